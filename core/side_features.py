"""Side information the movie catalog has and the model lacks (issue #22).

Why: a movie the model's training data never had carries no genres or year,
so the online learners' side features, the per-user genre biases and the
network all see it as featureless until a retrain with a movie file.  The
catalog (``fbp catalog load``, ``fbp catalog follow``) knows it.  The worker
(:mod:`stream.batch.side_features`, every batch) and the trainer (before
each fine-tune) fill the model from it the same way:

1. :func:`missing` -- which of some movie ids have no side features;
2. :class:`Asked` -- of those, which were not asked for lately (a movie the
   catalog did not know may be published later, so it is asked again, but
   at most once per ``retry_s``);
3. the catalog's ``get_many`` for them;
4. :func:`fill` -- ``RatingModel.add_movies`` for the movies it knew.

Only empty rows are filled: what a checkpoint's movie file said is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np
import pandas as pd

from core.catalog import Movie
from models.base import RatingModel


def movies_frame(movies: Iterable[Movie]) -> pd.DataFrame:
    """Catalog movies as the models' movies DataFrame (movie_id, title, year
    float or NaN, genres list), the shape ``core.datasets`` loads."""
    rows = [(m.movie_id, m.title, math.nan if m.year is None else float(m.year), list(m.genres)) for m in movies]
    return pd.DataFrame(rows, columns=["movie_id", "title", "year", "genres"])


def missing(model: RatingModel, movie_ids: Iterable[int]) -> np.ndarray:
    """The distinct ids among ``movie_ids`` the model has no side features for."""
    ids = np.unique(np.fromiter((int(i) for i in movie_ids), np.int64))
    return model.movies_without_features(ids) if len(ids) else ids


def fill(model: RatingModel, movies: Mapping[int, Movie]) -> int:
    """The catalog's ``movies`` into the model's empty rows; how many it filled."""
    return model.add_movies(movies_frame(movies.values())) if movies else 0


class Asked:
    """When each movie id was last asked for: :meth:`due` hands out the ids
    not asked within ``retry_s`` and marks them asked now.  Bounded: past
    ``limit`` ids, those asked longest ago are forgotten (asked again)."""

    def __init__(self, retry_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 limit: int = 1 << 20) -> None:
        self.retry_s, self.clock, self.limit = float(retry_s), clock, int(limit)
        self._at: dict[int, float] = {}

    def due(self, movie_ids: Iterable[Any]) -> list[int]:
        now = self.clock()
        out = [int(i) for i in movie_ids if now - self._at.get(int(i), -math.inf) >= self.retry_s]
        for i in out:
            self._at.pop(i, None)  # re-inserted last: the dict stays in asking order
            self._at[i] = now
        while len(self._at) > self.limit:
            del self._at[next(iter(self._at))]
        return out


def fill_from_catalog(model: RatingModel, catalog: Any, movie_ids: Iterable[int]) -> int:
    """Steps 1, 3 and 4 with a blocking catalog (``core.repos.catalog.MovieCatalog``):
    the trainer's way, once per fine-tune, so every missing id is asked;
    returns how many rows were filled."""
    ids = missing(model, movie_ids)
    return fill(model, catalog.get_many(ids.tolist())) if len(ids) else 0
