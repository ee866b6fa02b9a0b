"""How the served online part's hand-chosen settings were chosen (issue #22):
on the first half of ML-100K by time only, then frozen.

``python -m trainer.served_tune PATH`` prints and writes (JSON):

* ``members``: the Hedge mixture over three candidate member sets, each
  member with its own movie side as :func:`trainer.hedge.member_predictions`
  runs it (:data:`models.mixture.MEMBERS` is the seven);
* ``user_genre``: the genre biases on the seven's mixture over a grid of
  rate x l2 (:class:`models.mixture.UserGenreConfig`);
* ``neighbours``: the neighbourhood on the served online part's errors over
  a grid of k x shrink x lam at its budget (history 64, 256 slots x 16
  probes; :class:`models.neighbours.NeighbourConfig`), and the CPU its
  kernel took per event (``time.process_time``, one run); then the budget
  itself (history, slots, probes) at the chosen shrink x lam and the served
  k (every kept rating votes);
* ``movie_side``: the served online part (without the neighbourhood) with
  one shared movie side, with three owners (served) and with each member
  learning its own;
* ``owners``: how many members learn movie tables of their own
  (:data:`models.mixture.MOVIE_SIDE_OWNERS`), the online part with the
  neighbourhood on: one, then greedily the best second and third owner;
* ``share``: how the network's prediction is combined with the online
  part's, on the served lstm's own two halves (seed 0): the learned global
  share as served, and the best combinations in hindsight -- one global
  share, and one per bucket of the user's rating count or of the two
  halves' disagreement -- bounds on what a finer learned combination could
  add.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.datasets import load_dataset
from models.neighbours import NeighbourConfig
from models.mixture import MEMBERS, MOVIE_SIDE_OWNERS, HedgeConfig, UserGenreConfig, member_configs
from models.online import OnlineConfig
from trainer.diverse import _clip, stream_arrays
from trainer.hedge import RATE_SCALES, TAUS, batch_starts, member_predictions, mix
from trainer.learners import neighbourhood as nb
from trainer.learners import user_genre as ug
from trainer.prequential import run_prequential, stream_order, stretch_cuts
from trainer.stream_order import occurrence_rank

SETS = {"five taus at rates x1": [(t, 1.0) for t in TAUS], "seven (served)": list(MEMBERS),
        "fifteen (trainer.hedge.members)": [(t, s) for t in TAUS for s in RATE_SCALES]}


def _rmse(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(p, np.float64) - y) ** 2)))


def tune(frac: float = 0.5) -> dict[str, Any]:
    ds = load_dataset("ml-100k")
    df = stream_order(ds.ratings)
    df = df.iloc[: int(len(df) * frac)].reset_index(drop=True)
    a = stream_arrays(ds, df)
    y, starts = a["y"], batch_starts(len(df), 1024, stretch_cuts(len(df), 5000))
    mixes = {name: mix(member_predictions(ds, df, member_configs(OnlineConfig(), ms), starts), y, a["uidx"],
                       HedgeConfig(), starts) for name, ms in SETS.items()}
    base = mixes["seven (served)"].astype(np.float64)
    genre = sorted((_rmse(_clip(base + ug.corrections(base, y, a["uidx"], a["genres"], UserGenreConfig(lr=lr, l2=l2))), y),
                    lr, l2) for lr, l2 in itertools.product((0.02, 0.05, 0.1, 0.2), (0.0, 0.01, 0.05, 0.1)))
    served = run_prequential("online", df, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users, seed=0,
                             hparams={"neighbours": False}).predictions.astype(np.float64)

    def neighbourhood(**kw: Any) -> tuple[float, float]:
        """(RMSE of the served online part with it on top, CPU us per event)."""
        t0 = time.process_time()
        corr = nb.corrections(served, y, a["uidx"], a["movie"], nb.NeighbourhoodConfig(**kw))
        return _rmse(_clip(served + corr), y), (time.process_time() - t0) / len(y) * 1e6

    grid = sorted((rmse, k, shrink, lam, us) for k, shrink, lam in itertools.product(
        (20, 50, 100), (100.0, 200.0, 500.0, 1000.0), (0.5, 1.0, 2.0))
        for rmse, us in [neighbourhood(k=k, shrink=shrink, lam=lam, history=64, slots=256, probes=16)])
    _, _, shrink, lam, _ = grid[0]
    k = NeighbourConfig().k  # served: every kept rating votes (models.neighbours.NeighbourConfig says why)
    budget = [(history, slots, probes, *neighbourhood(k=k, shrink=shrink, lam=lam, history=history, slots=slots,
                                                      probes=probes))
              for history, slots, probes in ((16, 256, 16), (32, 256, 16), (64, 256, 16), (64, 128, 16), (64, 256, 8))]
    sides = {n: float(run_prequential("online", df, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users, seed=0,
                                      hparams={"movie_side_owners": n, "neighbours": False}).rmse)
             for n in (1, len(MEMBERS))}
    return {"slice": f"ML-100K, first {frac:.0%} by time", "n": len(df),
            "members": {name: _rmse(m, y) for name, m in mixes.items()},
            "user_genre": {"mixture of seven": _rmse(base, y),
                           "grid (rmse, lr, l2)": genre},
            "neighbours": {"served online part without it": _rmse(served, y),
                           "grid (rmse, k, shrink, lam, cpu us per event)": grid,
                           "budget (history, slots, probes, rmse, cpu us per event)": budget},
            "movie_side": {"one shared": sides[1], f"{MOVIE_SIDE_OWNERS} owners (served)": _rmse(served, y),
                           "each member its own": sides[len(MEMBERS)]},
            "owners": owners(ds, df),
            "share": share_bounds(ds, df, a["uidx"], y)}


def owners(ds: Any, df: Any) -> dict[str, Any]:
    """The online part with the first n members owning movie tables: member
    0 alone, then the best second of the other six, then the best third of
    the remaining five (each scored with the others reading member 0's)."""
    kw = dict(genre_vocab=ds.genre_vocab, users=ds.users, seed=0)

    def rmse(order: list, n: int) -> float:
        return float(run_prequential("online", df, ds.movies, hparams={
            "online_members": [list(m) for m in order], "movie_side_owners": n}, **kw).rmse)

    chosen, rest = [MEMBERS[0]], list(MEMBERS[1:])
    doc: dict[str, Any] = {"1 owner": rmse(chosen + rest, 1)}
    for n in range(2, MOVIE_SIDE_OWNERS + 1):
        tried = {str(list(c)): rmse(chosen + [c] + [m for m in rest if m != c], n) for c in rest}
        best = min(rest, key=lambda c: tried[str(list(c))])
        doc[f"{n} owners: each candidate"] = tried
        chosen, rest = chosen + [best], [m for m in rest if m != best]
    doc["chosen"] = [list(m) for m in chosen]
    return doc


def share_bounds(ds: Any, df: Any, uidx: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The served lstm's RMSE with its learned share, and in hindsight with
    the best single share and the best share per bucket (the user's rating
    count before the event, log2; the halves' disagreement |net - online|
    in steps of 0.1): what any finer combination of the same two halves
    could at most add."""
    r = run_prequential("lstm", df, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users, seed=0)
    net, on = (np.asarray(r.extra[k], np.float64) for k in ("network", "online"))
    dv, err = net - on, y - on
    count = occurrence_rank(uidx)  # the user's ratings before this one

    def best(key: np.ndarray) -> float:
        n = int(key.max()) + 1
        w = np.bincount(key, dv * err, n) / np.maximum(np.bincount(key, dv * dv, n), 1e-12)
        return _rmse(on + w[key] * dv, y)

    return {"online part alone": _rmse(on, y), "served (learned share)": float(r.rmse),
            "final learned share": float(r.extra["final_network_weight"]),
            "hindsight: best single share": best(np.zeros(len(y), np.int64)),
            "hindsight: best share per log2 rating count": best(np.minimum(np.log2(count + 1).astype(np.int64), 9)),
            "hindsight: best share per disagreement step": best(np.minimum((np.abs(dv) / 0.1).astype(np.int64), 9))}


if __name__ == "__main__":
    doc = tune()
    print(json.dumps({"members": doc["members"], "user_genre best": doc["user_genre"]["grid (rmse, lr, l2)"][:3],
                      "mixture of seven": doc["user_genre"]["mixture of seven"],
                      "neighbours best": doc["neighbours"]["grid (rmse, k, shrink, lam, cpu us per event)"][:3],
                      "without neighbours": doc["neighbours"]["served online part without it"],
                      "neighbour budget": doc["neighbours"]["budget (history, slots, probes, rmse, cpu us per event)"],
                      "movie_side": doc["movie_side"], "owners": doc["owners"], "share": doc["share"]}, indent=1))
    Path(sys.argv[1]).write_text(json.dumps(doc, indent=1))
