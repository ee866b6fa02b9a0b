"""What the fixed rating floor of 1.0 costs on a half-star file (issue #22):
the online part alone, prequential; how many predictions sit at the floor,
what those events were rated, and the RMSE if 0.75 were predicted there.

``python docs/results/issue22/rating_floor.py PATH`` (a MovieLens folder or file)
"""

from __future__ import annotations

import sys

import numpy as np

from core.datasets import load_dataset
from trainer.prequential import run_prequential, stream_order


def main(path: str) -> None:
    ds = load_dataset(path)
    df = stream_order(ds.ratings)
    r = run_prequential("online", df, ds.movies, genre_vocab=ds.genre_vocab)
    p, y = r.predictions, df["rating"].to_numpy()[-len(r.predictions):]
    floor = p <= 1.0001
    lower = np.where(floor, 0.75, p)
    print(f"online RMSE {r.rmse:.4f}; at the floor: {floor.mean():.2%} of predictions, "
          f"their ratings average {y[floor].mean() if floor.any() else float('nan'):.2f}; "
          f"0.75 there instead: RMSE {float(np.sqrt(np.mean((lower - y) ** 2))):.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
