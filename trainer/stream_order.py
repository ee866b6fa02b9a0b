"""Events in stream order, and one worker batch of them: what the trainer's
bootstrap pass (``trainer.train``) and the prequential simulator
(``trainer.prequential``) share -- a module of its own so neither has to
import the other for it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from models import state as mstate
from models.base import RatingModel, State
from models.batch import learn_batch, pad_events


def stream_order(ratings: pd.DataFrame) -> pd.DataFrame:
    order = np.lexsort((np.arange(len(ratings)), ratings["ts"].to_numpy()))
    return ratings.iloc[order].reset_index(drop=True)


def occurrence_rank(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions have the same key."""
    s = pd.Series(keys)
    return s.groupby(s).cumcount().to_numpy()


def padded(model: RatingModel, uidx: np.ndarray, movie: np.ndarray, rating: np.ndarray, ts: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, tuple[torch.Tensor, ...]]:
    """A chunk as the worker builds its batch: the chunk's users (first-seen
    order), each event's user row, and the padded [users, T] block."""
    users, row = np.unique(uidx, return_inverse=True)
    rank = occurrence_rank(uidx)
    block = pad_events(row, rank, len(users), movie, rating, ts)
    return users, row, tuple(x.to(model.device) for x in block)


def step_online_events(
    model: RatingModel, states: State, uidx: np.ndarray, movie: np.ndarray, rating: np.ndarray, ts: np.ndarray,
    learn_movies: bool = True,
) -> np.ndarray:
    """One worker batch: :func:`models.batch.learn_batch` over the chunk (the
    network and the online part, movie-side increments merged round by round;
    ``learn_movies=False``: a worker with ``worker.online_movie_side`` off)."""
    users, row, block = padded(model, uidx, movie, rating, ts)
    u = torch.from_numpy(users).to(model.device)
    p, new, _ = learn_batch(model, mstate.select(states, u), *block, learn_movies=learn_movies)
    mstate.scatter(states, u, new)
    return p.float().cpu().numpy()[row, occurrence_rank(uidx)]
