"""How the network's epochs per fine-tune were chosen (issue #22): the served
lstm on ML-100K's first half by time, prequential, at 2, 3, 4, 6 and 8 epochs,
seeds 0 and 1, with the online part alone beside it.

``python docs/results/issue22/network_epochs.py OUT.json``
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np

from core.datasets import load_dataset
from trainer.prequential import run_prequential, stream_order

EPOCHS = (2, 3, 4, 6, 8)
SEEDS = (0, 1)


def main(out: str) -> None:
    ds = load_dataset("ml-100k")
    df = stream_order(ds.ratings)
    df = df.iloc[: len(df) // 2].reset_index(drop=True)
    y = df["rating"].to_numpy(np.float64)
    doc = {"slice": "ML-100K, first 50% by time", "n": len(df),
           "online": run_prequential("online", df, ds.movies, genre_vocab=ds.genre_vocab).rmse, "runs": []}
    print(f"online part alone {doc['online']:.5f}")
    for ep, seed in itertools.product(EPOCHS, SEEDS):
        r = run_prequential("lstm", df, ds.movies, genre_vocab=ds.genre_vocab, seed=seed, epochs=ep)
        row = {"epochs": ep, "seed": seed, "rmse": r.rmse, "final_share": r.extra["final_network_weight"],
               "network_alone": float(np.sqrt(np.mean((r.extra["network"] - y) ** 2)))}
        doc["runs"].append(row)
        print(f"epochs {ep} seed {seed}: served {row['rmse']:.5f}  share {row['final_share']:.3f}  "
              f"network alone {row['network_alone']:.4f}", flush=True)
    doc["mean"] = {ep: float(np.mean([r["rmse"] for r in doc["runs"] if r["epochs"] == ep])) for ep in EPOCHS}
    print({k: round(v, 5) for k, v in doc["mean"].items()})
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
