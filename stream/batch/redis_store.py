"""Stage ``redis_store``: the batch's states and watermarks in one atomic
Redis call, then its movie-side increments (:mod:`core.repos.movies`).

Runs only once Kafka has the batch's records: a crash can then only cause a
repeat (same event id, same predicted value: the state it came from was not
yet replaced), never a missing prediction.  States go before increments: a
crash between the two loses that batch's increments (the redelivered events
are skipped by their watermarks), it never counts them twice."""

from __future__ import annotations

from core.repos.movies import MovieSideStore
from core.repos.states import StateStore
from stream.batch.types import Predicted

STAGE = "redis_store"


async def store(done: Predicted, states: StateStore, movies: MovieSideStore | None) -> None:
    await states.store(done.rows)
    for adds in done.adds:  # after the states: a crash here loses, never repeats, them
        assert movies is not None  # only a shared movie side makes increments
        await movies.add(adds)
