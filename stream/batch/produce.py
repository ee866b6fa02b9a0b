"""Stage ``produce``: records to Kafka, then the wait for its acknowledgements.

Sending returns futures at once; :meth:`Producer.acknowledged` awaits them in
``finish``, so with pipelining the wait overlaps the next batch's work.  A
dead letter refused as too large is sent once more stripped of payload, key
and headers; any other produce failure is infrastructure and propagates."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Sequence

from core.events import KafkaRecord, Rejection, dlq_record, rating_key
from stream import metrics as m
from stream.batch.config import BatchConfig
from stream.batch.decode import source_header
from stream.batch.types import BatchResult, Predicted, SendFn, SendManyFn, Work
from stream.faults import INFRASTRUCTURE, is_size_error

STAGE = "produce"

Futures = list[Awaitable[object]]


class Producer:
    def __init__(self, send: SendFn, cfg: BatchConfig, send_many: SendManyFn | None = None) -> None:
        self.send = send
        #: a batch's records in one call (default: ``send`` record by record)
        self.send_many: SendManyFn = send_many or self._send_each
        self.cfg = cfg

    async def rekey(self, misrouted: Work, res: BatchResult) -> Futures:
        """Re-publish events keyed otherwise than by their user id to the
        repartition topic, keyed by user id (their own bytes, their original
        position in a header): they reach the worker that owns the user, in
        the order of their source partition."""
        futs = [await self.send(self.cfg.repartition_topic, rating_key(ev.user_id), rec.value,
                                headers=source_header(rec), timestamp=rec.timestamp or None)
                for ev, rec in misrouted]
        res.rekeyed = len(misrouted)
        return futs

    async def reemit(self, out: Predicted) -> None:
        """Send the queued stored records again (into the batch's transaction)."""
        for user, _, _, _, value in out.reemit:
            out.futs.append(await self.send(self.cfg.predictions_topic, rating_key(user), value))

    async def predictions(self, records: Sequence[tuple[bytes, bytes]], out: Predicted) -> None:
        out.futs += await self.send_many(self.cfg.predictions_topic, records)

    async def dead_letters(self, res: BatchResult) -> Futures:
        return [await self.send_dead_letter(rej, rec) for rej, rec in res.dead]

    async def send_dead_letter(self, rej: Rejection, rec: KafkaRecord, stripped: bool = False
                               ) -> Awaitable[object]:
        """Send one dead letter; a size error at send time (the client checks
        max_request_size before queueing) gets the stripped retry at once."""
        letter = dlq_record(rej, rec, payload_prefix_bytes=self.cfg.dlq_payload_prefix_bytes, stripped=stripped)
        try:
            return await self.send(self.cfg.dlq_topic, None, letter)
        except INFRASTRUCTURE as exc:
            if stripped or not is_size_error(exc):
                raise
        m.DLQ_STRIPPED.inc()
        return await self.send_dead_letter(rej, rec, stripped=True)

    async def acknowledged(self, futs: Futures, dlq_futs: Futures, res: BatchResult) -> None:
        """Wait until Kafka has every record of the batch."""
        await asyncio.gather(*futs)
        results = await asyncio.gather(*dlq_futs, return_exceptions=True)
        retries = []
        for (rej, rec), r in zip(res.dead, results):
            if isinstance(r, BaseException):
                if not is_size_error(r):
                    raise r
                m.DLQ_STRIPPED.inc()
                retries.append(await self.send_dead_letter(rej, rec, stripped=True))
        await asyncio.gather(*retries)  # never a third try: a stripped letter is a few hundred bytes

    async def _send_each(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> Futures:
        return [await self.send(topic, key, value) for key, value in records]
