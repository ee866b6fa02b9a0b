"""A batch's prediction records, produced as whole Kafka record batches.

Why: aiokafka's per-record ``send`` is a coroutine that waits on metadata,
serializes, picks a partition, appends to the accumulator and makes a
future: about 10.6 us of CPU per record on this project's 2-core machine,
a fifth of the worker's whole per-event cost (py-spy of ``fbp worker``
draining a backlog: 25% of its main thread in ``produce_predictions``).
Filling one ``BatchBuilder`` per partition and handing each to
``send_batch`` costs about 4.3 us per record (prediction-sized records;
``python -m bench.produce`` prints both, side by side).  Each batch is closed
before it is handed over, so it leaves without waiting out the producer's
linger: the worker awaits these acknowledgements straight away.

Same records, same partitions: a record goes where the per-record send would
put it (the producer's own partitioner over the topic's partitions; a test
compares the two for thousands of keys), with the producer's timestamp.
Used for predictions only: dead letters and re-keyed events are rare, and a
dead letter refused as too large must fail alone (``Predictor.acknowledged``
retries it stripped), not with a whole record batch.

Works on a transactional producer too (the builder is then transactional and
``send_batch`` adds the partition to the open transaction), so exactly-once
mode uses it as well.
"""

from __future__ import annotations

from typing import Any, Awaitable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

#: (key, value) of one record
Record = tuple[bytes, bytes]


async def send_records(producer: AIOKafkaProducer, topic: str, records: Sequence[Record]) -> list[Awaitable[object]]:
    """Queue ``records`` on ``topic`` in order per partition; one future per
    record batch sent, done when Kafka acknowledged it (as ``send``'s)."""
    if not records:
        return []
    by_partition = partition_records(producer, sorted(await producer.partitions_for(topic)), records)
    futs: list[Awaitable[object]] = []
    for partition, recs in by_partition.items():
        batch = producer.create_batch()
        for key, value in recs:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                futs.append(await _send(producer, batch, topic, partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)  # a fresh batch takes any one record
        futs.append(await _send(producer, batch, topic, partition))
    return futs


async def _send(producer: AIOKafkaProducer, batch: BatchBuilder, topic: str, partition: int) -> Awaitable[object]:
    # Closed: complete, so the sender takes it at once instead of after the
    # producer's linger (the worker waits for these acks right away).
    batch.close()
    return await producer.send_batch(batch, topic, partition=partition)


def partition_records(producer: AIOKafkaProducer, partitions: list[int],
                      records: Sequence[Record]) -> dict[int, list[Record]]:
    """Records per partition, as the producer's partitioner places them
    (aiokafka's ``DefaultPartitioner``: murmur2 of the key, like Java's)."""
    choose = partitioner(producer)
    memo: dict[bytes, int] = {}
    out: dict[int, list[Record]] = {}
    for rec in records:
        key = rec[0]
        p = memo.get(key)
        if p is None:
            p = memo[key] = choose(key, partitions, partitions)
        out.setdefault(p, []).append(rec)
    return out


# -- the two private names this module relies on, each in one named adapter;
# tests/test_library_adapters.py pins the library versions they were read from.

def faust_producer(app: Any) -> AIOKafkaProducer:
    """The started aiokafka producer behind a Faust app's producer
    (faust-streaming 0.15.3 keeps it behind ``_ensure_producer``)."""
    return app.producer._ensure_producer()


def partitioner(producer: AIOKafkaProducer) -> Any:
    """The partitioner ``AIOKafkaProducer.send`` uses for a keyed record
    (aiokafka 0.14.0: ``_partitioner``)."""
    return producer._partitioner
