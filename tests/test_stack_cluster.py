"""``fbp stack up --kafka-brokers 3 --redis-cluster`` against the real processes:
a 3-broker KRaft cluster whose project topics get RF 3 / min.insync.replicas 2,
and a 3-master + 3-replica Redis Cluster; ``down`` stops all nine processes.

Runs on its own ports and data dir (override with FBP_CLUSTER_TEST_KAFKA_PORT /
FBP_CLUSTER_TEST_REDIS_PORT), so the default stack others use keeps running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from core.settings import REPO_ROOT, Settings, load_settings
from stack import clusters_running, running, stack_down, stack_status, topic_settings
from stack.service import port_open

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KAFKA_PORT = int(os.environ.get("FBP_CLUSTER_TEST_KAFKA_PORT", "19392"))
REDIS_PORT = int(os.environ.get("FBP_CLUSTER_TEST_REDIS_PORT", "7300"))


def cluster_settings(data_dir) -> Settings:
    return load_settings(stack={
        "data_dir": data_dir, "kafka_brokers": 3, "kafka_cluster_port": KAFKA_PORT,
        "kafka_cluster_controller_port": KAFKA_PORT + 100, "redis_cluster": True,
        "redis_cluster_port": REDIS_PORT, "kafka_heap": "384m",
    }, kafka={"ratings_topic": "cluster-ratings", "predictions_topic": "cluster-predictions",
              "dlq_topic": "cluster-dlq", "model_updates_topic": "cluster-model-updates"})  # fmt: skip


def all_ports(s: Settings) -> list[int]:
    st = s.stack
    kafka = [st.kafka_cluster_port + i for i in range(3)] + [st.kafka_cluster_controller_port + i for i in range(3)]
    return kafka + [st.redis_cluster_port + i for i in range(6)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Settings]:
    data = tmp_path_factory.mktemp("cluster-stack")
    libs = load_settings().stack.data_dir / "kafka-libs"
    if libs.is_dir():  # reuse the fetched jars instead of a second Maven download
        (data / "kafka-libs").symlink_to(libs)
    s = cluster_settings(data)
    taken = [p for p in all_ports(s) if port_open(p)]
    if taken:
        pytest.fail(f"cluster-test ports {taken} are in use; set FBP_CLUSTER_TEST_KAFKA_PORT / _REDIS_PORT")
    with running(s, ["kafka", "redis"]) as rows:
        assert not any(r.external for r in rows)
        yield s


def test_up_starts_nine_processes(cluster):
    rows = stack_status(cluster, ["kafka", "redis"])
    assert [r.name for r in rows] == [f"kafka-{i}" for i in (1, 2, 3)] + [f"redis-node-{i}" for i in range(1, 7)]
    assert all(r.healthy and r.pid for r in rows)
    assert len({r.pid for r in rows}) == 9


def test_redis_cluster_has_three_masters_three_replicas(cluster):
    node = redis.Redis(port=cluster.stack.redis_cluster_port)
    try:
        info = node.cluster("info")  # redis-py parses CLUSTER INFO / NODES into dicts
        roles = [n["flags"] for n in node.cluster("nodes").values()]
    finally:
        node.close()
    assert info["cluster_state"] == "ok"
    assert int(info["cluster_slots_assigned"]) == 16384
    assert int(info["cluster_known_nodes"]) == 6
    assert sum("master" in r for r in roles) == 3
    assert sum("slave" in r for r in roles) == 3


def test_redis_cluster_client_spreads_keys(cluster):
    rc = RedisCluster(host="127.0.0.1", port=cluster.stack.redis_cluster_port)
    try:
        for i in range(60):
            rc.set(f"cluster-test:{i}", i)
        assert [int(rc.get(f"cluster-test:{i}")) for i in range(60)] == list(range(60))
        masters = {rc.get_node_from_key(f"cluster-test:{i}").name for i in range(60)}
        assert len(masters) == 3
        rc.delete(*(f"cluster-test:{i}" for i in range(60)))
    finally:
        rc.close()


def test_project_topics_have_rf3_and_min_insync2(cluster):
    from kafka.admin import ConfigResource, ConfigResourceType

    from core.kafka_io import make_admin
    from core.topics import ensure_topics, topic_specs

    ts = topic_settings(cluster)
    assert ts.kafka.servers == [f"127.0.0.1:{KAFKA_PORT + i}" for i in range(3)]
    ensure_topics(ts)  # idempotent: `up` created them already
    admin = make_admin(ts)
    try:
        described = {t["name"]: t for t in admin.describe_topics(list(topic_specs(ts)))}
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, configs=["min.insync.replicas"]) for t in described]
        )
    finally:
        admin.close()
    assert set(described) == set(topic_specs(ts))
    for t in described.values():
        for p in t["partitions"]:
            assert len(p["replica_nodes"]) == 3, (t["name"], p)
            assert len(p["isr_nodes"]) >= 2, (t["name"], p)
    # Only topic-level overrides are listed (the default 'modified' filter), so
    # this sees what core.topics set, not the brokers' own default.
    found = {name: _value(cfg.get("min.insync.replicas")) for name, cfg in configs["topic"].items()}
    assert found == {t: "2" for t in described}


def _value(entry):
    return entry.get("value") if isinstance(entry, dict) else entry


def test_status_prints_client_settings(cluster):
    clusters = clusters_running(cluster)
    assert clusters["kafka"]["FBP_KAFKA__BOOTSTRAP_SERVERS"] == ",".join(
        f"127.0.0.1:{KAFKA_PORT + i}" for i in range(3))
    assert clusters["kafka"]["FBP_KAFKA__MIN_INSYNC_REPLICAS"] == "2"
    assert clusters["redis"]["FBP_REDIS__URL"] == f"redis://127.0.0.1:{REDIS_PORT}/0"
    env = {**os.environ, "FBP_STACK__DATA_DIR": str(cluster.stack.data_dir),
           "FBP_STACK__KAFKA_CLUSTER_PORT": str(KAFKA_PORT),
           "FBP_STACK__KAFKA_CLUSTER_CONTROLLER_PORT": str(KAFKA_PORT + 100),
           "FBP_STACK__REDIS_CLUSTER_PORT": str(REDIS_PORT),
           # The single broker/Redis of this data dir: on idle ports, not the default stack's.
           "FBP_STACK__KAFKA_PORT": str(KAFKA_PORT + 50), "FBP_STACK__KAFKA_CONTROLLER_PORT": str(KAFKA_PORT + 51),
           "FBP_STACK__REDIS_PORT": str(REDIS_PORT + 50)}
    out = subprocess.run(
        # No --kafka-brokers / --redis-cluster: status shows the clusters this data dir runs.
        [sys.executable, "-m", "fbp.cli", "stack", "status", "-s", "kafka", "-s", "redis"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"export FBP_KAFKA__BOOTSTRAP_SERVERS={clusters['kafka']['FBP_KAFKA__BOOTSTRAP_SERVERS']}" in out.stdout
    assert f"export FBP_REDIS__URL=redis://127.0.0.1:{REDIS_PORT}/0" in out.stdout
    assert "3 masters, 3 replicas" in out.stdout
    assert all(f"kafka-{i} " in out.stdout for i in (1, 2, 3))
    assert all(f"redis-node-{i} " in out.stdout for i in range(1, 7))


def test_down_stops_every_node(tmp_path_factory, cluster):
    """Last in the module: stop everything, then check all twelve ports are free."""
    stopped = stack_down(cluster, ["kafka", "redis"])
    assert sorted(stopped) == sorted([f"kafka-{i}" for i in (1, 2, 3)] + [f"redis-node-{i}" for i in range(1, 7)])
    assert [p for p in all_ports(cluster) if port_open(p)] == []
    assert stack_down(cluster, ["kafka", "redis"]) == []
