"""Dead letters as the worker writes them (``core.events.dlq_record``), parsed.

Why its own type: ``stats`` and ``replay`` need the stored payload and key
as bytes, whether they are whole, and where the original record was -- for
every shape the worker has written.  Older dead letters (before sizes,
hashes, keys and headers were recorded) are read too: a missing field counts
as "not recorded"; a record that is not a dead letter at all parses as None.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson


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
