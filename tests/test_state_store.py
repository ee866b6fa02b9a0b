"""The Redis state store's watermark rules, against the real Redis of the stack."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
import torch

from core.redis_conn import async_redis
from models.devices import pick_device
from core.repos.states import StateStore


@pytest.fixture
def prefix(stack):
    p = f"test-{uuid.uuid4().hex[:8]}"
    yield p
    r = redis.Redis.from_url(stack.redis.url)
    for k in r.scan_iter(match=f"{p}:*"):
        r.delete(k)


def test_state_and_watermark_written_together_and_never_backwards(stack, prefix):
    async def go() -> None:
        store = StateStore(async_redis(stack.redis), prefix)
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


def test_watermarks_are_per_source_topic(stack, prefix):
    """A user fed from two topics (ratings and its repartition topic) keeps one
    watermark per (topic, partition): offset 5 of one topic says nothing about
    offset 3 of the other, and a redelivery from either is still recognised."""
    async def go() -> None:
        store = StateStore(async_redis(stack.redis), prefix)
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


def test_legacy_single_watermark_is_still_honoured(stack, prefix):
    """Hashes written before per-source marks (fields p/o) still cover their
    partition's redeliveries, and are converted on the next write."""
    async def go() -> None:
        store = StateStore(async_redis(stack.redis), prefix)
        await store.client.hset(store.key(7), mapping={"s": b"old", "p": 2, "o": 40})
        got = await store.get(7)
        assert got.covers("ratings", 2, 40) and not got.covers("ratings", 2, 41)
        assert not got.covers("ratings", 1, 0)
        await store.store([(7, b"new", [("ratings", 2, 41)])])
        assert set(await store.client.hkeys(store.key(7))) == {b"s", b"o:ratings:2"}
        await store.client.aclose()

    asyncio.run(go())


def test_device_choice_falls_back_to_cpu():
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda"
    else:
        assert pick_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"
