"""The Redis repositories on one Redis and on the stack's Redis Cluster (3
masters + 3 replicas, tests/rediscluster.py): same code, same results; key groups
that move together share a slot; and a master failover loses no state write
that was acknowledged with ``wait_replicas``.

Durability, plainly: Redis replication is asynchronous.  A master
acknowledges a write before its replica has it; if the master dies in that
window its replica is promoted without the write, and the worker -- which has
already committed the Kafka offsets of those events -- never applies them
again: the users' states silently miss them.  What makes the promise hold:

* ``FBP_REDIS__WAIT_REPLICAS=1``: each state write ends with ``WAIT 1`` on
  every master it touched; fewer acknowledgements fail the batch
  (StateNotDurable), the worker exits without committing, and the batch is
  redelivered (the watermark makes the replay idempotent);
* ``min-replicas-to-write 1`` (+ ``min-replicas-max-lag``) on the servers:
  a master cut off from its replicas refuses writes at all, so a
  partitioned old master cannot take writes that the promotion discards.
  Alone it is not enough: it checks replica lag in seconds, not each
  write, so the last writes before a crash can still be lost; WAIT is what
  ties the acknowledgement to a replica having the write.

Without them (the default, wait_replicas 0): a master crash loses the
state writes of the replication lag (sub-millisecond on loopback, up to
seconds under load or with a slow link) whose offsets were committed --
those users' states lack those events from then on, with no error anywhere.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from core.redis_conn import async_redis, sync_redis
from core.repos import keys
from core.repos.buffer import BufferedEvent, EventBuffer
from core.repos.models import ModelStore
from core.repos.states import StateNotDurable, StateStore
from core.repos.trainer import TrainerStore
from fbp_errors import CheckpointError
from stream.faults import is_infrastructure
from tests.rediscluster import LocalCluster, local_cluster, redis_cfg  # noqa: F401  (fixtures)


def test_model_store_publish_load_rollback(redis_cfg):
    from models.registry import build

    r = sync_redis(redis_cfg)
    store = ModelStore(r, redis_cfg.key_prefix)
    assert store.current() is None and store.versions() == []
    store.ensure_seq_at_least(6)  # serving a local checkpoint of version 6
    a = store.publish(build("baseline"), {"model": "baseline"})
    b = store.publish(build("baseline"), {"model": "baseline"})
    assert (a.version, b.version) == (7, 8)
    store.ensure_seq_at_least(2)  # a counter that exists is left alone
    assert store.versions() == [7, 8] and store.current().version == 8
    assert store.load(7).version == 7 and store.blob(7) is not None and store.blob(99) is None
    assert store.rollback().version == 7 and store.current().version == 7
    assert [h["reason"] for h in store.history()][:2] == ["rollback from 8", "publish"]
    with pytest.raises(CheckpointError, match="not published"):
        store.load(99)
    r.close()


def test_cluster_nodes_find_the_cluster_when_the_url_node_is_down(local_cluster):  # noqa: F811
    """A worker restarted while the node its URL names is down still starts:
    ``cluster_nodes`` seeds the client's discovery.  Without them the same
    client cannot reach the cluster at all."""
    from core.settings import RedisSettings

    dead = RedisSettings(url="redis://127.0.0.1:1/0", cluster=True)  # nothing listens on port 1
    with pytest.raises(redis.exceptions.RedisClusterException):
        sync_redis(dead).ping()
    seeded = dead.model_copy(update={"cluster_nodes": local_cluster.seeds})
    sync = sync_redis(seeded)
    assert sync.ping() and len(sync.get_primaries()) == 3
    sync.close()

    async def go() -> int:
        client = async_redis(seeded)
        await client.initialize()
        n = len(client.get_primaries())
        await client.aclose()
        return n

    assert asyncio.run(go()) == 3


def test_event_buffer_and_trainer_control(redis_cfg):
    r = sync_redis(redis_cfg)
    buf = EventBuffer(r, redis_cfg.key_prefix, capacity=50, reservoir=20, seed=1)
    evs = [BufferedEvent(i % 7, 1 + i, 3.0, 1000 + i) for i in range(120)]
    for a in range(0, 120, 40):
        buf.append(evs[a:a + 40], {("ratings", 0): a + 40})
    again = EventBuffer(r, redis_cfg.key_prefix, capacity=50, reservoir=20, seed=1)
    assert again.seq == 120 and len(again) == 50
    recent, sample = again.snapshot()
    assert recent["seq"].tolist() == list(range(70, 120)) and len(sample) == 20
    assert np.array_equal(sample, again.sample())
    assert not again.fresh("ratings", 0, 119) and again.fresh("ratings", 0, 120)
    assert EventBuffer.recent_key(redis_cfg.key_prefix) == again.k_recent

    ctl = TrainerStore(r, redis_cfg.key_prefix)
    assert ctl.pop_request() is None
    ctl.request_finetune(by="test")
    assert ctl.pending_requests() == 1 and ctl.pop_request()["by"] == "test"
    ctl.save_state(runs=3, last_run_seq=120)
    assert ctl.state() == {"runs": "3", "last_run_seq": "120"}
    for i in range(205):
        ctl.log_decision({"i": i})
    got = ctl.decisions()
    assert len(got) == 200 and got[0] == {"i": 204}
    again.clear()
    assert EventBuffer(r, redis_cfg.key_prefix, capacity=50).seq == 0
    r.close()


def test_key_groups_share_a_slot():
    """What one MULTI or script touches must hash to one slot (the cluster
    refuses otherwise); user states must spread over many slots."""
    p = "fbp"
    model = {key_slot(keys.model_key(p, *k).encode()) for k in
             [("seq",), ("current",), ("history",), ("v", 3), ("v", 3, "meta")]}
    trainer = {key_slot(keys.trainer_key(p, k).encode()) for k in
               ["recent", "reservoir", "seq", "offsets", "requests", "state", "decisions"]}
    assert len(model) == 1 and len(trainer) == 1
    for u in (0, 1, 1023, 1024, 98765):
        b = keys.state_bucket(u)
        assert key_slot(keys.state_key(p, u).encode()) == key_slot(keys.users_key(p, b).encode())
    spread = {key_slot(keys.state_key(p, u).encode()) for u in range(5000)}
    assert len(spread) > 900


# -- failover ---------------------------------------------------------------------
def _kill(cl: LocalCluster, port: int) -> None:
    """SIGKILL the redis-server on ``port`` (no shutdown, no final AOF write)."""
    os.kill(int(cl.node(port).info("server")["process_id"]), signal.SIGKILL)


def _healed(cl: LocalCluster) -> bool:
    masters = replicas_up = 0
    for port in cl.ports:
        try:
            info = cl.node(port).info("replication")
        except redis.ConnectionError:
            return False
        if info["role"] == "master":
            masters += 1
        elif info.get("master_link_status") == "up":
            replicas_up += 1
    return masters == 3 and replicas_up == 3


def _promoted(cl: LocalCluster, victim: int) -> bool:
    """A live node's slot map no longer names the killed node as a master:
    one of its replicas has been promoted."""
    for port in cl.ports:
        if port == victim:
            continue
        try:
            slots = cl.node(port).cluster("slots")
        except redis.RedisError:
            continue
        return all(int(rng[2][1]) != victim for rng in slots)  # [start, end, [host, port, id], replicas...]
    return False


def _serving(cl: LocalCluster) -> bool:
    """Every slot has a live master again (what reads through the cluster
    client need; a restarted node may still be resyncing as a replica)."""
    for port in cl.ports:
        try:
            return cl.node(port).cluster("info").get("cluster_state") == "ok"
        except redis.RedisError:
            continue
    return False


def _diagnose(cl: LocalCluster) -> str:
    """Each node's role and link, and the log tail of any node that is down."""
    from stack import redis_cluster as rc
    from stack.supervisor import log_tail

    rows = []
    for svc in rc.nodes(cl.settings):
        try:
            info = svc.client(1.0).info("replication")
            rows.append(f"{svc.port}: {info['role']} link={info.get('master_link_status', '-')}")
        except redis.RedisError as exc:
            rows.append(f"{svc.port}: DOWN ({exc})\n{log_tail(svc, 15)}")
    return "\n".join(rows)


def _heal(cl: LocalCluster, within_s: float) -> bool:
    """Restart whatever node is down and wait for 3 masters with 3 linked replicas."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if _healed(cl):
            return True
        try:
            cl.restart_missing_nodes()
        except Exception:  # noqa: BLE001 -- a node still shutting down; try again
            pass
        time.sleep(1.0)
    return _healed(cl)


@pytest.mark.slow
def test_master_failover_loses_no_acknowledged_write(redis_cfg, local_cluster):  # noqa: F811
    """Kill -9 the master that owns user 0 while batches of 200 users are
    stored with wait_replicas=1.  Every batch either raises (not durable: the
    worker would not commit it) or is on a replica; after the failover each
    user holds at least its last acknowledged write."""
    if not redis_cfg.cluster:
        pytest.skip("failover needs the cluster")
    if foreign := local_cluster.foreign_nodes():
        pytest.skip(f"the running cluster is another checkout's stack ({foreign[0]}); "
                    "killing and restarting its nodes from here would break it")
    victim = None
    restarted = False

    async def go() -> tuple[dict[int, int], int]:
        nonlocal victim, restarted
        client = async_redis(redis_cfg)
        store = StateStore(client, redis_cfg.key_prefix, wait_replicas=1, wait_timeout_ms=500)
        users = list(range(200))
        acked: dict[int, int] = {}
        refused = 0
        b = 0
        deadline = time.monotonic() + 240
        while b < 40 and time.monotonic() < deadline:
            if b == 15 and victim is None:
                victim = client.get_node_from_key(store.key(0)).port
                _kill(local_cluster, victim)
            # As an operator would: once the replica has taken over (the killed
            # node is not back yet), restart the dead node so the new master
            # has a replica again and WAIT 1 can succeed.
            if refused >= 3 and not restarted and _promoted(local_cluster, victim):
                await asyncio.to_thread(local_cluster.restart_missing_nodes)
                restarted = True
            rows = [(u, f"b{b}".encode(), [("r", 0, b)]) for u in users]
            try:
                await store.store(rows)
            except Exception as exc:  # noqa: BLE001 -- classified as the worker does
                if not is_infrastructure(exc):  # StateNotDurable, RedisError, RedisClusterException
                    raise
                refused += 1  # a worker exits 75 here; Kafka redelivers the batch
                await asyncio.sleep(0.3)
                continue
            acked.update((u, b) for u in users)
            b += 1
        await client.aclose()
        return acked, refused

    try:
        acked, refused = asyncio.run(go())
        assert victim is not None and restarted, "the killed master was never restarted"
        end = time.monotonic() + 90
        while not _serving(local_cluster) and time.monotonic() < end:
            time.sleep(0.5)
        assert _serving(local_cluster), "no live master for some slots after the failover:\n" + _diagnose(
            local_cluster)

        async def check() -> list:
            client = async_redis(redis_cfg)
            got = await StateStore(client, redis_cfg.key_prefix).load(list(acked))
            await client.aclose()
            return got

        got = asyncio.run(check())
        lost = [u for u, s in zip(acked, got) if s.marks.get(("r", 0), -1) < acked[u]]
        print(f"  failover of master :{victim}: {len(acked)} users, {refused} store calls refused "
              f"as not durable or failed, {len(lost)} acknowledged writes lost")
        assert refused > 0, "the promoted master had no replica, yet WAIT 1 was satisfied"
        assert lost == []
    finally:  # leave the cluster whole for the tests after this one
        healed = _heal(local_cluster, 120)
    assert healed, "the cluster did not heal after the failover:\n" + _diagnose(local_cluster)
