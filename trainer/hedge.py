"""``online-hedge`` (simulator only): settings that adapt to the stream, by a
Hedge-style mixture of online learners.

Why: the online part's session time constant and AdaGrad rates are constants
chosen on ML-100K's first half; a stream with other habits gets ML-100K's
choices.  Here K copies of the online learner of :mod:`models.online` run side
by side, one per (session tau x rate scale), each predict-then-learn on every
event exactly as :func:`trainer.ablations.run_online` runs it (batches of
``batch_events``, rounds of distinct users, increments merged per round).
Their clamped predictions are combined per event::

    w_k  ∝  exp(-eta_g * Lg_k) * exp(-eta_u * Lu_k)

* ``Lg_k``: the global discounted squared error of learner k
  (``Lg = gamma_g * Lg + e^2`` per event), updated after each batch -- the
  way a shared, mergeable vector would be updated by every worker;
* ``Lu_k``: the user's own discounted squared error (``gamma_u``), updated
  after each of the user's ratings is revealed; a user with no history has
  ``Lu = 0`` and falls back to the global weights.

Nothing looks ahead: event i is predicted from errors of events revealed
before it (the global part: before its batch).  The learners do not see the
mixture, so their predictions are computed once and the mixture is one
compiled pass (:func:`mix`), which makes choosing ``eta_*``/``gamma_*`` on
the first half of a stream cheap (:func:`choose`).

The served ``lstm`` runs the same mixture over five members (the five taus
at rates x1, :mod:`models.mixture`), with the shared weights updated after
each round instead of each batch; this simulator keeps the fifteen-member
pool and the grid its settings were chosen on.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.mixture import BLEND_LR, HedgeConfig, blend_step, hedge, member_configs
from models.online import OnlineConfig, OnlineLearner
from trainer.prequential import PrequentialResult, _result, occurrence_rank, stream_order

#: the members: session time constants (s) x scales of the AdaGrad rates
TAUS = (5.0, 10.0, 30.0, 120.0, 600.0)
RATE_SCALES = (0.5, 1.0, 2.0)


def members(base: OnlineConfig | None = None, taus=TAUS, scales=RATE_SCALES) -> list[OnlineConfig]:
    """One learner per (tau, rate scale); the scale multiplies the bias,
    factor and feature AdaGrad rates."""
    return member_configs(base or OnlineConfig(), [(t, s) for t in taus for s in scales])


def batch_starts(n: int, batch_events: int = 1024, cuts: list[int] | tuple[int, ...] = ()) -> np.ndarray:
    """Where each batch starts (and ``n`` at the end): batches of
    ``batch_events`` that restart at every cut, as the simulator's stretches
    between fine-tune points do (:func:`trainer.prequential.run_prequential`),
    so the mixture sees the batches the served model sees."""
    edges = sorted({0, n, *[c for c in cuts if 0 < c < n]})
    out = [s for a, b in zip(edges, edges[1:]) for s in range(a, b, batch_events)]
    return np.asarray(out + [n], np.int64)


def member_predictions(ds: Any, df: pd.DataFrame, cfgs: list[OnlineConfig], starts: np.ndarray | None = None
                       ) -> np.ndarray:
    """[n, K] clamped predict-then-learn predictions of each member over ``df``
    (stream order), each run as :func:`trainer.ablations.run_online` runs one,
    in the batches ``starts`` (:func:`batch_starts`; default 1024 events)."""
    from trainer.ablations import learner_inputs

    mfeat, ufeat, uidx = learner_inputs(ds, df)
    col = {c: torch.from_numpy(df[c].to_numpy(np.int64).copy()) for c in ("user_id", "movie_id", "ts")}
    y = torch.from_numpy(df["rating"].to_numpy(np.float32).copy())
    ui = torch.from_numpy(uidx)
    n_users = int(uidx.max()) + 1 if len(uidx) else 0
    starts = batch_starts(len(df)) if starts is None else starts
    out = np.empty((len(df), len(cfgs)), np.float32)
    for k, cfg in enumerate(cfgs):
        learner = OnlineLearner(cfg, mfeat, ufeat, n_users)
        for s, t in zip(starts[:-1], starts[1:]):
            e = slice(int(s), int(t))
            out[e, k] = learner.process(ui[e], col["user_id"][e], col["movie_id"][e], y[e], col["ts"][e],
                                        occurrence_rank(uidx[e])).numpy()
    return out


def mix(P: np.ndarray, y: np.ndarray, uidx: np.ndarray, hc: HedgeConfig, starts: np.ndarray | None = None
        ) -> np.ndarray:
    """The mixture's prediction of every event (see the module docstring),
    the shared weights updated after each batch of ``starts``: the served
    kernel (:func:`models.mixture.hedge`) with each batch as one round."""
    n_users = int(uidx.max()) + 1 if len(uidx) else 0
    starts = batch_starts(len(y)) if starts is None else starts
    K = P.shape[1]
    return hedge(P, y, uidx, starts, np.zeros((n_users, K)), np.zeros(K), hc)


def _rmse(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((p.astype(np.float64) - y) ** 2)))


def learned_blend(net: np.ndarray, base: np.ndarray, y: np.ndarray, starts: np.ndarray, lr: float = BLEND_LR
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A learned share ``w`` for the network on top of ``base``, as the
    served model learns it (:func:`models.mixture.blend_step`): ``w`` starts
    at 0 and takes one step after each batch of ``starts``.  Returns
    (predictions, ``w`` used for each event)."""
    out, used, w = np.empty(len(y), np.float32), np.empty(len(y), np.float32), 0.0
    for s, e in zip(starts[:-1], starts[1:]):
        used[s:e] = w
        out[s:e], w = blend_step(net[s:e], base[s:e].astype(np.float64), y[s:e], w, 1.0, 5.0, lr)
    return out, used


#: the grid :func:`choose` searches
GRID = {"eta_g": (0.001, 0.003, 0.01, 0.03, 0.1), "gamma_g": (0.99, 0.999, 0.9999),
        "eta_u": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0), "gamma_u": (0.9, 0.95, 0.99, 0.995, 0.999)}


def choose(P: np.ndarray, y: np.ndarray, uidx: np.ndarray, grid: dict = GRID, starts: np.ndarray | None = None
           ) -> tuple[HedgeConfig, list]:
    """The grid point with the lowest mixture RMSE on these events (call it
    on a tuning slice only), and every point's RMSE."""
    rows = []
    for vals in itertools.product(*grid.values()):
        hc = HedgeConfig(**dict(zip(grid, vals)))
        rows.append((_rmse(mix(P, y, uidx, hc, starts), y), hc))
    rows.sort(key=lambda r: r[0])
    return rows[0][1], rows


def run_hedge_prequential(ds: Any, ratings: pd.DataFrame | None = None, *, hc: HedgeConfig | None = None,
                          bootstrap: int = 0, batch_events: int = 1024, cuts: list[int] | tuple[int, ...] = (),
                          rolling_window: int = 2000) -> PrequentialResult:
    """``online-hedge`` over ``ratings`` (default: the data set's) in stream
    order: the first ``bootstrap`` events are learned (members and weights),
    the rest predicted then learned and scored; batches restart at ``cuts``
    (the served model's fine-tune points).  ``extra``: each member's
    predictions and RMSE, and the best single member in hindsight."""
    t0 = time.perf_counter()
    df = stream_order(ds.ratings if ratings is None else ratings)
    cfgs = members()
    starts = batch_starts(len(df), batch_events, [bootstrap, *cuts])
    P = member_predictions(ds, df, cfgs, starts)
    y = df["rating"].to_numpy(np.float64)
    uidx = np.unique(df["user_id"].to_numpy(np.int64), return_inverse=True)[1]
    p = mix(P, y, uidx, hc or HedgeConfig(), starts)
    r = _result("online-hedge", y[bootstrap:].astype(np.float32), p[bootstrap:], rolling_window,
                seconds=time.perf_counter() - t0, policy="online")
    each = [_rmse(P[bootstrap:, k], y[bootstrap:]) for k in range(len(cfgs))]
    best = int(np.argmin(each))
    r.extra.update(members=P[bootstrap:], member_rmse=each, ratings=y[bootstrap:].astype(np.float32),
                   starts=starts[starts >= bootstrap] - bootstrap,
                   best_member={"tau_s": cfgs[best].tau_s, "rate_scale": cfgs[best].lr_bias / OnlineConfig().lr_bias,
                                "rmse": each[best]})
    return r


def tune(data: str = "ml-100k", frac: float = 0.5, finetune_every: int = 5000, batch_events: int = 1024
         ) -> dict[str, Any]:
    """Choose the mixture settings on the first ``frac`` of ``data`` by time
    (batches cut at the served model's fine-tune points), as the defaults were."""
    from core.datasets import load_dataset
    from trainer.prequential import stretch_cuts

    ds = load_dataset(data)
    df = stream_order(ds.ratings)
    df = df.iloc[: int(len(df) * frac)].reset_index(drop=True)
    starts = batch_starts(len(df), batch_events, stretch_cuts(len(df), finetune_every))
    cfgs = members()
    P = member_predictions(ds, df, cfgs, starts)
    y = df["rating"].to_numpy(np.float64)
    uidx = np.unique(df["user_id"].to_numpy(np.int64), return_inverse=True)[1]
    best, rows = choose(P, y, uidx, starts=starts)

    def best_where(pred) -> dict[str, Any]:
        r, hc = min(((r, hc) for r, hc in rows if pred(hc)), key=lambda t: t[0])
        return {"rmse": r, **hc.to_dict()}

    return {"data": data, "slice": f"first {frac:.0%} by time", "n": len(df), "chosen": best.to_dict(),
            "rmse": rows[0][0],
            "members": {f"tau {c.tau_s:g} x rates {c.lr_bias / OnlineConfig().lr_bias:g}": _rmse(P[:, k], y)
                        for k, c in enumerate(cfgs)},
            "global weights only": best_where(lambda hc: hc.eta_u == 0),
            "top 5": [{"rmse": r, **hc.to_dict()} for r, hc in rows[:5]]}


if __name__ == "__main__":
    import json
    import sys

    doc = tune()
    print(json.dumps(doc, indent=2))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(doc, indent=2))
