"""What begun, unfinished batches wrote, readable before Redis has it.

Why: with pipelining the next batch begins while the previous one still
waits for Kafka's acknowledgements and its Redis writes.  Its users' states
and the movie rows it added to must then come from memory, as they will be
stored, not from the older values still in Redis.  ``hold`` when a batch has
begun, ``read`` while loading, ``release`` once it is stored; a later batch
that rewrote an entry keeps it."""

from __future__ import annotations

import asyncio

from core.repos.states import Stored
from stream.batch.types import Predicted


class Overlay:
    def __init__(self) -> None:
        #: user -> (step, state as it will be stored)
        self._users: dict[int, tuple[int, Stored]] = {}
        #: movie id (None: the globals) -> last step adding to it
        self._movies: dict[int | None, int] = {}
        self._step = 0
        self._unfinished = 0
        self._all_finished = asyncio.Event()
        self._all_finished.set()

    @property
    def busy(self) -> bool:
        """Some begun batch has not finished."""
        return self._unfinished > 0

    @property
    def empty(self) -> bool:
        """Nothing held: every state and movie row is as Redis has it."""
        return not self._users and not self._movies

    async def settled(self) -> None:
        """Wait until every begun batch has finished."""
        await self._all_finished.wait()

    def hold(self, done: Predicted) -> int:
        """Hold what a begun batch wrote; returns its step, for :meth:`release`."""
        self._step += 1
        for u, st in done.written.items():
            self._users[u] = (self._step, st)
        for adds in done.adds:
            for movie_id in adds.keys():
                self._movies[movie_id] = self._step
        self._unfinished += 1
        self._all_finished.clear()
        return self._step

    def release(self, step: int, done: Predicted) -> None:
        """The batch of ``step`` is stored: drop what no later batch rewrote."""
        for u in done.written:
            if self._users.get(u, (None,))[0] == step:
                del self._users[u]
        for movie_id in (i for adds in done.adds for i in adds.keys()):
            if self._movies.get(movie_id) == step:
                del self._movies[movie_id]
        self._unfinished -= 1
        if not self._unfinished:
            self._all_finished.set()

    def users(self, users: list[int]) -> dict[int, Stored]:
        """The held states of ``users`` (a snapshot: the batch that wrote them
        may finish and release them while the caller loads the rest)."""
        if not self._users:
            return {}
        return {u: self._users[u][1] for u in users if u in self._users}

    def movies(self) -> set[int | None]:
        """Movie ids (None: the globals) that unfinished batches add to."""
        return set(self._movies)
