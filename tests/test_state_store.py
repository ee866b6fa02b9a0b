"""The Redis state store's watermark rules, against the real Redis of the
stack and a local Redis Cluster (same tests, ``redis_cfg`` parametrised)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest
import torch

from core.redis_conn import async_redis
from models.devices import pick_device
from core.repos.states import StateLayoutError, StateNotDurable, StateStore
from fbp_errors import DataError
from tests.rediscluster import local_cluster, redis_cfg  # noqa: F401  (fixtures)


def test_state_and_watermark_written_together_and_never_backwards(redis_cfg):
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        assert await store.store([(7, b"v1", [("r", 0, 10)])]) == (1, 1)
        got = await store.get(7)
        assert (got.blob, got.marks) == (b"v1", {("r", 0): 10})
        assert got.covers("r", 0, 10) and got.covers("r", 0, 3) and not got.covers("r", 0, 11)
        # a zombie replaying an older offset cannot overwrite newer state
        assert await store.store([(7, b"old", [("r", 0, 9)])]) == (0, 0)
        assert (await store.get(7)).blob == b"v1"
        # newer offset wins; a new partition (repartitioning) is accepted
        assert await store.store([(7, b"v2", [("r", 0, 11)]), (8, b"u8", [("r", 1, 5)])]) == (2, 1)
        assert await store.store([(7, b"v3", [("r", 2, 0)])]) == (1, 0)
        got = await store.get(7)
        assert got.blob == b"v3" and got.marks == {("r", 0): 11, ("r", 2): 0}
        assert not got.covers("r", 0, 12) and got.covers("r", 0, 11)
        assert await store.users() == 2
        assert (await store.get(12345)).blob is None
        assert [x.blob for x in await store.load([8, 7, 999])] == [b"u8", b"v3", None]
        await store.client.aclose()

    asyncio.run(go())


def test_watermarks_are_per_source_topic(redis_cfg):
    """A user fed from two topics (ratings and its repartition topic) keeps one
    watermark per (topic, partition): offset 5 of one topic says nothing about
    offset 3 of the other, and a redelivery from either is still recognised."""
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        await store.store([(7, b"v1", [("ratings", 1, 5)])])
        got = await store.get(7)
        assert not got.covers("ratings-repartition", 1, 3)  # another topic's offsets
        await store.store([(7, b"v2", [("ratings-repartition", 1, 3)])])
        got = await store.get(7)
        assert got.covers("ratings", 1, 5) and got.covers("ratings-repartition", 1, 3)
        assert not got.covers("ratings", 1, 6) and not got.covers("ratings-repartition", 1, 4)
        # one source newer, the other older: written, and no mark moves back
        assert await store.store([(7, b"v3", [("ratings", 1, 4), ("ratings-repartition", 1, 9)])]) == (1, 0)
        got = await store.get(7)
        assert got.blob == b"v3" and got.marks == {("ratings", 1): 5, ("ratings-repartition", 1): 9}
        await store.client.aclose()

    asyncio.run(go())


def test_legacy_single_watermark_is_still_honoured(redis_cfg):
    """Hashes written before per-source marks (fields p/o) still cover their
    partition's redeliveries, and are converted on the next write."""
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        await store.client.hset(store.key(7), mapping={"s": b"old", "p": 2, "o": 40})
        got = await store.get(7)
        assert got.covers("ratings", 2, 40) and not got.covers("ratings", 2, 41)
        assert not got.covers("ratings", 1, 0)
        await store.store([(7, b"new", [("ratings", 2, 41)])])
        assert set(await store.client.hkeys(store.key(7))) == {b"s", b"l", b"o:ratings:2"}
        await store.client.aclose()

    asyncio.run(go())


def test_a_batch_of_many_users_spread_over_slots(redis_cfg):
    """One store call over users of many buckets (on a cluster: every node),
    each written atomically with its watermark; the users count is exact,
    repeats change nothing, and tools can list and drop the states."""
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        users = list(range(0, 3000, 7))
        rows = [(u, f"s{u}".encode(), [("r", u % 3, u)]) for u in users]
        assert await store.store(rows) == (len(users), len(users))
        assert await store.store(rows) == (0, 0)  # a redelivered batch: all dropped
        got = await store.load(users)
        assert [g.blob for g in got] == [f"s{u}".encode() for u in users]
        assert all(g.covers("r", u % 3, u) and not g.covers("r", u % 3, u + 1) for g, u in zip(got, users))
        assert await store.users() == len(users)
        assert await store.user_ids() == users
        assert await store.drop() > 0
        assert await store.users() == 0 and await store.user_ids() == []
        await store.client.aclose()

    asyncio.run(go())


def test_one_call_mixes_new_stale_and_newer_users_each_decided_alone(redis_cfg):
    """A group written by one script call (a whole batch on a single Redis):
    users with 0..3 watermarks and exactly-once outputs, some already stored
    at a newer offset (a zombie's write), some newer; each user's outcome is
    its own, and the reply counts match."""
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        assert await store.store([(1, b"a1", [("r", 0, 10)]), (2, b"b1", [("r", 1, 5), ("q", 0, 3)])]) == (2, 2)
        rows = [
            (1, b"a0", [("r", 0, 9)]),                    # older than stored: dropped
            (2, b"b2", [("r", 1, 5), ("q", 0, 4)]),      # one source moved: written
            (3, b"c1", []),                               # new user, no watermark
            (4, b"d1", [("r", 0, 1), ("r", 1, 2), ("q", 0, 3)], [("r", 0, [(1, b"rec1")])]),
        ]
        assert await store.store(rows) == (3, 2)
        got = await store.load([4, 3, 2, 1])  # any order
        assert [g.blob for g in got] == [b"d1", b"c1", b"b2", b"a1"]
        assert got[0].marks == {("r", 0): 1, ("r", 1): 2, ("q", 0): 3} and got[0].output("r", 0, 1) == b"rec1"
        assert got[2].marks == {("r", 1): 5, ("q", 0): 4} and got[3].marks == {("r", 0): 10}
        assert await store.users() == 4
        await store.drop()
        await store.client.aclose()

    asyncio.run(go())


def test_a_state_of_another_layout_is_refused_then_replaced(redis_cfg):
    """A hash written by another layout is not parsed: load() hands it back as
    a fresh user flagged foreign with a message saying what to do (the worker
    resets it), and the next write replaces it whole (its fields gone)."""
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        await store.client.hset(store.key(5), mapping={"s": b"future", "l": 99, "o:r:0": 70, "x": 1})
        got = (await store.load([5]))[0]
        assert got.blob is None and got.foreign is not None and not got.covers("r", 0, 1)
        assert isinstance(got.foreign, StateLayoutError) and isinstance(got.foreign, DataError)
        assert re.search(f"layout 99.*drop the states of prefix '{redis_cfg.key_prefix}'", str(got.foreign))
        assert await store.store([(5, b"mine", [("r", 0, 1)])]) == (1, 0)
        assert set(await store.client.hkeys(store.key(5))) == {b"s", b"l", b"o:r:0"}
        assert (await store.get(5)).blob == b"mine"
        await store.client.aclose()

    asyncio.run(go())


def test_keys_of_the_unversioned_layout_migrate(stack):
    """A deployment from before layout 1 (single Redis) keeps its users, their
    watermarks and its published model after migrate_unversioned; a second
    run moves nothing."""
    from core.redis_conn import sync_redis
    from core.repos import keys
    from core.repos.models import ModelStore

    if stack.redis.cluster:  # the unversioned layout could not run on a cluster: nothing to migrate there
        pytest.skip("the pre-layout-1 keys only ever existed on a single Redis")

    prefix = f"test-mig-{uuid.uuid4().hex[:6]}"
    r = sync_redis(stack.redis)
    try:
        old = lambda *parts: keys.unversioned_key(prefix, *parts)  # noqa: E731
        r.hset(old("u", 7), mapping={"s": b"seven", "o:ratings:0": 41})
        r.hset(old("u", 2048), mapping={"s": b"legacy", "p": 1, "o": 9})
        r.set(old("meta", "users"), 2)
        r.set(old("model", "current"), 3)
        r.set(old("model", "v", 3, "meta"), b'{"sha256": "x"}')
        r.rpush(old("trainer", "requests"), b"{}")
        assert keys.migrate_unversioned(r, prefix) == {"model": 2, "trainer": 1, "users": 2}
        assert keys.migrate_unversioned(r, prefix) == {"model": 0, "trainer": 0, "users": 0}
        assert ModelStore(r, prefix).current().version == 3

        async def go() -> None:
            store = StateStore(async_redis(stack.redis), prefix)
            assert await store.users() == 2
            a, b = await store.load([7, 2048])
            assert a.blob == b"seven" and a.covers("ratings", 0, 41) and not a.covers("ratings", 0, 42)
            assert b.blob == b"legacy" and b.covers("ratings", 1, 9)
            await store.client.aclose()

        asyncio.run(go())
    finally:
        keys.drop_namespace(r, prefix)
        r.close()


def test_the_worker_resets_and_counts_a_state_of_another_layout(redis_cfg):
    """The batch path meets a user whose hash has another layout: the event is
    predicted as for a new user, the reset is counted under reason
    redis_layout, and the stored hash becomes this layout's."""
    from core.events import RatingEvent, encode_rating, rating_key
    from models.registry import build
    from stream import metrics as m
    from stream.predictor import BatchConfig, Incoming, Predictor

    async def send(topic, key, value):
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    def resets() -> float:
        return m.REGISTRY.get_sample_value("fbp_states_reset_total", {"reason": "redis_layout"}) or 0.0

    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        await store.client.hset(store.key(5), mapping={"s": b"future", "l": 99})
        p = Predictor(build("baseline"), store, send, BatchConfig(predictions_topic="p", dlq_topic="d", top_k=0))
        before = resets()
        ev = RatingEvent("e1", 5, 10, 4.0, 880_000_000)
        res = await p.process([Incoming(encode_rating(ev), 0, 0, time.time(), key=rating_key(ev))])
        assert len(res.predictions) == 1 and res.reset == 1
        assert resets() - before == 1
        got = await store.get(5)
        assert got.foreign is None and got.blob is not None and got.covers("ratings", 0, 0)
        await store.client.aclose()

    asyncio.run(go())


def test_wait_for_a_replica(redis_cfg):
    """With wait_replicas the store waits for replica acknowledgement: on the
    cluster (one replica per master) it succeeds; asking for more replicas
    than exist fails the write as not durable instead of reporting success."""
    async def go() -> None:
        client = async_redis(redis_cfg)
        if redis_cfg.cluster:
            ok = StateStore(client, redis_cfg.key_prefix, wait_replicas=1, wait_timeout_ms=5000)
            assert await ok.store([(u, b"x", [("r", 0, 1)]) for u in range(50)]) == (50, 50)
        greedy = StateStore(client, redis_cfg.key_prefix, wait_replicas=3, wait_timeout_ms=50)
        with pytest.raises(StateNotDurable, match="acknowledged by [01] of the 3"):
            await greedy.store([(1000, b"y", [("r", 0, 1)])])
        await client.aclose()

    asyncio.run(go())


def test_device_choice_falls_back_to_cpu():
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda"
    else:
        assert pick_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"
