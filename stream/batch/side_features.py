"""The movie catalog's side information for the serving model, per batch.

Part of the ``redis_load`` stage: the batch's movies that the serving model
has no genres or year for, and did not ask for within
``worker.catalog_retry_s``, are read from the catalog with one HMGET,
concurrently with the batch's states (:mod:`core.side_features` has the
steps and why).  :meth:`SideFeatures.apply` puts what the catalog knew into
the model before ``model_step``, so the batch's own predictions use it.  A
swap keeps what was filled (``RatingModel.adopt_local``).  In a steady
stream nearly every batch asks for nothing and costs one lookup of its
movies' feature rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from core import side_features as sf
from core.catalog import Movie
from core.repos.catalog import AsyncMovieCatalog
from stream import metrics as m
from stream.batch.serving import Serving


class SideFeatures:
    def __init__(self, catalog: AsyncMovieCatalog | None, serving: Serving, retry_s: float = 60.0) -> None:
        self.catalog = catalog
        self.serving = serving
        self.asked = sf.Asked(retry_s)

    async def load(self, ids: np.ndarray) -> Mapping[int, Movie]:
        """The catalog's entries for those of the batch's movies (``ids``,
        distinct) the model lacks (none without a catalog, or when every movie
        has its features)."""
        if self.catalog is None or not len(ids):
            return {}
        ask = self.asked.due(self.serving.model.movies_without_features(ids))
        if not ask:
            return {}
        got = await self.catalog.get_many(ask)
        if len(got) < len(ask):
            m.CATALOG_FEATURES.labels("not_in_catalog").inc(len(ask) - len(got))
        return got

    def apply(self, movies: Mapping[int, Movie]) -> int:
        n = sf.fill(self.serving.model, movies)
        if n:
            m.CATALOG_FEATURES.labels("filled").inc(n)
        return n
