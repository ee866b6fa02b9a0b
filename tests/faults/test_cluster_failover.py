"""Failures on the clusters (issue #15 item 3): the leader broker of the
ratings partitions SIGKILLed on a 3-broker KRaft cluster, and a Redis master
SIGKILLed (its replica promoted) on a 3+3 Redis Cluster, both mid-replay.

The check is the fault suite's oracle (:meth:`tests.faults.conftest.Scenario.verify`):
every event id has a prediction (``missing=0``) and the final Redis state of
every user equals an undisturbed in-process run of the same events
(``state_mismatches=0``).

Why a cluster of its own: these tests kill nodes, so they start a private
3-broker Kafka and 3+3 Redis Cluster with the stack code (``stack_up`` with
``kafka_brokers=3`` and ``redis_cluster=True``) on their own ports and data
dir -- never the default stack (9092 / 6379) nor the stack's cluster ports
(9192.. / 7100..) that others use.  Ports: ``FBP_FAILOVER_KAFKA_PORT`` (three
brokers from there, controllers at +100) and ``FBP_FAILOVER_REDIS_PORT`` (six
nodes from there, cluster bus at +10000).

Durable settings under test (README, "Guarantees"): topics with replication
factor 3 and ``min.insync.replicas=2``, ``acks=all`` idempotent producers (the
replay and the worker); the worker on redis-py's cluster client with
``FBP_REDIS__WAIT_REPLICAS=1`` (each state write waits for one replica before
the batch's offsets are committed).  6,000 ML-100K events per scenario, fewer
than the single-node scenarios, so each fits in ~3 minutes on 2 cores.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kafka.errors import KafkaError

from core.settings import Settings, load_settings
from stack import kafka_cluster, running, stack_up, start_service, stop_service
from stack import redis_cluster as rcluster
from stack import procs
from stack.procs import Namespace
from stack.service import port_open
from tests.faults.conftest import Scenario

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]

KAFKA_PORT = int(os.environ.get("FBP_FAILOVER_KAFKA_PORT", "19692"))
REDIS_PORT = int(os.environ.get("FBP_FAILOVER_REDIS_PORT", "7600"))
EVENTS = 6_000
RATE = 200  # events/s: a 30 s replay, so the fault and the recovery land inside it


# -- the private clusters ---------------------------------------------------------
def cluster_settings(data_dir: Path) -> Settings:
    """3 brokers + 3+3 Redis Cluster on this file's ports; clients pointed at
    them with RF 3 / min.insync 2 and WAIT for one replica."""
    s = load_settings(stack={
        "data_dir": data_dir, "kafka_brokers": 3, "kafka_cluster_port": KAFKA_PORT,
        "kafka_cluster_controller_port": KAFKA_PORT + 100, "redis_cluster": True,
        "redis_cluster_port": REDIS_PORT, "kafka_heap": "320m",
    }, kafka={"security_protocol": "PLAINTEXT", "sasl_mechanism": None},
       redis={"url": f"redis://127.0.0.1:{REDIS_PORT}/0", "cluster": True, "wait_replicas": 1,
              "username": None, "password": None})  # fmt: skip
    return kafka_cluster.client_settings(s)


def all_ports(s: Settings) -> list[int]:
    st = s.stack
    return ([st.kafka_cluster_port + i for i in range(3)]
            + [st.kafka_cluster_controller_port + i for i in range(3)]
            + [p + d for p in rcluster.ports(s) for d in (0, 10000)])  # fmt: skip


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> Iterator[Settings]:
    """Both clusters, started once for this file and stopped at its end."""
    data = tmp_path_factory.mktemp("failover-stack")
    libs = load_settings().stack.data_dir / "kafka-libs"
    if libs.is_dir():  # the jars the default stack fetched: no second Maven download
        (data / "kafka-libs").symlink_to(libs)
    s = cluster_settings(data)
    taken = [p for p in all_ports(s) if port_open(p)]
    if taken:
        pytest.fail(f"failover-test ports {taken} are in use; set FBP_FAILOVER_KAFKA_PORT / "
                    "FBP_FAILOVER_REDIS_PORT")
    with running(s, ["kafka", "redis"], topics=False) as rows:
        assert not any(r.external for r in rows)
        yield s


@pytest.fixture(scope="module")
def cluster_df(ml100k):
    """The replayed slice: the first 6,000 ratings of ML-100K (row index = event id)."""
    return ml100k.ratings.iloc[:EVENTS]


@pytest.fixture(scope="module")
def cluster_reference(ckpt, cluster_df):
    """The undisturbed run of the same events, in process."""
    from models.checkpoint import load_checkpoint
    from tests.streamkit import simulate

    model, _ = load_checkpoint(ckpt)
    _, uindex, states = simulate(model, cluster_df)
    return model, uindex, states


@pytest.fixture
def cns(clusters) -> Iterator[Namespace]:
    # a failed scenario may have left a node down: bring everything back first
    stack_up(clusters, ["kafka", "redis"], topics=False, timeout_s=180)
    n = Namespace.fresh(4, clusters)
    n.create()  # RF 3, min.insync.replicas 2 (from the cluster's client settings)
    yield n
    try:
        n.drop()
    except Exception:  # noqa: BLE001 - best-effort clean-up; the data dir goes with tmp
        pass


class ClusterScenario(Scenario):
    """The fault suite's scenario, with workers on the clusters' client variables."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(kafka_cluster.client_env(self.settings))
        env.update(rcluster.client_env(self.settings))
        env["FBP_REDIS__WAIT_REPLICAS"] = str(self.settings.redis.wait_replicas)
        return env


@pytest.fixture
def cluster_scenario(clusters, cns, ckpt, cluster_df, cluster_reference, tmp_path):
    def make(name: str, port: int, **kw) -> ClusterScenario:
        return ClusterScenario(name, clusters, cns, ckpt, cluster_df, cluster_reference, tmp_path, port, **kw)

    return make


# -- Kafka: the leader broker --------------------------------------------------------
def ratings_leaders(s: Settings, topic: str, down: int | None = None) -> dict[int, int]:
    """partition -> leader broker id (-1 while none) of ``topic``, asked of the
    brokers other than ``down`` (a dead bootstrap server fails the admin client)."""
    from core.kafka_io import make_admin

    live = [f"127.0.0.1:{p}" for i, p in enumerate(kafka_cluster.client_ports(s), 1) if i != down]
    admin = make_admin(s, bootstrap_servers=live)
    try:
        (desc,) = admin.describe_topics([topic])
    finally:
        admin.close()
    return {p["partition_index"]: p["leader_id"] for p in desc["partitions"]}


def test_kafka_leader_broker_killed_mid_replay(cluster_scenario):
    """SIGKILL the broker leading the most ratings partitions at 30% of the
    replay.  Its partitions' leadership moves to an in-sync replica; the replay
    producer (acks=all, idempotent) and the *same* worker process ride it out.
    The broker is restarted after the replay."""
    sc = cluster_scenario("kafka_leader_kill", port=6291, seed=11)
    s = sc.settings
    # a topic just created on a cluster just started may not have its leaders yet
    deadline = time.monotonic() + 60
    before = ratings_leaders(s, sc.ns.ratings)
    while not (before and all(b > 0 for b in before.values())) and time.monotonic() < deadline:
        time.sleep(0.5)
        before = ratings_leaders(s, sc.ns.ratings)
    led = [b for b in before.values() if b > 0]
    assert len(led) == len(before) > 0, f"the ratings partitions have no leaders after 60 s: {before}"
    victim = max(set(led), key=led.count)
    moved = sorted(p for p, b in before.items() if b == victim)
    worker = sc.start_worker()
    sc.feed(rate=RATE)
    try:
        sc.wait_fraction(0.3)
        assert stop_service(f"kafka-{victim}", s, signal.SIGKILL) is True
        sc.faults += 1
        t0 = time.monotonic()
        after = before
        while time.monotonic() - t0 < 60:
            try:
                after = ratings_leaders(s, sc.ns.ratings, down=victim)
            except KafkaError:  # the admin may still pick the dead broker until metadata catches up
                after = before
            if all(after[p] not in (victim, -1) for p in moved):
                break
            time.sleep(0.5)
        print(f"  killed broker {victim} (leader of ratings partitions {moved}) at {sc.progress} "
              f"predicted; leaders {before} -> {after} in {time.monotonic() - t0:.1f}s")
        assert all(after[p] not in (victim, -1) for p in moved), "leadership never moved off the killed broker"
        sc.join_feed()
        assert worker.alive(), "worker died while a broker was down:\n" + worker.tail()
        sc.verify([worker], timeout=300)
    finally:
        worker.kill()
        start_service(f"kafka-{victim}", s, timeout_s=120)  # the cluster whole again for the next test


# -- Redis: a master failed over to its replica -------------------------------------
def _node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)


def master_and_replica(s: Settings, key: str) -> tuple[int, int]:
    """Ports of the master serving ``key`` and of its replica."""
    from redis.cluster import RedisCluster

    rc = RedisCluster(host="127.0.0.1", port=s.stack.redis_cluster_port)
    try:
        master = rc.get_node_from_key(key).port
        nodes = rc.cluster_nodes()
    finally:
        rc.close()
    port = {k: int(k.split("@")[0].rsplit(":", 1)[1]) for k in nodes}  # "host:port[@bus]"
    mid = next(v["node_id"] for k, v in nodes.items() if port[k] == master)
    return master, next(port[k] for k, v in nodes.items() if v["master_id"] == mid)


def role(port: int) -> str:
    try:
        return _node(port).info("replication")["role"]
    except redis.RedisError:
        return "down"


def test_redis_master_failover_mid_replay(cluster_scenario):
    """SIGKILL the master that owns the first user's state at 30% of the
    replay; the cluster promotes its replica (cluster-node-timeout 5 s).  The
    promoted master has no replica until the old one is restarted and rejoins,
    so WAIT 1 refuses writes meanwhile: a refused batch is not committed (the
    worker exits 75 and is restarted, as a supervisor would) and is
    redelivered.  Nothing acknowledged is lost: 0 missing, state exact."""
    from core.repos import keys

    sc = cluster_scenario("redis_master_failover", port=6292, seed=12)
    s = sc.settings
    first_user = int(sc.df.sort_values("ts", kind="stable")["user_id"].iloc[0])
    victim, replica = master_and_replica(s, keys.state_key(sc.ns.prefix, first_user))
    victim_name = f"redis-node-{victim - s.stack.redis_cluster_port + 1}"
    workers = [sc.start_worker()]
    sc.feed(rate=RATE)
    try:
        sc.wait_fraction(0.3)
        assert stop_service(victim_name, s, signal.SIGKILL) is True
        sc.faults += 1
        t0 = time.monotonic()
        while role(replica) != "master" and time.monotonic() - t0 < 60:
            time.sleep(0.25)
        promoted = time.monotonic() - t0
        assert role(replica) == "master", f"replica :{replica} was not promoted"
        start_service(victim_name, s, timeout_s=60)  # rejoins as the new master's replica
        while role(victim) != "slave" and time.monotonic() - t0 < 120:
            time.sleep(0.25)
        print(f"  killed master :{victim} at {sc.progress} predicted; replica :{replica} promoted "
              f"after {promoted:.1f}s; old master back as {role(victim)} after {time.monotonic() - t0:.1f}s")
        sc.join_feed()
        workers += restart_if_exited(sc, workers[-1])
        sc.verify(workers, timeout=300)
    finally:
        for w in workers:
            w.kill()


def restart_if_exited(sc: Scenario, worker: procs.Proc) -> list[procs.Proc]:
    """A worker that failed stop (75: a batch not durable or Redis away) is
    replaced, as systemd / k8s / compose would; its batch is redelivered."""
    if worker.alive():
        return []
    code = worker.popen.returncode
    print(f"  worker exited ({code}) during the failover; restarting")
    assert code == 75, f"worker exited with {code}, not the fail-stop 75:\n{worker.tail()}"
    return [sc.start_worker()]


# -- Redis: every master at maxmemory -------------------------------------------------
def test_a_full_redis_cluster_pauses_the_worker_and_loses_nothing(cluster_scenario):
    """Every master's maxmemory set 512 KB below its use at 30% of the replay
    (noeviction): the worker pauses with the full-Redis message, the masters
    gain no key while more events arrive, and once maxmemory is lifted it goes
    on by itself: 0 missing, state exact, no repeat, no exit."""
    from tests.faults.test_redis_full import _produced
    from tests.streamkit import read_topic

    sc = cluster_scenario("redis_cluster_full", port=6293, seed=13)
    s = sc.settings
    nodes = [_node(p) for p in rcluster.ports(s)]
    masters = [n for n in nodes if n.info("replication")["role"] == "master"]

    def keys_now() -> int:
        return sum(int(n.dbsize()) for n in masters)

    worker = sc.start_worker()
    sc.feed(rate=RATE)
    try:
        sc.wait_fraction(0.3)
        for n in masters:
            n.config_set("maxmemory-policy", "noeviction")
            n.config_set("maxmemory", str(int(n.info("memory")["used_memory"]) - 512 * 1024))
        sc.faults += 1
        deadline = time.monotonic() + 120
        while "Redis is full" not in worker.log.read_text(errors="replace"):
            assert time.monotonic() < deadline and worker.alive(), worker.tail()
            time.sleep(0.2)
        keys_then, produced_then = keys_now(), _produced(sc)
        while _produced(sc) <= produced_then + 300:
            assert time.monotonic() < deadline + 120, "the replay stalled"
            time.sleep(0.2)
        assert keys_now() == keys_then and worker.alive()
        print(f"  cluster full at {sc.progress} predicted; {keys_then} keys while events "
              f"{produced_then} -> {_produced(sc)} arrived")
        for n in masters:
            n.config_set("maxmemory", "0")
        sc.join_feed()
        assert worker.alive(), worker.tail()
        sc.verify([worker], timeout=300)
        recs = read_topic(s, sc.ns.predictions, until=len(sc.df), timeout=60)
        assert len(recs) == len({r["event_id"] for r in recs}), "a pause must not redeliver anything"
        assert "resumed after" in worker.log.read_text(errors="replace")
    finally:
        for n in nodes:
            try:
                n.config_set("maxmemory", "0")
            except redis.RedisError:
                pass
        worker.kill()
