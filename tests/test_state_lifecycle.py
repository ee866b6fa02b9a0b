"""State lifecycle against real Redis (the stack's single Redis and a local
Redis Cluster, ``redis_cfg`` parametrised): idle users expire and come back
cold, the watermark's limit after an expiry, and erasure (``fbp user forget``)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from core.redis_conn import async_redis, sync_redis
from core.repos.buffer import REC, BufferedEvent, EventBuffer
from core.repos.erasure import ErasureLog
from core.repos.states import StateStore
from tests.rediscluster import local_cluster, redis_cfg  # noqa: F401  (fixtures)


async def _gone(store: StateStore, user_id: int, timeout: float = 10.0) -> None:
    """Wait until Redis no longer holds the user's state (expiry is Redis's own clock)."""
    deadline = time.monotonic() + timeout
    while await store.client.exists(store.key(user_id)):
        assert time.monotonic() < deadline, f"state of user {user_id} did not expire"
        await asyncio.sleep(0.05)


def test_each_write_sets_and_refreshes_the_idle_expiry(redis_cfg):
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix, idle_ttl_ms=60_000)
        await store.store([(7, b"v1", [("r", 0, 1)])])
        assert 0 < await store.ttl_ms(7) <= 60_000
        await store.client.pexpire(store.key(7), 5_000)  # as if 55 s had passed
        await store.store([(7, b"v2", [("r", 0, 2)])])  # the same script call refreshes it
        assert await store.ttl_ms(7) > 5_000
        # a write that lands nothing (a zombie's older offset) does not keep the user alive
        await store.client.pexpire(store.key(7), 5_000)
        await store.store([(7, b"old", [("r", 0, 1)])])
        assert await store.ttl_ms(7) <= 5_000
        # idle TTL 0: no expiry, and an expiry left by an earlier setting is removed
        forever = StateStore(store.client, redis_cfg.key_prefix, idle_ttl_ms=0)
        await forever.store([(7, b"v3", [("r", 0, 3)])])
        assert await store.ttl_ms(7) == -1
        await store.client.aclose()

    asyncio.run(go())


def test_an_idle_user_expires_and_is_served_as_new(redis_cfg):
    """After the idle TTL the user's state is gone: the worker predicts for
    them exactly as for a user never seen (the model's cold start)."""
    from core.events import RatingEvent, encode_rating, rating_key
    from models.registry import build
    from stream.predictor import BatchConfig, Incoming, Predictor

    async def send(topic, key, value):
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    def rec(ev: RatingEvent, offset: int):
        return Incoming(encode_rating(ev), 0, offset, time.time(), key=rating_key(ev))

    async def go() -> None:
        import torch

        torch.manual_seed(0)
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix, idle_ttl_ms=1_000)
        p = Predictor(build("lstm"), store, send, BatchConfig(predictions_topic="p", dlq_topic="d", top_k=0))
        history = [RatingEvent(f"h{i}", 5, 10 + i, 5.0, 880_000_000 + i) for i in range(6)]
        await p.process([rec(ev, i) for i, ev in enumerate(history)])
        assert 0 < await store.ttl_ms(5) <= 1_000
        probe = lambda u, eid: RatingEvent(eid, u, 40, 3.0, 880_000_100)  # noqa: E731
        warm = (await p.process([rec(probe(5, "warm"), 10), rec(probe(6, "new1"), 11)])).predictions
        assert abs(warm[0].predicted - warm[1].predicted) > 1e-4  # the history matters
        await _gone(store, 5)
        await _gone(store, 6)
        cold = (await p.process([rec(probe(5, "cold"), 12), rec(probe(9, "new2"), 13)])).predictions
        assert cold[0].predicted == pytest.approx(cold[1].predicted, abs=1e-6)
        assert cold[0].predicted == pytest.approx(warm[1].predicted, abs=1e-6)
        await store.client.aclose()

    asyncio.run(go())


def test_the_watermark_expires_with_the_state(redis_cfg):
    """The documented limit: an event redelivered within the TTL is skipped,
    one redelivered after its user's state expired is not recognised (it
    would be applied again).  Hence the default TTL far above Kafka's
    retention (README, "State lifecycle")."""
    async def go() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix, idle_ttl_ms=300)
        await store.store([(3, b"s", [("r", 0, 10)])])
        assert (await store.get(3)).covers("r", 0, 7)
        await _gone(store, 3)
        assert not (await store.get(3)).covers("r", 0, 7)
        await store.client.aclose()

    asyncio.run(go())


def _buffer_users(buf: EventBuffer) -> tuple[set[int], set[int]]:
    recent, res = buf.snapshot()
    return set(recent["user"].tolist()), set(res["user"].tolist())


def test_forget_erases_every_key_of_a_user(redis_cfg):
    """``fbp user forget`` removes the users' states (watermarks, outputs) and
    buffer events, uncounts them, counts the erasure; others are untouched."""
    from fbp.user_cmd import forget_users
    from core.settings import load_settings

    settings = load_settings().model_copy(update={"redis": redis_cfg})
    prefix = redis_cfg.key_prefix

    async def fill() -> StateStore:
        store = StateStore(async_redis(redis_cfg), prefix, idle_ttl_ms=60_000)
        rows = [(u, b"s%d" % u, [("r", 0, u)], [("r", 0, [(u, b"out")])]) for u in range(1, 41)]
        assert await store.store(rows) == (40, 40)
        return store

    asyncio.run(fill())
    r = sync_redis(redis_cfg)
    buf = EventBuffer(r, prefix, capacity=500, reservoir=50, seed=1)
    buf.append([BufferedEvent(u % 40 + 1, 7, 4.0, 880_000_000 + u) for u in range(400)])
    assert {3, 17} <= _buffer_users(buf)[0] and {3, 17} & _buffer_users(buf)[1]
    forgotten_before = ErasureLog(r, prefix).count()
    before = set(r.scan_iter(match=f"*{prefix}*", count=1000))

    out = forget_users(settings, [3, 17, 17, 999])

    assert out["users"] == 3 and out["states_removed"] == 2
    assert out["buffer_recent_removed"] == 20 and out["buffer_reservoir_removed"] > 0
    assert ErasureLog(r, prefix).count() - forgotten_before == 3
    async def check() -> None:
        store = StateStore(async_redis(redis_cfg), prefix)
        got = await store.load([3, 17, 4])
        assert got[0].blob is None and got[1].blob is None and got[2].blob == b"s4"
        assert await store.users() == 38
        await store.client.aclose()

    asyncio.run(check())
    after = set(r.scan_iter(match=f"*{prefix}*", count=1000))
    removed = {k.decode() for k in before - after}
    assert removed == {StateStore(r, prefix).key(3), StateStore(r, prefix).key(17)}
    recent_users, res_users = _buffer_users(EventBuffer(r, prefix, capacity=500, reservoir=50))
    assert not {3, 17} & (recent_users | res_users) and 4 in recent_users
    assert len(EventBuffer(r, prefix, capacity=500)) == 400 - 20
    r.close()


def test_a_master_without_the_scripts_gets_only_its_own_calls_again(redis_cfg):
    """After a failover the promoted master has no script cache, so part of a
    pipelined store or forget is refused (NOSCRIPT) while the rest applied.
    Only the refused calls may be sent again: sending the applied deletes and
    first writes again makes them report nothing (a forget counted 1 of 2
    states after test_redis_cluster's failover)."""
    if not redis_cfg.cluster:
        pytest.skip("a single Redis refuses all of a pipeline or none of it")
    users = list(range(1, 41))
    r = sync_redis(redis_cfg)
    masters = {r.get_node_from_key(StateStore(r, redis_cfg.key_prefix).key(u)).port for u in users}
    assert len(masters) > 1, "the 40 users should span several masters"
    victim = min(masters)

    def flush_scripts_of_one_master() -> None:
        import redis as redis_py

        node = redis_py.Redis(port=victim)
        node.script_flush()
        node.close()

    async def go() -> tuple[tuple[int, int], int]:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        await store.store([(99, b"warm", [("r", 0, 1)])])  # every master has been sent the script
        await store.forget([99])
        flush_scripts_of_one_master()
        written = await store.store([(u, b"s%d" % u, [("r", 0, u)]) for u in users])
        flush_scripts_of_one_master()
        removed = await store.forget(users)
        await store.client.aclose()
        return written, removed

    written, removed = asyncio.run(go())
    r.close()
    assert written == (40, 40)
    assert removed == 40


def test_fbp_user_forget_command_writes_json(redis_cfg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fbp.user_cmd import app

    async def fill() -> None:
        store = StateStore(async_redis(redis_cfg), redis_cfg.key_prefix)
        await store.store([(11, b"x", [("r", 0, 1)])])
        await store.client.aclose()

    asyncio.run(fill())
    for k, v in {"FBP_REDIS__URL": redis_cfg.url, "FBP_REDIS__KEY_PREFIX": redis_cfg.key_prefix,
                 "FBP_REDIS__CLUSTER": str(redis_cfg.cluster).lower(),
                 "FBP_REDIS__CLUSTER_NODES": ",".join(redis_cfg.cluster_nodes)}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "forget.json"
    res = CliRunner().invoke(app, ["forget", "11", "12", "--json", str(out)])
    assert res.exit_code == 0, res.output
    got = orjson.loads(out.read_bytes())
    assert got["users"] == 2 and got["states_removed"] == 1
    assert "states_removed=1" in res.output


def test_packed_buffer_events_carry_the_user_where_forget_looks():
    """The erasure script matches bytes 9..16 of a packed event: the user id."""
    rec = np.zeros(1, dtype=REC)
    rec["user"] = 123456789
    assert rec.tobytes()[8:16] == np.int64(123456789).astype("<i8").tobytes()


def test_bench_state_measures_bytes_per_user_and_projects(stack, tmp_path):
    """``fbp bench state --json``: bytes per user per family from real Redis
    (at least the state blob itself), and 1M/10M/100M projections."""
    from typer.testing import CliRunner

    from bench.cli import app

    out = tmp_path / "state.json"
    res = CliRunner().invoke(app, ["state", "--users", "400", "--events-per-user", "2",
                                   "--families", "lstm,baseline", "--shards", "4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    got = orjson.loads(out.read_bytes())
    assert set(got["bytes_per_user"]) == {"lstm", "baseline", "lstm+exactly_once"}
    for run in got["runs"]:
        # MEMORY USAGE counts each hash's blob exactly; what deleting the hashes
        # frees (INFO used_memory) is the blob and more, give or take the few
        # hundred bytes Redis's own bookkeeping moves meanwhile (with 50 users
        # that once read 1,138 B against a 1,152 B blob)
        assert run["memory_usage_per_user"] > run["state_blob_bytes"] > 100
        assert run["used_memory_per_user"] > 0.9 * run["state_blob_bytes"]
        assert 0 < run["idle_ttl_ms"] <= got["idle_ttl_s"] * 1000
    assert got["bytes_per_user"]["lstm+exactly_once"] > got["bytes_per_user"]["lstm"]
    assert got["bytes_per_movie"]["lstm"] > 0
    rows = got["projection"]["lstm"]
    assert [r["users"] for r in rows] == [1_000_000, 10_000_000, 100_000_000]
    per = got["bytes_per_user"]["lstm"]
    assert rows[1]["single_redis_bytes"] == pytest.approx(10_000_000 * per, rel=0.01)
    assert rows[1]["per_master_4_shards_bytes"] == pytest.approx(rows[1]["single_redis_bytes"] / 4)


def test_the_worker_warns_when_kafka_keeps_ratings_longer_than_states_live():
    from core.topics import expiry_outlives_kafka

    day = 86400.0
    assert expiry_outlives_kafka(90 * 86400, {"ratings": 14 * day, "ratings-repartition": 14 * day}) is None
    assert expiry_outlives_kafka(0, {"ratings": None}) is None  # nothing expires
    msg = expiry_outlives_kafka(7 * 86400, {"ratings": 14 * day, "ratings-repartition": 1 * day})
    assert msg is not None and "ratings: 14.0 days" in msg and "repartition" not in msg
    assert "FBP_STATE__IDLE_TTL_S" in msg
    assert "forever" in expiry_outlives_kafka(90 * 86400, {"ratings": None})


def test_retention_windows_read_from_the_broker(stack):
    from core.topics import repartition_topic, retention_windows

    got = retention_windows(stack)
    assert set(got) == {stack.kafka.ratings_topic, repartition_topic(stack)}
    assert all(w is None or w > 0 for w in got.values())
