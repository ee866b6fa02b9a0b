"""``fbp bench state``: what one user and one movie cost in Redis, per model
family, and what that makes for 1M / 10M / 100M users.

How: for each family in ``models.registry``, a fresh model (default
hyper-parameters) serves a synthetic stream through the worker's own batch
code (``stream.predictor.Predictor``, its states stored by ``StateStore``
with the configured idle TTL, the online movie side on) into the configured
Redis, under a fresh key prefix.  Then, on that real Redis:

* ``memory_usage``: ``MEMORY USAGE key SAMPLES 0`` of each user hash, averaged;
* ``used_memory``: the drop of INFO ``used_memory`` when the users' hashes are
  deleted, divided by the users -- what a user really costs, with the
  keyspace's and the expiry table's entries;
* the same two for the movie side's rows (per movie).

The projection is the used_memory figure times the users (plus the movies'
rows once), on one Redis and per master of an N-master cluster (user states
are spread over 1,024 hash-tag buckets; the movie rows too).  Replicas hold as
much again.  Run it alone on the Redis (other writers move ``used_memory``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np

from core.settings import Settings

USERS_PROJECTED = (1_000_000, 10_000_000, 100_000_000)


def _events(users: int, per_user: int, movies: int, seed: int) -> list[Any]:
    """Synthetic rating records: each user rates ``per_user`` random movies, in time order."""
    from core.events import RatingEvent, encode_rating, rating_key
    from stream.predictor import Incoming

    rng = np.random.default_rng(seed)
    out = []
    t0 = 880_000_000
    for i in range(per_user):
        for u in range(1, users + 1):
            ev = RatingEvent(f"s{u}-{i}", u, int(rng.integers(1, movies)), float(rng.integers(1, 6)),
                             t0 + i * 3600 + u)
            out.append(Incoming(encode_rating(ev), u % 4, len(out), time.time(), key=rating_key(ev)))
    return out


async def _memory_usage(client: Any, names: list[str]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.execute_command("MEMORY", "USAGE", n, "SAMPLES", "0")
    return [int(x or 0) for x in await pipe.execute()]


async def _used(client: Any) -> int:
    from core.redis_conn import amemory

    return sum(used for used, _ in (await amemory(client)).values())


async def _measure_family(settings: Settings, family: str, users: int, per_user: int,
                          exactly_once: bool) -> dict[str, Any]:
    from core.redis_conn import async_redis
    from core.repos.keys import adrop_namespace, movie_side_patterns
    from core.repos.movies import MovieSideStore
    from core.repos.states import StateStore
    from models.registry import build
    from stream.predictor import BatchConfig, Predictor

    async def send(topic: str, key: Any, value: Any, *a: Any) -> Any:
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    prefix = f"bench-state-{uuid.uuid4().hex[:8]}"
    client = async_redis(settings.redis)
    try:
        store = StateStore.from_settings(client, settings.redis.model_copy(update={"key_prefix": prefix}),
                                         settings.state)
        model = build(family)
        movies = MovieSideStore(client, prefix)
        cfg = BatchConfig(predictions_topic="p", dlq_topic="d", top_k=settings.worker.top_k,
                          keep_outputs=exactly_once)
        p = Predictor(model, store, send, cfg, movies=movies)
        recs = _events(users, per_user, min(model.capacity, 1683), seed=0)
        for i in range(0, len(recs), 4000):
            await p.process(recs[i:i + 4000])
        user_keys = [store.key(u) for u in range(1, users + 1)]
        movie_keys = [k.decode() async for k in client.scan_iter(match=movie_side_patterns(prefix)[0], count=5000)]
        u_usage = await _memory_usage(client, user_keys)
        m_usage = await _memory_usage(client, movie_keys)
        ttl = await client.pttl(user_keys[0])
        blob = float(np.mean([await client.hstrlen(k, "s") for k in user_keys[:200]]))
        # what deleting them frees (DEL, not UNLINK: freed before the reply)
        before = await _used(client)
        for i in range(0, len(user_keys), 500):
            await client.delete(*user_keys[i:i + 500])
        mid = await _used(client)
        for i in range(0, len(movie_keys), 500):
            await client.delete(*movie_keys[i:i + 500])
        after = await _used(client)
        return {
            "family": family, "users": users, "events_per_user": per_user, "exactly_once": exactly_once,
            "memory_usage_per_user": float(np.mean(u_usage)),
            "used_memory_per_user": (before - mid) / users,
            "movies": len(movie_keys),
            "memory_usage_per_movie": float(np.mean(m_usage)) if m_usage else 0.0,
            "used_memory_per_movie": (mid - after) / len(movie_keys) if movie_keys else 0.0,
            "idle_ttl_ms": ttl, "state_blob_bytes": blob,
        }
    finally:
        await adrop_namespace(client, prefix)
        await client.aclose()


def projection(per_user: float, per_movie: float, movies: int, shards: list[int]) -> list[dict[str, Any]]:
    """Bytes for USERS_PROJECTED users on one Redis and per master of each cluster size."""
    rows = []
    for n in USERS_PROJECTED:
        total = n * per_user + movies * per_movie
        rows.append({"users": n, "single_redis_bytes": total,
                     **{f"per_master_{k}_shards_bytes": total / k for k in shards}})
    return rows


def bench_state(settings: Settings, *, users: int = 1000, events_per_user: int = 10,
                families: list[str] | None = None, shards: list[int] | None = None,
                movies: int = 100_000) -> dict[str, Any]:
    """Measure every family (plus the default family in exactly-once mode) and project."""
    from models.registry import DEFAULT_MODEL, available

    shards = shards or [3, 10]
    fams = families or available()
    runs = [asyncio.run(_measure_family(settings, f, users, events_per_user, False)) for f in fams]
    if DEFAULT_MODEL in fams:
        runs.append(asyncio.run(_measure_family(settings, DEFAULT_MODEL, users, events_per_user, True)))
    out: dict[str, Any] = {
        "redis": "cluster" if settings.redis.cluster else "single",
        "idle_ttl_s": settings.state.idle_ttl_s, "top_k": settings.worker.top_k,
        "movies_projected": movies, "shards": shards, "runs": runs,
        "bytes_per_user": {}, "bytes_per_movie": {}, "projection": {},
    }
    for r in runs:
        name = r["family"] + ("+exactly_once" if r["exactly_once"] else "")
        out["bytes_per_user"][name] = round(r["used_memory_per_user"], 1)
        out["bytes_per_movie"][name] = round(r["used_memory_per_movie"], 1)
        out["projection"][name] = projection(r["used_memory_per_user"], r["used_memory_per_movie"],
                                             movies, shards)
    return out
