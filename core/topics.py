"""The topics the system uses, created idempotently.

Auto-creation is off on our broker (a typo must not silently create a topic
with the wrong partition count), so everything that produces or consumes calls
:func:`ensure_topics` first; ``fbp stack up`` does too.  ``reset_topics`` gives
tests a clean slate and waits until the broker has really finished deleting.
"""

from __future__ import annotations

import time

from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from core.settings import Settings
from core.kafka_io import make_admin


def repartition_topic(settings: Settings) -> str:
    """Where workers re-publish valid events that were not keyed by their user
    id (``worker.key_policy=rekey``), keyed by user id -- Kafka Streams' and
    Faust's ``group_by`` pattern.  Same partition count as ``ratings``, so a
    user's re-keyed and directly keyed events land on partitions of one number."""
    return f"{settings.kafka.ratings_topic}-repartition"


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count.  model-updates has one partition: it is a
    totally ordered log of model versions; so has the (small, compacted)
    movies catalog feed."""
    k = settings.kafka
    return {
        k.ratings_topic: k.partitions,
        repartition_topic(settings): k.partitions,
        k.predictions_topic: k.partitions,
        k.dlq_topic: k.partitions,
        k.model_updates_topic: 1,
        k.movies_topic: 1,
    }


def _topic_configs(settings: Settings, topic: str) -> dict[str, str]:
    """Per-topic configs: min.insync.replicas on a replicated cluster; the
    movies catalog feed is compacted (the last record per movie id stays)."""
    m = settings.kafka.min_insync_replicas
    configs = {} if m is None else {"min.insync.replicas": str(m)}
    if topic == settings.kafka.movies_topic:
        configs["cleanup.policy"] = "compact"
    return configs


def _create(admin, settings: Settings, specs: dict[str, int], timeout_s: float) -> list[str]:
    """Create the missing topics, retrying while a just-deleted one is still going away."""
    rf = settings.kafka.replication_factor
    created: list[str] = []
    deadline = time.monotonic() + timeout_s
    existing = set(admin.list_topics())
    todo = {t: p for t, p in specs.items() if t not in existing}
    while todo:
        res = admin.create_topics(
            {t: {"num_partitions": p, "replication_factor": rf, "configs": _topic_configs(settings, t)}
             for t, p in todo.items()},
            timeout_ms=int(timeout_s * 1000),
            raise_errors=False,
        )
        retry = {}
        for t in res.get("topics", []):
            name, code = t["name"], t["error_code"]
            if code == 0:
                created.append(name)
            elif code == TopicAlreadyExistsError.errno:
                # Exists (another process won the race) -- or is still being deleted.
                if name not in set(admin.list_topics()):
                    retry[name] = todo[name]
            else:
                raise KafkaError(f"creating topic {name}: error {code} {t.get('error_message')}")
        todo = retry
        if todo and time.monotonic() > deadline:
            raise KafkaError(f"topics {sorted(todo)} still being deleted after {timeout_s}s")
        if todo:
            time.sleep(0.2)
    admin.wait_for_topics(list(specs), timeout_ms=int(timeout_s * 1000))
    return created


def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create any missing topic; returns the names created (empty if all existed)."""
    admin = make_admin(settings)
    try:
        return _create(admin, settings, topic_specs(settings), timeout_s)
    finally:
        admin.close()


def reset_topics(
    settings: Settings, topics: list[str] | None = None, *, timeout_s: float = 60.0
) -> None:
    """Delete and recreate topics (default: all of them), empty and with fresh offsets."""
    specs = topic_specs(settings)
    if topics is not None:
        specs = {t: specs[t] for t in topics}
    admin = make_admin(settings)
    try:
        present = [t for t in specs if t in set(admin.list_topics())]
        if present:
            try:
                admin.delete_topics(present, timeout_ms=int(timeout_s * 1000))
            except UnknownTopicOrPartitionError:
                pass
            deadline = time.monotonic() + timeout_s
            while set(present) & set(admin.list_topics()):
                if time.monotonic() > deadline:
                    raise KafkaError(f"topics {present} not deleted after {timeout_s}s")
                time.sleep(0.1)
        _create(admin, settings, specs, timeout_s)
    finally:
        admin.close()


def topic_counts(settings: Settings, topics: list[str] | None = None) -> dict[str, int]:
    """Records currently held per topic (end minus beginning offsets, all partitions)."""
    from kafka import TopicPartition

    from core.kafka_io import make_consumer

    specs = topic_specs(settings)
    names = topics or list(specs)
    consumer = make_consumer(settings)
    try:
        out = {}
        for t in names:
            parts = consumer.partitions_for_topic(t) or set()
            tps = [TopicPartition(t, p) for p in sorted(parts)]
            if not tps:
                out[t] = 0
                continue
            begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
            out[t] = sum(end[tp] - begin[tp] for tp in tps)
        return out
    finally:
        consumer.close()
