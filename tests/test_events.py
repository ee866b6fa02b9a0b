"""The rating/prediction wire contract: every reject code, schemas, speed."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator

from core.events import (
    MAX_MOVIE_ID,
    REJECT_REASONS,
    PredictionRecord,
    RatingEvent,
    KafkaRecord,
    Misrouted,
    Rejection,
    classify,
    decode_limits,
    internal_error,
    decode_prediction,
    decode_rating,
    dlq_record,
    encode_prediction,
    encode_rating,
    rating_key,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "core" / "schemas"
KW = {"max_payload_bytes": 4096, "min_ts": 0, "max_ts": 2_000_000_000}
GOOD = {"event_id": "e-1", "user_id": 7, "movie_id": 42, "rating": 4.5, "ts": 1_700_000_000}


def _schema(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _dec(obj) -> RatingEvent | Rejection:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()  # stdlib: big ints too
    return decode_rating(raw, **KW)


def _reason(obj) -> str:
    res = _dec(obj)
    assert isinstance(res, Rejection), res
    assert res.reason in REJECT_REASONS
    return res.reason


def _with(**kw):
    d = dict(GOOD)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return d


def test_good_event_round_trips():
    ev = _dec(GOOD)
    assert ev == RatingEvent("e-1", 7, 42, 4.5, 1_700_000_000, None)
    assert decode_rating(encode_rating(ev), **KW) == ev
    ctx = RatingEvent("e-2", 0, MAX_MOVIE_ID, 0.5, 0, {"device": "tv", "n": [1, 2]})
    assert decode_rating(encode_rating(ctx), **KW) == ctx
    # Integral floats for ts (and ids) are accepted as ints; int ratings become floats.
    ev2 = _dec(_with(ts=1_700_000_000.0, rating=3))
    assert ev2.ts == 1_700_000_000 and type(ev2.ts) is int
    assert ev2.rating == 3.0 and type(ev2.rating) is float
    assert _dec(_with(context=None)).context is None


def test_reason_oversized_payload():
    big = orjson.dumps(_with(context={"pad": "x" * 5000}))
    assert _reason(big) == "oversized_payload"


def test_reason_bad_encoding():
    assert _reason(b'{"event_id": "\xff\xfe", "user_id": 1}') == "bad_encoding"


def test_reason_bad_json():
    assert _reason(b'{"event_id": "a", ') == "bad_json"
    assert _reason(b'{"rating": NaN}') == "bad_json"
    assert _reason(b"") == "bad_json"


def test_reason_not_an_object():
    assert _reason(b"[1, 2, 3]") == "not_an_object"
    assert _reason(b'"hello"') == "not_an_object"
    assert _reason(b"null") == "not_an_object"


def test_reason_missing_field():
    for f in ("event_id", "user_id", "movie_id", "rating", "ts"):
        assert _reason(_with(**{f: ...})) == "missing_field", f
    assert _reason(_with(ts=..., context={})) == "missing_field"


def test_reason_unknown_field():
    assert _reason(_with(extra=1)) == "unknown_field"
    res = _dec(_with(colour="red"))
    assert "colour" in res.detail


@pytest.mark.parametrize(
    "bad",
    [
        {"event_id": 5},
        {"user_id": "7"},
        {"user_id": True},
        {"movie_id": 4.2},
        {"movie_id": None},
        {"rating": "4"},
        {"rating": False},
        {"ts": "2024-01-01"},
        {"ts": 1.5},
        {"ts": True},
        {"context": [1]},
        {"context": "x"},
    ],
)
def test_reason_wrong_type(bad):
    assert _reason(_with(**bad)) == "wrong_type"


@pytest.mark.parametrize("rating", [0.0, 0.49, 5.01, 6, -1, 1e308, -1e308])
def test_reason_rating_out_of_range(rating):
    assert _reason(_with(rating=rating)) == "rating_out_of_range"


def test_non_finite_numbers_never_pass():
    # JSON has no NaN/Infinity and orjson refuses overflowing literals: bad_json, not a crash.
    body = b'{"event_id":"a","user_id":1,"movie_id":1,"ts":1,"rating":%s}'
    for lit in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        assert _reason(body % lit) == "bad_json", lit
    assert _reason(_with(ts=1e300)) == "absurd_timestamp"


@pytest.mark.parametrize(
    "bad",
    [
        {"user_id": -1},
        {"user_id": 2**53},
        {"user_id": 10**30},
        {"movie_id": MAX_MOVIE_ID + 1},
        {"movie_id": -3},
        {"event_id": ""},
        {"event_id": "x" * 129},
    ],
)
def test_reason_id_out_of_range(bad):
    assert _reason(_with(**bad)) == "id_out_of_range"


@pytest.mark.parametrize("ts", [-1, 2_000_000_001, 10**15])
def test_reason_absurd_timestamp(ts):
    assert _reason(_with(ts=ts)) == "absurd_timestamp"


# -- record-level reasons: what classify() makes of a whole Kafka record ----------
def _rec(value, key: bytes | None = b"7", **kw) -> KafkaRecord:
    if isinstance(value, dict):
        value = json.dumps(value).encode()
    return KafkaRecord(value, key, **kw)


def _classify(rec: KafkaRecord, policy: str = "refuse", rekey: bool = True):
    return classify(rec, **KW, key_policy=policy, rekey=rekey)


def test_reason_null_value():
    got = _classify(_rec(None))
    assert isinstance(got, Rejection) and got.reason == "null_value" and got.raw is None
    assert _classify(_rec(None, key=None)).reason == "null_value"


def test_reason_empty_value():
    got = _classify(_rec(b""))
    assert got.reason == "empty_value" and got.raw == b""


def test_reason_bad_key():
    """A valid event keyed otherwise than by its user id in decimal text."""
    for key in (None, b"", b"8", b"07", b" 7", b"\xff", b"user-7", b"7" * 300):
        got = _classify(_rec(GOOD, key=key))
        assert isinstance(got, Rejection) and got.reason == "bad_key", key
        assert len(got.detail) < 200  # a huge key is not copied into the detail
    assert _classify(_rec(GOOD, key=b"7")) == _dec(GOOD)


def test_key_policy_rekey_marks_misrouted_events_except_on_the_repartition_topic():
    got = _classify(_rec(GOOD, key=None), policy="rekey")
    assert isinstance(got, Misrouted) and got.event == _dec(GOOD)
    assert _classify(_rec(GOOD, key=b"8"), policy="rekey", rekey=False).reason == "bad_key"
    # the value is judged first: a bad value is never re-keyed
    assert _classify(_rec(b"[1]", key=None), policy="rekey").reason == "not_an_object"


def test_reason_internal_error():
    try:
        raise KeyError("boom " * 1000)
    except KeyError as exc:
        got = internal_error(exc, b"payload")
    assert got.reason == "internal_error" and got.error_type == "KeyError" and got.raw == b"payload"
    assert len(got.detail) <= 1100
    d = orjson.loads(dlq_record(got, _rec(b"payload")))
    assert d["error_type"] == "KeyError" and d["reason"] == "internal_error"


def test_every_reason_has_a_test():
    names = {n for n in globals() if n.startswith("test_reason_")}
    assert {f"test_reason_{r}" for r in REJECT_REASONS} <= names


def test_decode_limits_from_settings():
    from core.settings import load_settings

    s = load_settings()
    kw = decode_limits(s.worker, now=1_000_000)
    assert kw == {
        "max_payload_bytes": s.worker.max_payload_bytes,
        "min_ts": s.worker.min_ts,
        "max_ts": 1_000_000 + s.worker.max_future_s,
    }


def test_rating_key_is_decimal_user_id():
    assert rating_key(RatingEvent("a", 12345, 1, 3.0, 1)) == b"12345"
    assert rating_key(0) == b"0"


SCHEMA_EXAMPLES = [
    (GOOD, True),
    (_with(context={"a": 1}), True),
    (_with(context=None), True),
    (_with(ts=1_700_000_000.0), True),
    (_with(rating=0.5), True),
    (_with(rating=5), True),
    (_with(movie_id=MAX_MOVIE_ID), True),
    (_with(user_id=2**53 - 1), True),
    (_with(rating=0.4), False),
    (_with(rating=True), False),
    (_with(user_id=True), False),
    (_with(user_id=-1), False),
    (_with(user_id=2**53), False),
    (_with(movie_id=MAX_MOVIE_ID + 1), False),
    (_with(event_id=""), False),
    (_with(event_id="e" * 129), False),
    (_with(ts=...), False),
    (_with(ts=1.5), False),
    (_with(ts=-5), False),
    (_with(extra=1), False),
    (_with(context=[]), False),
    ([1, 2], False),
]


@pytest.mark.parametrize(("obj", "ok"), SCHEMA_EXAMPLES)
def test_schema_and_decoder_agree(obj, ok):
    v = _schema("rating_event.schema.json")
    assert v.is_valid(obj) is ok
    res = _dec(obj)
    assert isinstance(res, RatingEvent) is ok, res
    if ok:
        assert v.is_valid(orjson.loads(encode_rating(res)))


def _prediction() -> PredictionRecord:
    return PredictionRecord(
        event_id="ml-100k-3",
        user_id=7,
        movie_id=42,
        predicted=3.71,
        actual=4.0,
        model_version=2,
        top_k=[[50, 0.9], [181, 0.7]],
        timings={"event_to_prediction_ms": 12.5, "batch_ms": 3.25},
        ts=1_700_000_000,
        produced_at=1_700_000_000.123,
    )


def test_prediction_round_trip_and_schema():
    rec = _prediction()
    raw = encode_prediction(rec)
    errors = list(_schema("prediction.schema.json").iter_errors(orjson.loads(raw)))
    assert not errors, errors
    assert decode_prediction(raw) == rec
    bad = orjson.loads(raw)
    bad["top_k"] = [[1, 2, 3]]
    assert not _schema("prediction.schema.json").is_valid(bad)


def test_decode_prediction_errors_name_the_problem():
    with pytest.raises(ValueError, match="not JSON"):
        decode_prediction(b"{")
    d = orjson.loads(encode_prediction(_prediction()))
    del d["model_version"]
    with pytest.raises(ValueError, match="model_version"):
        decode_prediction(orjson.dumps(d))


def test_dlq_record_keeps_payload_and_source():
    rej = _dec(b"[1]")
    rec = KafkaRecord(b"[1]", b"k", (("trace", b"\x00\x01"),), "ratings", 3, 99, 1_700_000_000.5)
    d = orjson.loads(dlq_record(rej, rec))
    assert d["reason"] == "not_an_object" and d["payload"] == "[1]" and d["error_type"] is None
    assert d["payload_encoding"] == "utf-8" and d["payload_bytes"] == 3 and not d["payload_truncated"]
    assert d["payload_sha256"] == hashlib.sha256(b"[1]").hexdigest()
    assert d["key"] == "k" and d["key_encoding"] == "utf-8"
    assert d["headers"] == [["trace", base64.b64encode(b"\x00\x01").decode()]]
    assert d["source"] == {"topic": "ratings", "partition": 3, "offset": 99, "timestamp": 1_700_000_000.5}
    assert abs(d["rejected_at"] - time.time()) < 60
    rej = _dec(b"\xff\x00junk")
    d = orjson.loads(dlq_record(rej, KafkaRecord(b"\xff\x00junk", None)))
    assert d["reason"] == "bad_encoding" and d["payload_encoding"] == "base64"
    assert base64.b64decode(d["payload"]) == b"\xff\x00junk"
    assert d["key"] is None and d["key_encoding"] is None
    d = orjson.loads(dlq_record(_classify(_rec(None)), _rec(None)))
    assert d["payload"] is None and d["payload_encoding"] is None and d["payload_bytes"] is None


def test_dlq_record_is_bounded_whatever_the_record():
    """A dead letter of a ~1 MB value, a huge key and many large headers stays
    small, keeps the size and hash of the whole value, and cuts UTF-8 text at
    a character boundary; stripped, it keeps only sizes, hash and source."""
    value = "é".encode() * 500_000  # 1 MB of two-byte characters
    rec = KafkaRecord(value, b"k" * 100_000, tuple((f"h{i}", b"v" * 10_000) for i in range(100)), "r", 1, 2, 3.0)
    rej = _classify(rec)
    full = dlq_record(rej, rec, payload_prefix_bytes=1024)
    d = orjson.loads(full)
    assert len(full) < 12_000, len(full)
    assert d["payload_bytes"] == len(value) and d["payload_truncated"]
    assert d["payload_sha256"] == hashlib.sha256(value).hexdigest()
    assert d["payload_encoding"] == "utf-8" and d["payload"] == "é" * 512
    assert d["key_bytes"] == 100_000 and d["key_truncated"] and len(d["key"]) == 256
    assert len(d["headers"]) == 16 and d["headers_truncated"]
    assert all(len(base64.b64decode(v)) == 256 for _, v in d["headers"])
    small = orjson.loads(dlq_record(rej, rec, stripped=True))
    assert small["stripped"] and small["payload"] is None and small["key"] is None and small["headers"] == []
    assert small["payload_sha256"] == d["payload_sha256"] and small["source"] == d["source"]
    # a cut inside a multi-byte character moves back to its start
    odd = orjson.loads(dlq_record(rej, KafkaRecord(value, None), payload_prefix_bytes=1023))
    assert odd["payload"] == "é" * 511


def test_decode_is_fast():
    """The worker decodes every event; the budget is well under 20 us each."""
    raws = [encode_rating(RatingEvent(f"ml-100k-{i}", i % 943, i % 1682, 3.0, 1_700_000_000 + i)) for i in range(2000)]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for r in raws:
            decode_rating(r, **KW)
        best = min(best, (time.perf_counter() - t0) / len(raws))
    print(f"decode_rating: {best * 1e6:.2f} us/event")
    assert best < 20e-6
