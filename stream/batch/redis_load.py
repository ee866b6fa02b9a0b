"""Stage ``redis_load``: what the batch's events start from.

The states and watermarks of the batch's users (one round trip; states an
unfinished batch wrote come from the overlay) and, concurrently, the rows of
its movies (:mod:`.movie_rows`) and the catalog's side information for the
movies the model has none for (:mod:`.side_features`).  Then the events
already folded into their user's state -- at or below their source's
watermark: a redelivery -- are set aside."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from core.catalog import Movie
from core.repos.states import StateStore, Stored
from stream.batch.decode import watermark
from stream.batch.movie_rows import Bases, MovieRows
from stream.batch.overlay import Overlay
from stream.batch.side_features import SideFeatures
from stream.batch.types import Marks, Work

STAGE = "redis_load"


@dataclass
class Loaded:
    """Unique users in first-seen order (user -> index into ``stored``), their
    stored states, the movie rows the batch read (None: no online side), and
    the catalog's entries for its movies without side features."""

    users: dict[int, int]
    stored: list[Stored]
    bases: Bases | None
    catalog: Mapping[int, Movie] = field(default_factory=dict)

    def of(self, user: int) -> Stored:
        return self.stored[self.users[user]]


@dataclass
class Fresh:
    """Events not yet applied, in batch order; the watermarks they move per
    user; (user, stored state, position) of each event already applied."""

    work: Work = field(default_factory=list)
    marks: Marks = field(default_factory=dict)
    applied: list[tuple[int, Stored, tuple[str, int, int]]] = field(default_factory=list)

    @cached_property
    def users(self) -> list[int]:
        """Users with fresh events, in first-seen order (read once the filter is done)."""
        return list(self.marks)


class Loader:
    def __init__(self, store: StateStore, movies: MovieRows, overlay: Overlay, side: SideFeatures) -> None:
        self.store = store
        self.movies = movies
        self.overlay = overlay
        self.side = side

    async def load(self, work: Work) -> Loaded:
        movies = np.unique(np.fromiter((ev.movie_id for ev, _ in work), np.int64, len(work)))
        (users, stored), bases, catalog = await asyncio.gather(
            self._states(work), self.movies.load(movies), self.side.load(movies))
        return Loaded(users, stored, bases, catalog)

    async def _states(self, work: Work) -> tuple[dict[int, int], list[Stored]]:
        users: dict[int, int] = {}
        for ev, _ in work:
            users.setdefault(ev.user_id, len(users))
        held = self.overlay.users(list(users))
        if not held:
            return users, await self.store.load(list(users))
        rest = [u for u in users if u not in held]
        got = dict(zip(rest, await self.store.load(rest)))
        return users, [held[u] if u in held else got[u] for u in users]


def filter_applied(work: Work, loaded: Loaded, repartition_topic: str | None) -> Fresh:
    """Set aside events already folded into their user's state."""
    out = Fresh()
    users, stored, marks = loaded.users, loaded.stored, out.marks
    for ev, rec in work:
        # the hot loop: only a re-keyed event needs its header read
        src, part, off = (watermark(rec, repartition_topic) if rec.topic == repartition_topic
                          else (rec.topic, rec.partition, rec.offset))
        st = stored[users[ev.user_id]]
        if st.covers(src, part, off):
            out.applied.append((ev.user_id, st, (src, part, off)))
            continue
        out.work.append((ev, rec))
        marks.setdefault(ev.user_id, {})[(src, part)] = off
    return out
