"""What the stages hand each other: records in, results out, timing."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Sequence

from core.events import KafkaRecord, PredictionRecord, RatingEvent, Rejection
from core.repos.movies import Adds
from core.repos.states import Mark, Stored

#: ``send(topic, key, value, headers=None, timestamp=None)`` -> a future acked by Kafka
SendFn = Callable[..., Awaitable[Awaitable[object]]]
#: ``send_many(topic, [(key, value), ...])`` -> futures acked by Kafka (``stream.outbox``)
SendManyFn = Callable[[str, Sequence[tuple[bytes, bytes]]], Awaitable[list[Awaitable[object]]]]

#: (user, state blob, watermarks) -- plus, in exactly-once mode, the outputs per source
Row = tuple
Work = list[tuple[RatingEvent, KafkaRecord]]
#: per user: (source, partition) -> the last offset this batch folds in
Marks = dict[int, dict[tuple[str, int], int]]
#: (user, source, partition, offset, stored record) to produce again
Reemit = tuple[int, str, int, int, bytes]


def Incoming(raw: bytes | None, partition: int, offset: int, kafka_ts: float, topic: str = "ratings",
             key: bytes | None = None, headers: Any = ()) -> KafkaRecord:
    """A :class:`KafkaRecord` from the fields a consumer hands over, in the
    positional order the worker's callers use (``kafka_ts`` in seconds;
    ``headers`` a list of (name, value) pairs or a mapping)."""
    hs = tuple(headers.items()) if isinstance(headers, Mapping) else tuple(headers or ())
    return KafkaRecord(raw, key, hs, topic, partition, offset, kafka_ts)


@dataclass
class BatchResult:
    """What one batch did, for metrics, the live page and the tests."""

    predictions: list[PredictionRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    kafka_ts: list[float] = field(default_factory=list)
    skipped: int = 0
    rederived: int = 0
    reset: int = 0
    rekeyed: int = 0
    #: seconds per stage (labels of ``fbp_stage_duration_seconds``)
    stage_s: dict[str, float] = field(default_factory=dict)
    #: (rejection, its record) for the dead-letter producer
    dead: list[tuple[Rejection, KafkaRecord]] = field(default_factory=list)
    #: skipped events whose stored record was produced again (exactly-once mode)
    reemitted: int = 0

    def reject(self, rej: Rejection, rec: KafkaRecord) -> None:
        self.rejected.append(rej)
        self.dead.append((rej, rec))


@dataclass
class Predicted:
    """What the stages made of some events: prediction records with their
    Kafka timestamps, state rows to store, and the sends in flight."""

    predictions: list[PredictionRecord] = field(default_factory=list)
    kafka_ts: list[float] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    futs: list[Awaitable[object]] = field(default_factory=list)
    #: movie-side increments to add once the states are stored (one per model pass)
    adds: list[Adds] = field(default_factory=list)
    skipped: int = 0
    rederived: int = 0
    reset: int = 0
    #: exactly-once mode: skipped events to produce again, and the encoded record of each fresh event
    reemit: list[Reemit] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)
    #: each written user's state as Redis will hold it once stored (the overlay)
    written: dict[int, Stored] = field(default_factory=dict)

    @classmethod
    def collect(cls, res: BatchResult, parts: list[Predicted]) -> Predicted:
        """The parts as one, their counts copied into ``res``."""
        out = cls()
        for p in parts:
            out.predictions += p.predictions
            out.kafka_ts += p.kafka_ts
            out.rows += p.rows
            out.futs += p.futs
            out.adds += p.adds
            out.skipped += p.skipped
            out.rederived += p.rederived
            out.reset += p.reset
            out.reemit += p.reemit
            out.written.update(p.written)
        res.predictions, res.kafka_ts = out.predictions, out.kafka_ts
        res.reemitted = len(out.reemit)
        res.skipped, res.rederived, res.reset = out.skipped, out.rederived, out.reset
        return out


@dataclass
class Begun:
    """A batch half done: records sent (acknowledgements pending), states
    computed but not stored.  :meth:`stream.predictor.Predictor.finish` completes it."""

    batch: Sequence[KafkaRecord]
    res: BatchResult
    done: Predicted
    futs: list[Awaitable[object]]
    dlq_futs: list[Awaitable[object]]
    step: int


@contextmanager
def timed(res: BatchResult, stage: str) -> Iterator[None]:
    """Add the block's wall time to ``res.stage_s[stage]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        res.stage_s[stage] = res.stage_s.get(stage, 0.0) + time.perf_counter() - t


__all__ = ["BatchResult", "Begun", "Incoming", "KafkaRecord", "Mark", "Marks", "Predicted", "Reemit",
           "Row", "SendFn", "SendManyFn", "Work", "timed"]
