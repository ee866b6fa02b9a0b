"""The served ``lstm`` with each adaptive piece taken out, in one run
(issue #22): what the mixture, the genre biases, the neighbourhood, the
learned share, the shared movie side and the network each earn, River
beside them.

Every row is :func:`trainer.prequential.run_prequential` of the served
family with one hyper-parameter changed (the same events, fine-tune points
and seed); "network alone" is the served run's own network half.
``python -m trainer.served_ablation DATA PATH [SEEDS]`` prints the table and
writes ``PATH`` (JSON: ``rows`` name -> ``rmse``, ``rmse_std``, ``per_seed``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.datasets import load_dataset
from models.mixture import MEMBERS
from trainer.prequential import run_prequential, run_river_prequential, stream_order

#: row -> (family, hyper-parameters changed from the served defaults)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "served lstm": ("lstm", {}),
    "online part alone (online)": ("online", {}),
    "one learner instead of the mixture": ("lstm", {"online_members": [[10.0, 1.0]]}),
    "no genre biases": ("lstm", {"user_genre": False}),
    "fixed share 0.2 instead of learned": ("lstm", {"online_weight": 0.8}),
    "one shared movie side": ("lstm", {"movie_side_owners": 1}),
    "each member its own movie side": ("lstm", {"movie_side_owners": len(MEMBERS)}),
    "no neighbourhood": ("lstm", {"neighbours": False}),
    "issue #12 online part (one learner, no genre biases) alone": (
        "online", {"online_members": [[10.0, 1.0]], "user_genre": False, "neighbours": False}),
}


def _rmse(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((p.astype(np.float64) - y) ** 2)))


def run(data: str, seeds: int = 1) -> dict[str, Any]:
    ds = load_dataset(data)
    df = stream_order(ds.ratings)
    y = df["rating"].to_numpy(np.float64)
    kw = dict(genre_vocab=ds.genre_vocab, users=ds.users)
    per: dict[str, list[float]] = {}
    for seed in range(seeds):
        for name, (family, hp) in VARIANTS.items():
            r = run_prequential(family, df, ds.movies, hparams=hp, seed=seed, **kw)
            per.setdefault(name, []).append(r.rmse)
            if name == "served lstm":
                per.setdefault("network alone", []).append(_rmse(r.extra["network"], y))
            print(f"  {data} seed {seed} {name}: {r.rmse:.4f}", flush=True)
        per.setdefault("river-biasedmf", []).append(run_river_prequential(df, seed=73 + seed).rmse)
    rows = {k: {"rmse": float(np.mean(v)), "rmse_std": float(np.std(v)), "per_seed": v} for k, v in per.items()}
    return {"data": ds.name, "n": len(df), "seeds": list(range(seeds)), "protocol": "prequential", "rows": rows}


def table(doc: dict[str, Any]) -> str:
    served = doc["rows"]["served lstm"]["rmse"]
    out = [f"{doc['data']} ({doc['n']:,} events, seeds {doc['seeds']})", "| row | RMSE | vs served |", "|---|---|---|"]
    for name, r in doc["rows"].items():
        out.append(f"| {name} | {r['rmse']:.4f} ± {r['rmse_std']:.4f} | {r['rmse'] - served:+.4f} |")
    return "\n".join(out)


if __name__ == "__main__":
    doc = run(sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    print(table(doc))
    Path(sys.argv[2]).write_text(json.dumps(doc, indent=2))
