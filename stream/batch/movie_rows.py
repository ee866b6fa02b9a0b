"""The shared online movie side in and out of the serving model.

Redis is authoritative (:mod:`core.repos.movies`): the ``redis_load`` stage
reads the rows of the batch's movies and the globals into the model, the
``model_step`` stage turns the batch's increments into store writes, the
``redis_store`` stage adds them.  The whole movie side is read at start-up
and after each swap (a promotion keeps what the online updates learned; the
checkpoint only gives the base of movies Redis has never seen).  Rows of
movies not in a batch are refreshed when a batch next has them, so top-K may
score them from slightly older values.

A model without an online part (``RatingModel.movie_side()`` None), or no
store (``worker.online_movie_side`` off), makes every method a no-op."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.repos.movies import Adds, MovieSideStore
from models import online_pack as opk
from models.base import MovieSide
from models.batch import Increments
from stream.batch.overlay import Overlay
from stream.batch.serving import Serving

log = logging.getLogger(__name__)


@dataclass
class Bases:
    """The movie side as a batch read it: rows of ``ids`` (ascending) and the globals."""

    ids: np.ndarray
    rows: np.ndarray
    globals: np.ndarray


def f32_sum(base: np.ndarray, inc: np.ndarray) -> np.ndarray:
    """``base + inc`` summed in double and rounded to float32, as Redis's add script does."""
    return (np.asarray(base, np.float32).astype(np.float64) + np.asarray(inc, np.float32)).astype(np.float32)


class MovieRows:
    def __init__(self, store: MovieSideStore | None, serving: Serving, overlay: Overlay) -> None:
        self.store = store
        self.serving = serving
        self.overlay = overlay
        #: the whole movie side was read since the last swap
        self.loaded = False

    def side(self) -> MovieSide | None:
        """The model's online movie side, or None (none, or nothing shared to learn)."""
        return self.serving.model.movie_side() if self.store is not None else None

    async def load_all(self) -> None:
        """Every row the model has, and the globals (start-up and after a swap);
        rows Redis lacks keep the checkpoint's values."""
        if self.side() is not None:
            await self._read(np.arange(self.serving.model.capacity, dtype=np.int64))
            log.info("online movie side loaded from Redis (%d rows)", self.serving.model.capacity)
        self.loaded = True

    async def load(self, ids: np.ndarray) -> Bases | None:
        """The stored rows of the batch's movies (``ids``: distinct, ascending)
        and the globals, written into the model; returns their values before
        the batch, the bases a missing key starts from when the batch adds to it."""
        if self.side() is None or not len(ids):
            return None
        self.serving.model.ensure_capacity(int(ids[-1]))
        return await self._read(ids)

    async def _read(self, ids: np.ndarray) -> Bases:
        ms, device = self.side(), self.serving.device
        assert ms is not None and self.store is not None
        # rows an unfinished batch adds to: memory already has its increments,
        # Redis may not when it answers (taken before the read: that batch may
        # finish meanwhile, its add landing after this read on the server)
        held = self.overlay.movies()
        got, found, glob = await self.store.load(ids.tolist(), opk.row_len(ms), opk.global_len(ms))
        if held:
            found &= ~np.isin(ids, np.fromiter((i for i in held if i is not None), np.int64))
        if found.any():
            opk.set_rows(ms, torch.from_numpy(ids[found]).to(device), got[found])
        if glob is not None and None not in held:
            opk.set_globals(ms, glob)
        rows = opk.rows(ms, torch.from_numpy(ids).to(device))
        return Bases(ids, rows, opk.globals_vec(ms))

    def adds(self, inc: Increments, bases: Bases | None) -> Adds | None:
        """The batch's increments as store writes, each with its base."""
        ms = self.side()
        if ms is None or not inc or bases is None:
            return None
        ids, deltas = opk.row_increments(ms, inc)
        at = np.searchsorted(bases.ids, ids)  # every incremented row is one the batch read
        if len(ids) and (at.max() >= len(bases.ids) or not np.array_equal(bases.ids[at], ids)):
            raise ValueError("movie-side increments for rows the batch did not read")
        return Adds(ids, deltas, bases.rows[at], opk.global_increment(ms, inc), bases.globals)

    def as_stored(self, adds: list[Adds]) -> None:
        """The added-to rows in memory exactly as Redis will hold them (its
        script sums base and increment in double and rounds to float32), so
        that a batch reading them from the overlay sees what it would read
        from Redis."""
        ms = self.side()
        if ms is None:
            return
        for a in adds:
            if len(a.ids):
                opk.set_rows(ms, torch.from_numpy(a.ids).to(self.serving.device), f32_sum(a.base, a.inc))
            if a.global_inc is not None:
                opk.set_globals(ms, f32_sum(a.global_base, a.global_inc))
