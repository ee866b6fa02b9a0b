"""Exactly-once output (``worker.exactly_once``, issue #15): real Kafka and Redis.

A ``read_committed`` subscriber of the predictions topic must see each event
id exactly once, also when a worker dies between storing a batch's states in
Redis and committing its Kafka transaction (the redelivered events are then
skipped by their watermarks and must be answered with their stored records).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from core.events import RatingEvent, encode_rating, rating_key
from core.settings import Settings
from stack import procs
from stack.procs import Namespace

pytestmark = pytest.mark.integration


def read_all(settings: Settings, topic: str, *, isolation: str, expect: int, timeout: float = 120,
             idle_s: float = 3.0) -> list[dict]:
    """Every record of ``topic`` as ``isolation`` shows it: read until ``expect``
    distinct event ids were seen and then ``idle_s`` passed without a new record
    (so that repeats after the last new id are counted too), or ``timeout``."""
    c = KafkaConsumer(topic, **settings.kafka.kafka_python_kwargs(), group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False, isolation_level=isolation)
    out: list[dict] = []
    ids: set[str] = set()
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = c.poll(timeout_ms=300)
            for msgs in batch.values():
                for msg in msgs:
                    rec = orjson.loads(msg.value)
                    out.append(rec)
                    ids.add(rec.get("event_id", f"#{len(out)}"))
                    last_new = time.monotonic()
            if len(ids) >= expect and time.monotonic() - last_new > idle_s:
                break
    finally:
        c.close()
    return out


# -- the re-emit path, one batch at a time --------------------------------------------------
class Crash(Exception):
    """Stands for a SIGKILL after the states were stored, before the commit."""


def test_redelivered_batch_after_an_uncommitted_store_is_answered_once(stack, ns, ckpt):
    """Batch A is processed (states stored, records sent) and its transaction
    never commits; a new producer with the same transactional id fences it.
    Redelivered with five new events (batch B, mixed: re-emitted + fresh), it
    dies again before the commit; the third try commits.  read_committed:
    every event id once, the five first ones with their original bytes'
    prediction; read_uncommitted shows the aborted copies too."""
    from core.redis_conn import async_redis
    from core.repos.states import StateStore
    from models.checkpoint import load_checkpoint
    from stream.predictor import Incoming
    from stream.runtime import make_predictor
    from stream.transactions import Transactions

    s = ns.scoped()
    s = s.model_copy(update={"worker": s.worker.model_copy(update={"exactly_once": True, "app_id": ns.prefix})})
    events = [RatingEvent(f"eo-{i}", 1 + i % 5, 20 + i, 4.0, 880_000_000 + i) for i in range(10)]
    records = [Incoming(encode_rating(ev), 0, i, time.time(), ns.ratings, rating_key(ev))
               for i, ev in enumerate(events)]

    async def attempt(batch, crash: bool):
        """One worker's life: a fresh fencing producer, a fresh predictor, one batch."""
        model, _ = load_checkpoint(ckpt)
        client = async_redis(s.redis)
        txns = Transactions(s.kafka, s.worker.app_id)
        predictor = make_predictor(s, model, StateStore(client, ns.prefix), txns.send)

        async def body(recs):
            res = await predictor.process(recs)
            if crash:
                raise Crash
            return res

        try:
            return await txns.run(batch, body)
        except Crash:
            return None  # the open transaction is left behind, as a SIGKILL leaves it
        finally:
            await client.aclose()
            if not crash:
                await txns.close()

    assert asyncio.run(attempt(records[:5], crash=True)) is None
    assert asyncio.run(attempt(records, crash=True)) is None
    res = asyncio.run(attempt(records, crash=False))
    assert res is not None
    committed = read_all(stack, ns.predictions, isolation="read_committed", expect=10, timeout=60)
    everything = read_all(stack, ns.predictions, isolation="read_uncommitted", expect=10, timeout=60)
    counts = Counter(r["event_id"] for r in committed)
    print(f"\nre-emitted {res.reemitted}, fresh {len(res.predictions)}; read_committed "
          f"{len(committed)} records, read_uncommitted {len(everything)}")
    assert res.reemitted == 10 and not res.predictions  # all ten were stored by the second try
    assert counts == Counter(ev.event_id for ev in events), counts
    first = {}
    for r in everything:  # each committed record is a copy of the first one sent for its id
        first.setdefault(r["event_id"], r)
    assert all(first[r["event_id"]] == r for r in committed)
    assert len(everything) == 5 + 10 + 10
    c = KafkaConsumer(**stack.kafka.kafka_python_kwargs(), group_id=ns.prefix, enable_auto_commit=False)
    try:
        assert c.committed(TopicPartition(ns.ratings, 0)) == 10  # the offsets went with the transaction
    finally:
        c.close()


# -- a real worker, SIGKILLed mid-replay ------------------------------------------------------
EVENTS = 12_000
POISON = 20
KILL_AT = (0.2, 0.55)  # fractions of the events predicted (read_uncommitted) when a worker dies


def _feed(stack: Settings, ns: Namespace, df) -> None:
    """All at once, before the first worker starts, so each worker works
    through a backlog and a kill finds a transaction open: a sixth of the
    users unkeyed (re-keyed through the repartition topic, in the
    transaction), and ``POISON`` undecodable records (dead letters)."""
    errors: list = []
    prod = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all", linger_ms=5)
    try:
        step = len(df) // POISON
        for i, (idx, row) in enumerate(df.iterrows()):
            ev = RatingEvent(f"df-{idx}", int(row.user_id), int(row.movie_id), float(row.rating), int(row.ts))
            key = None if ev.user_id % 6 == 1 else rating_key(ev)
            prod.send(ns.ratings, value=encode_rating(ev), key=key).add_errback(errors.append)
            if i % step == 0:
                prod.send(ns.ratings, value=b"{not json", key=b"x").add_errback(errors.append)
        prod.flush()
    finally:
        prod.close()
    assert not errors, errors[:1]


class Progress(threading.Thread):
    """Counts prediction records as they arrive (read_uncommitted), so a kill
    lands within a poll of the wanted progress, mid-batch."""

    def __init__(self, stack: Settings, topic: str) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(topic, **stack.kafka.kafka_python_kwargs(), group_id=None,
                                      auto_offset_reset="earliest", enable_auto_commit=False)
        self.count = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.count += sum(len(v) for v in self.consumer.poll(timeout_ms=50).values())
        self.consumer.close()

    def wait(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n:
            assert time.monotonic() < deadline, f"{self.count} of {n} predictions after {timeout}s"
            time.sleep(0.01)


def _env(ns: Namespace, ckpt: Path, port: int) -> dict[str, str]:
    env = ns.env(256, port)
    env.update({"FBP_WORKER__CHECKPOINT": str(ckpt), "FBP_WORKER__EXACTLY_ONCE": "true",
                "FBP_WORKER__SESSION_TIMEOUT_S": "6", "FBP_WORKER__TOP_K": "3"})
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_read_committed_sees_each_event_once_across_sigkills(stack, ns, ckpt, ml100k, tmp_path):
    """Two SIGKILLs of the worker while it works through a backlog, a fresh
    worker after each: a read_committed consumer sees every event id's
    prediction exactly once and every poison record's dead letter once;
    read_uncommitted shows more (the killed transactions' aborted records):
    printed, not asserted -- a kill between two transactions aborts nothing."""
    df = ml100k.ratings.iloc[:EVENTS]
    port = 6171
    _feed(stack, ns, df)
    progress = Progress(stack, ns.predictions)
    progress.start()
    worker = procs.start_worker(port, tmp_path, _env(ns, ckpt, port))
    try:
        for frac in KILL_AT:
            progress.wait(int(EVENTS * frac))
            assert worker.alive(), worker.tail()
            worker.kill()
            worker = procs.start_worker(port, tmp_path, _env(ns, ckpt, port))
        # every id committed before the stop (Progress counts aborted copies too)
        read_all(stack, ns.predictions, isolation="read_committed", expect=EVENTS, timeout=300, idle_s=0)
    finally:
        progress.done.set()
        code = worker.stop()
    committed = read_all(stack, ns.predictions, isolation="read_committed", expect=EVENTS)
    everything = read_all(stack, ns.predictions, isolation="read_uncommitted", expect=EVENTS)
    letters = read_all(stack, ns.dlq, isolation="read_committed", expect=POISON, idle_s=1.0)
    counts = Counter(r["event_id"] for r in committed)
    expected = {f"df-{i}" for i in df.index}
    missing = expected - set(counts)
    repeated = {e: n for e, n in counts.items() if n > 1}
    reemits = worker.log.read_text(errors="replace").count("re-emitted")  # one log for every worker
    sources = Counter((d["source"]["partition"], d["source"]["offset"]) for d in letters)
    print(f"\nexactly_once kills={len(KILL_AT)} events={EVENTS} read_committed={len(committed)} "
          f"missing={len(missing)} repeated={len(repeated)} read_uncommitted={len(everything)} "
          f"(aborted copies {len(everything) - len(committed)}), re-emitting batches={reemits}, "
          f"dead letters={len(letters)}, worker exit={code}")
    assert code == 0, worker.tail()
    assert not missing, f"{len(missing)} events without a committed prediction, e.g. {sorted(missing)[:5]}"
    assert not repeated, f"{len(repeated)} event ids committed more than once, e.g. {list(repeated.items())[:5]}"
    assert set(counts) == expected
    assert len(letters) == POISON and max(sources.values()) == 1, sources
