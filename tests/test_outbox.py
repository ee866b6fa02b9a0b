"""stream.outbox: a batch's records sent as whole Kafka record batches land
exactly where aiokafka's per-record ``send`` would put them, in order, once."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.transport.drivers import aiokafka as faust_aiokafka

from stack.procs import Namespace
from stream.outbox import partition_records, send_records


def _records(n: int, users: int) -> list[tuple[bytes, bytes]]:
    return [(str(i % users).encode(), b'{"i":%d,"pad":"%s"}' % (i, b"x" * (i % 300))) for i in range(n)]


def test_the_private_names_the_outbox_relies_on_still_exist():
    """``stream.outbox.faust_producer`` and ``partitioner`` reach past these
    libraries' public API: pinned to the versions they were read from."""
    from importlib.metadata import version

    assert (version("aiokafka"), version("faust-streaming")) == ("0.14.0", "0.15.3")
    assert callable(getattr(AIOKafkaProducer, "_partition")) and "_partitioner" in AIOKafkaProducer.__init__.__code__.co_names
    assert hasattr(faust_aiokafka.Producer, "_ensure_producer")


def test_outbox_records_land_where_send_puts_them_in_order(stack):
    ns = Namespace.fresh(5, stack)
    ns.create()
    records = _records(6_000, 997)  # several full record batches per partition

    async def go() -> tuple[dict[int, list], dict[bytes, int]]:
        kw = stack.kafka.aiokafka_kwargs()
        prod = AIOKafkaProducer(acks="all", linger_ms=5, **kw)
        await prod.start()
        try:
            futs = await send_records(prod, ns.ratings, records)
            await asyncio.gather(*futs)
            # the per-record path, for the partition each key gets there
            per_send = {}
            for key in {k for k, _ in records[:997]}:
                meta = await (await prod.send(ns.predictions, b"-", key=key))
                per_send[key] = meta.partition
        finally:
            await prod.stop()
        cons = AIOKafkaConsumer(ns.ratings, auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None, **kw)
        await cons.start()
        got: dict[int, list] = {}
        try:
            n = 0
            while n < len(records):
                fetched = await asyncio.wait_for(cons.getmany(timeout_ms=1000), 60)
                for tp, msgs in fetched.items():
                    got.setdefault(tp.partition, []).extend((m.key, m.value) for m in msgs)
                    n += len(msgs)
            await asyncio.sleep(1.0)  # nothing beyond: each record exactly once
            extra = await cons.getmany(timeout_ms=1000)
            assert not any(extra.values())
        finally:
            await cons.stop()
        return got, per_send

    try:
        got, per_send = asyncio.run(go())
    finally:
        ns.drop()
    assert sum(len(v) for v in got.values()) == len(records)
    for partition, recs in got.items():
        assert all(per_send[k] == partition for k, _ in recs), "a record went elsewhere than send puts it"
        expected = [r for r in records if per_send[r[0]] == partition]
        assert recs == expected, f"partition {partition}: records out of order or altered"
    assert len(got) == 5


def test_partition_records_keeps_each_partitions_order():
    class P:  # the partitioner contract: (key, all, available) -> partition
        @staticmethod
        def _partitioner(key, all_p, avail):
            return all_p[int(key) % len(all_p)]

    recs = _records(50, 7)
    out = partition_records(P(), [0, 1, 2], recs)
    assert sorted(sum(out.values(), [])) == sorted(recs)
    for p, rs in out.items():
        assert rs == [r for r in recs if int(r[0]) % 3 == p]


def test_nothing_to_send_sends_nothing():
    assert asyncio.run(send_records(None, "t", [])) == []  # type: ignore[arg-type]
