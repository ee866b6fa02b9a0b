"""Per-user x genre biases on another learner's errors, learned per event.

Why: the online learner gives each user one bias and a few factors; a user
who likes comedies and dislikes thrillers is a bias per genre, learned
directly (the issue's prototype: a weak but different member of the pool).

    corr(u, j) = sum_g f_jg * b_ug / max(1, sum_g f_jg)

``f_j`` is the movie's genre multi-hot; ``b_ug`` learns the base learner's
error with an AdaGrad step per (user, genre) after the event is predicted.
State: ``n_genres`` biases and accumulators per user (ML-100K's 18 genre
columns: 144 bytes as float32), nothing shared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numba
import numpy as np


@dataclass(frozen=True)
class UserGenreConfig:
    """Chosen on ML-100K's first half by time (:mod:`trainer.diverse`), then frozen."""

    lr: float = 0.05
    l2: float = 0.01
    eps: float = 1e-2

    def to_dict(self) -> dict:
        return asdict(self)


@numba.njit(cache=True)
def _run(base, y, uidx, genres, n_users, lr, l2, eps):
    n, G = genres.shape
    b = np.zeros((n_users, G))
    acc = np.zeros((n_users, G))
    out = np.zeros(n, np.float32)
    for i in range(n):
        u = uidx[i]
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
    return out


def corrections(base: np.ndarray, y: np.ndarray, uidx: np.ndarray, genres: np.ndarray,
                cfg: UserGenreConfig = UserGenreConfig()) -> np.ndarray:
    """``corr`` of every event (``genres``: each event's movie's multi-hot),
    computed before the event is learned; the prediction is ``clip(base + corr)``."""
    n_users = int(uidx.max()) + 1 if len(uidx) else 0
    return _run(np.ascontiguousarray(base, np.float64), np.ascontiguousarray(y, np.float64),
                np.ascontiguousarray(uidx, np.int64), np.ascontiguousarray(genres, np.float64), n_users,
                float(cfg.lr), float(cfg.l2), float(cfg.eps))
