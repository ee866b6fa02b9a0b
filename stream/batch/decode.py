"""Stage ``decode``: what each Kafka record is.

Each record becomes an event to predict, an event to re-key (valid, but keyed
otherwise than by its user id: re-published to the repartition topic by the
``produce`` stage) or a dead letter with its reason -- an unexpected
exception on one record included (``internal_error``).  Also the watermark
an event is de-duplicated by, which depends on where it was first read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from core.events import KafkaRecord, Misrouted, Rejection, classify, decode_limits, internal_error
from stream.batch.config import BatchConfig
from stream.batch.types import BatchResult, Work

STAGE = "decode"

#: header a re-keyed event carries: where it was first read ("topic:partition:offset")
SOURCE_HEADER = "fbp-source"
#: watermark namespace of re-keyed events ('@' cannot occur in a Kafka topic name)
REKEYED_SUFFIX = "@rekeyed"


@dataclass
class Routed:
    """A decoded batch: events to predict and events to re-key, in batch order."""

    work: Work = field(default_factory=list)
    misrouted: Work = field(default_factory=list)


def decode(batch: Sequence[KafkaRecord], cfg: BatchConfig, res: BatchResult) -> Routed:
    """Classify each record; rejections go to ``res.dead`` with their reason."""
    limits = decode_limits(cfg)
    policy = "rekey" if cfg.rekeys else "refuse"
    out = Routed()
    for rec in batch:
        try:
            got = classify(rec, **limits, key_policy=policy, rekey=rec.topic != cfg.repartition_topic)
        except Exception as exc:  # record boundary: whatever it is, it is this record's
            got = internal_error(exc, rec.value)
        if isinstance(got, Rejection):
            res.reject(got, rec)
        elif isinstance(got, Misrouted):
            out.misrouted.append((got.event, rec))
        else:
            out.work.append((got, rec))
    return out


def watermark(rec: KafkaRecord, repartition_topic: str | None) -> tuple[str, int, int]:
    """The (source, partition, offset) an event is de-duplicated by.

    A re-keyed event is de-duplicated by where it was *first* read (its
    ``fbp-source`` header), in a namespace of its own: a crash after
    re-publishing but before committing re-publishes it, and both copies
    must count once.  Everything else by its own position."""
    if rec.topic == repartition_topic:
        for name, value in rec.headers:
            if name == SOURCE_HEADER and value:
                try:
                    topic, part, off = bytes(value).decode("ascii").rsplit(":", 2)
                    return topic + REKEYED_SUFFIX, int(part), int(off)
                except (UnicodeDecodeError, ValueError):
                    break
    return rec.topic, rec.partition, rec.offset


def source_header(rec: KafkaRecord) -> list[tuple[str, bytes]]:
    """The header a re-keyed copy of ``rec`` carries (see :func:`watermark`)."""
    return [(SOURCE_HEADER, f"{rec.topic}:{rec.partition}:{rec.offset}".encode("ascii"))]
