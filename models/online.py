"""Online learning on both sides: a per-event biased MF with adaptive rates,
a session bias and side features, written as one pure function over tensors.

Why: issue #12 measured that a plain per-event SGD model (River's BiasedMF)
beat the fine-tuned networks, because they froze the movie side between
fine-tunes, averaged the user bias over the whole history and resolved no
time gap under minutes.  This module learns from *every* event on both sides:

    pred = mu + b_i + b_u + s_u * exp(-gap / tau) + w_m . f_i + w_u . g_u
           + (q_i + V f_i) . (p_u + U g_u)

* ``mu`` (running mean), ``b_i``, ``q_i`` (movie bias and factors) and the
  side-feature weights ``w_m, w_u, V, U`` are the **shared movie side**
  (:class:`MovieSide`).  :func:`online_round` never mutates it: it returns
  *increments* -- plain sums per movie row (and per feature weight) -- that
  any number of workers can add concurrently without losing an update
  (Redis ``HINCRBYFLOAT``, or ``index_add_`` here: :meth:`MovieSide.apply`).
  A movie's factor is ``q_init(id) + sum of increments`` where ``q_init`` is
  a deterministic hash of the id, so every worker agrees on it and a new movie
  learns from its first rating.
* ``b_u``, ``p_u``, their AdaGrad accumulators and the session bias ``s_u``
  are the **user side**, kept in the user's state (``on_*`` keys).
* Every parameter has its own AdaGrad rate ``lr / sqrt(G)``: a movie rated
  by thousands settles, a new one moves fast.
* ``s_u`` is a bias that decays with the time since the user's previous
  rating (tau ~ 20 s): ML-100K users rate in bursts (half the events share a
  timestamp with the same user's previous one) and a burst has a mood.
* ``f_i`` (genres, year) and ``g_u`` (age, gender, occupation where the data
  has them, zeros otherwise) give new movies and users a prior.

Used by ``models.lstm.LSTMModel`` (its base prediction) and by the
prequential simulator, which runs a batch's rounds exactly as a worker would.
:func:`online_round` is the reference (and the path on a GPU); on CPU the
rounds of a whole batch run in :mod:`models.online_kernel`, compiled, which
tests/test_online_kernel.py holds equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.common import lookup
from models.config import DictConfig

#: the user-side state keys this module owns (prefix ``on_``)
USER_KEYS = ("on_ub", "on_ubG", "on_p", "on_pG", "on_s")


@dataclass(frozen=True)
class OnlineConfig(DictConfig):
    """Hyper-parameters, chosen on the first half of ML-100K by time (see
    ``trainer/ablations.py``) and then frozen."""

    k: int = 10
    lr_bias: float = 0.2
    lr_factor: float = 0.1
    lr_feat: float = 0.01
    l2_bias: float = 0.005
    l2_factor: float = 0.02
    init_std: float = 0.1
    tau_s: float = 10.0
    lr_session: float = 0.1
    mu_prior: float = 3.5
    mu_prior_n: float = 10.0
    eps: float = 1e-2
    use_session: bool = True
    use_features: bool = True
    adaptive: bool = True


def q_init(ids: Tensor, k: int, std: float) -> Tensor:
    """Deterministic pseudo-random initial factor of each movie id [..] -> [.., k]:
    a 32-bit integer hash of (id, j), uniform with standard deviation ``std``.
    Every worker computes the same start, so only increments need sharing."""
    a = ids.detach().cpu().numpy().astype(np.uint64)[..., None]
    j = np.arange(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = (a * np.uint64(0x9E3779B1) + j * np.uint64(0x85EBCA77) + np.uint64(0x165667B1)) & np.uint64(0xFFFFFFFF)
        h ^= h >> np.uint64(15)
        h = (h * np.uint64(0x2C1B3C6D)) & np.uint64(0xFFFFFFFF)
        h ^= h >> np.uint64(12)
        h = (h * np.uint64(0x297A2D39)) & np.uint64(0xFFFFFFFF)
        h ^= h >> np.uint64(15)
    u = h.astype(np.float64) / 2.0**32 - 0.5
    return torch.from_numpy((u * std * math.sqrt(12.0)).astype(np.float32)).to(ids.device)


def apply_increments(t: dict[str, Tensor], inc: dict[str, tuple[Tensor | None, Tensor]]) -> None:
    """Add increments ``name -> (row ids or None for a global tensor, delta)``
    to the tensors ``t`` in place (rows may repeat: they add up)."""
    for name, (rows, delta) in inc.items():
        if rows is None:
            t[name] += delta
        else:
            t[name].index_add_(0, rows, delta)


class MovieSide:
    """The shared, mergeable movie-side parameters (tensors, any device).

    Every tensor is a sum of increments, so concurrent writers merge by
    addition.  Rows are indexed by movie id; ``grow`` extends them with zeros."""

    ROW = ("b", "bG", "q", "qG")
    GLOBAL = ("mu", "wm", "wmG", "V", "VG", "wu", "wuG", "U", "UG")

    def __init__(self, cfg: OnlineConfig, capacity: int, n_mfeat: int, n_ufeat: int,
                 device: torch.device | str = "cpu", tensors: dict[str, Tensor] | None = None) -> None:
        k = cfg.k
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        self.cfg = cfg
        self._q0: Tensor | None = None
        if tensors is not None:  # a view over existing tensors (e.g. a model's buffers)
            self.t = tensors
            return
        self.t: dict[str, Tensor] = {
            "b": z(capacity), "bG": z(capacity), "q": z(capacity, k), "qG": z(capacity, k),
            "mu": z(2),  # (sum of ratings, count)
            "wm": z(n_mfeat), "wmG": z(n_mfeat), "V": z(n_mfeat, k), "VG": z(n_mfeat, k),
            "wu": z(n_ufeat), "wuG": z(n_ufeat), "U": z(n_ufeat, k), "UG": z(n_ufeat, k),
        }  # fmt: skip

    @property
    def capacity(self) -> int:
        return int(self.t["b"].shape[0])

    def q0(self, movie: Tensor) -> Tensor:
        """:func:`q_init` of ``movie``, from a table cached per capacity (zero
        rows for ids outside the tables, like every other movie row)."""
        return self.row(self.q0_table(movie.device), movie)

    def q0_table(self, device: torch.device | str = "cpu") -> Tensor:
        """:func:`q_init` of every row [capacity, k], cached per capacity and device."""
        if self._q0 is None or self._q0.shape[0] != self.capacity or self._q0.device != torch.device(device):
            self._q0 = q_init(torch.arange(self.capacity), self.cfg.k, self.cfg.init_std).to(device)
        return self._q0

    def row(self, table: Tensor, movie: Tensor) -> Tensor:
        """``table[movie]`` with ids outside ``[0, capacity)`` reading as zero
        rows ("unknown movie"), the convention of ``models.common.lookup``."""
        return lookup(table, movie)

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for name in self.ROW:
            old = self.t[name]
            new = torch.zeros((capacity, *old.shape[1:]), dtype=old.dtype, device=old.device)
            new[: old.shape[0]] = old
            self.t[name] = new

    def apply(self, inc: dict[str, tuple[Tensor | None, Tensor]]) -> None:
        """Add increments: ``name -> (row ids or None for a global tensor, delta)``."""
        apply_increments(self.t, inc)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"online_{k}": v for k, v in self.t.items()}

    def load(self, tensors: dict[str, Tensor]) -> None:
        for k in self.t:
            if f"online_{k}" in tensors:
                self.t[k] = tensors[f"online_{k}"].to(self.t[k].device).clone()


def user_spec(cfg: OnlineConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    k = cfg.k
    return {"on_ub": ((), torch.float32), "on_ubG": ((), torch.float32), "on_p": ((k,), torch.float32),
            "on_pG": ((k,), torch.float32), "on_s": ((), torch.float32)}


def user_spec_with_features(cfg: OnlineConfig, n_ufeat: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """:func:`user_spec` plus ``on_g``: the user's side features, copied into
    the state once (zeros when unknown: the model falls back to no features)."""
    spec = user_spec(cfg)
    spec["on_g"] = ((n_ufeat,), torch.float32)
    return spec


def _rate(lr: float, G: Tensor, g2: Tensor, cfg: OnlineConfig) -> Tensor:
    if not cfg.adaptive:
        return torch.full_like(G, lr)
    return lr / torch.sqrt(G + g2 + cfg.eps)


def predict(ms: MovieSide, user: dict[str, Tensor], movie: Tensor, gap_s: Tensor, has_prev: Tensor,
            mfeat: Tensor, ufeat: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Unclamped prediction [B] of one event per user, plus the pieces the
    update needs (no state change)."""
    cfg, t = ms.cfg, ms.t
    mu = (t["mu"][0] + cfg.mu_prior * cfg.mu_prior_n) / (t["mu"][1] + cfg.mu_prior_n)
    q0 = ms.q0(movie) + ms.row(t["q"], movie)
    qe, pe = q0, user["on_p"]
    pred = mu + ms.row(t["b"], movie) + user["on_ub"]
    if cfg.use_features:
        qe = qe + mfeat @ t["V"]
        pe = pe + ufeat @ t["U"]
        pred = pred + mfeat @ t["wm"] + ufeat @ t["wu"]
    decay = torch.where(has_prev, torch.exp(-gap_s.clamp(min=0).to(torch.float32) / cfg.tau_s),
                        torch.zeros_like(user["on_s"]))
    sess = user["on_s"] * decay if cfg.use_session else torch.zeros_like(decay)
    pred = pred + sess + (qe * pe).sum(-1)
    return pred, {"q0": q0, "qe": qe, "pe": pe, "sess": sess}


def online_round(ms: MovieSide, user: dict[str, Tensor], movie: Tensor, rating: Tensor, gap_s: Tensor,
                 has_prev: Tensor, mfeat: Tensor, ufeat: Tensor
                 ) -> tuple[Tensor, dict[str, Tensor], dict[str, tuple[Tensor | None, Tensor]]]:
    """Predict-then-learn one event per user (distinct users in the batch).

    Returns (prediction before the event [B], new user-side state,
    movie-side increments ``name -> (rows or None, delta)``).  ``ms`` is not
    changed: the caller merges the increments (:meth:`MovieSide.apply`, or a
    Redis ``HINCRBYFLOAT`` per row and field in the stream)."""
    cfg, t = ms.cfg, ms.t
    pred, parts = predict(ms, user, movie, gap_s, has_prev, mfeat, ufeat)
    e = rating - pred.clamp(1.0, 5.0)  # the error of what would have been served
    # user side (state): bias, factors, session
    g_ub = -e + cfg.l2_bias * user["on_ub"]
    g_p = -e[:, None] * parts["qe"] + cfg.l2_factor * user["on_p"]
    new = {
        "on_ub": user["on_ub"] - _rate(cfg.lr_bias, user["on_ubG"], g_ub**2, cfg) * g_ub,
        "on_ubG": user["on_ubG"] + g_ub**2,
        "on_p": user["on_p"] - _rate(cfg.lr_factor, user["on_pG"], g_p**2, cfg) * g_p,
        "on_pG": user["on_pG"] + g_p**2,
        "on_s": parts["sess"] + cfg.lr_session * e if cfg.use_session else user["on_s"],
    }
    # movie side (increments): bias, factor, running mean, feature weights
    # (a movie outside the tables -- the caller did not ensure_capacity --
    # reads as unknown and gets no row increment)
    known = (movie >= 0) & (movie < ms.capacity)
    g_b = -e + cfg.l2_bias * ms.row(t["b"], movie)
    g_q = -e[:, None] * parts["pe"] + cfg.l2_factor * parts["q0"]
    rows = movie[known]
    inc: dict[str, tuple[Tensor | None, Tensor]] = {
        "b": (rows, (-_rate(cfg.lr_bias, ms.row(t["bG"], movie), g_b**2, cfg) * g_b)[known]),
        "bG": (rows, (g_b**2)[known]),
        "q": (rows, (-_rate(cfg.lr_factor, ms.row(t["qG"], movie), g_q**2, cfg) * g_q)[known]),
        "qG": (rows, (g_q**2)[known]),
        "mu": (None, torch.stack([rating.sum(), torch.tensor(float(len(rating)), device=rating.device)])),
    }
    if cfg.use_features:
        g_wm = (-e[:, None] * mfeat).sum(0)
        g_wu = (-e[:, None] * ufeat).sum(0)
        g_V = -(mfeat.T @ (e[:, None] * parts["pe"]))
        g_U = -(ufeat.T @ (e[:, None] * parts["qe"]))
        for name, g in (("wm", g_wm), ("wu", g_wu), ("V", g_V), ("U", g_U)):
            inc[name] = (None, -_rate(cfg.lr_feat, t[name + "G"], g**2, cfg) * g)
            inc[name + "G"] = (None, g**2)
    return pred, new, inc


def user_feature_matrix(users, max_user_id: int) -> tuple[Tensor, list[str]]:
    """[max_user_id + 1, F] user side features and their names: normalised age,
    age-known flag, gender M/F flags, occupation one-hot.  Users missing from
    ``users`` (or no user file at all: F = 0) get zeros."""
    if users is None or len(users) == 0:
        return torch.zeros(max_user_id + 1, 0), []
    occ = sorted({str(o) for o in users["occupation"] if str(o)})
    names = ["age", "age_known", "gender_m", "gender_f"] + [f"occ_{o}" for o in occ]
    col = {o: 4 + i for i, o in enumerate(occ)}
    out = np.zeros((max_user_id + 1, len(names)), dtype=np.float32)
    for uid, age, gender, o in zip(users["user_id"], users["age"], users["gender"], users["occupation"]):
        if not 0 <= int(uid) <= max_user_id:
            continue
        row = out[int(uid)]
        if age == age:  # not NaN
            row[0], row[1] = (float(age) - 35.0) / 15.0, 1.0
        row[2], row[3] = gender == "M", gender == "F"
        if str(o) in col:
            row[col[str(o)]] = 1.0
    return torch.from_numpy(out), names


class OnlineLearner:
    """The online model over a whole stream: a :class:`MovieSide`, the users'
    ``on_*`` states and the side-feature tables.  :meth:`process` runs a batch
    the way a worker does: rounds of distinct users, each round through
    :func:`online_round`, increments merged after each round."""

    def __init__(self, cfg: OnlineConfig, movie_feats: Tensor, user_feats: Tensor, n_users: int,
                 merge_every: int = 0) -> None:
        self.cfg = cfg
        #: 0: merge increments after every round (the stream); N: hold them for N
        #: events (the ablation "movie side frozen between fine-tunes")
        self.merge_every = int(merge_every)
        self._pending: list[dict] = []
        self._held = 0
        self.mfeat = movie_feats.float()
        self.ufeat = user_feats.float()
        self.ms = MovieSide(cfg, self.mfeat.shape[0], self.mfeat.shape[1], self.ufeat.shape[1])
        self.user = {k: torch.zeros((n_users, *shape), dtype=dt) for k, (shape, dt) in user_spec(cfg).items()}
        self.last_ts = torch.zeros(n_users, dtype=torch.int64)
        self.count = torch.zeros(n_users, dtype=torch.int64)

    def _grow(self, max_movie: int) -> None:
        if max_movie >= self.mfeat.shape[0]:
            cap = 1 << int(max_movie).bit_length()
            pad = torch.zeros(cap - self.mfeat.shape[0], self.mfeat.shape[1])
            self.mfeat = torch.cat([self.mfeat, pad])
        self.ms.grow(self.mfeat.shape[0])

    def process(self, uidx: Tensor, user_id: Tensor, movie: Tensor, rating: Tensor, ts: Tensor,
                rank: np.ndarray) -> Tensor:
        """Predict-then-learn a batch; ``uidx`` rows of the user tables, ``rank``
        each event's occurrence rank of its user within the batch.  Merging
        every round (``merge_every=0``) runs the compiled kernel
        (:mod:`models.online_kernel`); held increments run :meth:`_process_rounds`."""
        self._grow(int(movie.max()))
        uf = self.ufeat[user_id.clamp(max=self.ufeat.shape[0] - 1)] if self.ufeat.shape[1] else \
            torch.zeros(len(uidx), 0)
        if self.merge_every:
            return self._process_rounds(uidx, movie, rating, ts, rank, uf)
        from models.online_kernel import online_events

        order = np.argsort(rank, kind="stable")  # round r = every user's r-th event, in batch order
        starts = np.searchsorted(rank[order], np.arange(int(rank.max()) + 2))
        ev = torch.from_numpy(order)
        mv = movie[ev].numpy()
        p, _ = online_events(self.ms, self.user, self.last_ts.numpy(), self.count.numpy(), uidx[ev].numpy(), mv,
                             rating[ev].numpy(), ts[ev].numpy(), self.mfeat[movie[ev]].numpy(), uf[ev].numpy(),
                             starts, apply=True)
        preds = torch.empty(len(uidx))
        preds[ev] = torch.from_numpy(p)
        return preds

    def _process_rounds(self, uidx: Tensor, movie: Tensor, rating: Tensor, ts: Tensor, rank: np.ndarray,
                        uf: Tensor) -> Tensor:
        """:meth:`process` as a torch loop of :func:`online_round` rounds (the
        reference; increments held per ``merge_every``)."""
        preds = torch.empty(len(uidx))
        for r in range(int(rank.max()) + 1):
            ev = torch.from_numpy(np.nonzero(rank == r)[0])
            u = uidx[ev]
            st = {k: v[u] for k, v in self.user.items()}
            gap = ts[ev] - self.last_ts[u]
            p, new, inc = online_round(self.ms, st, movie[ev], rating[ev], gap, self.count[u] > 0,
                                       self.mfeat[movie[ev]], uf[ev])
            self._merge(inc, len(ev))
            for k, v in new.items():
                self.user[k][u] = v
            self.last_ts[u] = ts[ev]
            self.count[u] += 1
            preds[ev] = p.clamp(1.0, 5.0)
        return preds

    def _merge(self, inc: dict, n: int) -> None:
        if not self.merge_every:
            self.ms.apply(inc)
            return
        self._pending.append(inc)
        self._held += n
        if self._held >= self.merge_every:
            for i in self._pending:
                self.ms.apply(i)
            self._pending, self._held = [], 0
