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
keep no event ids -- so each replayed letter is remembered in Redis
(:class:`core.repos.replays.ReplayLedger`, once Kafka acknowledged it) and a
later run skips it (``already_replayed``) unless ``again=True``.  Every
replayed record carries a ``fbp-replayed-from``
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
from core.redis_conn import sync_redis
from core.repos.replays import ReplayLedger
from core.settings import Settings
from fbp_errors import ConfigError, InfrastructureError
from stream.dlq.reader import CONSUMER_OPTS, STALL_S, read_dead_letters
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
    """Reads records back from their source topics with one reused consumer.

    Fetches come in source order (``replay`` sorts them), so a partition's
    bounds are asked once and the records of the last poll are kept: a run
    of neighbouring offsets costs one fetch, not one round trip each.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer = None
        self._bounds: dict[TopicPartition, tuple[int, int] | None] = {}
        self._tp: TopicPartition | None = None
        self._last_poll: dict[int, tuple[bytes | None, bytes | None]] = {}

    def __enter__(self) -> "SourceFetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._consumer is not None:
            self._consumer.close()

    def _client(self):
        if self._consumer is None:
            from core.kafka_io import make_consumer

            self._consumer = make_consumer(self.settings, **CONSUMER_OPTS, client_id="fbp-dlq-fetch",
                                           max_poll_records=64)
        return self._consumer

    def _bounds_of(self, tp: TopicPartition) -> tuple[int, int] | None:
        """(log start, end) offsets of ``tp``, None when it does not exist."""
        if tp not in self._bounds:
            c = self._client()
            if tp.partition not in (c.partitions_for_topic(tp.topic) or set()):
                self._bounds[tp] = None
            else:
                self._bounds[tp] = (c.beginning_offsets([tp])[tp], c.end_offsets([tp])[tp])
        return self._bounds[tp]

    def fetch(self, src: Source) -> tuple[bytes | None, bytes | None] | str:
        """(key, value) of the record at ``src``, or why it cannot be had."""
        if src.topic is None or src.partition is None or src.offset is None:
            return "source_not_recorded"
        tp = TopicPartition(src.topic, src.partition)
        bounds = self._bounds_of(tp)
        if bounds is None:
            return "source_gone"
        if src.offset < bounds[0]:
            return "source_expired"  # deleted by retention
        if src.offset >= bounds[1]:
            return "source_gone"  # topic recreated since
        if tp == self._tp and src.offset in self._last_poll:
            return self._last_poll[src.offset]
        return self._read_at(tp, src.offset)

    def _read_at(self, tp: TopicPartition, offset: int) -> tuple[bytes | None, bytes | None] | str:
        c = self._client()
        if tp != self._tp:
            c.assign([tp])
            self._tp = tp
        c.seek(tp, offset)
        deadline = time.monotonic() + STALL_S
        while time.monotonic() < deadline:
            msgs = c.poll(timeout_ms=500).get(tp, [])
            if msgs:
                self._last_poll = {m.offset: (m.key, m.value) for m in msgs}
                return self._last_poll.get(offset, "source_gone")  # a gap: compacted away
        raise InfrastructureError(f"fetching {tp.topic}/{tp.partition}/{offset} made no progress")


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


class Publisher:
    """Sends replayed records as they are planned (so recovered payloads are
    not all held at once) and counts, at the end, what Kafka did not take."""

    def __init__(self, settings: Settings, topic: str, dlq_topic: str, *, dry_run: bool) -> None:
        self.topic, self.dlq_topic, self.dry_run = topic, dlq_topic, dry_run
        self.failed: Counter[str] = Counter()
        self._futures: list[tuple[str, Any]] = []  # (DLQ position, send future)
        self._producer = None
        if not dry_run:
            from core.kafka_io import make_producer

            try:
                self._producer = make_producer(settings, client_id="fbp-dlq-replay")
            except KafkaError as exc:
                raise InfrastructureError(f"cannot reach Kafka to replay into {topic!r}: {exc}") from exc

    def send(self, r: Replayable) -> None:
        if self._producer is None:
            return
        origin = position(self.dlq_topic, r.letter)
        try:
            self._futures.append((origin, self._producer.send(
                self.topic, key=r.key, value=r.value, headers=[(REPLAY_HEADER, origin.encode())])))
        except KafkaError as exc:  # e.g. larger than the producer's max_request_size
            self.failed[f"produce_failed:{type(exc).__name__}"] += 1

    def finish(self) -> list[str]:
        """Wait for every acknowledgement; returns the DLQ positions Kafka took."""
        if self._producer is None:
            return []
        taken: list[str] = []
        try:
            self._producer.flush()
            for origin, fut in self._futures:
                try:
                    fut.get(timeout=60)
                    taken.append(origin)
                except KafkaError as exc:
                    self.failed[f"produce_failed:{type(exc).__name__}"] += 1
        finally:
            self.close()
        return taken

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


def position(dlq_topic: str, dl: DeadLetter) -> str:
    """A dead letter's own place in the DLQ: its identity in the replay ledger."""
    return ReplayLedger.position(dlq_topic, dl.dlq_partition, dl.dlq_offset)


def select(settings: Settings, reasons: set[str], since: float | None) -> list[DeadLetter]:
    """Matching dead letters in source order (topic, partition, offset): the
    original order of each source partition -- per user, for keyed producers --
    whatever DLQ partition each letter landed in."""
    letters = [dl for dl in read_dead_letters(settings) if dl is not None and matches(dl, reasons, since)]
    def position(dl: DeadLetter) -> tuple[str, int, int]:
        src = dl.source
        return (src.topic or "", -1 if src.partition is None else src.partition,
                -1 if src.offset is None else src.offset)

    return sorted(letters, key=position)


def replay(
    settings: Settings, *, reasons: Iterable[str] = (), since: float | None = None, dry_run: bool = False,
    again: bool = False,
) -> ReplayReport:
    """Select dead letters, rebuild their original records, publish them to the
    ratings topic, and remember them as replayed (``again`` replays letters
    a previous run already replayed)."""
    wanted = check_reasons(reasons)
    k = settings.kafka
    report = ReplayReport(dlq_topic=k.dlq_topic, topic=k.ratings_topic, dry_run=dry_run)
    letters = select(settings, wanted, since)
    report.matched = len(letters)
    ledger = ReplayLedger(sync_redis(settings.redis), settings.redis.key_prefix)

    skipped: Counter[str] = Counter()
    # dead letters of the movie catalog feed (`fbp catalog follow`) are not
    # ratings: republishing them to the ratings topic would only refuse them again
    catalog = [dl for dl in letters if dl.source.topic == k.movies_topic]
    if catalog:
        skipped["movies_topic"] = len(catalog)
        letters = [dl for dl in letters if dl.source.topic != k.movies_topic]
    if not again:
        done = ledger.replayed([position(k.dlq_topic, dl) for dl in letters])
        skipped["already_replayed"] = sum(done)
        letters = [dl for dl, d in zip(letters, done) if not d]
    out = Publisher(settings, k.ratings_topic, k.dlq_topic, dry_run=dry_run)
    try:
        with SourceFetcher(settings) as fetcher:
            for dl in letters:
                p = plan(dl, fetcher)
                if isinstance(p, Skipped):
                    skipped[p.why] += 1
                    continue
                report.replayable += 1
                report.recovered_from_source += p.recovered
                out.send(p)
        taken = out.finish()
        ledger.mark(taken)
        report.replayed = len(taken)
    except KafkaError as exc:
        out.close()
        raise InfrastructureError(f"replay failed talking to Kafka: {exc}") from exc
    skipped.update(out.failed)
    report.skipped = {why: n for why, n in skipped.most_common() if n}
    return report
