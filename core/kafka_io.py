"""One place that builds kafka-python clients from settings.

Why: every producer/consumer/admin must carry the same connection options
(``settings.kafka.kafka_python_kwargs()``, so TLS/SASL switch on from config
alone) and the same safety defaults (idempotent, ``acks=all`` producers; no
topic auto-creation).  Callers override anything with keyword arguments.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from core.settings import Settings

_C = TypeVar("_C")


def _connect(settings: Settings, factory: Callable[..., _C], kw: dict[str, Any]) -> _C:
    """Build a client; a failed bootstrap says where, how and as whom it tried.

    kafka-python reports a refused SASL login only as "Unable to bootstrap"
    (the broker closes the connection), so with TLS/SASL configured the
    message names the credentials to check.  The password is never included.
    """
    try:
        return factory(**kw)
    except KafkaError as exc:
        k = settings.kafka
        if k.security_protocol == "PLAINTEXT" or "bootstrap" not in str(exc).lower():
            raise
        who = f", SASL {k.sasl_mechanism} as user {k.sasl_username!r}" if k.sasl_mechanism else ""
        raise type(exc)(
            f"cannot connect to Kafka {k.bootstrap_servers} over {k.security_protocol}{who} ({exc}); "
            "if the broker is up, authentication or the TLS handshake failed: check "
            "FBP_KAFKA__SASL_USERNAME / FBP_KAFKA__SASL_PASSWORD / FBP_KAFKA__SSL_CAFILE"
        ) from exc

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
    return _connect(settings, KafkaProducer, kw)


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
    return _connect(settings, lambda **k: KafkaConsumer(*topics, **k), kw)


def make_admin(settings: Settings, **overrides: Any) -> KafkaAdminClient:
    kw: dict[str, Any] = {**settings.kafka.kafka_python_kwargs(), "client_id": "fbp-admin"}
    kw.update(overrides)
    return _connect(settings, KafkaAdminClient, kw)
