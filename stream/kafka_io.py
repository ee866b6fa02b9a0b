"""One place that builds kafka-python clients from settings.

Why: every producer/consumer/admin must carry the same connection options
(``settings.kafka.kafka_python_kwargs()``, so TLS/SASL switch on from config
alone) and the same safety defaults (idempotent, ``acks=all`` producers; no
topic auto-creation).  Callers override anything with keyword arguments.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from fbp.settings import Settings

_IDEMPOTENCE = "enable_idempotence" in KafkaProducer.DEFAULT_CONFIG


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A durable producer tuned for throughput (batches up to 256 KiB, 5 ms linger).

    ``acks="all"`` + idempotence: a retried send never duplicates or reorders
    a partition's records, which per-user ordering depends on.
    """
    kw: dict[str, Any] = {
        **settings.kafka.kafka_python_kwargs(),
        "client_id": "fbp-producer",
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_in_flight_requests_per_connection": 5,
        "allow_auto_create_topics": False,
    }
    if _IDEMPOTENCE:
        kw["enable_idempotence"] = True
    kw.update(overrides)
    return KafkaProducer(**kw)


def make_consumer(
    settings: Settings, *topics: str, group_id: str | None = None, **overrides: Any
) -> KafkaConsumer:
    """A consumer from the earliest offset; auto-commits only when in a group."""
    kw: dict[str, Any] = {
        **settings.kafka.kafka_python_kwargs(),
        "client_id": "fbp-consumer",
        "group_id": group_id,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": group_id is not None,
        "allow_auto_create_topics": False,
    }
    kw.update(overrides)
    return KafkaConsumer(*topics, **kw)


def make_admin(settings: Settings, **overrides: Any) -> KafkaAdminClient:
    kw: dict[str, Any] = {**settings.kafka.kafka_python_kwargs(), "client_id": "fbp-admin"}
    kw.update(overrides)
    return KafkaAdminClient(**kw)
