"""One batch of events, predicted then learned: the code the worker, the
prequential simulator and the tests' reference simulator all run.

Why one function: "the simulator equals the stream" only holds if both run
the same code.  A batch is a padded ``[users, T]`` block (each user's events
of the batch in order, :func:`pad_events`); :func:`learn_batch` returns the
predictions made before each event, the users' new states and the batch's
movie-side *increments* (sums per movie row and per global tensor, already
applied to the model round by round; empty for models without an online
part), which a worker then adds to the shared movie side in Redis.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.base import Increments, RatingModel, State


def occurrence_rank(uidx: np.ndarray) -> np.ndarray:
    """For each event, how many earlier events of the batch have the same user."""
    uidx = np.asarray(uidx)
    order = np.argsort(uidx, kind="stable")  # each user's events together, in batch order
    grouped = uidx[order]
    first = np.r_[0, np.flatnonzero(grouped[1:] != grouped[:-1]) + 1] if len(uidx) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[first, len(uidx)])
    rank = np.empty(len(uidx), dtype=np.int64)
    rank[order] = np.arange(len(uidx)) - np.repeat(first, sizes)
    return rank


def pad_events(uidx: np.ndarray, rank: np.ndarray, n_users: int, movie, rating, ts, *, pin: bool = False
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each user's events (row ``uidx``, position ``rank``) as a padded
    [users, T] (movie, rating, ts, mask); pinned for asynchronous copies to a GPU."""
    T = int(rank.max()) + 1 if len(rank) else 0
    out_movie = torch.zeros((n_users, T), dtype=torch.int64, pin_memory=pin)
    out_rating = torch.zeros((n_users, T), dtype=torch.float32, pin_memory=pin)
    out_ts = torch.zeros((n_users, T), dtype=torch.int64, pin_memory=pin)
    mask = torch.zeros((n_users, T), dtype=torch.bool, pin_memory=pin)
    ui, ri = torch.tensor(np.asarray(uidx, np.int64)), torch.tensor(np.asarray(rank, np.int64))
    out_movie[ui, ri] = torch.tensor(np.asarray(movie, np.int64))
    out_rating[ui, ri] = torch.tensor(np.asarray(rating, np.float32))
    out_ts[ui, ri] = torch.tensor(np.asarray(ts, np.int64))
    mask[ui, ri] = True
    return out_movie, out_rating, out_ts, mask


@torch.no_grad()
def learn_batch(model: RatingModel, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                learn_movies: bool = True) -> tuple[Tensor, State, Increments]:
    """Predict-then-learn a padded batch: (predictions [U, T], new states,
    the batch's movie-side increments): :meth:`RatingModel.learn_batch`,
    whose default (no online side) runs ``step`` (T == 1) or
    ``forward_sequence`` and returns no increments.  ``learn_movies=False``
    keeps the movie side fixed (and returns no increments)."""
    return model.learn_batch(state, movie, rating, ts, mask, learn_movies=learn_movies)


def sum_increments(parts: list[Increments]) -> Increments:
    """The increments of several rounds as one sum per movie row (rows unique)
    and per global tensor."""
    out: Increments = {}
    names = {n for p in parts for n in p}
    for name in names:
        got = [p[name] for p in parts if name in p]
        if got[0][0] is None:
            out[name] = (None, torch.stack([d for _, d in got]).sum(0))
            continue
        rows = torch.cat([r for r, _ in got])
        delta = torch.cat([d for _, d in got])
        uniq, inv = torch.unique(rows, return_inverse=True)
        acc = torch.zeros((len(uniq), *delta.shape[1:]), dtype=delta.dtype, device=delta.device)
        out[name] = (uniq, acc.index_add_(0, inv, delta))
    return out
