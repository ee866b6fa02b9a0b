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


def retention_windows(settings: Settings) -> dict[str, float | None]:
    """How long the ratings topics keep a record at most, in seconds:
    ``retention.ms`` + ``segment.ms`` (a segment is deleted only once its
    newest record is past retention); None where retention is infinite or the
    topic is compacted (kept until overwritten)."""
    from kafka.admin import ConfigResource, ConfigResourceType

    names = [settings.kafka.ratings_topic, repartition_topic(settings)]
    wanted = {"retention.ms": None, "segment.ms": None, "cleanup.policy": None}
    admin = make_admin(settings)
    try:
        got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t, configs=dict(wanted))
                                      for t in names], config_filter="all")
    finally:
        admin.close()
    out: dict[str, float | None] = {}
    for topic, cfg in got.get("topic", {}).items():
        value = {k: v.get("value") for k, v in cfg.items()}
        retention = int(value.get("retention.ms") or -1)
        compact = "compact" in str(value.get("cleanup.policy") or "")
        out[topic] = None if retention < 0 or compact else (retention + int(value.get("segment.ms") or 0)) / 1000
    return out


def expiry_outlives_kafka(idle_ttl_s: int, windows: dict[str, float | None]) -> str | None:
    """None when every event still in Kafka is younger than the idle TTL (no
    expired user's event can be delivered again), else why not."""
    if idle_ttl_s <= 0:
        return None
    short = {t: w for t, w in windows.items() if w is None or w >= idle_ttl_s}
    if not short:
        return None
    kept = ", ".join(f"{t}: {'forever' if w is None else f'{w / 86400:.1f} days'}" for t, w in sorted(short.items()))
    return (f"state.idle_ttl_s ({idle_ttl_s / 86400:.1f} days) is not above how long Kafka keeps ratings "
            f"(retention.ms + segment.ms; {kept}): after a consumer-group rewind past the TTL, an expired "
            "user's retained events are applied and predicted again (README, State lifecycle). Raise "
            "FBP_STATE__IDLE_TTL_S or shorten the topics' retention")
