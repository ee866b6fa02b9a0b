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

import numpy as np

from models.mixture import user_genre_events


@dataclass(frozen=True)
class UserGenreConfig:
    """Chosen on ML-100K's first half by time (:mod:`trainer.diverse`), then frozen."""

    lr: float = 0.05
    l2: float = 0.01
    eps: float = 1e-2

    def to_dict(self) -> dict:
        return asdict(self)


def corrections(base: np.ndarray, y: np.ndarray, uidx: np.ndarray, genres: np.ndarray,
                cfg: UserGenreConfig = UserGenreConfig()) -> np.ndarray:
    """``corr`` of every event (``genres``: each event's movie's multi-hot),
    computed before the event is learned; the prediction is ``clip(base + corr)``
    (the served model's kernel, :func:`models.mixture.user_genre_events`)."""
    n_users = int(uidx.max()) + 1 if len(uidx) else 0
    G = genres.shape[1]
    return user_genre_events(base, y, uidx, genres, np.zeros((n_users, G)), np.zeros((n_users, G)), cfg)
