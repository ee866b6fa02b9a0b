"""``fbp dlq``: count and replay dead letters.

Why a tool: the worker dead-letters any record it cannot use (see
``core.events.dlq_record`` for the record's shape) and goes on, so the DLQ is
where an operator looks after an alert, and where a fixed problem (a limit
raised, a producer that keyed wrongly) is repaired by publishing the original
events again.  Both commands read the DLQ topic from its beginning up to the
end offsets taken when they start, then stop: no consumer group, nothing
committed, so they can be run any number of times.

Replay and the worker's de-duplication: the worker de-duplicates by Kafka
position, not by event id (``core.repos.states``: one watermark per user and
source topic/partition; an event at or below it is skipped).  A replayed
event is a new record at a new offset, so the worker always applies it.  A
dead-lettered event was never applied (records are rejected before any state
is touched), so replaying it once applies it exactly once.  Replaying the
same dead letters twice, or replaying an event its producer also re-sent,
applies it twice: user states keep no event ids.  Every replayed record
carries a ``fbp-replayed-from`` header (``<dlq topic>/<partition>/<offset>``)
so repeats can be traced; ``--since`` and ``--reason`` bound a run.

Older dead letters (before payload sizes, hashes, keys and headers were
recorded) are read too: missing fields count as "not recorded".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import orjson
import typer
from kafka import TopicPartition
from kafka.errors import KafkaError

from core.events import REJECT_REASONS, rating_key
from core.settings import Settings, get_settings
from fbp_errors import ConfigError, InfrastructureError

#: header naming the dead letter a replayed record came from
REPLAY_HEADER = "fbp-replayed-from"
#: how long a read may make no progress before the broker is declared unavailable
STALL_S = 30.0


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Source:
    """Where the rejected record was: enough to fetch it again while retention lasts."""

    topic: str | None
    partition: int | None
    offset: int | None
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One DLQ record, parsed.  ``payload``/``key`` are the stored bytes (possibly
    a prefix); ``payload_complete``/``key_complete`` say whether they are whole."""

    reason: str
    detail: str | None
    error_type: str | None
    payload: bytes | None
    payload_bytes: int | None
    payload_complete: bool
    payload_sha256: str | None
    key: bytes | None
    key_complete: bool
    source: Source
    rejected_at: float | None
    dlq_partition: int
    dlq_offset: int


def _decode_field(text: Any, encoding: Any) -> bytes | None:
    """Stored text -> bytes (``utf-8`` text or ``base64``); None when not stored."""
    if not isinstance(text, str):
        return None
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            return None
    return text.encode("utf-8")


def _opt_int(v: Any) -> int | None:
    return v if type(v) is int else None


def _opt_float(v: Any) -> float | None:
    return float(v) if type(v) in (int, float) else None


def parse_dead_letter(value: bytes | None, partition: int, offset: int) -> DeadLetter | None:
    """A DLQ record as written by any version of the worker; None when it is not
    one (not a JSON object with a ``reason``), e.g. written by another tool."""
    try:
        obj = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("reason"), str):
        return None
    payload = _decode_field(obj.get("payload"), obj.get("payload_encoding"))
    size = _opt_int(obj.get("payload_bytes"))
    if size is None and payload is not None and "payload_bytes" not in obj:
        size = len(payload)  # old shape: the whole payload was always kept
    key = _decode_field(obj.get("key"), obj.get("key_encoding"))
    key_size = _opt_int(obj.get("key_bytes"))
    src = obj.get("source") if isinstance(obj.get("source"), dict) else {}
    return DeadLetter(
        reason=obj["reason"],
        detail=obj.get("detail") if isinstance(obj.get("detail"), str) else None,
        error_type=obj.get("error_type") if isinstance(obj.get("error_type"), str) else None,
        payload=payload,
        payload_bytes=size,
        payload_complete=payload is not None and size == len(payload),
        payload_sha256=obj.get("payload_sha256") if isinstance(obj.get("payload_sha256"), str) else None,
        key=key,
        key_complete=key is not None and (key_size is None or key_size == len(key))
        and not obj.get("key_truncated", False),
        source=Source(
            topic=src.get("topic") if isinstance(src.get("topic"), str) else None,
            partition=_opt_int(src.get("partition")),
            offset=_opt_int(src.get("offset")),
            timestamp=_opt_float(src.get("timestamp")),
        ),
        rejected_at=_opt_float(obj.get("rejected_at")),
        dlq_partition=partition,
        dlq_offset=offset,
    )


# ----------------------------------------------------------------------------- reading


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
        consumer = make_consumer(settings, client_id="fbp-dlq", enable_auto_commit=False)
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


# ----------------------------------------------------------------------------- stats


@dataclass
class Stats:
    topic: str
    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_source_topic: dict[str, int] = field(default_factory=dict)
    unreadable: int = 0  # records on the topic that are not dead letters
    oldest: float | None = None  # rejected_at, unix seconds
    newest: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dlq_stats(settings: Settings, topic: str | None = None) -> Stats:
    """Counts by reason and by source topic, and the oldest/newest rejection."""
    stats = Stats(topic=topic or settings.kafka.dlq_topic)
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for dl in read_dead_letters(settings, stats.topic):
        if dl is None:
            stats.unreadable += 1
            continue
        stats.total += 1
        reasons[dl.reason] += 1
        sources[dl.source.topic or "(not recorded)"] += 1
        if dl.rejected_at is not None:
            stats.oldest = dl.rejected_at if stats.oldest is None else min(stats.oldest, dl.rejected_at)
            stats.newest = dl.rejected_at if stats.newest is None else max(stats.newest, dl.rejected_at)
    stats.by_reason = dict(reasons.most_common())
    stats.by_source_topic = dict(sources.most_common())
    return stats


# ----------------------------------------------------------------------------- replay


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


# ----------------------------------------------------------------------------- CLI

app = typer.Typer(no_args_is_help=True, help="Dead letters: count them, replay them after a fix")


def _iso(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"fbp dlq: {exc}", err=True)
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


@app.command()
def stats(
    topic: Optional[str] = typer.Option(None, help="DLQ topic (default: FBP_KAFKA__DLQ_TOPIC)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the counts here as JSON."),
) -> None:
    """Count dead letters by reason and by source topic (the whole DLQ, up to its end now)."""
    try:
        s = dlq_stats(get_settings(), topic)
    except (InfrastructureError, ConfigError) as exc:
        raise _fail(exc) from None
    typer.echo(f"{s.topic}: {s.total} dead letters, oldest {_iso(s.oldest)}, newest {_iso(s.newest)}")
    for reason, n in s.by_reason.items():
        typer.echo(f"  {reason:<22} {n:>9}")
    if s.by_source_topic:
        typer.echo("by source topic:")
        for t, n in s.by_source_topic.items():
            typer.echo(f"  {t:<22} {n:>9}")
    if s.unreadable:
        typer.echo(f"  (plus {s.unreadable} records that are not dead letters)")
    _write_json(json_path, s.to_dict())


@app.command("replay")
def replay_cmd(
    reason: Optional[list[str]] = typer.Option(None, "--reason", help="Only this reason (repeatable)."),
    since: Optional[str] = typer.Option(None, help="Only letters rejected at or after this time "
                                                    "(ISO-8601, UTC unless a zone is given, or unix seconds)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be replayed; publish nothing."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the counts here as JSON."),
) -> None:
    """Publish the original records of matching dead letters to the ratings topic again.

    For use AFTER fixing what rejected them (a limit raised, a producer fixed):
    records are keyed by the user id in the payload (else their original key).
    Where the DLQ kept only a prefix, the original is fetched from its source
    topic while Kafka's retention lasts and checked against its sha256.
    Letters of null values cannot be replayed (counted as skipped).

    The worker de-duplicates by Kafka position, not event id: each replayed
    record is a new event and is applied to the user's state.  A dead letter
    was never applied, so one replay applies it once; replaying the same
    letters again applies them again.  Bound runs with --reason/--since.
    """
    try:
        report = replay(get_settings(), reasons=reason or (), since=parse_since(since), dry_run=dry_run)
    except (InfrastructureError, ConfigError) as exc:
        raise _fail(exc) from None
    verb = "would replay" if dry_run else "replayed"
    n = report.replayable if dry_run else report.replayed
    typer.echo(f"matched {report.matched} dead letters in {report.dlq_topic}; {verb} {n} to {report.topic}"
               f" ({report.recovered_from_source} fetched back from their source topic)")
    for why, count in report.skipped.items():
        typer.echo(f"  skipped {why:<32} {count:>7}")
    _write_json(json_path, report.to_dict())
    if any(why.startswith("produce_failed") for why in report.skipped):
        raise typer.Exit(1)
