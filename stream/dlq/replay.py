"""``fbp dlq replay``: publish the originals of dead letters again, after a fix.

Stages: select the matching letters; rebuild each original record (fetched
back from its source topic and checked against its sha256 when the DLQ holds
only a prefix) or say why it cannot be; publish with the idempotent
``acks=all`` producer and wait for every acknowledgement.

Replay and the worker's de-duplication: the worker de-duplicates by Kafka
position, not by event id (``core.repos.states``: one watermark per user and
source topic/partition; an event at or below it is skipped).  A replayed
event is a new record at a new offset, so the worker always applies it.  A
dead-lettered event was never folded into a state (it is refused before its
user's state is loaded, or its user's batch is dropped before the store), so
replaying it once applies it exactly once.  Replaying the same dead letters
twice, or an event its producer also re-sent, applies it twice: user states
keep no event ids.  Every replayed record carries a ``fbp-replayed-from``
header (``<dlq topic>/<partition>/<offset>``) so repeats can be traced; the
original record's headers are not re-sent (the DLQ keeps them only bounded,
and the worker reads none of them).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from kafka import TopicPartition
from kafka.errors import KafkaError

from core.events import REJECT_REASONS, rating_key
from core.settings import Settings
from fbp_errors import ConfigError, InfrastructureError
from stream.dlq.reader import STALL_S, read_dead_letters
from stream.dlq.records import DeadLetter, Source

#: header naming the dead letter a replayed record came from
REPLAY_HEADER = "fbp-replayed-from"


@dataclass(frozen=True, slots=True)
class Replayable:
    """A record to publish again: the original value, and the key to send it with."""

    letter: DeadLetter
    key: bytes | None
    value: bytes
    recovered: bool  # fetched back from the source topic (the DLQ held only a prefix)


@dataclass(frozen=True, slots=True)
class Skipped:
    letter: DeadLetter
    why: str


@dataclass
class ReplayReport:
    dlq_topic: str
    topic: str
    dry_run: bool
    matched: int = 0
    replayable: int = 0
    replayed: int = 0
    recovered_from_source: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_since(text: str | None) -> float | None:
    """``--since``: unix seconds, or ISO-8601 (a time without a zone is UTC)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: give unix seconds (1767225600) or ISO-8601 (2026-01-01T00:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def check_reasons(reasons: Iterable[str]) -> set[str]:
    """Refuse a reason code the worker never writes (a typo would match nothing)."""
    wanted = set(reasons)
    unknown = sorted(wanted - set(REJECT_REASONS))
    if unknown:
        raise ConfigError(f"unknown --reason {', '.join(unknown)}; the codes are: {', '.join(REJECT_REASONS)}")
    return wanted


def matches(dl: DeadLetter, reasons: set[str], since: float | None) -> bool:
    """A dead letter without a rejection time never matches ``--since``."""
    if reasons and dl.reason not in reasons:
        return False
    return since is None or (dl.rejected_at is not None and dl.rejected_at >= since)


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def replay_key(value: bytes, original_key: bytes | None) -> bytes | None:
    """The user id of the event as the key (what a correct producer sends), else
    the original key: a payload that does not parse keeps the record as it was."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return original_key
    user = obj.get("user_id") if isinstance(obj, dict) else None
    return rating_key(user) if type(user) is int else original_key


class SourceFetcher:
    """Reads single records back from their source topic (one consumer, reused)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer = None

    def _get(self):
        if self._consumer is None:
            from core.kafka_io import make_consumer

            self._consumer = make_consumer(self.settings, client_id="fbp-dlq-fetch", enable_auto_commit=False)
        return self._consumer

    def fetch(self, src: Source) -> tuple[bytes | None, bytes | None] | str:
        """(key, value) of the record at ``src``, or why it cannot be had."""
        if src.topic is None or src.partition is None or src.offset is None:
            return "source_not_recorded"
        c = self._get()
        tp = TopicPartition(src.topic, src.partition)
        if src.partition not in (c.partitions_for_topic(src.topic) or set()):
            return "source_gone"
        c.assign([tp])
        if src.offset < c.beginning_offsets([tp])[tp]:
            return "source_expired"  # deleted by retention
        if src.offset >= c.end_offsets([tp])[tp]:
            return "source_gone"  # topic recreated since
        c.seek(tp, src.offset)
        deadline = time.monotonic() + STALL_S
        while time.monotonic() < deadline:
            for msg in c.poll(timeout_ms=500).get(tp, []):
                if msg.offset == src.offset:
                    return msg.key, msg.value
                if msg.offset > src.offset:
                    return "source_gone"  # compacted away
        raise InfrastructureError(f"fetching {src.topic}/{src.partition}/{src.offset} made no progress")

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


def plan(dl: DeadLetter, fetcher: SourceFetcher) -> Replayable | Skipped:
    """What replaying one dead letter means: the whole original payload (fetched
    back from its source and checked against its sha256 when the DLQ holds only
    a prefix) and its key -- or why it cannot be replayed."""
    if dl.reason == "null_value" or (dl.payload is None and dl.payload_bytes is None):
        return Skipped(dl, "null_value")  # nothing to publish: the record had no value
    if dl.payload_bytes == 0:
        return Skipped(dl, "empty_value")
    value, key, recovered = dl.payload, dl.key, False
    if not dl.payload_complete:
        got = fetcher.fetch(dl.source)
        if isinstance(got, str):
            return Skipped(dl, got)
        key, value = got
        recovered = True
        if value is None:
            return Skipped(dl, "source_has_no_value")
    if dl.payload_sha256 is not None and _sha256(value) != dl.payload_sha256:
        return Skipped(dl, "sha256_mismatch")
    if not recovered and dl.key is not None and not dl.key_complete:
        got = fetcher.fetch(dl.source)
        key = None if isinstance(got, str) else got[0]
    return Replayable(dl, replay_key(value, key), value, recovered)


def _publish(settings: Settings, topic: str, dlq_topic: str, todo: list[Replayable]) -> dict[str, int]:
    """Send and wait for every acknowledgement; returns failures by error type."""
    from core.kafka_io import make_producer

    failed: Counter[str] = Counter()
    try:
        producer = make_producer(settings, client_id="fbp-dlq-replay")
    except KafkaError as exc:
        raise InfrastructureError(f"cannot reach Kafka to replay into {topic!r}: {exc}") from exc
    try:
        futures = []
        for r in todo:
            origin = f"{dlq_topic}/{r.letter.dlq_partition}/{r.letter.dlq_offset}".encode()
            try:
                futures.append(producer.send(topic, key=r.key, value=r.value, headers=[(REPLAY_HEADER, origin)]))
            except KafkaError as exc:  # e.g. larger than the producer's max_request_size
                failed[f"produce_failed:{type(exc).__name__}"] += 1
        producer.flush()
        for fut in futures:
            try:
                fut.get(timeout=60)
            except KafkaError as exc:
                failed[f"produce_failed:{type(exc).__name__}"] += 1
    finally:
        producer.close()
    return dict(failed)


def replay(
    settings: Settings, *, reasons: Iterable[str] = (), since: float | None = None, dry_run: bool = False,
) -> ReplayReport:
    """Select dead letters, rebuild their original records, publish them to the ratings topic."""
    wanted = check_reasons(reasons)
    k = settings.kafka
    report = ReplayReport(dlq_topic=k.dlq_topic, topic=k.ratings_topic, dry_run=dry_run)
    letters = [dl for dl in read_dead_letters(settings) if dl is not None and matches(dl, wanted, since)]
    report.matched = len(letters)

    fetcher = SourceFetcher(settings)
    try:
        plans = [plan(dl, fetcher) for dl in letters]
    except KafkaError as exc:
        raise InfrastructureError(f"fetching originals back from Kafka failed: {exc}") from exc
    finally:
        fetcher.close()
    todo = [p for p in plans if isinstance(p, Replayable)]
    skipped = Counter(p.why for p in plans if isinstance(p, Skipped))
    report.replayable = len(todo)
    report.recovered_from_source = sum(r.recovered for r in todo)

    if not dry_run and todo:
        failed = _publish(settings, k.ratings_topic, k.dlq_topic, todo)
        skipped.update(failed)
        report.replayed = len(todo) - sum(failed.values())
    report.skipped = dict(skipped.most_common())
    return report
