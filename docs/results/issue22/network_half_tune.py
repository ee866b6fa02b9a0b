"""The network half's hand-chosen settings re-chosen on ML-100K's first half
by time and checked on a synthetic stream (issue #22, part 4): the served
lstm, prequential, seeds 0 and 1, one run per setting JSON given (keys:
``finetune_every``, ``epochs``, ``lr``, ``l2``, ``batch_users``, and model
hparams under ``hparams``), each from the defaults of the code it runs on.
DATA is ``ml-100k-first-half`` or any ``load_dataset`` source (whole stream).

``python docs/results/issue22/network_half_tune.py OUT.json DATA '{}' '{"l2": 1e-2}' ...``
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from core.datasets import load_dataset
from trainer.prequential import run_prequential, stream_order


FIRST_HALF = "ml-100k-first-half"


def _stream(data: str):
    ds = load_dataset("ml-100k" if data == FIRST_HALF else data)
    df = stream_order(ds.ratings)
    return ds, df.iloc[: len(df) // 2].reset_index(drop=True) if data == FIRST_HALF else df


def _one(args: tuple[str, str, int]) -> dict:
    data, setting, seed = args[0], json.loads(args[1]), args[2]
    torch.set_num_threads(1)
    ds, df = _stream(data)
    kw = {k: v for k, v in setting.items() if k != "hparams"}
    r = run_prequential("lstm", df, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users,
                        hparams=setting.get("hparams"), seed=seed, **kw)
    y = df["rating"].to_numpy(np.float64)
    net_rmse = float(np.sqrt(np.mean((r.extra["network"] - y) ** 2)))
    on_rmse = float(np.sqrt(np.mean((r.extra["online"] - y) ** 2)))
    return {"setting": setting, "seed": seed, "rmse": r.rmse, "online": on_rmse, "network_alone": net_rmse,
            "share": on_rmse - r.rmse, "final_share": r.extra["final_network_weight"]}


def main(out: str, data: str, grid: list[str]) -> None:
    jobs = [(data, g, s) for g in grid for s in (0, 1)]
    with ProcessPoolExecutor(2) as ex:
        runs = list(ex.map(_one, jobs))
    rows = []
    for g in grid:
        rs = [r for r in runs if r["setting"] == json.loads(g)]
        row = {"setting": json.loads(g), "rmse": [round(r["rmse"], 5) for r in rs],
               "mean": round(float(np.mean([r["rmse"] for r in rs])), 5),
               "share": round(float(np.mean([r["share"] for r in rs])), 5),
               "network_alone": round(float(np.mean([r["network_alone"] for r in rs])), 4)}
        rows.append(row)
        print(row, flush=True)
    with open(out, "w") as f:
        json.dump({"data": data, "seeds": [0, 1], "rows": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or ["{}"])
