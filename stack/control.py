"""The stack's public operations: up, down, status, and one node at a time.

``stack_up`` starts what is not running (all launches first, then the health
waits, so start-ups overlap), forms the Redis Cluster when one is configured,
and creates the project's topics -- on a multi-broker cluster with its
replication factor and ``min.insync.replicas``.  Idempotent.  ``stack_down``
stops every process this data dir's stack started, single or clustered.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from core.settings import Settings, get_settings
from stack import kafka_cluster, supervisor
from stack import redis_cluster as rcluster
from stack.registry import SERVICES, configured, node, variants, with_options
from stack.service import Service, ServiceStatus


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else get_settings()


def stack_up(
    settings: Settings | None = None,
    services: Iterable[str] = SERVICES,
    *,
    topics: bool = True,
    timeout_s: float = 90.0,
    kafka_brokers: int | None = None,
    redis_cluster: bool | None = None,
) -> list[ServiceStatus]:
    """Start what is not running, wait for health, form the Redis Cluster,
    create Kafka topics; idempotent.  The keyword options override settings.stack."""
    settings = with_options(_settings(settings), kafka_brokers=kafka_brokers, redis_cluster=redis_cluster)
    names = list(services)
    procs = [svc for n in names for svc in configured(n, settings)]
    with supervisor.locked(settings):
        statuses = supervisor.start_many(procs, settings, timeout_s)
        if "redis" in names and settings.stack.redis_cluster:
            rcluster.form(settings, timeout_s)
        if topics and "kafka" in names:
            from core.topics import ensure_topics

            ensure_topics(topic_settings(settings))
    return statuses


@contextmanager
def running(settings: Settings, services: Iterable[str] = SERVICES, *, timeout_s: float = 180.0,
            **options: Any) -> Iterator[list[ServiceStatus]]:
    """The services up for the length of a ``with`` block and always stopped
    after it -- also when start-up itself fails half-way (a cluster is nine
    processes: none may be left behind).  For tests and throw-away stacks."""
    names = list(services)
    try:
        rows = stack_up(settings, names, timeout_s=timeout_s, **options)
    except BaseException:
        stack_down(settings, names, timeout_s=10)
        raise
    try:
        yield rows
    finally:
        stack_down(settings, names, timeout_s=30)


def topic_settings(settings: Settings) -> Settings:
    """Settings whose Kafka part reaches the configured local broker(s)."""
    return kafka_cluster.client_settings(settings) if settings.stack.kafka_brokers > 1 else settings


def stack_down(
    settings: Settings | None = None,
    services: Iterable[str] = SERVICES,
    *,
    sig: int = signal.SIGTERM,
    timeout_s: float = 30.0,
) -> list[str]:
    """Stop every process of these services that this stack started (single or
    cluster nodes; others are left alone); returns the names stopped."""
    settings = _settings(settings)
    procs = [svc for n in reversed(list(services)) for svc in _down_targets(n, settings)]
    return supervisor.stop_many(procs, settings, sig, timeout_s=timeout_s)


def _down_targets(name: str, settings: Settings) -> list[Service]:
    """A logical service's every variant, or the one node named."""
    if name in SERVICES:
        return variants(name, settings)
    family = "kafka" if name.startswith("kafka-") else "redis" if name.startswith("redis-node-") else None
    found = [v for v in variants(family, settings) if v.name == name] if family else []
    return found or [node(name, settings)]  # node() refuses unknown names


def stack_status(
    settings: Settings | None = None,
    services: Iterable[str] = SERVICES,
    *,
    include_started: bool = False,
) -> list[ServiceStatus]:
    """Pid, port and health of each configured process (quick; starts nothing).
    ``include_started`` adds the other variants this stack is running (e.g. a
    cluster started with ``up --kafka-brokers 3`` while settings say 1), and
    then leaves out a configured variant that is not running."""
    settings = _settings(settings)
    rows = []
    for n in services:
        mine = [supervisor.status_of(p) for p in configured(n, settings)]
        if include_started:
            shown = {r.name for r in mine}
            others = [supervisor.status_of(v) for v in variants(n, settings)
                      if v.name not in shown and supervisor.ours(v)]  # fmt: skip
            if others and not any(r.running for r in mine):
                mine = []  # e.g. only the cluster runs: the idle single broker is no fault
            mine += others
        rows += mine
    return rows


def clusters_running(settings: Settings | None = None) -> dict[str, dict[str, str]]:
    """For each local cluster this stack runs, its state and the client variables."""
    settings = _settings(settings)
    out: dict[str, dict[str, str]] = {}
    kafka_nodes = [v for v in variants("kafka", settings) if v.name.startswith("kafka-") and supervisor.ours(v)]
    if kafka_nodes:
        ks = with_options(settings, kafka_brokers=max(len(kafka_nodes), settings.stack.kafka_brokers))
        out["kafka"] = {"brokers": str(len(kafka_nodes)), **kafka_cluster.client_env(ks)}
    if any(supervisor.ours(n) for n in rcluster.nodes(settings)):
        st = rcluster.state(settings)
        out["redis"] = {"state": st.detail, **rcluster.client_env(settings)}
    return out


def start_service(name: str, settings: Settings | None = None, *, timeout_s: float = 90.0) -> ServiceStatus:
    """Start one process (no-op if running) and wait until it is healthy."""
    settings = _settings(settings)
    return supervisor.start_many([node(name, settings)], settings, timeout_s)[0]


def stop_service(
    name: str,
    settings: Settings | None = None,
    sig: int = signal.SIGTERM,
    *,
    timeout_s: float = 30.0,
) -> bool:
    """Signal the process we started (``sig``, then SIGKILL after ``timeout_s``).

    Returns False if it was not running.  ``sig=SIGKILL`` simulates a crash.
    """
    settings = _settings(settings)
    return supervisor.stop(node(name, settings), settings, sig, timeout_s=timeout_s)


def service_healthy(name: str, settings: Settings | None = None) -> bool:
    """Does the process answer a real request (Kafka metadata, Redis PING, Prometheus ready)?"""
    return node(name, _settings(settings)).health(3.0)[0]
