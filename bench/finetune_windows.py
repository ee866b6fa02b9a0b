"""How often a fine-tune beats its champion on the holdout, over many trigger
points of ML-100K: ``python -m bench.finetune_windows [BOOTSTRAP_EVENTS ...]``.

For each bootstrap size it trains the stream tests' bootstrap LSTM (1 epoch,
seed 0) on the first N events, then, for trigger points every 350 events from
2,500 to 20,000 events after event 10,000, builds the fine-tuning service's
split (10,000-event recent window, 10% holdout, half replay from older stream
events) and runs :func:`trainer.finetune.finetune` (1 epoch, the model's
default learning rate) against that bootstrap.  Prints the share of windows
where the challenger wins and the spread of the gain (champion RMSE minus
challenger RMSE).  Why: it says whether the hot-swap test's promotions are
signal or luck for a given bootstrap (README, Fine-tuning and hot swap).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

START, WINDOW = 10_000, 10_000


def _records(ratings, lo: int, hi: int) -> np.ndarray:
    from core.repos.buffer import REC

    df = ratings.iloc[lo:hi]
    rec = np.zeros(len(df), REC)
    rec["seq"] = np.arange(lo, hi)
    for field, col in (("user", "user_id"), ("movie", "movie_id"), ("rating", "rating"), ("ts", "ts")):
        rec[field] = df[col].to_numpy()
    return rec


def gains(bootstrap_events: int) -> np.ndarray:
    from core.datasets import load_dataset
    from trainer.finetune import finetune, split_for_finetune
    from trainer.train import fit, make_model

    ds = load_dataset("ml-100k")
    head = ds.ratings.iloc[:bootstrap_events]
    torch.manual_seed(0)  # as tests/streamkit.checkpoint, the stream tests' bootstrap
    boot = make_model("lstm", ds.movies, ds.genre_vocab, int(head["movie_id"].max()))
    fit(boot, head, epochs=1, device="cpu", valid_frac=0.0, seed=0, progress=False)
    boot.version = 1
    out = []
    for n in range(2_500, 20_001, 350):
        lo = START + max(0, n - WINDOW)
        split = split_for_finetune(_records(ds.ratings, lo, START + n), _records(ds.ratings, START, lo),
                                   holdout_fraction=0.1, replay_fraction=0.5, seed=n)
        out.append(finetune(boot, split, epochs=1, min_holdout=200, seed=n).decision.improvement)
    return np.array(out)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    for n in [int(a) for a in argv] or [2_000, 10_000]:
        g = gains(n)
        print(f"bootstrap {n} events: {len(g)} windows, challenger wins {np.mean(g > 0):.0%}, "
              f"median gain {np.median(g):+.4f}, min {g.min():+.4f}, max {g.max():+.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
