"""Reading a topic once, from its beginning to the end offsets taken at the start.

Why not a consumer group: ``fbp dlq`` must see the whole DLQ every time it
runs and must not move anyone's committed offsets; records that arrive while
it reads are left for the next run, so it always stops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from kafka import TopicPartition
from kafka.errors import KafkaError

from core.settings import Settings
from fbp_errors import InfrastructureError
from stream.dlq.records import DeadLetter, parse_dead_letter

#: how long a read may make no progress before the broker is declared unavailable
STALL_S = 30.0
#: No CRC check: kafka-python computes CRC32C in pure Python, 80% of a DLQ read's
#: time (20,000 letters: 24 of 30 s).  The broker checked each batch's CRC when
#: it was produced; replay checks a recovered payload against its sha256.
CONSUMER_OPTS = {"enable_auto_commit": False, "check_crcs": False}


def _partitions(consumer, topic: str) -> list[TopicPartition]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise InfrastructureError(
            f"topic {topic!r} does not exist on {consumer.config['bootstrap_servers']}: "
            "check FBP_KAFKA__DLQ_TOPIC, or create the topics with `fbp stack topics`"
        )
    return [TopicPartition(topic, p) for p in sorted(parts)]


def read_topic_to_end(settings: Settings, topic: str) -> Iterator[tuple[int, int, bytes | None]]:
    """(partition, offset, value) of every record of ``topic`` from its beginning
    to the end offsets taken now; records added meanwhile are left for next time."""
    from core.kafka_io import make_consumer

    try:
        consumer = make_consumer(settings, **CONSUMER_OPTS, client_id="fbp-dlq")
    except KafkaError as exc:
        raise InfrastructureError(f"cannot reach Kafka to read {topic!r}: {exc}") from exc
    try:
        tps = _partitions(consumer, topic)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        todo = {tp for tp in tps if consumer.position(tp) < end[tp]}
        last_progress = time.monotonic()
        while todo:
            batch = consumer.poll(timeout_ms=500)
            for tp, msgs in batch.items():
                for msg in msgs:
                    if msg.offset < end[tp]:
                        yield tp.partition, msg.offset, msg.value
            if batch:
                last_progress = time.monotonic()
            todo = {tp for tp in todo if consumer.position(tp) < end[tp]}
            if todo and time.monotonic() - last_progress > STALL_S:
                raise InfrastructureError(
                    f"reading {topic!r} made no progress for {STALL_S:.0f}s "
                    f"(still to read: {sorted(tp.partition for tp in todo)})"
                )
    except KafkaError as exc:
        raise InfrastructureError(f"reading {topic!r} failed: {exc}") from exc
    finally:
        consumer.close()


def read_dead_letters(settings: Settings, topic: str | None = None) -> Iterator[DeadLetter | None]:
    """Every dead letter of the DLQ topic (None for records that are not dead letters)."""
    for partition, offset, value in read_topic_to_end(settings, topic or settings.kafka.dlq_topic):
        yield parse_dead_letter(value, partition, offset)
