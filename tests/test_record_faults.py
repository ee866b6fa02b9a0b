"""Whole Kafka records, fuzzed, through a real worker.

``tests/test_fuzz_events.py`` fuzzes payload bytes; this fuzzes *records*:
hypothesis builds keys (absent, empty, non-numeric, another user's, right),
values (null, empty, random bytes, invalid UTF-8, up to just under the
broker's ~1 MB maximum, valid events keyed wrongly), headers, and the
compression each record is produced with (none, gzip, snappy, lz4, zstd,
with aiokafka).  They are mixed into a valid ML-100K stream (kafka-python,
keyed by user id) and go through one real worker.  Then:

* the worker never exits;
* every bad record is in the DLQ, found by its (partition, offset), with the
  reason its kind must get, within the bounded size;
* every valid event -- including the wrongly keyed ones, re-keyed through
  the repartition topic -- has exactly the prediction and final state of a
  clean in-process reference run.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.events import VALUE_REASONS, RatingEvent, encode_rating, rating_key

pytestmark = pytest.mark.integration

GOOD_EVENTS = 1000
BAD_RECORDS = 80
MISKEYED = 20
NEAR_MAX = 1_040_000  # the broker's message.max.bytes is 1,048,588
CODECS = (None, "gzip", "snappy", "lz4", "zstd")

_keys = st.one_of(
    st.none(), st.just(b""), st.binary(max_size=40),
    st.text(alphabet="abcxyz-_ ", min_size=1, max_size=20).map(str.encode),
    st.integers(0, 10**12).map(lambda n: str(n).encode()),
)
_headers = st.lists(st.tuples(st.text(max_size=30), st.one_of(st.none(), st.binary(max_size=600))), max_size=20)


@st.composite
def bad_record(draw) -> tuple[str, bytes | None, bytes | None, list, str | None]:
    """(kind, key, value, headers, compression); the kind fixes the reason."""
    kind = draw(st.sampled_from(["null", "empty", "random", "bad_utf8", "huge"]))
    if kind == "null":
        value = None
    elif kind == "empty":
        value = b""
    elif kind == "random":  # any bytes a broken producer may send (valid JSON events are vanishingly rare)
        value = draw(st.binary(min_size=1, max_size=3000))
    elif kind == "bad_utf8":
        value = b'{"event_id":"' + draw(st.binary(max_size=50)) + b"\xff\xfe" + b'"}'
    else:  # larger than max_payload_bytes, up to just under the broker's limit
        value = b"x" * draw(st.sampled_from([4097, 65_536, 500_000, NEAR_MAX]))
    key = draw(_keys)
    if value is None and key is None:  # Kafka allows it, the Python clients refuse to send it
        key = b""
    return kind, key, value, draw(_headers), draw(st.sampled_from(CODECS))


WANT = {"null": {"null_value"}, "empty": {"empty_value"}, "bad_utf8": {"bad_encoding"},
        "huge": {"oversized_payload"}, "random": set(VALUE_REASONS)}


async def _produce(servers: list[str], topic: str, records) -> list[tuple[int, int]]:
    """Send each (key, value, headers, codec) with aiokafka; their (partition, offset)."""
    from aiokafka import AIOKafkaProducer

    producers = {}
    try:
        for codec in CODECS:
            producers[codec] = AIOKafkaProducer(bootstrap_servers=servers, compression_type=codec,
                                                max_request_size=1_048_576, acks="all")
            await producers[codec].start()
        out = []
        for key, value, headers, codec in records:
            md = await producers[codec].send_and_wait(topic, value, key=key, headers=headers or None)
            out.append((md.partition, md.offset))
        return out
    finally:
        for p in producers.values():
            await p.stop()


def drawn(strategy, n: int) -> list:
    """``n`` examples as hypothesis explores them (seeded: the same every run).

    One worker run costs a minute, so hypothesis does not drive one run per
    example: it generates the records, the worker gets them all at once."""
    out: list = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x) -> None:
        out.append(x)

    collect()
    return out


@pytest.mark.timeout(600)
def test_fuzzed_records_mixed_into_a_valid_stream_change_nothing(stack, ns, ckpt, ml100k, tmp_path):
    from kafka import KafkaProducer

    from models.checkpoint import load_checkpoint
    from stack import procs
    from tests.streamkit import FROZEN_MOVIE_SIDE, read_topic, redis_states, simulate, state_mismatches
    from trainer.prequential import stream_order

    bad = drawn(bad_record(), BAD_RECORDS)
    df = ml100k.ratings.iloc[:GOOD_EVENTS]
    order = stream_order(df)
    good = [RatingEvent(f"rf-{i}", int(u), int(m), float(r), int(t))
            for i, u, m, r, t in zip(order.index, order["user_id"], order["movie_id"], order["rating"], order["ts"])]
    # valid events of users of their own, keyed wrongly (another user's id, none, junk):
    # re-keyed by the worker; one event per user, so arrival order cannot matter
    miskeyed = [RatingEvent(f"mk-{i}", 900_000 + i, 1 + i, 3.0, 880_000_000 + i) for i in range(MISKEYED)]
    wrong_keys = drawn(st.tuples(_keys.filter(lambda k: not (k or b"").startswith(b"900")),
                                 st.sampled_from(CODECS)), MISKEYED)
    miskeyed = miskeyed[:len(wrong_keys)]

    port = 6191
    env = {**ns.env(256, port), **FROZEN_MOVIE_SIDE}  # exact-state oracle below
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    env["FBP_WORKER__DEVICE"] = "cpu"
    worker = procs.start_worker(port, tmp_path, env)
    try:
        prod = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all")
        half = len(good) // 2
        for ev in good[:half]:
            prod.send(ns.ratings, key=rating_key(ev), value=encode_rating(ev))
        prod.flush()
        foreign = [(k, v, h, c) for _, k, v, h, c in bad]
        foreign += [(k, encode_rating(ev), [], c) for ev, (k, c) in zip(miskeyed, wrong_keys)]
        coords = asyncio.run(_produce(stack.kafka.servers, ns.ratings, foreign))
        for ev in good[half:]:
            prod.send(ns.ratings, key=rating_key(ev), value=encode_rating(ev))
        prod.flush()
        prod.close()

        preds = read_topic(stack, ns.predictions, until=GOOD_EVENTS + len(miskeyed), timeout=300)
        dlq = read_topic(stack, ns.dlq, until=len(bad), timeout=120, by_event_id=False)
        time.sleep(1.0)  # let a late duplicate show up if there were one (not a timing assertion)
        assert worker.alive(), "worker stopped on a record:\n" + worker.tail()
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()

    # every bad record dead-lettered once, with its kind's reason, bounded
    letters = {(d["source"]["partition"], d["source"]["offset"]): d for d in dlq}
    wrong = [(kind, letters.get(at, {}).get("reason")) for (kind, *_), at in zip(bad, coords)
             if letters.get(at, {}).get("reason") not in WANT[kind]]
    biggest = max(len(orjson.dumps(d)) for d in dlq)
    # valid events: one prediction each, the reference value, the reference state
    by_id = {}
    for r in preds:
        by_id.setdefault(r["event_id"], []).append(r["predicted"])
    model, _ = load_checkpoint(ckpt)
    everything = pd.concat([order.assign(eid=[ev.event_id for ev in good]),
                            pd.DataFrame({"user_id": [e.user_id for e in miskeyed],
                                          "movie_id": [e.movie_id for e in miskeyed],
                                          "rating": [e.rating for e in miskeyed], "ts": [e.ts for e in miskeyed],
                                          "eid": [e.event_id for e in miskeyed]})], ignore_index=True)
    ref, uindex, ref_states = simulate(model, everything)
    ref_by_id = dict(zip(stream_order(everything)["eid"], ref))
    diffs = sum(1 for i in ref_by_id if len(by_id.get(i, [])) != 1 or abs(by_id[i][0] - ref_by_id[i]) >= 1e-3)
    states, absent = redis_states(ns, model, uindex)
    mism = state_mismatches(states, ref_states)
    kinds = {k: sum(1 for b in bad if b[0] == k) for k in WANT}
    print(f"\nrecord fuzz: bad={len(bad)} {kinds} miskeyed={len(miskeyed)} good={GOOD_EVENTS} dlq={len(dlq)} "
          f"wrong_reason={len(wrong)} largest_dead_letter={biggest}B prediction_diffs={diffs} "
          f"state_mismatches={mism} absent={len(absent)}")
    assert len(dlq) == len(bad) and not wrong, wrong[:5]
    assert biggest < 64 * 1024
    assert diffs == 0 and mism == 0 and not absent


# -- an exception on one user's events, and an infrastructure fault -----------------
def _predictor(stack, ns, model, store, producer):
    from stream.runtime import make_predictor

    async def send(topic, key, value, headers=None, timestamp=None):
        return await producer.send(topic, value, key=key, headers=headers)

    return make_predictor(ns.scoped(), model, store, send)


def test_an_exception_on_one_users_events_dead_letters_only_those(stack, ns, ckpt):
    """The batch's model stage raises for one user's event (a bug, not bad
    input): the batch is retried user by user, that user's event becomes an
    ``internal_error`` letter naming the exception, the others are predicted
    and stored.  A Redis that cannot be reached is not a record's fault: it
    propagates (the agent then fails stop)."""
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaProducer

    from core.redis_conn import async_redis
    from core.repos.states import StateStore
    from models.checkpoint import load_checkpoint
    from stream.faults import is_infrastructure
    from stream.predictor import Incoming

    model, _ = load_checkpoint(ckpt)
    step = model.step

    def poisoned(state, movie, rating, ts):
        if bool((movie == 13).any()):
            raise ValueError("movie 13 breaks the model")
        return step(state, movie, rating, ts)

    model.step = poisoned
    events = [RatingEvent(f"ie-{u}", u, 13 if u == 3 else 20 + u, 4.0, 880_000_000 + u) for u in range(1, 6)]
    records = [Incoming(encode_rating(ev), 0, i, time.time(), ns.ratings, rating_key(ev)) for i, ev in enumerate(events)]

    async def go():
        prod = AIOKafkaProducer(bootstrap_servers=stack.kafka.servers, acks="all")
        await prod.start()
        try:
            store = StateStore(async_redis(stack.redis), ns.prefix)
            res = await _predictor(stack, ns, model, store, prod).process(records)
            stored = await store.load([ev.user_id for ev in events])
            dead = StateStore(aioredis.Redis(port=1, socket_connect_timeout=1), ns.prefix)
            try:
                await _predictor(stack, ns, model, dead, prod).process(records)
                fault = None
            except Exception as exc:  # noqa: BLE001 - the test inspects what came out
                fault = exc
            return res, stored, fault
        finally:
            await prod.stop()

    from tests.streamkit import read_topic

    res, stored, fault = asyncio.run(go())
    letters = read_topic(stack, ns.dlq, until=1, timeout=30, by_event_id=False)
    assert sorted(p.event_id for p in res.predictions) == ["ie-1", "ie-2", "ie-4", "ie-5"]
    assert [(r.reason, r.error_type) for r in res.rejected] == [("internal_error", "ValueError")]
    assert [(d["reason"], d["error_type"], d["source"]["offset"]) for d in letters] == [
        ("internal_error", "ValueError", 2)]
    assert "movie 13" in letters[0]["detail"]
    assert [s.blob is not None for s in stored] == [True, True, False, True, True]
    assert fault is not None and is_infrastructure(fault), repr(fault)


def test_a_dead_letter_too_large_for_the_producer_is_sent_stripped(stack, ns, ckpt):
    """With a producer whose max_request_size is below the letter's size (as a
    broker with a small message.max.bytes would be), the letter is re-sent
    once without payload, key and headers -- sizes, hash and source kept --
    instead of failing the batch."""
    import hashlib

    from aiokafka import AIOKafkaProducer

    from core.redis_conn import async_redis
    from core.repos.states import StateStore
    from models.checkpoint import load_checkpoint
    from stream.predictor import Incoming
    from tests.streamkit import read_topic

    model, _ = load_checkpoint(ckpt)
    value = b"\xff" * 5000  # oversized and not UTF-8: a 1024-byte prefix, base64 in the letter
    records = [Incoming(value, 0, 7, time.time(), ns.ratings, b"k" * 200)]

    async def go():
        prod = AIOKafkaProducer(bootstrap_servers=stack.kafka.servers, acks="all", max_request_size=1000)
        await prod.start()
        try:
            store = StateStore(async_redis(stack.redis), ns.prefix)
            return await _predictor(stack, ns, model, store, prod).process(records)
        finally:
            await prod.stop()

    res = asyncio.run(go())
    letters = read_topic(stack, ns.dlq, until=1, timeout=30, by_event_id=False)
    assert [r.reason for r in res.rejected] == ["oversized_payload"]
    assert len(letters) == 1
    d = letters[0]
    assert d["stripped"] and d["payload"] is None and d["key"] is None and d["headers"] == []
    assert d["payload_bytes"] == 5000 and d["key_bytes"] == 200
    assert d["payload_sha256"] == hashlib.sha256(value).hexdigest()
    assert d["source"]["offset"] == 7 and d["reason"] == "oversized_payload"
