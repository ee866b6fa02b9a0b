"""Bad input: malformed rating events, fuzzed.

1. Unit level (fast, no stack): ``decode_rating`` over >= 10,000
   hypothesis-driven malformed payloads of every kind -- invalid UTF-8 and
   JSON, wrong types, missing/extra fields, NaN/inf ratings, out-of-range
   values, huge ids, oversized payloads, absurd timestamps -- never raises
   and gives the stable reason code of the kind; arbitrary bytes and
   arbitrary JSON never raise either.
2. Integration: >= 10,000 malformed events mixed into a valid ML-100K stream
   (same partitions, interleaved, some reusing valid event ids) through a real
   worker: each bad one is in the DLQ with its reason, the worker never
   crashes, and the valid events' predictions and final state equal the
   undisturbed reference.
3. What a *valid* re-sent event means: the worker de-duplicates by Kafka
   position (the per-user watermark), not by event id, so the same payload
   sent twice is two events: two prediction records, applied twice.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import string
import time
from collections import Counter

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.events import (
    KafkaRecord,
    MAX_EVENT_ID_LEN,
    REJECT_REASONS,
    VALUE_REASONS,
    RatingEvent,
    Rejection,
    decode_rating,
    dlq_record,
    encode_rating,
)

MAX_PAYLOAD = 4096
NOW = 1_700_000_000
LIMITS = {"max_payload_bytes": MAX_PAYLOAD, "min_ts": 0, "max_ts": NOW + 7 * 24 * 3600}
FIELDS = ("event_id", "user_id", "movie_id", "rating", "ts")
BAD_UTF8 = (b"\xff", b"\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80",
            b"\xe2\x82", b"\xf0\x28\x8c\x28")


# -- the generator of malformed payloads ------------------------------------------
def valid_obj(rng: random.Random, ids: list[str] | None = None) -> dict:
    eid = rng.choice(ids) if ids and rng.random() < 0.3 else f"fz-{rng.randrange(10**9)}"
    return {"event_id": eid, "user_id": rng.randrange(1, 10**6), "movie_id": rng.randrange(1, 1700),
            "rating": rng.choice([0.5, 1, 2, 2.5, 3, 4, 4.5, 5]), "ts": rng.randrange(800_000_000, 900_000_000)}


def _junk_key(rng: random.Random) -> str:
    k = "".join(rng.choice(string.ascii_letters + "_-") for _ in range(rng.randint(1, 12)))
    return k if k not in FIELDS and k != "context" else k + "_x"


def _wrong_value(rng: random.Random, field: str):
    common = [None, [1], {"a": 1}, True, False]
    return rng.choice({
        "event_id": common + [12, 3.5, -1],
        "user_id": common + ["12", "abc", 1.5, -0.25, ""],
        "movie_id": common + ["7", 2.5, "x"],
        "rating": [None, [4], {"v": 4}, True, False, "4", "", "NaN"],
        "ts": common + ["880000000", 8.8e8 + 0.5, "2020-01-01"],
        "context": [[1, 2], "ctx", 3, 2.5, True],
    }[field])


def malformed(rng: random.Random, ids: list[str] | None = None, now: int = NOW) -> tuple[bytes, str]:
    """One malformed payload and the reason code it must get (``now``: the
    worker's clock, for timestamps that are absurd relative to it)."""
    kind = rng.choice(VALUE_REASONS)
    obj = valid_obj(rng, ids)
    if kind == "oversized_payload":
        size = rng.randint(MAX_PAYLOAD + 1, 4 * MAX_PAYLOAD)
        if rng.random() < 0.5:
            obj["context"] = {"pad": "x" * size}
            return orjson.dumps(obj), kind
        return rng.getrandbits(8 * size).to_bytes(size, "little"), kind
    if kind == "bad_encoding":
        enc = orjson.dumps(obj)
        at = rng.randrange(len(enc) + 1)
        return enc[:at] + rng.choice(BAD_UTF8) + enc[at:], kind
    if kind == "bad_json":
        enc = orjson.dumps(obj)
        body = enc[1:-1]
        return rng.choice([
            lambda: enc[: rng.randrange(len(enc))],                  # truncated (incl. empty)
            lambda: enc + rng.choice([b"x", b"}", b",", b"\x00", b" 1"]),  # trailing garbage
            lambda: b"{" + body + b',"rating":' + rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]) + b"}",
            lambda: b"{" + body + b",}",                                # trailing comma
            lambda: enc.replace(b'"', b"'"),                            # single quotes
            lambda: b"{" + body.replace(b'"fz-', b'"\\ud800fz-', 1) + b"}" if b'"fz-' in body else b"{",
            lambda: b"// c\n" + enc,                                    # comment
            lambda: b"\xef\xbb\xbf" + enc,                              # BOM
            lambda: "".join(rng.choice("{}[]:,\"' \tabc01") for _ in range(rng.randint(1, 40))).encode() + b"{",
        ])(), kind
    if kind == "not_an_object":
        return orjson.dumps(rng.choice([[obj], [], 1, -2.5, "event", None, True, [[1, 2], {"a": 1}],
                                        list(obj.values())])), kind
    if kind == "missing_field":
        for k in rng.sample(FIELDS, rng.randint(1, 5)):
            del obj[k]
        if rng.random() < 0.3:
            obj[_junk_key(rng)] = 1  # also an unknown field: missing is reported first
        return orjson.dumps(obj), kind
    if kind == "unknown_field":
        for _ in range(rng.randint(1, 3)):
            obj[_junk_key(rng)] = rng.choice([1, "x", None, [1], {"a": 2}])
        return orjson.dumps(obj), kind
    if kind == "wrong_type":
        field = rng.choice(FIELDS + ("context",))
        obj[field] = _wrong_value(rng, field)
        return orjson.dumps(obj), kind
    if kind == "rating_out_of_range":
        obj["rating"] = rng.choice([0, 0.0, -0.0, 0.49, 5.01, 5.5, 6, 10, -1, 1e6, -1e300, 1e300,
                                   rng.uniform(-1e9, 0.4999), rng.uniform(5.0001, 1e9)])
        return orjson.dumps(obj), kind
    if kind == "id_out_of_range":
        which = rng.choice(["user", "movie", "event", "huge"])
        if which == "user":
            obj["user_id"] = rng.choice([-1, -(2**40), 2**53, 2**53 + 1, 2**63 - 1, rng.randrange(2**53, 2**64)])
        elif which == "movie":
            obj["movie_id"] = rng.choice([-1, 1_000_001, 2**31, 2**62, rng.randrange(1_000_001, 2**63)])
        elif which == "event":
            obj["event_id"] = rng.choice(["", "e" * rng.randint(MAX_EVENT_ID_LEN + 1, 1000)])
        else:  # beyond 64 bits: JSON numbers that only a double can hold
            big = str(10 ** rng.randint(20, 300) + rng.randrange(10**6)).encode()
            rest = orjson.dumps({k: v for k, v in obj.items() if k != "user_id"})
            return b'{"user_id":' + big + b"," + rest[1:], kind
        return orjson.dumps(obj), kind
    if kind == "absurd_timestamp":
        obj["ts"] = rng.choice([-1, -(10**12), now + 30 * 86400, now + 10**9, 2**62, 1e300, -1e300,
                                rng.randrange(now + 8 * 86400, 2**63)])
        return orjson.dumps(obj), kind
    raise AssertionError(kind)


# -- 1. unit level ------------------------------------------------------------------
def test_decode_rating_fuzz_reason_codes_are_stable():
    """>= 10,000 hypothesis-driven malformed payloads: never raises, the exact
    reason of the kind, the same answer twice, a well-formed DLQ record."""
    seen: Counter[str] = Counter()

    @settings(max_examples=12_000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False))
    def check(rnd: random.Random) -> None:
        raw, want = malformed(rnd)
        got = decode_rating(raw, **LIMITS)
        assert isinstance(got, Rejection), (raw[:200], got)
        assert got.reason == want, (raw[:200], got.reason, got.detail, want)
        assert got.reason in REJECT_REASONS
        again = decode_rating(raw, **LIMITS)
        assert (again.reason, again.detail) == (got.reason, got.detail)
        rec = orjson.loads(dlq_record(got, KafkaRecord(raw, None, (), "ratings", 0, 1)))
        assert rec["reason"] == want
        back = rec["payload"].encode() if rec["payload_encoding"] == "utf-8" else base64.b64decode(rec["payload"])
        # a bounded prefix of the payload, cut at most 3 bytes early (a UTF-8 boundary), and its hash
        assert back == raw if len(raw) <= 1024 else (raw.startswith(back) and 1021 <= len(back) <= 1024)
        assert rec["payload_truncated"] == (len(back) < len(raw)) and rec["payload_bytes"] == len(raw)
        assert rec["payload_sha256"] == hashlib.sha256(raw).hexdigest()
        seen[want] += 1

    check()
    total = sum(seen.values())
    print(f"\nfuzz decode_rating: {total} malformed payloads, 0 exceptions; by reason {dict(sorted(seen.items()))}")
    assert total >= 10_000
    assert set(seen) == set(VALUE_REASONS)


@settings(max_examples=1_500, deadline=None, database=None)
@given(st.binary(max_size=6000))
def test_decode_rating_never_raises_on_arbitrary_bytes(raw):
    got = decode_rating(raw, **LIMITS)
    assert isinstance(got, RatingEvent) or got.reason in REJECT_REASONS


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=1_500, deadline=None, database=None)
@given(st.fixed_dictionaries({}, optional={k: _json for k in FIELDS + ("context",)}) | _json)
def test_decode_rating_never_raises_on_arbitrary_json(obj):
    got = decode_rating(orjson.dumps(obj), **LIMITS)
    assert isinstance(got, RatingEvent) or got.reason in REJECT_REASONS


@settings(max_examples=1_000, deadline=None, database=None)
@given(st.builds(
    RatingEvent,
    event_id=st.text(min_size=1, max_size=MAX_EVENT_ID_LEN).filter(lambda s: s.encode("utf-8", "surrogatepass") == s.encode("utf-8", "ignore")),
    user_id=st.integers(0, 2**53 - 1), movie_id=st.integers(0, 1_000_000),
    rating=st.sampled_from([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]) | st.floats(0.5, 5.0),
    ts=st.integers(0, NOW),  # far out of time order but plausible: accepted, applied in arrival order
))
def test_valid_events_round_trip(ev):
    got = decode_rating(encode_rating(ev), **LIMITS)
    assert got == ev


# -- 2. integration: malformed events mixed into a valid stream ---------------------
def _read_n(settings_, topic: str, n: int, timeout: float) -> list[dict]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, **settings_.kafka.kafka_python_kwargs(), group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=500)
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            for msg in c:
                out.append(orjson.loads(msg.value))
    finally:
        c.close()
    return out


BAD_EVENTS = 10_000
GOOD_EVENTS = 6_000


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_malformed_events_mixed_into_stream_change_nothing(stack, ns, ckpt, ml100k, tmp_path):
    import httpx
    from kafka import KafkaProducer

    from stack import procs
    from models.checkpoint import load_checkpoint
    from core.kafka_io import make_producer
    from tests.streamkit import FROZEN_MOVIE_SIDE, redis_states, simulate, state_mismatches
    from trainer.prequential import stream_order

    df = ml100k.ratings.iloc[:GOOD_EVENTS]
    order = stream_order(df)
    ids = [f"df-{i}" for i in order.index]
    rng = random.Random(1234)
    now = int(time.time())
    bad = [malformed(rng, ids, now=now) for _ in range(BAD_EVENTS)]
    user_keys = [str(u).encode() for u in order["user_id"].unique()]

    # interleave: each bad event lands at a random position, on a valid user's
    # partition most of the time (else a random or missing key)
    good = [(str(int(u)).encode(), encode_rating(RatingEvent(eid, int(u), int(mv), float(r), int(t))))
            for eid, u, mv, r, t in zip(ids, order["user_id"], order["movie_id"], order["rating"], order["ts"])]
    slots = sorted(rng.randrange(len(good) + 1) for _ in bad)
    stream: list[tuple[bytes | None, bytes]] = []
    gi = 0
    for (raw, _), at in zip(bad, slots):
        while gi < at:
            stream.append(good[gi])
            gi += 1
        key = rng.choice(user_keys) if rng.random() < 0.8 else rng.choice([None, b"", b"\xff\xfe", b"99999999999"])
        stream.append((key, raw))
    stream.extend(good[gi:])

    port = 6171
    env = {**ns.env(256, port), **FROZEN_MOVIE_SIDE}  # exact-state oracle below
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    worker = procs.start_worker(port, tmp_path, env)
    try:
        prod = make_producer(stack, client_id="fuzz")
        errors: list[BaseException] = []
        for key, raw in stream:
            prod.send(ns.ratings, key=key, value=raw).add_errback(errors.append)
        prod.flush()
        prod.close()
        assert not errors, errors[0]

        preds = _read_n(stack, ns.predictions, GOOD_EVENTS, timeout=300)
        dlq = _read_n(stack, ns.dlq, BAD_EVENTS, timeout=120)
        assert worker.alive(), "worker crashed on bad input:\n" + worker.tail()

        # 3. a valid payload sent twice is two events (dedupe is by Kafka position)
        dup_user = 987_654
        dup = encode_rating(RatingEvent("dup-1", dup_user, 50, 4.0, 880_000_000))
        p2 = KafkaProducer(**stack.kafka.kafka_python_kwargs())
        for _ in range(2):
            p2.send(ns.ratings, key=str(dup_user).encode(), value=dup)
        p2.flush()
        p2.close()
        deadline = time.monotonic() + 60
        dup_recs: list[dict] = []
        while len(dup_recs) < 2 and time.monotonic() < deadline:
            dup_recs = [r for r in _read_n(stack, ns.predictions, GOOD_EVENTS + 2, timeout=5)
                        if r["event_id"] == "dup-1"]
        prof = httpx.get(f"{worker.url}/api/v1/users/{dup_user}/profile", timeout=10).json()
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()

    # every bad one in the DLQ with its reason (as a multiset of payload hash + reason);
    # a zero-byte value is a record-level fault the worker names before decoding
    want = Counter((hashlib.sha256(raw).hexdigest(), "empty_value" if raw == b"" else reason) for raw, reason in bad)
    got = Counter((r["payload_sha256"], r["reason"]) for r in dlq)
    wrong = sum((want - got).values()) + sum((got - want).values())
    # valid events: one record each, the reference prediction, the reference state
    by_id = {r["event_id"]: r for r in preds if r["event_id"] != "dup-1"}
    model, _ = load_checkpoint(ckpt)
    ref, uindex, ref_states = simulate(model, df)
    pred = np.array([by_id[i]["predicted"] if i in by_id else math.nan for i in ids])
    pred_diff = int(np.sum(~(np.abs(pred - ref) < 1e-3)))
    states, absent = redis_states(ns, model, uindex)
    mism = state_mismatches(states, ref_states)
    print(f"\nfuzz stream: bad={len(bad)} good={GOOD_EVENTS} dlq={len(dlq)} dlq_wrong={wrong} "
          f"missing={GOOD_EVENTS - len(by_id)} prediction_diffs={pred_diff} state_mismatches={mism} "
          f"crashes=0; by reason {dict(sorted(Counter(r for _, r in bad).items()))}")
    assert len(dlq) == BAD_EVENTS and wrong == 0
    assert len(by_id) == GOOD_EVENTS and len([r for r in preds if r["event_id"] != "dup-1"]) == GOOD_EVENTS
    assert pred_diff == 0 and mism == 0 and not absent
    assert len(dup_recs) == 2 and prof["ratings"] == 2, (dup_recs, prof)
