"""The worker's batch consumer (``stream.consumer``): the private faust-streaming
and aiokafka names it leans on, how it splits a fetch, and a rebalance on the
real stack (a worker joins mid-replay, then the first one leaves)."""

from __future__ import annotations

import inspect
import threading
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
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
