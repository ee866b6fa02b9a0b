"""The wire contract: what a rating event and a prediction look like on Kafka.

Rating events arrive from anywhere, so :func:`decode_rating` trusts nothing:
every malformed payload becomes a :class:`Rejection` with one of the stable
:data:`REJECT_REASONS` codes (counted in metrics, routed to the DLQ) instead of
an exception that would stall a partition.  It runs once per event in the
worker, so it is hand-written checks over :func:`orjson.loads` (a few
microseconds) rather than a generic validator; ``core/schemas/*.json`` say
the same thing for other languages and tests keep the two in agreement.
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass, field
from typing import Any

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
)

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
    """Why a payload was refused (``reason`` is one of REJECT_REASONS) and the payload."""

    reason: str
    detail: str
    raw: bytes


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


def decode_limits(worker_settings: Any, now: float | None = None) -> dict[str, int]:
    """``decode_rating`` keyword arguments from ``settings.worker`` at time ``now``."""
    now = time.time() if now is None else now
    return {
        "max_payload_bytes": int(worker_settings.max_payload_bytes),
        "min_ts": int(worker_settings.min_ts),
        "max_ts": int(now) + int(worker_settings.max_future_s),
    }


def _reject(reason: str, detail: str, raw: bytes) -> Rejection:
    return Rejection(reason, detail, raw)


def _as_int(v: Any) -> int | None:
    """An exact integer from a JSON int or an integral float; None otherwise (bools too)."""
    t = type(v)
    if t is int:
        return v
    if t is float and v.is_integer():
        return int(v)
    return None


def decode_rating(
    raw: bytes, *, max_payload_bytes: int, min_ts: int, max_ts: int
) -> RatingEvent | Rejection:
    """Parse and validate one rating payload; never raises for bad input."""
    if len(raw) > max_payload_bytes:
        return _reject("oversized_payload", f"{len(raw)} bytes > {max_payload_bytes}", raw)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as uexc:
            return _reject("bad_encoding", f"not UTF-8: {uexc}", raw)
        return _reject("bad_json", str(exc), raw)
    if type(obj) is not dict:
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

    user_id = _as_int(obj["user_id"])
    if user_id is None:
        return _reject("wrong_type", "user_id must be an integer", raw)
    movie_id = _as_int(obj["movie_id"])
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
    ts = _as_int(ts_raw)
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


def dlq_record(rejection: Rejection, *, topic: str, partition: int, offset: int) -> bytes:
    """The dead-letter record: why, the original payload, and where it came from.

    The payload is kept verbatim as a string when it is UTF-8, else base64, so
    it can be inspected and replayed after a fix.
    """
    raw = bytes(rejection.raw)
    try:
        payload, enc = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, enc = base64.b64encode(raw).decode("ascii"), "base64"
    return orjson.dumps(
        {
            "reason": rejection.reason,
            "detail": rejection.detail,
            "payload": payload,
            "payload_encoding": enc,
            "source": {"topic": topic, "partition": partition, "offset": offset},
            "rejected_at": time.time(),
        }
    )
