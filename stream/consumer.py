"""Whole Kafka fetches of the ratings topic, handed to the worker's batch handler inside Faust.

Why: Faust's stock path costs about 50 us per event before any of our code
runs (``Consumer._drain_messages`` awaits ``wait_first(callback(message), ...)``
per message, then the conductor, the stream iterator and per-event acks; see
issue #13).  Here the ratings topic's records of one fetch go to one
``async def handler(records)`` call instead; Faust keeps everything else: the
app, the consumer group and its rebalances, flow control (``stop_flow`` /
pausing), offset commits through its own commit path, the web server, timers.

How it plugs in: a transport driver (``fbp-kafka://`` broker URLs, registered
in Faust's transport registry) whose ``Consumer`` is faust's aiokafka
``Consumer`` with a different ``_drain_messages``.  Records of any other topic
still take Faust's per-message path.

Trade-off (why the transport subclass and not an own ``AIOKafkaConsumer`` in a
Faust task): the subclass keeps *one* consumer group membership, Faust's
rebalance protocol, its commit path, its livelock detector and ``/health`` as
they are, and costs one fetch hop less; but it overrides private methods of
faust-streaming (``_drain_messages``, ``_new_offset``,
``_filter_tps_with_pending_acks``, ``_create_worker_consumer``), calls its
consumer thread's ``_ensure_consumer`` and reads private state
(``_read_offset``, aiokafka's ``_fetch_max_wait_ms``).  So
faust-streaming and aiokafka are pinned in ``pyproject.toml`` and
``tests/test_batch_consumer.py`` fails loudly when one of those names or
signatures changes.  The public-API alternative would need its own rebalance
listener, commit bookkeeping and health reporting, duplicating Faust's.

Delivery rules of this path:

* a fetch is not handled when Faust stopped the flow while it was in flight
  (a rebalance), and the rest of a fetch is not handled once the flow stopped
  or the consumer-group generation changed; either way every partition whose
  records were not handled is *put back*: sought to its first unhandled
  offset, if still assigned (a partition assigned anew starts from its
  committed offset anyway).  Faust's own ``getmany`` instead relies on a
  seek to the committed offsets, which leaves a partition *without* a
  committed offset where the dropped fetch left it: its records up to there
  were lost (issue #15: a worker SIGKILLed before its first commit, the
  survivor's first fetch of its partitions landing mid-rebalance);
* a batch counts as done only when the handler returned, i.e. after its
  predictions were acknowledged by Kafka and its states stored (the handler
  exits the process -- 75 -- on an infrastructure fault, so a failed batch is
  never marked done);
* a *pipelined* route's handler returns after a batch's first half (up to
  sending its predictions) with an awaitable of the second half (acks, state
  store): the next batch begins while it runs, second halves finish in order
  and a batch counts as done when its second half did; at most one batch is
  begun ahead of the one finishing;
* done offsets are committed by Faust's commit timer; on revocation the
  batches in flight are awaited and committed *before* Faust forgets the revoked
  partitions' offsets (stock Faust drops them first, so up to a commit
  interval was redelivered after every rebalance); batches in flight when the
  worker stops are finished and committed too.

With ``worker.exactly_once`` (a *transactional* route) a chunk holds one
partition's records, the handler commits its offsets in the batch's Kafka
transaction (``stream.transactions``) and Faust's commit path leaves them
alone; the route's ``on_assigned`` hook runs before Faust reads the committed
offsets of an assignment (the new owner's fence), ``on_revoked`` after the
batch in flight finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

from faust.transport import drivers as faust_drivers
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, AppT, TopicT

log = logging.getLogger(__name__)

R = TypeVar("R")

#: broker URL scheme of this transport (``fbp-kafka://host:port``)
SCHEME = "fbp-kafka"


@dataclass(frozen=True)
class BatchRoute(Generic[R]):
    """Which topics go to which batch handler, and how records are built."""

    topics: frozenset[str]
    handler: Callable[[list[R]], Awaitable[Any]]
    #: aiokafka ``ConsumerRecord`` -> the handler's record type
    to_record: Callable[[Any], R]
    #: most records per handler call (a larger fetch is split in order)
    max_batch: int
    #: the aiokafka consumer's ``fetch_max_wait_ms`` (Faust hard-codes 1500)
    fetch_max_wait_ms: int
    #: the handler commits the offsets (one partition per call, read_committed); Faust does not
    transactional: bool = False
    #: awaited with the route's newly assigned / revoked (topic, partition)s
    on_assigned: Callable[[set[tuple[str, int]]], Awaitable[None]] | None = None
    on_revoked: Callable[[set[tuple[str, int]]], Awaitable[None]] | None = None
    #: the handler returns after a batch's first half with an awaitable of its
    #: second half: the next batch begins meanwhile (at most one batch ahead)
    pipelined: bool = False


_ROUTES: "weakref.WeakKeyDictionary[AppT, BatchRoute]" = weakref.WeakKeyDictionary()


def broker_urls(servers: Iterable[str]) -> list[str]:
    """Broker URLs that select this transport."""
    return [f"{SCHEME}://{s}" for s in servers]


def route_batches(app: AppT, topic: TopicT, handler: Callable[[list[R]], Awaitable[Any]], *,
                  to_record: Callable[[Any], R], max_batch: int, fetch_max_wait_ms: int,
                  transactional: bool = False, on_assigned: Any = None, on_revoked: Any = None,
                  pipelined: bool = False) -> None:
    """Subscribe ``app`` to ``topic`` (one or more names) and hand its fetched records to ``handler``.

    The app must use :func:`broker_urls`; no agent may read ``topic``."""
    if pipelined and transactional:
        raise ValueError("a transactional route handles one batch at a time (one open transaction)")
    _ROUTES[app] = BatchRoute(frozenset(topic.topics), handler, to_record, max_batch, fetch_max_wait_ms,
                              transactional, on_assigned, on_revoked, pipelined)
    app.topics.add(topic)  # the conductor subscribes the consumer to it


def _chunks(fetch: Mapping[TP, list], size: int) -> Iterator[tuple[list, dict[TP, int]]]:
    """(records, last offset per partition) of at most ``size`` records, in fetch order."""
    out: list = []
    last: dict[TP, int] = {}
    for tp, recs in fetch.items():
        i = 0
        while i < len(recs):
            part = recs[i:i + size - len(out)]
            out.extend(part)
            last[tp] = part[-1].offset
            i += len(part)
            if len(out) == size:
                yield out, last
                out, last = [], {}
    if out:
        yield out, last


def _partition_chunks(fetch: Mapping[TP, list], size: int) -> Iterator[tuple[list, dict[TP, int]]]:
    """As :func:`_chunks`, but each chunk from one partition (one transaction each)."""
    for tp, recs in fetch.items():
        yield from _chunks({tp: recs}, size)


def _route_tps(route: BatchRoute, tps: Iterable[TP]) -> set[tuple[str, int]]:
    return {(tp.topic, tp.partition) for tp in tps if tp.topic in route.topics}


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_back(self, offsets: Mapping[TP, int]) -> None:
        """Seek each partition still assigned to its offset, on the consumer's thread."""
        await self.call_thread(self._seek_back, offsets)

    def _seek_back(self, offsets: Mapping[TP, int]) -> None:
        consumer = self._ensure_consumer()
        assigned = consumer.assignment()
        for tp, offset in offsets.items():
            atp = faust_aiokafka.ensure_aiokafka_TP(tp)
            if atp in assigned:  # revoked: its next owner starts from the committed offset
                consumer.seek(atp, offset)

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        route = _ROUTES.get(self.app)
        if route is not None:
            # read by AIOKafkaConsumer.start() when it builds its Fetcher
            consumer._fetch_max_wait_ms = route.fetch_max_wait_ms
            if route.transactional:  # aborted re-keyed events must not be read
                consumer._isolation_level = "read_committed"
        return consumer


class BatchConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka Consumer that hands whole fetches of one topic to a batch handler."""

    _thread: _ConsumerThread

    def __post_init__(self) -> None:
        super().__post_init__()
        self._route: BatchRoute | None = _ROUTES.get(self.app)
        #: next offset to commit per partition, for batches that are done
        self._done: dict[TP, int] = {}
        #: the last batch begun (pipelined: it finishes after every earlier one)
        self._batch: asyncio.Future | None = None
        #: pipelined: the batch begun before it
        self._older: asyncio.Future | None = None

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    # -- fetching ---------------------------------------------------------
    async def _drain_messages(self, fetcher: Any) -> None:
        route = self._route
        if route is None:
            return await super()._drain_messages(fetcher)
        stopped, fetcher_stopped = self._stopped.is_set, fetcher._stopped.is_set
        try:
            while not (stopped() or fetcher_stopped()):
                records, active = await self._wait_next_records(timeout=1.0)
                # As getmany: the generation the fetch is handed over in.  Read
                # *after* the fetch, which may have spanned a whole rebalance
                # (its records then come from the new assignment's positions).
                generation = self.app.consumer_generation_id
                if not records or self.should_stop:
                    await asyncio.sleep(0)
                    continue
                if not self.flow_active:  # Faust stopped the flow mid-fetch: a rebalance
                    await self._put_back(records)
                    continue
                mine, others, inactive = self._split(records, active, route.topics)
                await self._put_back(inactive)
                chunks = _partition_chunks if route.transactional else _chunks
                handled: dict[TP, int] = {}
                for chunk, last in chunks(mine, route.max_batch):
                    if not self.flow_active or self.app.consumer_generation_id != generation:
                        # a rebalance began: the rest of the fetch goes back
                        await self._put_back({tp: [r for r in recs if r.offset > handled.get(tp, -1)]
                                              for tp, recs in (*mine.items(), *others.items())})
                        break
                    await self._run(route, chunk, last)
                    handled.update(last)
                else:
                    for tp, recs in others.items():
                        await self._per_message(tp, recs)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise

    def _split(self, records: Mapping[TP, list], active: set[TP] | None, topics: frozenset[str]
               ) -> tuple[dict[TP, list], dict[TP, list], dict[TP, list]]:
        """This route's active (or buffered) partitions, the other active ones,
        and the inactive ones (paused while the fetch was in flight: put back)."""
        mine: dict[TP, list] = {}
        others: dict[TP, list] = {}
        inactive: dict[TP, list] = {}
        monitor = self.app.monitor
        for tp, recs in records.items():
            if not recs:
                continue
            if not (active is None or tp in active or tp in self._buffered_partitions):
                inactive[tp] = recs
                continue
            monitor.track_tp_end_offset(tp, self.highwater(tp))
            (mine if tp.topic in topics else others)[tp] = recs
        return mine, others, inactive

    async def _put_back(self, records: Mapping[TP, list]) -> None:
        """Undo the fetch of ``records`` (not handled): each partition still
        assigned is sought back to its first record's offset.

        Why not Faust's ``perform_seek`` (seek to the committed offsets): it
        skips a partition without a committed offset -- or one committed at 0 --
        leaving its position after the dropped records, which were then never
        handled (issue #15).  A partition revoked meanwhile is left alone:
        whoever gets it next starts from its committed offset."""
        offsets = {tp: recs[0].offset for tp, recs in records.items() if recs}
        if offsets:
            log.info("putting back a fetch not handled (rebalance): %s", offsets)
            await self._thread.seek_back(offsets)

    async def _run(self, route: BatchRoute, chunk: list, last: dict[TP, int]) -> None:
        """One handler call; shielded, so a stopping fetcher lets it finish (and
        ``on_stop`` commits it) instead of cutting it between produce and store.

        Pipelined, this returns once the batch's first half is done; its second
        half runs on after the previous batch's (in order), and the batch before
        that must have finished first: at most one batch ahead."""
        if not route.pipelined:
            self._batch = fut = asyncio.ensure_future(self._handle(route, chunk, last))
            await asyncio.shield(fut)
            return
        older, prev = self._older, self._batch
        if older is not None and not older.done():
            await asyncio.wait([older])
        begun = asyncio.get_running_loop().create_future()
        self._older = prev
        self._batch = asyncio.ensure_future(self._step(route, chunk, last, prev, begun))
        await asyncio.shield(begun)

    async def _step(self, route: BatchRoute, chunk: list, last: dict[TP, int],
                    prev: asyncio.Future | None, begun: asyncio.Future) -> None:
        try:
            rest = await route.handler([route.to_record(r) for r in chunk])
        finally:
            begun.set_result(None)
        if prev is not None and not prev.done():
            await asyncio.wait([prev])  # second halves finish in order
        await rest
        self._mark_done(route, last)

    async def _handle(self, route: BatchRoute, chunk: list, last: dict[TP, int]) -> None:
        to_record = route.to_record
        await route.handler([to_record(r) for r in chunk])
        self._mark_done(route, last)

    def _mark_done(self, route: BatchRoute, last: dict[TP, int]) -> None:
        # Done: predictions acknowledged, states stored.  Faust's commit takes it
        # from here (a transactional handler has committed the offsets itself).
        now = time.monotonic()
        inbound = self.app.monitor.stream_inbound_time  # read by Faust's livelock detector
        for tp, offset in last.items():
            if not route.transactional:
                self._done[tp] = offset + 1
            self._read_offset[tp] = offset
            inbound[tp] = now

    async def _per_message(self, tp: TP, recs: list) -> None:
        """Faust's own per-message delivery, for topics other than the route's."""
        for rec in recs:
            r_offset = self._read_offset[tp]
            if r_offset is None or rec.offset >= r_offset:
                await self.wait_first(self.callback(self._to_message(tp, rec)), self.suspend_flow.wait())
                self._read_offset[tp] = rec.offset

    async def _batch_finished(self) -> None:
        fut = self._batch
        if fut is not None and not fut.done():
            await asyncio.wait([fut])

    # -- committing -------------------------------------------------------
    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        yield from super()._filter_tps_with_pending_acks(topics)
        for tp in list(self._done):
            if topics is None or tp in topics or tp.topic in topics:
                yield tp

    def _new_offset(self, tp: TP) -> int | None:
        done = self._done.pop(tp, None)
        return super()._new_offset(tp) if done is None else done

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Finish and commit the batch in flight before Faust forgets the
        revoked partitions' offsets (it drops them before the app's commit)."""
        if self._route is not None and revoked:
            self.stop_flow()  # no new batch starts; Faust resumes the flow after the assignment
            log.info("revocation: waiting for the batch in flight")
            await self._batch_finished()
            pending = {tp for tp in revoked if tp in self._done}
            log.info("revocation: committing %d partition(s) before Faust forgets them", len(pending))
            while any(tp in self._done for tp in pending):  # a running periodic commit may miss them
                await self.commit(pending)
            log.info("revocation: committed")
        for tp in revoked:
            self._done.pop(tp, None)
        if self._route is not None and self._route.on_revoked is not None and revoked:
            await self._batch_finished()
            await self._route.on_revoked(_route_tps(self._route, revoked))
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        """The route's ``on_assigned`` first: Faust reads the committed offsets after it."""
        route = self._route
        if route is not None and route.on_assigned is not None and assigned:
            await route.on_assigned(_route_tps(route, assigned))
        await super().on_partitions_assigned(assigned, generation_id)

    async def on_stop(self) -> None:
        await self._batch_finished()
        await super().on_stop()  # waits for Faust's streams, then commits (ours included)


class Transport(faust_aiokafka.Transport):
    """faust's aiokafka transport with :class:`BatchConsumer`."""

    Consumer = BatchConsumer


faust_drivers.TRANSPORTS.aliases.setdefault(SCHEME, f"{__name__}:Transport")
