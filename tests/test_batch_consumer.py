"""The worker's batch consumer (``stream.consumer``): the private faust-streaming
and aiokafka names it leans on, how it splits a fetch, and a rebalance on the
real stack (a worker joins mid-replay, then the first one leaves)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
from faust.types import TP
from kafka import KafkaConsumer, TopicPartition

from stack import procs
from stack.procs import Namespace
from stream import consumer as bc

# -- private names -----------------------------------------------------------


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_faust_and_aiokafka_are_the_versions_the_batch_consumer_was_tested_with():
    """stream.consumer overrides private faust-streaming methods: an upgrade must be
    re-checked (this test, the rebalance test, tests/test_stream_e2e.py), then
    the pins in pyproject.toml and here moved together."""
    assert version("faust-streaming") == "0.15.3", "re-check stream.consumer against this faust-streaming"
    assert version("aiokafka") == "0.14.0", "re-check stream.consumer against this aiokafka"


def test_private_names_the_batch_consumer_relies_on_still_exist():
    """Fails loudly if faust-streaming or aiokafka renames what stream.consumer
    overrides or reads (a silent rename would bring back the stock per-event path
    or lose the revocation commit)."""
    import aiokafka
    from faust.transport import consumer as fc
    from faust.transport import drivers
    from faust.transport.drivers import aiokafka as fa

    base = fc.Consumer
    # overridden: the fetch loop, the commit bookkeeping, revocation, stop, the thread factory
    assert _params(base._drain_messages) == ["self", "fetcher"]
    assert _params(base._filter_tps_with_pending_acks) == ["self", "topics"]
    assert _params(base._new_offset) == ["self", "tp"]
    assert _params(base.on_partitions_revoked) == ["self", "revoked"]
    assert "_new_consumer_thread" in fa.Consumer.__dict__
    assert _params(fa.AIOKafkaConsumerThread._create_worker_consumer) == ["self", "transport"]
    # called or read
    assert _params(base._wait_next_records) == ["self", "timeout"]
    assert _params(fa.AIOKafkaConsumerThread.call_thread) == ["self", "fun", "args", "kwargs"]
    assert _params(fa.AIOKafkaConsumerThread._ensure_consumer) == ["self"]
    assert callable(fa.ensure_aiokafka_TP)
    # Why an unhandled fetch is put back by exact offsets: Faust's perform_seek
    # (aiokafka's seek_to_committed) does not move a partition without a
    # committed offset (issue #15).  If this changes, the put-back still holds.
    assert "if offset and offset > 0" in inspect.getsource(aiokafka.AIOKafkaConsumer.seek_to_committed)
    assert _params(base._to_message) == ["self", "tp", "record"]
    init = inspect.getsource(base.__init__) + inspect.getsource(base._reset_state)
    for attr in ("self._read_offset", "self._buffered_partitions"):
        assert attr in init, attr
    # Faust drops a revoked partition's pending offsets before the app commits:
    # the reason BatchConsumer commits first.  If this changes, revisit it.
    assert "self._acked.pop(tp, None)" in inspect.getsource(base.on_partitions_revoked)
    # _new_offset's result is what Faust commits
    assert "self._new_offset(tp)" in inspect.getsource(base._filter_committable_offsets)
    # aiokafka reads fetch_max_wait_ms from this attribute when it starts
    assert "self._fetch_max_wait_ms" in inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    # the transport registry that maps fbp-kafka:// to ours
    assert drivers.by_url(f"{bc.SCHEME}://127.0.0.1:9092") is bc.Transport
    assert bc.Transport.Consumer is bc.BatchConsumer


def test_a_fetch_is_split_in_order_with_the_last_offset_per_partition():
    recs = {("t", 0): [SimpleNamespace(offset=o) for o in range(10, 15)],
            ("t", 1): [SimpleNamespace(offset=o) for o in range(3)]}
    got = list(bc._chunks(recs, 3))
    assert [[r.offset for r in c] for c, _ in got] == [[10, 11, 12], [13, 14, 0], [1, 2]]
    assert [last for _, last in got] == [{("t", 0): 12}, {("t", 0): 14, ("t", 1): 0}, {("t", 1): 2}]
    whole = list(bc._chunks(recs, 100))
    assert len(whole) == 1 and whole[0][1] == {("t", 0): 14, ("t", 1): 2}


# -- a fetch the drain does not handle is put back ---------------------------

_APPS = itertools.count()


class _FakeKafka:
    """The drain's view of aiokafka, in memory: each partition holds offsets
    0..n-1, a fetch hands out up to ``per_fetch`` records per partition from
    its position and advances it (as aiokafka's ``fetched_records`` does, for
    every partition when the set it is given is empty), a seek sets it, and
    nothing is committed yet -- the group's take-over of a worker killed
    before its first commit (issue #15)."""

    def __init__(self, tps: list[TP], n: int, per_fetch: int) -> None:
        self.n, self.per_fetch = n, per_fetch
        self.pos = {tp: 0 for tp in tps}
        self.assigned = set(tps)
        self.seeks: list[tuple[TP, int]] = []

    def fetch(self, active: set[TP]) -> dict[TP, list]:
        out = {}
        for tp, lo in self.pos.items():
            hi = min(self.n, lo + self.per_fetch)
            if hi > lo and (not active or tp in active):
                out[tp] = [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o) for o in range(lo, hi)]
                self.pos[tp] = hi
        return out

    # aiokafka.AIOKafkaConsumer, as _ConsumerThread._seek_back calls it
    def assignment(self) -> set:
        return set(self.assigned)

    def seek(self, tp, offset: int) -> None:
        assert TP(tp.topic, tp.partition) in self.assigned, "aiokafka refuses to seek an unassigned partition"
        self.seeks.append((TP(tp.topic, tp.partition), offset))
        self.pos[TP(tp.topic, tp.partition)] = offset


def _batch_consumer(kafka: _FakeKafka, handler, max_batch: int):
    """A real BatchConsumer (its app never started) whose consumer thread is ``kafka``."""
    app = faust.App(f"test-batch-consumer-{next(_APPS)}", broker=bc.broker_urls(["127.0.0.1:1"]),
                    store="memory://")
    bc.route_batches(app, app.topic("r", key_type=bytes, value_type=bytes), handler,
                     to_record=lambda r: (r.partition, r.offset), max_batch=max_batch, fetch_max_wait_ms=10)
    consumer = app.consumer
    assert isinstance(consumer, bc.BatchConsumer)
    thread = consumer._thread

    async def getmany(active, timeout):
        await asyncio.sleep(0)
        return kafka.fetch(active)

    async def seek_to_committed():  # nothing committed: Faust's perform_seek moves nothing
        return {tp: None for tp in kafka.assigned}

    async def call_thread(fun, *args, **kwargs):  # the consumer thread's method queue, inline
        return fun(*args, **kwargs)

    thread.getmany = getmany
    thread.seek_to_committed = seek_to_committed
    thread.call_thread = call_thread
    thread._ensure_consumer = lambda: kafka
    thread.highwater = lambda tp: kafka.n
    thread.assignment = kafka.assignment
    consumer._set_active_tps(set(kafka.pos))
    app.consumer_generation_id = 1
    return app, consumer


async def _drain_until(consumer, got: list, want: int, timeout: float = 5.0) -> None:
    task = asyncio.ensure_future(consumer._drain_messages(SimpleNamespace(_stopped=asyncio.Event())))
    deadline = time.monotonic() + timeout
    try:
        while len(got) < want and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def _rebalance(app, consumer) -> None:
    """What a rebalance does to the drain: the revocation stops the flow and the
    generation moves on; Faust's recovery then seeks to the committed offsets
    and resumes the flow."""
    consumer.stop_flow()
    app.consumer_generation_id += 1

    async def recovered():
        await asyncio.sleep(0.05)
        await consumer.perform_seek()
        consumer.resume_flow()

    asyncio.ensure_future(recovered())


@pytest.mark.parametrize("when", ["fetch in flight", "between batches of a fetch"])
def test_records_not_handled_across_a_rebalance_are_read_again_without_a_committed_offset(when):
    """Issue #15: the take-over worker's first fetch of a dead worker's
    partitions returned while the rebalance had the flow stopped; the drain
    dropped it and relied on Faust's seek to the committed offsets, which does
    not move a partition that has none -- its first records were never
    handled (nor their predictions published, nor unkeyed ones re-keyed), and
    later commits covered them.  Every record must reach the handler once."""
    n = 30
    tps = [TP("r", 0), TP("r", 1)]
    kafka = _FakeKafka(tps, n, per_fetch=7)
    got: list[tuple[int, int]] = []
    box = {}

    async def handler(recs):
        got.extend(recs)
        if when == "between batches of a fetch" and len(got) == len(recs):  # during the first batch
            _rebalance(box["app"], box["consumer"])

    async def run():
        app, consumer = _batch_consumer(kafka, handler, max_batch=5)
        box.update(app=app, consumer=consumer)
        if when == "fetch in flight":
            plain, fetches = consumer._thread.getmany, itertools.count()

            async def getmany(active, timeout):
                records = await plain(active, timeout)
                if next(fetches) == 0:
                    _rebalance(app, consumer)  # the first fetch returns into a stopped flow
                return records

            consumer._thread.getmany = getmany
        await _drain_until(consumer, got, 2 * n)

    asyncio.run(run())
    want = [(p, o) for p in (0, 1) for o in range(n)]
    missing = sorted(set(want) - set(got))
    assert not missing, f"{len(missing)} records never handled: {missing[:10]}"
    assert sorted(got) == want, "a record was handled twice"
    assert kafka.seeks, "the unhandled records were not put back"


def test_put_back_leaves_a_revoked_partition_to_its_next_owner():
    kafka = _FakeKafka([TP("r", 0), TP("r", 1)], 10, per_fetch=10)
    kafka.assigned = {TP("r", 0)}

    async def run():
        _, consumer = _batch_consumer(kafka, lambda recs: asyncio.sleep(0), max_batch=5)
        recs = {tp: [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o) for o in (4, 5)]
                for tp in (TP("r", 0), TP("r", 1))}
        await consumer._put_back(recs)

    asyncio.run(run())
    assert kafka.seeks == [(TP("r", 0), 4)]


# -- rebalance on the real stack --------------------------------------------


def _committed_vs_end(ns: Namespace) -> tuple[dict[int, int | None], dict[int, int]]:
    c = KafkaConsumer(**ns.settings.kafka.kafka_python_kwargs(), group_id=ns.prefix,
                      enable_auto_commit=False)
    try:
        tps = [TopicPartition(ns.ratings, p) for p in range(ns.partitions)]
        end = {tp.partition: off for tp, off in c.end_offsets(tps).items()}
        committed = {tp.partition: c.committed(tp) for tp in tps}
    finally:
        c.close()
    return committed, end


@pytest.mark.integration
def test_worker_joins_then_first_leaves_mid_replay(stack, ns, ckpt, ml100k, tmp_path: Path):
    """Worker B joins mid-replay, then worker A leaves: every event gets its
    prediction, states equal the in-process reference, no record is repeated
    (the batch in flight is committed at revocation), and once the backlog is
    drained the group's committed offsets equal the end offsets."""
    from models.checkpoint import load_checkpoint
    from stream.replay import replay
    from tests.streamkit import FROZEN_MOVIE_SIDE, read_topic, redis_states, simulate, state_mismatches

    df = ml100k.ratings.iloc[:20_000]

    def env(port: int) -> dict[str, str]:
        e = {**ns.env(256, port), **FROZEN_MOVIE_SIDE}  # exact-state oracle below
        e["FBP_WORKER__CHECKPOINT"] = str(ckpt)
        return e

    a = procs.start_worker(6091, tmp_path, env(6091))
    feeder = threading.Thread(target=replay, args=(ns.scoped(), df), kwargs={"rate": 1500, "progress": False})
    feeder.start()
    b = None
    try:
        read_topic(stack, ns.predictions, until=5000, timeout=300)
        b = procs.start_worker(6092, tmp_path, env(6092))  # joins: the group rebalances
        read_topic(stack, ns.predictions, until=12_000, timeout=300)
        assert a.stop() == 0, a.tail()  # leaves: B takes every partition
        feeder.join()
        recs = read_topic(stack, ns.predictions, until=len(df), timeout=300)
        deadline = time.monotonic() + 30  # Faust commits every second
        committed, end = _committed_vs_end(ns)
        while committed != end and time.monotonic() < deadline:
            time.sleep(0.5)
            committed, end = _committed_vs_end(ns)
    finally:
        feeder.join()
        a.stop()
        if b is not None:
            b.stop()
    ids = {r["event_id"] for r in recs}
    model, _ = load_checkpoint(ckpt)
    _, uindex, ref_states = simulate(model, df)
    got, absent = redis_states(ns, model, uindex)
    print(f"events {len(df)} predictions {len(recs)} distinct {len(ids)} committed {committed} end {end}")
    assert len(ids) == len(df) and not absent, "an event has no prediction or a user no state"
    assert state_mismatches(got, ref_states) == 0
    assert len(recs) == len(ids), f"{len(recs) - len(ids)} predictions repeated across the rebalances"
    assert committed == end and sum(end.values()) == len(df)
