"""A full Redis, on a private ``redis-server`` with a small ``maxmemory``
(not the stack's: these tests change its memory settings): under
``noeviction`` a refused state write waits and goes through once Redis has
room; under an eviction policy states and watermarks vanish, so the worker
refuses to start.  The worker-level scenario is in tests/faults/."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from core.redis_conn import async_redis
from core.repos.states import StateStore
from core.settings import load_settings
from stream import metrics as m
from stream.faults import FullRedisPause, evicting_redis, is_redis_full

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_redis(tmp_path) -> Iterator[tuple[redis.Redis, int]]:
    """A private redis-server (no persistence), stopped at the end."""
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    try:
        yield client, port
    finally:
        proc.terminate()
        proc.wait(10)


def _fill(client: redis.Redis) -> None:
    """Make Redis full: maxmemory just under what it uses now."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(max(1, used - 1024)))


def test_a_refused_state_write_waits_until_redis_has_room(small_redis):
    client, port = small_redis
    cfg = load_settings().redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"})

    def full() -> float:
        return m.REGISTRY.get_sample_value("fbp_redis_full") or 0.0

    async def go() -> None:
        plain = StateStore(async_redis(cfg), "t")
        patient = StateStore(plain.client, "t", on_full=FullRedisPause(max_s=0.2))
        await plain.store([(1, b"a" * 100, [("r", 0, 1)])])
        _fill(client)
        # without a policy the refusal is an error (the old fail stop) ...
        with pytest.raises(redis.exceptions.OutOfMemoryError) as err:
            await plain.store([(2, b"b" * 100, [("r", 0, 5)])])
        assert is_redis_full(err.value)
        # ... with one, the write waits, paused, and lands once there is room
        task = asyncio.ensure_future(patient.store([(2, b"b" * 100, [("r", 0, 5)]), (1, b"a2", [("r", 0, 2)])]))
        deadline = time.monotonic() + 10
        while full() != 1.0:
            assert time.monotonic() < deadline and not task.done(), "no pause while Redis was full"
            await asyncio.sleep(0.02)
        assert not await plain.client.exists(plain.key(2))
        client.config_set("maxmemory", "0")
        assert await asyncio.wait_for(task, 10) == (2, 1)
        assert full() == 0.0
        got = await plain.load([1, 2])
        assert [g.blob for g in got] == [b"a2", b"b" * 100] and got[1].covers("r", 0, 5)
        await plain.client.aclose()

    asyncio.run(go())


def test_the_worker_refuses_a_redis_that_can_evict_states(small_redis):
    client, port = small_redis
    s = load_settings()
    s = s.model_copy(update={"redis": s.redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"})})
    assert evicting_redis(s) is None  # noeviction: fine
    for policy in ("allkeys-lru", "volatile-ttl"):
        client.config_set("maxmemory-policy", policy)
        problem = evicting_redis(s)
        assert problem is not None and policy in problem and "noeviction" in problem
        assert "FBP_STATE__ALLOW_EVICTION" in problem


def test_an_eviction_policy_loses_states_and_watermarks(small_redis):
    """What an eviction policy breaks: with allkeys-lru and a small maxmemory,
    stored states vanish -- those users start over, and their watermarks no
    longer recognise an event that was already applied."""
    client, port = small_redis
    cfg = load_settings().redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"})
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + 1024 * 1024))

    async def go() -> int:
        store = StateStore(async_redis(cfg), "t")
        for start in range(0, 5000, 50):
            await store.store([(u, b"s" * 500, [("r", 0, u)]) for u in range(start, start + 50)])
        got = await store.load(list(range(5000)))
        await store.client.aclose()
        return sum(not g.covers("r", 0, u) for u, g in zip(range(5000), got))

    forgotten = asyncio.run(go())
    print(f"\nallkeys-lru at ~1 MB: {forgotten} of 5000 stored users lost state and watermark")
    assert forgotten > 0


def test_a_refused_movie_side_increment_counts_once(small_redis):
    """The movie side's increments are not idempotent: on a full Redis only
    the refused calls are sent again, so each increment lands exactly once."""
    import numpy as np

    from core.repos.movies import Adds, MovieSideStore

    client, port = small_redis
    cfg = load_settings().redis.model_copy(update={"url": f"redis://127.0.0.1:{port}/0"})
    ids = np.arange(1, 41, dtype=np.int64)
    base = np.ones((40, 3), np.float32)

    def adds(step: float) -> Adds:
        return Adds(ids, np.full((40, 3), step, np.float32), base,
                    np.full(2, step, np.float32), np.zeros(2, np.float32))

    async def go() -> tuple[np.ndarray, np.ndarray | None]:
        store = MovieSideStore(async_redis(cfg), "t", on_full=FullRedisPause(max_s=0.1))
        await store.add(adds(0.5))
        _fill(client)
        task = asyncio.ensure_future(store.add(adds(0.25)))
        deadline = time.monotonic() + 10
        while (m.REGISTRY.get_sample_value("fbp_redis_full") or 0.0) != 1.0:
            assert time.monotonic() < deadline and not task.done(), "no pause while Redis was full"
            await asyncio.sleep(0.02)
        client.config_set("maxmemory", "0")
        await asyncio.wait_for(task, 10)
        rows, found, glob = await store.load(ids.tolist(), 3, 2)
        assert found.all()
        await store.client.aclose()
        return rows, glob

    rows, glob = asyncio.run(go())
    assert np.allclose(rows, 1.75) and np.allclose(glob, 0.75)
