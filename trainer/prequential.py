"""Prequential (test-then-train) simulation of the streaming pipeline.

Events are taken in timestamp order (ties: input order).  Each event is first
predicted from its user's current state, then folded into the state with
``step`` -- the weights stay fixed between fine-tunes, exactly as in the
stream.  Events are processed in chunks of ``batch_events``; inside a chunk the
events of a user are applied in order (round r handles each user's r-th event
of the chunk), so chunking never changes the network's predictions.  It does
change the online part's (the served ``lstm``, and ``online``): the events of
one round read the movie side as it was before the round, so a larger chunk
sees fewer of its own increments -- ML-100K, served ``lstm``, seed 0 (issue #22): 0.9214
at 1024 events per chunk, 0.9216 at 1 (the worker's batch plays this role).

Every ``finetune_every`` events (plus ``warmup`` geometric early points,
``N/8, N/4, N/2``, so the first period is not served by an untrained model --
:func:`finetune_points`) the model is fine-tuned (warm start, ``epochs``
epochs, no hold-out) on all events seen so far, and the users' states are then
brought in line with the new weights by :func:`refresh_states`, which
implements the state-after-swap policies:

* ``"window"`` (default, what the stream does): every state is re-derived from
  its stored window of the last W events (:func:`models.state.rederive`, the
  same function the worker calls for rows whose version is stale);
* ``"replay"``: a full pass of each user's whole seen history through the new
  weights (exact, but needs the history -- the stream does not keep it);
* ``"keep"``: states stay as computed by the old weights.

Measured on ML-100K (fine-tune every 5000 + warm-up, 2 epochs, seed 0), RMSE:

    policy   lstm (default hparams)   mf (k=10, before the feature-bias prior)
    window   0.9475                   0.9608
    replay   0.9481                   0.9627
    keep     0.9487                   0.9640

Full re-replay does not beat the window re-derive (differences are within
seed noise, ~0.003), so the stream's policy -- re-derive stale rows from the
W=32 window -- loses nothing measurable here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.settings import FINETUNE_EPOCHS
from models import state as mstate
from models.base import RatingModel, State
from trainer.stream_order import occurrence_rank, padded as _padded, step_online_events, stream_order
from trainer.train import fit, make_model, replay_states

POLICIES = ("window", "replay", "keep")


@dataclass
class PrequentialResult:
    model: str
    rmse: float
    mae: float
    n: int
    rolling: np.ndarray  # rolling RMSE after each event (window ``rolling_window``)
    predictions: np.ndarray  # float32, in stream (time) order
    seconds: float = 0.0
    finetunes: int = 0
    policy: str = "window"
    finetune_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rmse": self.rmse, "mae": self.mae, "n": self.n, "seconds": round(self.seconds, 2),
                "finetunes": self.finetunes, "policy": self.policy}


def finetune_points(n: int, every: int, warmup: int = 3) -> list[int]:
    """Event counts after which to fine-tune: ``every, 2*every, ...`` below ``n``,
    preceded by ``warmup`` geometric early ones (every/2^warmup, ..., every/2) so
    the model is not left untrained for the whole first period."""
    if not every:
        return []
    early = [every >> k for k in range(warmup, 0, -1) if (every >> k) >= 50]
    return [p for p in early + list(range(every, n, every)) if 0 < p < n]


def stretch_cuts(n: int, every: int, bootstrap: int = 0, warmup: int = 3) -> list[int]:
    """The fine-tune points of :func:`run_prequential` (after a ``bootstrap``:
    every ``every`` events after it, no warm-up points).  The online batches
    restart at each, so a peer that wants the same batches cuts there too."""
    if bootstrap > 0:
        return [bootstrap + p for p in range(every, n - bootstrap, every)] if every else []
    return finetune_points(n, every, warmup)


def rolling_rmse(err: np.ndarray, window: int) -> np.ndarray:
    sq = np.asarray(err, dtype=np.float64) ** 2
    c = np.cumsum(np.r_[0.0, sq])
    n = np.arange(1, len(sq) + 1)
    lo = np.maximum(n - window, 0)
    return np.sqrt((c[n] - c[lo]) / (n - lo)).astype(np.float32)


def _result(name: str, y: np.ndarray, p: np.ndarray, window: int, **kw: Any) -> PrequentialResult:
    err = p - y
    n = len(y)
    return PrequentialResult(
        model=name,
        rmse=float(np.sqrt(np.mean(err**2))) if n else math.nan,
        mae=float(np.mean(np.abs(err))) if n else math.nan,
        n=n,
        rolling=rolling_rmse(err, window) if n else np.zeros(0, np.float32),
        predictions=p.astype(np.float32),
        **kw,
    )


@torch.no_grad()
def step_events(
    model: RatingModel, states: State, uidx: np.ndarray, movie: np.ndarray, rating: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """Predict-then-learn a chunk of events (rows ``uidx`` of ``states``)."""
    dev = model.device
    preds = np.empty(len(uidx), dtype=np.float32)
    rank = occurrence_rank(uidx)
    mv, rt, tt = (torch.tensor(a, device=dev) for a in (movie, rating.astype(np.float32), ts))
    for r in range(int(rank.max()) + 1 if len(rank) else 0):
        ev = np.nonzero(rank == r)[0]
        e = torch.from_numpy(ev).to(dev)
        u = torch.from_numpy(uidx[ev]).to(dev)
        sub, p = model.step(mstate.select(states, u), mv[e], rt[e], tt[e])
        mstate.scatter(states, u, sub)
        preds[ev] = p.float().cpu().numpy()
    return preds


def _online(model: RatingModel) -> bool:
    return model.movie_side() is not None


@torch.no_grad()
def online_events(
    model: RatingModel, states: State, uidx: np.ndarray, movie: np.ndarray, rating: np.ndarray, ts: np.ndarray,
    batch_events: int = 1024,
) -> np.ndarray:
    """The online half of the served ``lstm`` over a stretch of the stream, as
    a worker runs it: batches of ``batch_events``, each through
    ``model.online_batch`` (the online half of :func:`models.batch.learn_batch`:
    rounds of distinct users, each round's movie-side increments merged before
    the next).  Updates the ``on_*`` rows of ``states`` (``last_ts``/``count``
    are the network's to advance); returns the clamped online predictions."""
    work = {k: v for k, v in states.items() if k.startswith("on_")}
    work["last_ts"], work["count"] = states["last_ts"].clone(), states["count"].clone()
    preds = np.empty(len(uidx), dtype=np.float32)
    for s in range(0, len(uidx), batch_events):
        e = min(len(uidx), s + batch_events)
        users, row, (mv, rt, tt, mask) = _padded(model, uidx[s:e], movie[s:e], rating[s:e], ts[s:e])
        u = torch.from_numpy(users).to(model.device)
        p, user, _ = model.online_batch(mstate.select(work, u), mv, rt, tt, mask)  # type: ignore[attr-defined]
        for k, v in user.items():
            work[k][u] = v
        last = tt[torch.arange(len(u), device=tt.device), mask.sum(1) - 1]
        work["last_ts"][u] = last.to(work["last_ts"].dtype)
        work["count"][u] += mask.sum(1).to(work["count"].dtype)
        preds[s:e] = p.cpu().numpy()[row, occurrence_rank(uidx[s:e])]
    return preds


@torch.no_grad()
def blend_events(model: RatingModel, net: np.ndarray, on: np.ndarray, rating: np.ndarray,
                 batch_events: int = 1024) -> np.ndarray:
    """The served prediction of a stretch from its network and online halves,
    in the batches :func:`online_events` ran: each batch is blended at the
    network's share as it stands, then the share learns from the batch
    (``model.learn_blend``), as a worker's ``learn_batch`` does."""
    out = np.empty(len(net), dtype=np.float32)
    for s in range(0, len(net), batch_events):
        e = min(len(net), s + batch_events)
        p, _ = model.learn_blend(*(torch.from_numpy(np.array(a[s:e], np.float32)).to(model.device)  # type: ignore[attr-defined]
                                   for a in (net, on, rating)))
        out[s:e] = p.float().cpu().numpy()
    return out


@torch.no_grad()
def sequence_events(
    model: RatingModel, states: State, uidx: np.ndarray, movie: np.ndarray, rating: np.ndarray, ts: np.ndarray,
    batch_users: int = 256,
) -> np.ndarray:
    """Same as :func:`step_events` (the equivalence property guarantees it),
    but each user's events of the chunk go through one ``forward_sequence``
    starting from the user's state -- much faster for long chunks."""
    from trainer.sequences import build_sequences, iterate

    dev = model.device
    frame = pd.DataFrame({"user_id": uidx, "movie_id": movie, "rating": rating, "ts": np.arange(len(uidx))})
    seqs = build_sequences(frame)
    seqs.ts = ts[seqs.row]  # real timestamps, in each user's (stream) order
    preds = np.empty(len(uidx), dtype=np.float32)
    for b in iterate(seqs, batch_users, dev, max_events=1 << 17):
        u = torch.from_numpy(seqs.users[b.idx]).to(dev)
        pred, fin = model.forward_sequence(b.movie, b.rating, b.ts, b.mask,
                                           state=mstate.select(states, u), return_state=True)
        mstate.scatter(states, u, fin)
        m = b.mask.cpu().numpy()
        preds[b.row[m]] = pred.float().cpu().numpy()[m]
    return preds


def refresh_states(
    model: RatingModel, states: State, seen: pd.DataFrame, user_index: dict[int, int], policy: str
) -> State:
    """Bring states in line with new weights (see the module docstring)."""
    if policy == "keep" or len(seen) == 0:
        return states
    if policy == "window":
        active = torch.nonzero(states["count"] > 0).flatten()
        if active.numel():
            sub = mstate.select(states, active)
            stale = torch.ones(len(active), dtype=torch.bool, device=active.device)
            mstate.scatter(states, active, model.rederive(sub, stale))  # keeps what the model says is kept
        return states
    if policy == "replay":
        users, fresh = replay_states(model, seen)
        idx = torch.tensor([user_index[int(u)] for u in users], dtype=torch.int64, device=model.device)
        kept = {k: states[k][idx].clone() for k in states if k.startswith("on_")}  # weight-independent
        fresh.update(kept)
        return mstate.scatter(states, idx, fresh)
    raise ValueError(f"unknown state policy {policy!r}; use one of {POLICIES}")


def run_prequential(
    model_name: str,
    ratings: pd.DataFrame,
    movies: pd.DataFrame | None = None,
    *,
    finetune_every: int = 5000,
    epochs: int = FINETUNE_EPOCHS,
    seed: int = 0,
    batch_events: int = 1024,
    genre_vocab: list[str] | None = None,
    hparams: dict[str, Any] | None = None,
    policy: str = "window",
    lr: float | None = None,
    l2: float | None = None,
    batch_users: int = 64,
    rolling_window: int = 2000,
    device: str = "cpu",
    progress: bool = False,
    mode: str = "sequence",
    warmup: int = 3,
    bootstrap_frac: float = 0.0,
    bootstrap_epochs: int = 8,
    users: pd.DataFrame | None = None,
) -> PrequentialResult:
    """Test-then-train over ``ratings`` with periodic warm-start fine-tuning.

    ``mode="step"`` runs every event through ``step`` (chunks of
    ``batch_events``, rounds by per-user rank) exactly as the worker does;
    ``mode="sequence"`` gives the same predictions through ``forward_sequence``
    from the current states, one chunk per fine-tune period, and is faster.

    ``bootstrap_frac > 0`` is the demo protocol: the model is first trained
    offline on that share of the events (``bootstrap_epochs``, early stopping
    on the last 10%, as ``fbp demo`` does), the bootstrap users' states are
    derived from their histories, and only the remaining events are streamed
    (fine-tunes every ``finetune_every`` events after the cut, no warm-up
    points) and scored."""
    from tqdm.auto import tqdm

    if policy not in POLICIES:
        raise ValueError(f"unknown state policy {policy!r}; use one of {POLICIES}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    df = stream_order(ratings)
    user_info = users  # side features (the name is reused below for the id column)
    model = make_model(model_name, movies, genre_vocab, int(df["movie_id"].max()) if len(df) else 0,
                       users=user_info, **(hparams or {}))
    # the vocabulary grows as the stream runs: start with the movies known up front
    model.to(device)
    model.eval()
    users = df["user_id"].to_numpy(np.int64)
    uniq = np.unique(users)
    user_index = {int(u): i for i, u in enumerate(uniq)}
    uidx = np.searchsorted(uniq, users)
    movie = df["movie_id"].to_numpy(np.int64)
    rating = df["rating"].to_numpy(np.float32)
    ts = df["ts"].to_numpy(np.int64)
    states = model.init_state(len(uniq), model.device)
    online = _online(model)
    #: a model whose network has no share (``online``) is neither fine-tuned nor run
    trains = model.network_weight > 0
    # sequence mode, online lstm: the network's and the online part's predictions, for the blend ablation
    parts = (np.full(len(df), np.nan, np.float32), np.full(len(df), np.nan, np.float32))
    if online and "on_g" in states and states["on_g"].shape[1]:
        from models.online import user_feature_matrix

        table, _ = user_feature_matrix(user_info, int(uniq.max()))
        states["on_g"].copy_(table[torch.from_numpy(uniq)].to(model.device))

    def advance(lo: int, hi: int, scored: bool = True) -> None:
        """Predict-then-learn events [lo, hi): the worker's path."""
        a = (uidx[lo:hi], movie[lo:hi], rating[lo:hi], ts[lo:hi])
        model.ensure_capacity(int(movie[lo:hi].max()))
        if mode == "step":
            for s in range(lo, hi, batch_events):
                e = min(hi, s + batch_events)
                b = (uidx[s:e], movie[s:e], rating[s:e], ts[s:e])
                preds[s:e] = step_online_events(model, states, *b) if online else step_events(model, states, *b)
            return
        if not online:
            preds[lo:hi] = sequence_events(model, states, *a)
            return
        # the two halves are independent: online rounds first (they read the
        # pre-stretch last_ts/count), then the network over the whole stretch
        on = online_events(model, states, *a, batch_events=batch_events)
        if not trains:  # the network has no share: its prediction would be multiplied by 0
            net = np.zeros_like(on)
            _advance_counters(states, *a)
        else:
            with model.network_only():  # type: ignore[attr-defined]
                net = sequence_events(model, states, *a)
        preds[lo:hi] = blend_events(model, net, on, rating[lo:hi], batch_events)
        parts[0][lo:hi], parts[1][lo:hi] = net, on
    preds = np.empty(len(df), dtype=np.float32)
    n = len(df)
    finetunes, ft_s = 0, 0.0
    bar = tqdm(total=n, desc=f"prequential {model_name}", disable=not progress, unit="ev")
    pos = 0
    # without a network the points only cut the stream into the same stretches
    # (the online batches restart at each), so ``online`` equals the lstm's online half
    points = stretch_cuts(n, finetune_every, 0, warmup)
    if bootstrap_frac > 0:
        pos = int(n * bootstrap_frac)
        points = stretch_cuts(n, finetune_every, pos, warmup)
        boot = df.iloc[:pos]
        if online:  # the online part learns the bootstrap once, as River does
            online_events(model, states, uidx[:pos], movie[:pos], rating[:pos], ts[:pos], batch_events)
        if not trains:
            _advance_counters(states, uidx[:pos], movie[:pos], rating[:pos], ts[:pos])
            bar.update(pos)
    if bootstrap_frac > 0 and trains:
        fit(model, boot, epochs=bootstrap_epochs, lr=lr, l2=l2, batch_users=batch_users, device=device,
            valid_frac=0.1, seed=seed, progress=False)
        model.eval()
        with _network_only(model):
            refresh_states(model, states, boot, user_index, "replay")
        bar.update(pos)
    start = pos
    while pos < n:
        seg_end = next((p for p in points if p > pos), n)
        advance(pos, seg_end)
        bar.update(seg_end - pos)
        pos = seg_end
        if pos in points and trains:
            t1 = time.perf_counter()
            seen = df.iloc[:pos]
            fit(model, seen, epochs=epochs, lr=lr, l2=l2, batch_users=batch_users, device=device,
                valid_frac=0.0, seed=seed + finetunes, progress=False)
            model.eval()
            with _network_only(model):
                refresh_states(model, states, seen, user_index, policy)
            finetunes += 1
            ft_s += time.perf_counter() - t1
    bar.close()
    res = _result(model_name, rating[start:], preds[start:], rolling_window, seconds=time.perf_counter() - t0,
                  finetunes=finetunes, policy=policy, finetune_seconds=ft_s)
    if online and mode == "sequence":
        res.extra.update(network=parts[0][start:], online=parts[1][start:])
    if online and trains:
        res.extra["final_network_weight"] = float(model.network_share)  # type: ignore[attr-defined]
    return res


RIVER_MODELS = ("river-biasedmf", "river-baseline")


def _advance_counters(states: State, uidx: np.ndarray, movie: np.ndarray, rating: np.ndarray, ts: np.ndarray) -> None:
    """``last_ts``/``count`` after a stretch whose network pass was skipped
    (the online part reads them; the network's pass would have advanced them)."""
    dev = states["count"].device
    rows = torch.from_numpy(np.ascontiguousarray(uidx, np.int64)).to(dev)
    states["count"].index_add_(0, rows, torch.ones(len(uidx), dtype=states["count"].dtype, device=dev))
    last = pd.Series(ts).groupby(uidx).last()
    who = torch.tensor(last.index.to_numpy(np.int64), device=dev)
    states["last_ts"][who] = torch.tensor(last.to_numpy(np.int64), device=dev).to(states["last_ts"].dtype)


def _network_only(model: RatingModel) -> Any:
    from contextlib import nullcontext

    return model.network_only() if _online(model) else nullcontext()  # type: ignore[attr-defined]


def run_river_prequential(ratings: pd.DataFrame, *, rolling_window: int = 2000, seed: int = 73,
                          kind: str = "river-biasedmf", bootstrap: int = 0) -> PrequentialResult:
    """A River peer (``river-biasedmf``: the configuration of River's MovieLens
    example; ``river-baseline``: biases only, SGD 0.025), users/items as
    strings.  The first ``bootstrap`` events (stream order) are learned once,
    the rest predicted then learned and scored.  Predictions are clamped to
    the rating range, as the project's are."""
    t0 = time.perf_counter()
    model = river_biasedmf(seed) if kind == "river-biasedmf" else river_baseline()
    df = stream_order(ratings)
    u_s, m_s, y = df["user_id"].astype(str).to_numpy(), df["movie_id"].astype(str).to_numpy(), df["rating"].to_numpy()
    for i in range(min(bootstrap, len(df))):
        model.learn_one(u_s[i], m_s[i], float(y[i]))
    preds = np.empty(max(len(df) - bootstrap, 0), dtype=np.float32)
    for j, i in enumerate(range(bootstrap, len(df))):
        preds[j] = min(max(model.predict_one(u_s[i], m_s[i]), 1.0), 5.0)
        model.learn_one(u_s[i], m_s[i], float(y[i]))
    return _result(kind, y[bootstrap:].astype(np.float32), preds, rolling_window,
                   seconds=time.perf_counter() - t0, policy="online")


def river_baseline() -> Any:
    """River's ``Baseline`` (global mean + user and item biases), plain SGD 0.025."""
    from river import optim, reco

    return reco.Baseline(optimizer=optim.SGD(0.025), l2=0.0, initializer=optim.initializers.Zeros())


def river_biasedmf(seed: int = 73) -> Any:
    from river import optim, reco

    return reco.BiasedMF(
        n_factors=10,
        bias_optimizer=optim.SGD(0.025),
        latent_optimizer=optim.SGD(0.05),
        weight_initializer=optim.initializers.Zeros(),
        latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
        l2_bias=0.0,
        l2_latent=0.0,
    )
