"""The network's size on ML-100K's first half by time (issue #22): the served
lstm, prequential, seeds 0 and 1, one run per hparams JSON given.

``python docs/results/issue22/network_size.py '{"hidden": 64}' '{"k": 8}' ...``
"""

from __future__ import annotations

import json
import sys

import numpy as np

from core.datasets import load_dataset
from trainer.prequential import run_prequential, stream_order


def main(grid: list[dict]) -> None:
    ds = load_dataset("ml-100k")
    df = stream_order(ds.ratings)
    df = df.iloc[: len(df) // 2].reset_index(drop=True)
    for hp in grid:
        rs = [run_prequential("lstm", df, ds.movies, genre_vocab=ds.genre_vocab, hparams=hp, seed=s) for s in (0, 1)]
        print(hp, [round(r.rmse, 5) for r in rs], "mean", round(float(np.mean([r.rmse for r in rs])), 5),
              "final share", [round(r.extra["final_network_weight"], 3) for r in rs], flush=True)


if __name__ == "__main__":
    main([json.loads(a) for a in sys.argv[1:]] or [{}])
