"""The local stack against the real processes: idempotent up, health, a Kafka
round trip, and Kafka/Redis surviving a stop or crash and restart."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError

from core.settings import REPO_ROOT, load_settings
from stack import (
    SERVICES,
    StackError,
    service_healthy,
    stack_status,
    stack_up,
    start_service,
    stop_service,
)
from core.kafka_io import make_consumer, make_producer

pytestmark = pytest.mark.integration


def test_up_is_idempotent(stack):
    before = {s.name: s.pid for s in stack_status(stack)}
    again = stack_up(stack)
    assert [s.name for s in again] == list(SERVICES)
    assert all(s.healthy for s in again)
    assert {s.name: s.pid for s in again} == before  # nothing restarted
    assert all(s.started_in_s is None for s in again if not s.external)


def test_status_reports_healthy(stack):
    rows = stack_status(stack)
    assert {r.name: (r.healthy, r.port) for r in rows} == {
        "kafka": (True, stack.stack.kafka_port),
        "redis": (True, stack.stack.redis_port),
        "prometheus": (True, stack.stack.prometheus_port),
    }
    out = subprocess.run(
        [sys.executable, "-m", "fbp.cli", "stack", "status"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for name in SERVICES:
        assert name in out.stdout


def test_topics_exist_with_partitions(stack):
    from core.kafka_io import make_admin

    admin = make_admin(stack)
    try:
        parts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    finally:
        admin.close()
    k = stack.kafka
    assert parts[k.ratings_topic] == k.partitions
    assert parts[k.predictions_topic] == k.partitions
    assert parts[k.dlq_topic] == k.partitions
    assert parts[k.model_updates_topic] == 1


def test_produce_consume_round_trip(clean_topics):
    s = clean_topics
    topic = s.kafka.ratings_topic
    prod = make_producer(s)
    sent = [(str(u).encode(), f"{u}-{i}".encode()) for i in range(20) for u in (1, 2, 3, 42)]
    for key, val in sent:
        prod.send(topic, value=val, key=key)
    prod.flush()
    prod.close()

    cons = make_consumer(s, consumer_timeout_ms=10_000)
    tps = [TopicPartition(topic, p) for p in range(s.kafka.partitions)]
    cons.assign(tps)
    cons.seek_to_beginning(*tps)
    got = []
    for msg in cons:
        got.append((msg.key, msg.value, msg.partition))
        if len(got) == len(sent):
            break
    cons.close()
    assert sorted((k, v) for k, v, _ in got) == sorted(sent)
    for key in {k for k, _ in sent}:
        mine = [(v, p) for k, v, p in got if k == key]
        assert len({p for _, p in mine}) == 1, "one key, one partition"
        assert [v for v, _ in mine] == [v for k, v in sent if k == key], "order kept per key"


def test_kafka_stop_makes_produce_fail_then_restart_recovers(stack):
    topic = stack.kafka.ratings_topic
    prod = make_producer(
        stack, request_timeout_ms=1000, delivery_timeout_ms=3000, max_block_ms=3000, linger_ms=0
    )
    prod.send(topic, b"warm-up", key=b"1").get(timeout=10)  # metadata cached
    try:
        assert stop_service("kafka", stack) is True
        assert not service_healthy("kafka", stack)
        t0 = time.monotonic()
        with pytest.raises(KafkaError):
            prod.send(topic, b"lost", key=b"1").get(timeout=15)
        assert time.monotonic() - t0 < 15
    finally:
        prod.close(timeout=1)
        st = start_service("kafka", stack)
    assert st.healthy and st.started_in_s is not None
    p2 = make_producer(stack)
    md = p2.send(topic, b"after-restart", key=b"1").get(timeout=30)
    p2.close()
    assert md.offset >= 0


def test_redis_crash_keeps_acknowledged_writes(stack, redis_client):
    key = f"test:crash:{uuid.uuid4().hex}"
    redis_client.set(key, "kept")
    time.sleep(1.5)  # appendfsync everysec: the AOF has it after a second
    try:
        assert stop_service("redis", stack, signal.SIGKILL) is True
        assert not service_healthy("redis", stack)
    finally:
        start_service("redis", stack)
    assert redis_client.get(key) == b"kept"
    redis_client.delete(key)


def test_taken_port_is_a_clear_error(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    s = load_settings(stack={"data_dir": tmp_path, "prometheus_port": port})
    try:
        with pytest.raises(StackError, match=f"port {port} is taken"):
            start_service("prometheus", s, timeout_s=5)
    finally:
        sock.close()


def test_missing_program_is_a_clear_error(tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    s = load_settings(stack={"data_dir": tmp_path, "redis_port": free})
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError, match="redis-server not found"):
        start_service("redis", s, timeout_s=5)


def test_unknown_service_is_refused(stack):
    with pytest.raises(StackError, match="unknown service"):
        stop_service("zookeeper", stack)
