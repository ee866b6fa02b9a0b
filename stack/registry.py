"""Which :class:`~stack.service.Service` objects a service name stands for.

Three logical services make the stack: ``kafka``, ``redis`` and ``prometheus``.
``kafka`` is the single broker, or with ``stack.kafka_brokers`` > 1 the nodes
``kafka-1`` ... ``kafka-N``; ``redis`` is the single store, or with
``stack.redis_cluster`` the nodes ``redis-node-1`` ... ``-6``.  Node names
address one process (``fbp stack down -s kafka-2``, fault tests).
"""

from __future__ import annotations

import re
from pathlib import Path

from core.settings import Settings
from fbp_errors import StackError
from stack import kafka_cluster, redis_cluster
from stack.kafka import single_node
from stack.prometheus import Prometheus
from stack.redis import RedisNode, secure_redis
from stack.service import Service

SERVICES: tuple[str, ...] = ("kafka", "redis", "prometheus")
_SINGLE = {"kafka": single_node, "redis": RedisNode, "prometheus": Prometheus}


def with_options(settings: Settings, *, kafka_brokers: int | None = None,
                 redis_cluster: bool | None = None) -> Settings:  # fmt: skip
    """``settings`` with the CLI's --kafka-brokers / --redis-cluster applied."""
    upd = {k: v for k, v in (("kafka_brokers", kafka_brokers), ("redis_cluster", redis_cluster)) if v is not None}
    if not upd:
        return settings
    stack = type(settings.stack).model_validate({**settings.stack.model_dump(), **upd})
    return settings.model_copy(update={"stack": stack})


def configured(name: str, settings: Settings) -> list[Service]:
    """The processes logical service ``name`` runs as under ``settings``."""
    st = settings.stack
    if name == "kafka":
        return [single_node(settings)] if st.kafka_brokers == 1 else list(kafka_cluster.nodes(settings))
    if name == "redis":
        return list(redis_cluster.nodes(settings)) if st.redis_cluster else [RedisNode(settings)]
    if name == "prometheus":
        return [Prometheus(settings)]
    raise StackError(f"unknown service {name!r}; choose from {', '.join(SERVICES)} "
                     "(or a node: kafka-<i>, redis-node-<i>)")


def variants(name: str, settings: Settings) -> list[Service]:
    """Every process that ``name`` may have run as in this data dir: the single
    instance and the cluster nodes (sized by the node dirs found), so ``down``
    stops what an earlier ``up --kafka-brokers 3`` started."""
    configured(name, settings)  # refuses unknown names
    data = Path(settings.stack.data_dir)
    if name == "kafka":
        found = _node_count(data, r"kafka-(\d+)")
        out = [single_node(settings)]
        if found:
            out += kafka_cluster.nodes(with_options(settings, kafka_brokers=max(found, 2)))
        return out
    if name == "redis":
        out: list[Service] = [RedisNode(settings)]
        if _node_count(data, r"redis-node-(\d+)") and not secure_redis(settings):
            out += redis_cluster.nodes(settings)
        return out
    return configured(name, settings)


def node(name: str, settings: Settings) -> Service:
    """One process by name: ``kafka``, ``redis``, ``prometheus``, ``kafka-<i>``, ``redis-node-<i>``."""
    if name in _SINGLE:
        return _SINGLE[name](settings)
    m = re.fullmatch(r"kafka-(\d+)", name)
    if m and 1 <= int(m[1]) <= settings.stack.kafka_brokers:
        return kafka_cluster.nodes(settings)[int(m[1]) - 1]
    m = re.fullmatch(r"redis-node-(\d+)", name)
    if m and 1 <= int(m[1]) <= redis_cluster.NODES:
        return redis_cluster.nodes(settings)[int(m[1]) - 1]
    configured(name, settings)  # raises the "unknown service" error
    raise StackError(f"unknown service {name!r}: no such node with stack.kafka_brokers="
                     f"{settings.stack.kafka_brokers}")


def _node_count(data: Path, pattern: str) -> int:
    if not data.is_dir():
        return 0
    ids = [int(m[1]) for p in data.iterdir() if (m := re.fullmatch(pattern, p.name))]
    return max(ids, default=0)

