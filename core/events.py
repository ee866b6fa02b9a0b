"""The wire contract: what a rating event and a prediction look like on Kafka.

Rating events arrive from anywhere, so the worker trusts nothing: everything
it learns about one Kafka record goes into a :class:`KafkaRecord`, and
:func:`classify` turns that into a valid event or a :class:`Rejection` with
one of the stable :data:`REJECT_REASONS` codes (counted in metrics, routed to
the DLQ by :func:`dlq_record`, whose output is bounded whatever the record's
size) instead of an exception that would stall a partition.  The value's
own checks live in :func:`decode_rating`.  It runs once per event in the
worker, so it is hand-written checks over :func:`orjson.loads` (a few
microseconds) rather than a generic validator; ``core/schemas/*.json`` say
the same thing for other languages and tests keep the two in agreement.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import orjson

MAX_ID = 2**53  # ids must stay exact in a JSON double
MAX_MOVIE_ID = 1_000_000  # the model's embedding tables are sized by this
MAX_EVENT_ID_LEN = 128
MIN_RATING, MAX_RATING = 0.5, 5.0

REJECT_REASONS: tuple[str, ...] = (
    "oversized_payload",
    "bad_encoding",
    "bad_json",
    "not_an_object",
    "missing_field",
    "unknown_field",
    "wrong_type",
    "rating_out_of_range",
    "id_out_of_range",
    "absurd_timestamp",
    # record-level reasons (appended: the codes above keep their positions)
    "null_value",       # a tombstone or a key sent without a value
    "empty_value",      # a zero-length value
    "bad_key",          # key is not the user id as decimal text (key_policy=refuse)
    "internal_error",   # an unexpected exception while handling this one record
)

#: the reasons :func:`decode_rating` gives (about the value's bytes alone)
VALUE_REASONS: tuple[str, ...] = REJECT_REASONS[:10]

#: what the worker does with a valid event whose key is not its user id
KEY_POLICIES = ("rekey", "refuse")

_REQUIRED = ("event_id", "user_id", "movie_id", "rating", "ts")
_ALLOWED = frozenset(_REQUIRED + ("context",))


@dataclass(frozen=True, slots=True)
class RatingEvent:
    """One user rating one movie at one time; ``event_id`` makes replays idempotent."""

    event_id: str
    user_id: int
    movie_id: int
    rating: float
    ts: int
    context: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused (``reason`` is one of REJECT_REASONS) and its value
    (None for a null value); ``error_type`` names the exception of an internal_error."""

    reason: str
    detail: str
    raw: bytes | None
    error_type: str | None = None


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """Everything the worker learns about one Kafka record, as the client gave it.

    ``key``/``value`` are None when absent (Kafka distinguishes null from
    empty); ``timestamp`` is the record's timestamp in seconds."""

    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    topic: str = "ratings"
    partition: int = 0
    offset: int = 0
    timestamp: float = 0.0


@dataclass(frozen=True, slots=True)
class Misrouted:
    """A valid event whose Kafka key is not its user id (``key_policy=rekey``):
    it must go through the repartition topic before it touches state."""

    event: RatingEvent


@dataclass(slots=True)
class PredictionRecord:
    """What the worker publishes for each accepted event.

    ``predicted`` is the model's rating for ``movie_id`` made *before* seeing
    ``actual``; ``top_k`` is ``[[movie_id, score], ...]`` for the user's next
    picks; ``timings`` holds latencies in milliseconds (e.g.
    ``event_to_prediction_ms``, ``batch_ms``).
    """

    event_id: str
    user_id: int
    movie_id: int
    predicted: float
    actual: float
    model_version: int
    top_k: list[list[float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    ts: int = 0
    produced_at: float = 0.0


class DecodeLimits(Protocol):
    """Where the limits come from: ``settings.worker`` or the stream's batch configuration."""

    max_payload_bytes: int
    min_ts: int
    max_future_s: int


def decode_limits(worker_settings: DecodeLimits, now: float | None = None) -> dict[str, int]:
    """``decode_rating`` keyword arguments from ``settings.worker`` at time ``now``."""
    now = time.time() if now is None else now
    return {
        "max_payload_bytes": int(worker_settings.max_payload_bytes),
        "min_ts": int(worker_settings.min_ts),
        "max_ts": int(now) + int(worker_settings.max_future_s),
    }


def _reject(reason: str, detail: str, raw: bytes) -> Rejection:
    return Rejection(reason, detail, raw)


def exact_int(v: Any) -> int | None:
    """An exact integer from a JSON int or an integral float (as JSON Schema
    reads "integer"); None otherwise, bools included."""
    t = type(v)
    if t is int:
        return v
    if t is float and v.is_integer():
        return int(v)
    return None


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, or the Rejection saying why not: ``bad_encoding`` when
    it is not even UTF-8, else ``bad_json``."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as uexc:
            return _reject("bad_encoding", f"not UTF-8: {uexc}", raw)
        return _reject("bad_json", str(exc), raw)


def decode_rating(
    raw: bytes, *, max_payload_bytes: int, min_ts: int, max_ts: int
) -> RatingEvent | Rejection:
    """Parse and validate one rating payload; never raises for bad input."""
    if len(raw) > max_payload_bytes:
        return _reject("oversized_payload", f"{len(raw)} bytes > {max_payload_bytes}", raw)
    obj = parse_json(raw)
    if type(obj) is not dict:
        if type(obj) is Rejection:
            return obj
        return _reject("not_an_object", f"top level is {type(obj).__name__}", raw)

    if len(obj) < 5 or not _ALLOWED.issuperset(obj):
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            return _reject("missing_field", "missing " + ", ".join(missing), raw)
        extra = sorted(k for k in obj if k not in _ALLOWED)
        return _reject("unknown_field", "unknown " + ", ".join(extra[:5]), raw)
    for k in _REQUIRED:
        if k not in obj:
            return _reject("missing_field", f"missing {k}", raw)

    event_id = obj["event_id"]
    if type(event_id) is not str:
        return _reject("wrong_type", "event_id must be a string", raw)
    if not 0 < len(event_id) <= MAX_EVENT_ID_LEN:
        return _reject("id_out_of_range", f"event_id length must be 1..{MAX_EVENT_ID_LEN}", raw)

    user_id = exact_int(obj["user_id"])
    if user_id is None:
        return _reject("wrong_type", "user_id must be an integer", raw)
    movie_id = exact_int(obj["movie_id"])
    if movie_id is None:
        return _reject("wrong_type", "movie_id must be an integer", raw)
    if not 0 <= user_id < MAX_ID:
        return _reject("id_out_of_range", f"user_id {user_id} not in [0, 2**53)", raw)
    if not 0 <= movie_id <= MAX_MOVIE_ID:
        return _reject("id_out_of_range", f"movie_id {movie_id} not in [0, {MAX_MOVIE_ID}]", raw)

    rating = obj["rating"]
    rt = type(rating)
    if rt is int:
        rating = float(rating)
    elif rt is not float:
        return _reject("wrong_type", "rating must be a number", raw)
    if not MIN_RATING <= rating <= MAX_RATING:  # also false for NaN
        return _reject("rating_out_of_range", f"rating {rating} not in [0.5, 5]", raw)

    ts_raw = obj["ts"]
    ts = exact_int(ts_raw)
    if ts is None:
        if type(ts_raw) is float and not math.isfinite(ts_raw):
            return _reject("absurd_timestamp", f"ts {ts_raw}", raw)
        return _reject("wrong_type", "ts must be an integer number of unix seconds", raw)
    if not min_ts <= ts <= max_ts:
        return _reject("absurd_timestamp", f"ts {ts} not in [{min_ts}, {max_ts}]", raw)

    context = obj.get("context")
    if context is not None and type(context) is not dict:
        return _reject("wrong_type", "context must be an object or null", raw)
    return RatingEvent(event_id, user_id, movie_id, rating, ts, context)


def classify(
    rec: KafkaRecord, *, max_payload_bytes: int, min_ts: int, max_ts: int,
    key_policy: str = "rekey", rekey: bool = True,
) -> RatingEvent | Misrouted | Rejection:
    """The one place that decides what a record is; never raises for bad input.

    Value first (null, empty, then :func:`decode_rating`), then the key: a valid
    event keyed otherwise than by its user id is :class:`Misrouted` under
    ``key_policy="rekey"`` and a ``bad_key`` rejection under ``"refuse"`` --
    or always when ``rekey`` is False (records already on the repartition
    topic were keyed by a worker; a wrong key there is not re-keyed again).
    """
    value = rec.value
    if value is None:
        return Rejection("null_value", "record has no value (tombstone or key-only record)", None)
    if len(value) == 0:
        return Rejection("empty_value", "record value is empty", value)
    ev = decode_rating(value, max_payload_bytes=max_payload_bytes, min_ts=min_ts, max_ts=max_ts)
    if isinstance(ev, Rejection) or rec.key == rating_key(ev.user_id):
        return ev
    if key_policy == "rekey" and rekey:
        return Misrouted(ev)
    shown = "no key" if rec.key is None else f"key {bytes(rec.key[:40])!r}"
    return Rejection("bad_key", f"{shown} is not user id {ev.user_id} as decimal text", value)


def internal_error(exc: BaseException, raw: bytes | None) -> Rejection:
    """An unexpected exception while handling one record, as its dead letter."""
    return Rejection("internal_error", _clip(str(exc) or repr(exc), DETAIL_MAX_CHARS), raw,
                     error_type=type(exc).__name__)


def encode_rating(ev: RatingEvent) -> bytes:
    """The canonical JSON of a rating event (``context`` omitted when None)."""
    d: dict[str, Any] = {
        "event_id": ev.event_id,
        "user_id": ev.user_id,
        "movie_id": ev.movie_id,
        "rating": ev.rating,
        "ts": ev.ts,
    }
    if ev.context is not None:
        d["context"] = ev.context
    return orjson.dumps(d)


def rating_key(ev: RatingEvent | int) -> bytes:
    """Kafka key: the user id in decimal ASCII.

    Every client hashes the key bytes deterministically, so one user's events
    share a partition and keep their order -- the worker's per-user state relies
    on that.  Plain digits keep keys identical whatever language produced them.
    """
    uid = ev if isinstance(ev, int) else ev.user_id
    return str(uid).encode("ascii")


def encode_prediction(rec: PredictionRecord) -> bytes:
    """The wire form of a prediction: its fields in declaration order as JSON
    (orjson writes the dataclass natively, so build records from plain Python
    int/float/str/list values -- numpy scalars are refused)."""
    return orjson.dumps(rec)


def decode_prediction(raw: bytes) -> PredictionRecord:
    """Parse a prediction; raises ValueError naming the problem (these are our own records)."""
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"prediction is not JSON: {exc}") from None
    if type(d) is not dict:
        raise ValueError("prediction must be a JSON object")
    try:
        return PredictionRecord(
            event_id=str(d["event_id"]),
            user_id=int(d["user_id"]),
            movie_id=int(d["movie_id"]),
            predicted=float(d["predicted"]),
            actual=float(d["actual"]),
            model_version=int(d["model_version"]),
            top_k=[[int(m), float(s)] for m, s in d.get("top_k", [])],
            timings={str(k): float(v) for k, v in d.get("timings", {}).items()},
            ts=int(d.get("ts", 0)),
            produced_at=float(d.get("produced_at", 0.0)),
        )
    except KeyError as exc:
        raise ValueError(f"prediction lacks field {exc.args[0]}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"prediction has a malformed field: {exc}") from None


DETAIL_MAX_CHARS = 1024
KEY_PREFIX_BYTES = 256
MAX_HEADERS = 16
HEADER_VALUE_BYTES = 256
HEADER_NAME_CHARS = 256


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _prefix(raw: bytes | None, limit: int, *, full_hash: bool) -> dict[str, Any]:
    """A bounded view of ``raw``: a prefix as UTF-8 text when it decodes (cut at
    a character boundary), else base64; its size, truncation and sha256."""
    if raw is None:
        return {"text": None, "encoding": None, "bytes": None, "truncated": False, "sha256": None}
    head = raw[:limit]
    text = enc = None
    for cut in range(0, 4 if len(raw) > limit else 1):  # a multi-byte char may straddle the cut
        try:
            text, enc = head[: len(head) - cut].decode("utf-8"), "utf-8"
            head = head[: len(head) - cut]
            break
        except UnicodeDecodeError:
            continue
    if text is None:
        text, enc = base64.b64encode(head).decode("ascii"), "base64"
    return {"text": text, "encoding": enc, "bytes": len(raw), "truncated": len(head) < len(raw),
            "sha256": hashlib.sha256(raw).hexdigest() if full_hash else None}


def _headers(headers: Sequence[tuple[str, bytes | None]]) -> list[list[str | None]]:
    out: list[list[str | None]] = []
    for name, value in list(headers)[:MAX_HEADERS]:
        name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        v = None if value is None else base64.b64encode(bytes(value[:HEADER_VALUE_BYTES])).decode("ascii")
        out.append([_clip(name, HEADER_NAME_CHARS), v])
    return out


def dlq_record(
    rejection: Rejection, record: KafkaRecord, *, payload_prefix_bytes: int = 1024, stripped: bool = False,
) -> bytes:
    """The dead-letter record: why, a bounded copy of the record, and where it came from.

    Whatever the record's size, the result stays within a few times
    ``payload_prefix_bytes`` + 16 headers, so it always fits the producer's and
    the broker's limits; the original can be fetched from ``source`` while
    retention lasts, and checked against ``payload_sha256``.  ``stripped``
    drops payload, key and headers (kept: sizes, hash, source) -- the retry
    after a size error, which must not fail twice.
    """
    raw = None if rejection.raw is None else bytes(rejection.raw)
    key = None if record.key is None else bytes(record.key)
    lim, klim = (0, 0) if stripped else (payload_prefix_bytes, KEY_PREFIX_BYTES)
    p = _prefix(raw, lim, full_hash=True)
    k = _prefix(key, klim, full_hash=False)
    if stripped:  # sizes and hash stay; ``stripped`` says why payload and key are null
        p["text"] = p["encoding"] = k["text"] = k["encoding"] = None
    return orjson.dumps(
        {
            "reason": rejection.reason,
            "detail": _clip(rejection.detail, DETAIL_MAX_CHARS),
            "error_type": rejection.error_type,
            "payload": p["text"],
            "payload_encoding": p["encoding"],
            "payload_bytes": p["bytes"],
            "payload_truncated": p["truncated"],
            "payload_sha256": p["sha256"],
            "key": k["text"],
            "key_encoding": k["encoding"],
            "key_bytes": k["bytes"],
            "key_truncated": k["truncated"],
            "headers": [] if stripped else _headers(record.headers),
            "headers_truncated": stripped and bool(record.headers) or len(record.headers) > MAX_HEADERS,
            "stripped": stripped,
            "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset,
                       "timestamp": record.timestamp},
            "rejected_at": time.time(),
        }
    )
