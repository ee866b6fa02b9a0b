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
        assert await store.store([(7, b"v1", 0, 10)]) == (1, 1)
        got = await store.get(7)
        assert (got.blob, got.partition, got.offset) == (b"v1", 0, 10)
        assert got.covers(0, 10) and got.covers(0, 3) and not got.covers(0, 11)
        # a zombie replaying an older offset cannot overwrite newer state
        assert await store.store([(7, b"old", 0, 9)]) == (0, 0)
        assert (await store.get(7)).blob == b"v1"
        # newer offset wins; a partition change (repartitioning) is accepted
        assert await store.store([(7, b"v2", 0, 11), (8, b"u8", 1, 5)]) == (2, 1)
        assert await store.store([(7, b"v3", 2, 0)]) == (1, 0)
        got = await store.get(7)
        assert (got.blob, got.partition, got.offset) == (b"v3", 2, 0)
        assert not got.covers(0, 11)  # another partition's offsets are not covered
        assert await store.users() == 2
        assert (await store.get(12345)).blob is None
        assert [x.blob for x in await store.load([8, 7, 999])] == [b"u8", b"v3", None]
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
