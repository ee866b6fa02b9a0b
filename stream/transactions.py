"""Exactly-once output (``worker.exactly_once``): one Kafka transaction per batch.

Why: at least once, a worker killed between producing a batch's predictions
and committing its offsets repeats them; a ``read_committed`` subscriber of
the predictions topic should see each event id once.  So each batch's
predictions, re-keyed events and dead letters, *and* its consumer offsets go
into one transaction: all of them become visible, or none.

How (Kafka Streams' eos-v1 scheme): one transactional producer per input
partition, ``transactional.id = <app_id>-<topic>-<partition>``, opened when
the partition is assigned -- before its committed offset is read -- so that
``InitProducerId`` fences whoever held the partition before (a SIGKILLed
worker's open transaction is aborted, a zombie's next commit fails) -- and
closed when it is revoked.  A batch is one partition's records
(``stream.consumer`` splits fetches so in this mode).

Redis state is outside the transaction; ``stream.predictor`` (``keep_outputs``)
stores each user's last outputs with its state and re-emits them when a
redelivered event is filtered by its watermark, see its module docstring.
A failed transaction (fenced, Kafka away, a refused record) raises; the
worker fails stop without committing anything, and the batch is redelivered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from core.events import KafkaRecord
from core.settings import KafkaSettings
from stream.outbox import send_records

log = logging.getLogger(__name__)

T = TypeVar("T")
TP = tuple[str, int]


class Transactions:
    """Transactional producers of one worker, one per assigned input partition."""

    def __init__(self, kafka: KafkaSettings, app_id: str, *, linger_ms: int = 5) -> None:
        self.kafka = kafka
        #: the consumer group whose offsets the transactions commit (Faust's group = app id)
        self.group_id = app_id
        self.linger_ms = linger_ms
        self._producers: dict[TP, AIOKafkaProducer] = {}
        self._current: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    def transactional_id(self, topic: str, partition: int) -> str:
        return f"{self.group_id}-{topic}-{partition}"

    # -- partitions come and go -------------------------------------------
    async def assigned(self, tps: Iterable[TP]) -> None:
        """Open (and fence with) the producers of newly assigned partitions."""
        async with self._lock:
            new = [tp for tp in set(tps) if tp not in self._producers]
            opened = await asyncio.gather(*(self._open(tp) for tp in new))
            self._producers.update(zip(new, opened))
        if new:
            log.info("exactly-once: %d transactional producer(s) opened", len(new))

    async def revoked(self, tps: Iterable[TP]) -> None:
        """Close the producers of revoked partitions (their batches are done):
        the next owner's producer fences them anyway."""
        async with self._lock:
            gone = [self._producers.pop(tp) for tp in set(tps) if tp in self._producers]
        await asyncio.gather(*(p.stop() for p in gone))

    async def close(self) -> None:
        await self.revoked(list(self._producers))

    async def _open(self, tp: TP) -> AIOKafkaProducer:
        p = AIOKafkaProducer(**self.kafka.aiokafka_kwargs(), transactional_id=self.transactional_id(*tp),
                             enable_idempotence=True, acks="all", linger_ms=self.linger_ms)
        await p.start()
        # an empty transaction waits for InitProducerId: the fence, done now,
        # before the consumer reads the partition's committed offset
        await p.begin_transaction()
        await p.abort_transaction()
        return p

    async def producer(self, tp: TP) -> AIOKafkaProducer:
        p = self._producers.get(tp)
        if p is None:  # a batch of a partition the assignment hook has not opened yet
            await self.assigned([tp])
            p = self._producers[tp]
        return p

    # -- one batch ----------------------------------------------------------
    async def run(self, records: Sequence[KafkaRecord], body: Callable[[Sequence[KafkaRecord]], Awaitable[T]]) -> T:
        """``body(records)`` inside a transaction that also commits the records'
        offsets; returns once Kafka committed it.  ``records`` are one
        partition's, in offset order.  Any failure propagates (the caller fails
        stop); the open transaction is then aborted by the next owner's fence."""
        first, last = records[0], records[-1]
        tp = (first.topic, first.partition)
        producer = await self.producer(tp)
        await producer.begin_transaction()
        self._current = producer
        try:
            result = await body(records)
        finally:
            self._current = None
        await producer.send_offsets_to_transaction({TopicPartition(*tp): last.offset + 1}, self.group_id)
        await producer.commit_transaction()
        return result

    async def send(self, topic: str, key: bytes | None, value: bytes,
                   headers: Any = None, timestamp: float | None = None) -> Awaitable[object]:
        """The predictor's ``send`` in this mode: into the open transaction."""
        p = self._in_transaction()
        ts_ms = int(timestamp * 1000.0) if timestamp else None
        return await p.send(topic, value, key=key, timestamp_ms=ts_ms, headers=list(headers) if headers else None)

    async def send_many(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> list[Awaitable[object]]:
        """The predictor's ``send_many`` in this mode: record batches into the open transaction."""
        return await send_records(self._in_transaction(), topic, records)

    def _in_transaction(self) -> AIOKafkaProducer:
        p = self._current
        if p is None:
            raise RuntimeError("exactly-once send outside a batch transaction")
        return p
