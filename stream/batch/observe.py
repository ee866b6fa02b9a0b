"""A finished batch into the worker's metrics (``stream.metrics``)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from core.events import KafkaRecord
from core.rolling import RollingError
from stream import metrics as m
from stream.batch.types import BatchResult


def observe(batch: Sequence[KafkaRecord], res: BatchResult, rolling: RollingError) -> None:
    m.BATCH_SIZE.observe(len(batch))
    for stage, s in res.stage_s.items():
        m.STAGE_SECONDS.labels(stage).observe(s)
    m.EVENTS.inc(len(res.predictions))
    m.SKIPPED.inc(res.skipped)
    m.REDERIVED.inc(res.rederived)
    m.REKEYED.inc(res.rekeyed)
    for rej in res.rejected:
        m.REJECTED.labels(rej.reason).inc()
    done = time.time()
    m.observe_many(m.LATENCY, np.maximum(0.0, done - np.asarray(res.kafka_ts, dtype=np.float64)))
    m.publish_errors(rolling, [rec.predicted - rec.actual for rec in res.predictions])
    m.LAST_BATCH.set(done)


def track_offsets(batch: Sequence[KafkaRecord], last: dict[int, int], repartition_topic: str | None) -> None:
    """Highest offset handled per partition of the ratings topic (for the lag gauge)."""
    for rec in batch:
        if rec.topic != repartition_topic and rec.offset > last.get(rec.partition, -1):
            last[rec.partition] = rec.offset
