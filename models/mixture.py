"""The served online part as a Hedge mixture of online learners, and the
network's learned share on top of it.

Why: one learner's session time constant and rates are constants chosen on
ML-100K, and a stream with other habits gets ML-100K's choices (issue #22).
Here K copies of the learner of :mod:`models.online` run side by side, one
per session time constant, each predict-then-learn on every event, and the
served online prediction combines them per event::

    w_k  ∝  exp(-eta_g * Lg_k - eta_u * Lu_k)

* ``Lg_k``: learner k's discounted squared error over every user, a shared
  global of the movie side (``hedge_L``), updated after each round the way
  the movie side is.  Workers add increments (``Lg' - Lg`` of their rounds),
  so concurrent workers merge by addition; each decays what it read.
* ``Lu_k``: the user's own discounted squared error, in the user's state
  (``on_L``), updated as each rating is revealed.  A new user has ``Lu = 0``
  and falls back to the global weights.

The network then gets a learned share ``w`` of the prediction::

    served = clamp(mix + w * (network - mix)),   w in [0, 1]

``w`` (``net_w``, a shared global: 0 before the network is trained, 0.2
once it is trained from scratch) takes one normalised
gradient step on each learned batch's squared error, so where the network
does not help it keeps (close to) no weight instead of a fixed 0.2.

Each member predicts through a :class:`models.online.MovieSide`: the first
``movie_side_owners`` (:data:`MOVIE_SIDE_OWNERS`) learn tables of their own
(tensors named ``m{j}_*``; member 0 keeps the plain names), the others read
member 0's; each owner is one more row per movie in Redis.
:class:`MixtureSide` presents the tables, plus the two shared globals, as
one mergeable side that :mod:`models.online_pack` packs like any other.
Settings were chosen on the first half of ML-100K by time
(``python -m trainer.hedge``), then frozen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from models import online as onl
from models.config import DictConfig

#: the members: (session time constant in s, scale of the AdaGrad rates); the
#: first is the base config.  Five time constants at rates x1 plus tau 10 s at
#: x0.5 and x2: on ML-100K's first half by time 0.9235 against 0.9241 for the
#: five taus alone and 0.9234 for all fifteen of ``trainer.hedge.members``
#: (``python -m trainer.served_tune``).  The first :data:`MOVIE_SIDE_OWNERS`
#: learn movie tables of their own, so the other rates come first.
MEMBERS = ((10.0, 1.0), (10.0, 2.0), (10.0, 0.5), (5.0, 1.0), (30.0, 1.0), (120.0, 1.0), (600.0, 1.0))
#: how many members learn their own movie tables (the others read member
#: 0's): on ML-100K's first half by time, with the neighbourhood, the online
#: part gives 0.92098 with one, 0.92056 with two (the second at rates x2, the
#: best of the six), 0.92034 with three (x0.5 third, the best of five); each
#: owner adds one row per movie to Redis and to every batch's reads and writes
MOVIE_SIDE_OWNERS = 3
#: step of the network's learned share per :data:`STEP_EVENTS` events (chosen
#: on ML-100K's first half by time, at batches of 1,024 events)
BLEND_LR = 0.1
STEP_EVENTS = 1024
#: the mixture's own shared globals
MIX_GLOBAL = ("hedge_L", "net_w")


@dataclass(frozen=True)
class HedgeConfig(DictConfig):
    """Mixture settings, chosen on the first half of ML-100K by time
    (``python -m trainer.hedge``) and then frozen."""

    eta_g: float = 0.03
    gamma_g: float = 0.999
    eta_u: float = 0.3
    gamma_u: float = 0.99


def member_name(j: int, name: str) -> str:
    """Member j's name for a movie-side tensor (member 0 keeps the plain one)."""
    return name if j == 0 else f"m{j}_{name}"


def member_user_key(j: int, key: str) -> str:
    """Member j's name for a user-state key ``on_*`` (member 0 keeps the plain one)."""
    return key if j == 0 else f"on_m{j}_{key[3:]}"


def member_configs(base: onl.OnlineConfig, members) -> list[onl.OnlineConfig]:
    """One config per (tau, rate scale): the scale multiplies the bias,
    factor and feature AdaGrad rates."""
    return [dataclasses.replace(base, tau_s=float(t), lr_bias=base.lr_bias * s, lr_factor=base.lr_factor * s,
                                lr_feat=base.lr_feat * s) for t, s in members]


@dataclass(frozen=True)
class UserGenreConfig(DictConfig):
    """Per-user x genre biases on the mixture's errors; chosen on ML-100K's
    first half by time over lr 0.02-0.2 x l2 0-0.1 (``python -m
    trainer.served_tune``: 0.9219 against the
    mixture's 0.9235 there), then frozen."""

    lr: float = 0.05
    l2: float = 0.1
    eps: float = 1e-2


class MixtureSide:
    """K members' movie sides and the mixture's globals as one mergeable
    side (:class:`models.base.MovieSide`): ``t`` maps every name to a view
    of the owner's buffers, ``members[j]`` is member j's side (its config
    over its own tables, or over member 0's when the side is shared)."""

    def __init__(self, members: list[onl.MovieSide], mix: dict[str, Tensor], owners: int | None = None) -> None:
        #: members[:owners] own movie tables; the others read member 0's
        #: (a shared movie side: only the user sides differ)
        self.owners = len(members) if owners is None else int(owners)
        self.members = members
        own = range(self.owners)
        self.ROW = tuple(member_name(j, n) for j in own for n in onl.MovieSide.ROW)
        self.GLOBAL = tuple(member_name(j, n) for j in own for n in onl.MovieSide.GLOBAL) + MIX_GLOBAL
        self.t: dict[str, Tensor] = {member_name(j, n): v for j in own for n, v in members[j].t.items()}
        self.t.update(mix)
        self.cfg = members[0].cfg

    def apply(self, inc: dict[str, tuple[Tensor | None, Tensor]]) -> None:
        onl.apply_increments(self.t, inc)


def prefixed(j: int, inc: dict) -> dict:
    """Member j's increments under its names in the mixture."""
    return {member_name(j, n): v for n, v in inc.items()}


def member_user(user: dict[str, Tensor], j: int) -> dict[str, Tensor]:
    """Member j's ``on_*`` user tensors under the plain names its learner reads."""
    return {k: user[member_user_key(j, k)] for k in onl.USER_KEYS}


# -- the mixture -------------------------------------------------------------
@numba.njit(cache=True)
def _hedge_rounds(P, y, row, starts, Lu, Lg, eta_g, gamma_g, eta_u, gamma_u, learn_global, out):
    """Mix the members' predictions ``P`` [n, K] of events grouped in rounds;
    ``Lu`` [users, K] updated per event, ``Lg`` [K] after each round when
    ``learn_global``."""
    n, K = P.shape
    w = np.empty(K)
    for r in range(len(starts) - 1):
        for i in range(starts[r], starts[r + 1]):
            u = row[i]
            lo = np.inf
            for k in range(K):
                w[k] = eta_g * Lg[k] + eta_u * Lu[u, k]
                lo = min(lo, w[k])
            tot, p = 0.0, 0.0
            for k in range(K):
                w[k] = np.exp(-(w[k] - lo))
                tot += w[k]
                p += w[k] * P[i, k]
            out[i] = p / tot
            for k in range(K):  # the user's rating is revealed: the user's weights learn now
                d = P[i, k] - y[i]
                Lu[u, k] = gamma_u * Lu[u, k] + d * d
        if not learn_global:
            continue
        for i in range(starts[r], starts[r + 1]):  # the shared weights after the round
            for k in range(K):
                d = P[i, k] - y[i]
                Lg[k] = gamma_g * Lg[k] + d * d


def hedge(P: np.ndarray, y: np.ndarray, row: np.ndarray, starts: np.ndarray, Lu: np.ndarray, Lg: np.ndarray,
          hc: HedgeConfig, learn_global: bool = True) -> np.ndarray:
    """The mixture's prediction of each event (grouped in rounds by
    ``starts``, rows ``row`` of ``Lu``).  ``Lu`` ([users, K]) and, when
    ``learn_global``, ``Lg`` ([K]) are updated in place; every
    event is mixed before its own rating updates any weight."""
    out = np.empty(len(y), np.float32)
    _hedge_rounds(np.ascontiguousarray(P, np.float32), np.ascontiguousarray(y, np.float64),
                  np.ascontiguousarray(row, np.int64), np.ascontiguousarray(starts, np.int64), Lu, Lg,
                  float(hc.eta_g), float(hc.gamma_g), float(hc.eta_u), float(hc.gamma_u), bool(learn_global), out)
    return out


@numba.njit(cache=True)
def _user_genre_events(base, y, row, genres, b, acc, lr, l2, eps, out):
    n, G = genres.shape
    for i in range(n):
        u = row[i]
        nf = 0.0
        for g in range(G):
            nf += genres[i, g]
        nf = max(nf, 1.0)
        c = 0.0
        for g in range(G):
            c += genres[i, g] * b[u, g]
        c /= nf
        out[i] = c
        e = y[i] - base[i] - c  # the error of base + this correction
        for g in range(G):
            if genres[i, g] != 0.0:
                grad = -e * genres[i, g] / nf + l2 * b[u, g]
                acc[u, g] += grad * grad
                b[u, g] -= lr / np.sqrt(acc[u, g] + eps) * grad


def user_genre_events(base: np.ndarray, y: np.ndarray, row: np.ndarray, genres: np.ndarray, b: np.ndarray,
                      acc: np.ndarray, cfg: UserGenreConfig) -> np.ndarray:
    """Per-user x genre corrections of ``base`` (each user's events in
    order; ``genres``: each event's movie's multi-hot), each computed before
    its event is learned::

        corr(u, j) = sum_g f_jg * b_ug / max(1, sum_g f_jg)

    ``b_ug`` (rows ``row`` of ``b``) learns the error of ``base + corr``
    with an AdaGrad step per (user, genre) (``acc``); both updated in place.
    Only the user's own state: nothing is shared, so any order that keeps
    each user's events in order gives the same corrections."""
    out = np.empty(len(y), np.float64)
    _user_genre_events(np.ascontiguousarray(base, np.float64), np.ascontiguousarray(y, np.float64),
                       np.ascontiguousarray(row, np.int64), np.ascontiguousarray(genres, np.float64), b, acc,
                       float(cfg.lr), float(cfg.l2), float(cfg.eps), out)
    return out


def user_genre_round(genres: Tensor, base: Tensor, rating: Tensor, b: Tensor, acc: Tensor, cfg: UserGenreConfig
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`user_genre_events` for one event per user, in torch (the
    reference): (corrections [B], new b, new acc)."""
    nf = genres.sum(-1).clamp(min=1.0)
    corr = (genres * b).sum(-1) / nf
    e = rating - base - corr
    on = genres != 0
    grad = torch.where(on, -e[:, None] * genres / nf[:, None] + cfg.l2 * b, torch.zeros_like(b))
    acc2 = acc + grad * grad
    b2 = torch.where(on, b - cfg.lr / torch.sqrt(acc2 + cfg.eps) * grad, b)
    return corr, b2, acc2


def genre_scores(genres: Tensor, b: Tensor) -> Tensor:
    """The corrections of candidate movies (``genres`` [N, G] or [B, N, G]) for users ``b`` [B, G]: [B, N]
    (one matmul when the candidates are shared)."""
    nf = genres.sum(-1).clamp(min=1.0)
    if genres.dim() == 2:
        return (b @ genres.T) / nf
    return (genres * b[:, None, :]).sum(-1) / nf


def hedge_weights(Lg: Tensor, Lu: Tensor, hc: HedgeConfig) -> Tensor:
    """Normalised weights [B, K] of users with losses ``Lu`` [B, K]."""
    return torch.softmax(-(hc.eta_g * Lg[None, :] + hc.eta_u * Lu).double(), -1).to(Lu.dtype)


def blend(net: Tensor, mix: Tensor, w: float | Tensor, lo: float, hi: float) -> Tensor:
    """The served prediction: the mixture moved a share ``w`` towards the network."""
    return (mix + w * (net - mix)).clamp(lo, hi)


def blend_step(net: np.ndarray, mix: np.ndarray, y: np.ndarray, w: float, lo: float, hi: float,
               lr: float = BLEND_LR) -> tuple[np.ndarray, float]:
    """One batch at share ``w``: (its predictions, the share after it): a
    normalised gradient step on the batch's squared error, kept in [0, 1].
    The step is ``lr`` per :data:`STEP_EVENTS` events (at most a full
    normalised step), so the share learns at the same pace whether a worker
    sees many small batches or a few large ones."""
    dv = net.astype(np.float64) - mix
    out = np.clip(mix + w * dv, lo, hi)
    if not len(y):
        return out.astype(np.float32), w
    g = float(np.mean((out - y) * dv))
    step = min(1.0, lr * len(y) / STEP_EVENTS)
    return out.astype(np.float32), float(np.clip(w - step * g / (float(np.mean(dv * dv)) + 1e-3), 0.0, 1.0))
