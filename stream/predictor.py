"""The work of one micro-batch, independent of Faust.

:meth:`Predictor.process` reads as its stages, named like the
``fbp_stage_duration_seconds`` labels:

1. **decode** each Kafka record (:func:`core.events.classify`): a valid
   event, an event keyed otherwise than by its user id (re-published to the
   repartition topic, or refused, per ``key_policy``), or a dead letter with
   a reason -- an unexpected exception on one record included
   (``internal_error``);
2. **load** the states of the batch's users from Redis in one round trip, and
   **filter** out events at or below their source's watermark (already
   applied: redelivery);
3. **model**: run the model once for the whole batch through
   :func:`models.batch.learn_batch` (the simulators run the same function):
   the users' new events form a padded [users, T] block fed to the network
   *from the stored state* (``step`` when T == 1, else ``forward_sequence``,
   property-tested equal), so one user's events apply in order and no
   history is re-read; a model with an online part also learns the movie side
   round by round (round j = each user's j-th event of the batch);
4. **top-K**: score the known movies for each user once, after all of its
   events in the batch (``stream.topk``);
5. **produce** predictions, re-keyed events and dead letters, and wait until
   Kafka has them all;
6. only then **store** states and watermarks in one atomic Redis call, and
   then the batch's movie-side increments (:mod:`core.repos.movies`).

With ``worker.online_movie_side`` on, the online movie side is learned per
batch and shared by every worker through Redis, which is
authoritative: the load stage also reads the rows of the batch's movies and
the globals (concurrently with the states) into the model, and the whole
movie side is read at start-up and after each model swap (a promotion keeps
what the online updates learned; the checkpoint only gives the base of
movies Redis has never seen).  Rows of movies not in a batch are refreshed
when a batch next has them, so top-K may score them from slightly older
values.

Producing before storing means a crash can only cause a repeat (same event
id, same predicted value: the state it came from was not yet replaced),
never a missing prediction.  States are stored before increments: a crash
between the two loses that batch's movie-side increments (the redelivered
events are skipped by their watermarks), it never counts them twice.  Infrastructure faults (``stream.faults``)
propagate so the caller can fail stop; anything else is one record's fault
and becomes that record's dead letter.

With ``worker.exactly_once`` (``keep_outputs``), ``send`` writes into the
batch's Kafka transaction (``stream.transactions``), committed with the
offsets only after this returns, so states are stored *before* the commit.
A crash in between would leave events applied in Redis whose records were
aborted; so each user's state write also stores the records its events got
(per source, :mod:`core.repos.states`), and an event the watermark filter
skips is answered with its stored record again, inside the new
transaction.  Dead letters carry no state: a redelivered record is simply
dead-lettered again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Sequence

import numpy as np
import torch

from core.events import (
    KafkaRecord, Misrouted, PredictionRecord, RatingEvent, Rejection, classify, decode_limits,
    dlq_record, encode_prediction, internal_error, rating_key,
)
from core.repos.movies import Adds, MovieSideStore
from core.repos.states import Mark, Stored, StateStore
from core.rolling import RollingError
from models import online_pack as opk
from models import state as mstate
from models.base import RatingModel
from models.batch import Increments, learn_batch, occurrence_rank, online_movie_side, pad_events
from stream import metrics as m
from stream.faults import INFRASTRUCTURE, is_size_error
from stream.topk import top_k

log = logging.getLogger(__name__)

#: ``send(topic, key, value, headers=None, timestamp=None)`` -> a future acked by Kafka
SendFn = Callable[..., Awaitable[Awaitable[object]]]
#: ``send_many(topic, [(key, value), ...])`` -> futures acked by Kafka (``stream.outbox``)
SendManyFn = Callable[[str, Sequence[tuple[bytes, bytes]]], Awaitable[list[Awaitable[object]]]]

#: header a re-keyed event carries: where it was first read ("topic:partition:offset")
SOURCE_HEADER = "fbp-source"
#: watermark namespace of re-keyed events ('@' cannot occur in a Kafka topic name)
REKEYED_SUFFIX = "@rekeyed"

Row = tuple[int, bytes, list[Mark]]
Work = list[tuple[RatingEvent, KafkaRecord]]


def Incoming(raw: bytes | None, partition: int, offset: int, kafka_ts: float, topic: str = "ratings",
             key: bytes | None = None, headers: Any = ()) -> KafkaRecord:
    """A :class:`KafkaRecord` from the fields a consumer hands over, in the
    positional order the worker's callers use (``kafka_ts`` in seconds;
    ``headers`` a list of (name, value) pairs or a mapping)."""
    hs = tuple(headers.items()) if isinstance(headers, Mapping) else tuple(headers or ())
    return KafkaRecord(raw, key, hs, topic, partition, offset, kafka_ts)


@dataclass
class BatchResult:
    predictions: list[PredictionRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    kafka_ts: list[float] = field(default_factory=list)
    skipped: int = 0
    rederived: int = 0
    reset: int = 0
    rekeyed: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)
    #: (rejection, its record) for the dead-letter producer
    dead: list[tuple[Rejection, KafkaRecord]] = field(default_factory=list)
    #: skipped events whose stored record was produced again (exactly-once mode)
    reemitted: int = 0


@dataclass
class _Predicted:
    """What the model stages made of some events: prediction records with their
    Kafka timestamps, state rows to store, and the sends in flight."""

    predictions: list[PredictionRecord] = field(default_factory=list)
    kafka_ts: list[float] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    futs: list[Awaitable[object]] = field(default_factory=list)
    #: movie-side increments to add once the states are stored (one per model pass)
    adds: list[Adds] = field(default_factory=list)
    skipped: int = 0
    rederived: int = 0
    reset: int = 0
    #: exactly-once mode: (user, source, partition, offset, record) of skipped
    #: events to produce again, and the encoded record of each fresh event
    reemit: list[tuple[int, str, int, int, bytes]] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)
    #: each written user's state as Redis will hold it once stored (the overlay)
    written: dict[int, Stored] = field(default_factory=dict)


@dataclass
class _Bases:
    """The movie side as a batch read it: rows of ``ids`` (ascending) and the globals."""

    ids: np.ndarray
    rows: np.ndarray
    globals: np.ndarray


def _f32_sum(base: np.ndarray, inc: np.ndarray) -> np.ndarray:
    """``base + inc`` summed in double and rounded to float32, as Redis's add script does."""
    return (np.asarray(base, np.float32).astype(np.float64) + np.asarray(inc, np.float32)).astype(np.float32)


@dataclass
class Begun:
    """A batch half done: predictions sent (acknowledgements pending), states
    computed but not stored.  :meth:`Predictor.finish` completes it."""

    batch: Sequence[KafkaRecord]
    res: BatchResult
    done: _Predicted
    futs: list[Awaitable[object]]
    dlq_futs: list[Awaitable[object]]
    step: int


@contextmanager
def _stage(res: BatchResult, name: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        res.stage_s[name] = res.stage_s.get(name, 0.0) + time.perf_counter() - t


def watermark(rec: KafkaRecord, repartition_topic: str | None) -> tuple[str, int, int]:
    """The (source, partition, offset) an event is de-duplicated by.

    A re-keyed event is de-duplicated by where it was *first* read (its
    ``fbp-source`` header), in a namespace of its own: a crash after
    re-publishing but before committing re-publishes it, and both copies
    must count once.  Everything else by its own position."""
    if rec.topic == repartition_topic:
        for name, value in rec.headers:
            if name == SOURCE_HEADER and value:
                try:
                    topic, part, off = bytes(value).decode("ascii").rsplit(":", 2)
                    return topic + REKEYED_SUFFIX, int(part), int(off)
                except (UnicodeDecodeError, ValueError):
                    break
    return rec.topic, rec.partition, rec.offset


class Predictor:
    """Turns micro-batches of rating records into prediction records."""

    def __init__(
        self,
        model: RatingModel,
        store: StateStore,
        send: SendFn,
        *,
        predictions_topic: str,
        dlq_topic: str,
        repartition_topic: str | None = None,
        key_policy: str = "rekey",
        top_k: int = 10,
        max_payload_bytes: int = 4096,
        min_ts: int = 0,
        max_future_s: int = 7 * 24 * 3600,
        dlq_payload_prefix_bytes: int = 1024,
        device: torch.device | str = "cpu",
        movies: MovieSideStore | None = None,
        keep_outputs: bool = False,
        send_many: SendManyFn | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.store = store
        #: the shared online movie side; None: the model's movie side stays fixed
        #: (``worker.online_movie_side`` off)
        self.movies = movies
        self._movies_loaded = False
        self.send = send
        #: the batch's prediction records in one call (default: ``send`` record by record)
        self.send_many: SendManyFn = send_many or self._send_each
        #: exactly-once mode: store each user's outputs with its state, re-emit them on redelivery
        self.keep_outputs = keep_outputs
        self.predictions_topic = predictions_topic
        self.dlq_topic = dlq_topic
        self.repartition_topic = repartition_topic
        # without a repartition topic there is nowhere to re-key to
        self.key_policy = key_policy if repartition_topic else "refuse"
        self.top_k = top_k
        self.max_payload_bytes = max_payload_bytes
        self.min_ts = min_ts
        self.max_future_s = max_future_s
        self.dlq_payload_prefix_bytes = dlq_payload_prefix_bytes
        self.rolling = RollingError()
        self._pending: RatingModel | None = None
        self._reset_logged = False
        #: highest offset handled per partition of the ratings topic (for the lag gauge)
        self.last_offset: dict[int, int] = {}
        #: begun, unfinished batches: user -> (step, state as it will be stored),
        #: movie id (None: the globals) -> last step adding to it
        self._overlay: dict[int, tuple[int, Stored]] = {}
        self._inflight_movies: dict[int | None, int] = {}
        self._step = 0
        self._unfinished = 0
        self._all_finished = asyncio.Event()
        self._all_finished.set()
        m.MODEL_VERSION.set(model.version)
        m.MODEL_INFO.labels(model=model.name, device=self.device.type).set(1)

    # -- model hot swap --------------------------------------------------
    def offer_model(self, model: RatingModel) -> None:
        """Queue a new model; it takes over at the start of the next batch."""
        self._pending = model

    def _maybe_swap(self) -> None:
        if self._pending is None:
            return
        new, self._pending = self._pending, None
        old = self.model
        self.model = new.to(self.device).eval()
        self._reset_logged = False
        self._movies_loaded = False  # Redis, not the checkpoint, has the learned movie side
        m.MODEL_INFO.remove(old.name, self.device.type)
        m.MODEL_INFO.labels(model=new.name, device=self.device.type).set(1)
        m.MODEL_VERSION.set(new.version)
        m.SWAPS.inc()
        log.info("model swapped: %s v%d -> %s v%d", old.name, old.version, new.name, new.version)

    # -- the batch -------------------------------------------------------
    async def process(self, batch: Sequence[KafkaRecord]) -> BatchResult:
        """One micro-batch, stage by stage; raises only infrastructure faults."""
        return await self.finish(await self.begin(batch))

    async def begin(self, batch: Sequence[KafkaRecord]) -> Begun:
        """The stages up to sending: decode, load, model, top-K, produce (not
        awaited).  The next batch may begin before this one finishes: it then
        reads the states and movie rows this one wrote from memory (the
        overlay), not the older ones still in Redis."""
        if self._pending is not None and self._unfinished:
            await self._all_finished.wait()  # a swap re-reads the movie side from Redis: settled first
        self._maybe_swap()
        res = BatchResult()
        t0 = time.perf_counter()
        if not self._movies_loaded:
            with _stage(res, "redis_load"):
                await self.load_movie_side()
        with _stage(res, "decode"):
            work, misrouted = self.decode(batch, res)
        rekey_futs = await self.rekey(misrouted, res)
        done = await self.predict(work, res, t0)
        dlq_futs = [await self.send_dead_letter(rej, rec) for rej, rec in res.dead]
        self._step += 1
        self._hold(self._step, done)
        return Begun(batch, res, done, done.futs + rekey_futs, dlq_futs, self._step)

    async def finish(self, b: Begun) -> BatchResult:
        """Wait until Kafka has the batch's records, then store its states and
        movie-side increments.  Batches must finish in the order they began."""
        res, done = b.res, b.done
        with _stage(res, "produce"):
            await self.acknowledged(b.futs, b.dlq_futs, res)
        with _stage(res, "redis_store"):
            await self.store.store(done.rows)
            for adds in done.adds:  # after the states: a crash here loses, never repeats, them
                await self.movies.add(adds)
        self._release(b.step, done)
        self._track_offsets(b.batch)
        self._observe(b.batch, res)
        if res.reemitted:  # rare: only after a transaction that stored its states did not commit
            log.warning("re-emitted %d stored prediction record(s) of redelivered events", res.reemitted)
        return res

    # -- the overlay: what begun, unfinished batches wrote -------------------
    def _hold(self, step: int, done: _Predicted) -> None:
        for u, st in done.written.items():
            self._overlay[u] = (step, st)
        for adds in done.adds:
            for movie_id in adds.keys():
                self._inflight_movies[movie_id] = step
            self._as_stored(adds)
        self._unfinished += 1
        self._all_finished.clear()

    def _as_stored(self, adds: Adds) -> None:
        """The added-to rows in memory exactly as Redis will hold them (its
        script sums base and increment in double and rounds to float32), so
        that a batch reading them from the overlay sees what it would read
        from Redis."""
        ms = self._movie_side()
        if ms is None:
            return
        if len(adds.ids):
            opk.set_rows(ms, torch.from_numpy(adds.ids).to(self.device), _f32_sum(adds.base, adds.inc))
        if adds.global_inc is not None:
            opk.set_globals(ms, _f32_sum(adds.global_base, adds.global_inc))

    def _release(self, step: int, done: _Predicted) -> None:
        for u in done.written:
            if self._overlay.get(u, (None,))[0] == step:  # not rewritten by a later batch
                del self._overlay[u]
        for movie_id in (i for adds in done.adds for i in adds.keys()):
            if self._inflight_movies.get(movie_id) == step:
                del self._inflight_movies[movie_id]
        self._unfinished -= 1
        if not self._unfinished:
            self._all_finished.set()

    def decode(self, batch: Sequence[KafkaRecord], res: BatchResult) -> tuple[Work, Work]:
        """Classify each record: (events to predict, events to re-key); the
        rest go to ``res.dead`` with their reason."""
        limits = decode_limits(self)  # this predictor's own max_payload_bytes / min_ts / max_future_s
        work: Work = []
        misrouted: Work = []
        for rec in batch:
            try:
                got = classify(rec, **limits, key_policy=self.key_policy,
                               rekey=rec.topic != self.repartition_topic)
            except Exception as exc:  # record boundary: whatever it is, it is this record's
                got = internal_error(exc, rec.value)
            if isinstance(got, Rejection):
                self._reject(res, got, rec)
            elif isinstance(got, Misrouted):
                misrouted.append((got.event, rec))
            else:
                work.append((got, rec))
        return work, misrouted

    async def rekey(self, misrouted: Work, res: BatchResult) -> list[Awaitable[object]]:
        """Re-publish events keyed otherwise than by their user id to the
        repartition topic, keyed by user id (their own bytes, their original
        position in a header): they reach the worker that owns the user, in
        the order of their source partition."""
        futs = []
        for ev, rec in misrouted:
            src = f"{rec.topic}:{rec.partition}:{rec.offset}".encode("ascii")
            futs.append(await self.send(self.repartition_topic, rating_key(ev.user_id), rec.value,
                                        headers=[(SOURCE_HEADER, src)], timestamp=rec.timestamp or None))
        res.rekeyed = len(misrouted)
        return futs

    async def predict(self, work: Work, res: BatchResult, t0: float) -> _Predicted:
        """The model stages for the whole batch at once; if they fail for a
        reason that is not infrastructure, again user by user, so that only
        the events of a user whose events make them fail are dead-lettered
        (``internal_error``) and the rest of the batch goes on."""
        if not work:
            return _Predicted()
        try:
            return self._collect(res, [await self._predict_group(work, res, t0)])
        except INFRASTRUCTURE:
            raise
        except Exception:  # record boundary: find the records it belongs to
            log.exception("batch of %d events failed in the model stages; retrying user by user", len(work))
        groups: dict[int, Work] = {}
        for ev, rec in work:
            groups.setdefault(ev.user_id, []).append((ev, rec))
        parts = []
        for group in groups.values():
            try:
                parts.append(await self._predict_group(group, res, t0))
            except INFRASTRUCTURE:
                raise
            except Exception as exc:  # record boundary
                for _, rec in group:
                    self._reject(res, internal_error(exc, rec.value), rec)
        return self._collect(res, parts)

    async def _predict_group(self, work: Work, res: BatchResult, t0: float) -> _Predicted:
        """load -> filter -> model -> top-K -> produce (sent, not yet awaited)."""
        out = _Predicted()
        with _stage(res, "redis_load"):
            (users, stored), bases = await asyncio.gather(self.load(work), self.load_movies(work))
        fresh, marks = self.filter_applied(work, users, stored, out)
        if not fresh:
            await self.reemit(out)
            return out
        with _stage(res, "model_step"):
            fusers = list(marks)
            state, preds, uidx, inc = self.model_step(fresh, fusers, [stored[users[u]] for u in fusers], out)
            adds = self.movie_adds(inc, bases)
            out.adds = [adds] if adds is not None else []
        with _stage(res, "topk"):
            tops = self.user_top_k(state, len(fusers))
        blobs = self.model.pack_states(state)
        m.STATE_BYTES.set(len(blobs[0]))
        out.rows = [(u, blobs[i], [(t, p, o) for (t, p), o in marks[u].items()]) for i, u in enumerate(fusers)]
        for i, u in enumerate(fusers):
            before = stored[users[u]]
            out.written[u] = Stored(blobs[i], {**before.marks, **marks[u]}, outputs=before.outputs)
        await self.reemit(out)  # after the model stages: a failure there retries the group, never repeats these
        await self.produce_predictions(fresh, preds, uidx, tops, out, t0)
        if self.keep_outputs:
            out.rows = self.with_outputs(out.rows, fresh, out)
        return out

    async def load(self, work: Work) -> tuple[dict[int, int], list[Stored]]:
        """Unique users in first-seen order, and their stored states and watermarks."""
        users: dict[int, int] = {}
        for ev, _ in work:
            users.setdefault(ev.user_id, len(users))
        if not self._overlay:
            return users, await self.store.load(list(users))
        # taken now: the batch that wrote them may finish (and release them) during the load
        held = {u: self._overlay[u][1] for u in users if u in self._overlay}
        rest = [u for u in users if u not in held]
        got = dict(zip(rest, await self.store.load(rest)))
        return users, [held[u] if u in held else got[u] for u in users]

    def filter_applied(self, work: Work, users: dict[int, int], stored: list[Stored], out: _Predicted
                       ) -> tuple[Work, dict[int, dict[tuple[str, int], int]]]:
        """Drop events already folded into their user's state (at or below
        their source's watermark); the new watermarks per user and source."""
        fresh: Work = []
        marks: dict[int, dict[tuple[str, int], int]] = {}
        for ev, rec in work:
            src, part, off = watermark(rec, self.repartition_topic)
            st = stored[users[ev.user_id]]
            if st.covers(src, part, off):
                out.skipped += 1
                if self.keep_outputs:
                    self._stored_output(ev.user_id, st, (src, part, off), out)
                continue
            fresh.append((ev, rec))
            marks.setdefault(ev.user_id, {})[(src, part)] = off
        return fresh, marks

    # -- exactly-once mode: outputs stored with the state ---------------------
    @staticmethod
    def _stored_output(user: int, st: Stored, pos: tuple[str, int, int], out: _Predicted) -> None:
        """Queue the stored record of a skipped event for re-emission.

        Why: in exactly-once mode the states are stored before the batch's
        transaction commits; a crash in between leaves the events applied in
        Redis but their records aborted, so the redelivered events, skipped
        here, must be answered with the records the aborted transaction had
        (same bytes: their state is gone).  Found only for the user's last
        write from that source, which is all that can be uncommitted: a
        partition's next batch starts after the previous one committed."""
        value = st.output(*pos)
        if value is not None:
            out.reemit.append((user, *pos, value))

    async def reemit(self, out: _Predicted) -> None:
        """Send the queued stored records again (into the batch's transaction)."""
        for user, _, _, _, value in out.reemit:
            out.futs.append(await self.send(self.predictions_topic, rating_key(user), value))

    def with_outputs(self, rows: list[Row], fresh: Work, out: _Predicted) -> list[tuple]:
        """Rows with each source's outputs of this write: the records re-emitted
        and produced here for that user and source (all still uncommitted)."""
        per: dict[int, dict[tuple[str, int], list[tuple[int, bytes]]]] = {}
        for user, src, part, off, value in out.reemit:
            per.setdefault(user, {}).setdefault((src, part), []).append((off, value))
        for (ev, rec), value in zip(fresh, out.encoded):
            src, part, off = watermark(rec, self.repartition_topic)
            per.setdefault(ev.user_id, {}).setdefault((src, part), []).append((off, value))
        return [(u, blob, marks, [(t, p, outs) for (t, p), outs in per.get(u, {}).items()])
                for u, blob, marks in rows]

    # -- the shared online movie side -------------------------------------
    def _movie_side(self) -> Any:
        """The model's online movie side, or None (a model without one, or
        no shared movie side to learn)."""
        return online_movie_side(self.model) if self.movies is not None else None

    async def load_movie_side(self) -> None:
        """Every row the model has, and the globals, from Redis (start-up and
        after a swap); rows Redis lacks keep the checkpoint's values."""
        if self._movie_side() is not None:
            await self._read_movies(np.arange(self.model.capacity, dtype=np.int64))
            log.info("online movie side loaded from Redis (%d rows)", self.model.capacity)
        self._movies_loaded = True

    async def load_movies(self, work: Work) -> _Bases | None:
        """The stored rows of the batch's movies and the globals, written into
        the model; returns their values before the batch, the bases a missing
        key starts from when the batch adds to it."""
        if self._movie_side() is None or not work:
            return None
        ids = np.unique(np.fromiter((ev.movie_id for ev, _ in work), np.int64, len(work)))
        self.model.ensure_capacity(int(ids[-1]))
        return await self._read_movies(ids)

    async def _read_movies(self, ids: np.ndarray) -> _Bases:
        ms = self._movie_side()
        # rows an unfinished batch adds to: memory already has its increments,
        # Redis may not when it answers (taken before the read: that batch may
        # finish meanwhile, its add landing after this read on the server)
        held = set(self._inflight_movies)
        got, found, glob = await self.movies.load(ids.tolist(), opk.row_len(ms), opk.global_len(ms))
        if held:
            found &= ~np.isin(ids, np.fromiter((i for i in held if i is not None), np.int64))
        if found.any():
            opk.set_rows(ms, torch.from_numpy(ids[found]).to(self.device), got[found])
        if glob is not None and None not in held:
            opk.set_globals(ms, glob)
        rows = opk.rows(ms, torch.from_numpy(ids).to(self.device))
        return _Bases(ids, rows, opk.globals_vec(ms))

    def movie_adds(self, inc: Increments, bases: _Bases | None) -> Adds | None:
        """The batch's increments as store writes, each with its base."""
        ms = self._movie_side()
        if ms is None or not inc or bases is None:
            return None
        ids, deltas = opk.row_increments(ms, inc)
        at = np.searchsorted(bases.ids, ids)  # every incremented row is one the batch read
        if len(ids) and (at.max() >= len(bases.ids) or not np.array_equal(bases.ids[at], ids)):
            raise ValueError("movie-side increments for rows the batch did not read")
        return Adds(ids, deltas, bases.rows[at], opk.global_increment(ms, inc), bases.globals)

    # -- the model stage ---------------------------------------------------
    def model_step(self, fresh: Work, fusers: list[int], stored: list[Stored], out: _Predicted
                   ) -> tuple[mstate.State, np.ndarray, np.ndarray, Increments]:
        """The users' states after their new events, one prediction per event
        (made from the state before it; ``uidx`` maps events to users), and
        the batch's movie-side increments (already applied to the model)."""
        model = self.model
        model.ensure_capacity(max(ev.movie_id for ev, _ in fresh))
        state = self.user_states(fusers, stored, out)
        frow = {u: i for i, u in enumerate(fusers)}
        uidx = np.fromiter((frow[ev.user_id] for ev, _ in fresh), dtype=np.int64, count=len(fresh))
        rank = occurrence_rank(uidx)
        # Built on the host; pinned when the model is on a GPU so the copies
        # below are asynchronous DMA transfers, one per tensor per batch.
        block = pad_events(uidx, rank, len(fusers), [ev.movie_id for ev, _ in fresh],
                           [ev.rating for ev, _ in fresh], [ev.ts for ev, _ in fresh],
                           pin=self.device.type == "cuda")
        with torch.inference_mode():
            block = tuple(x.to(self.device, non_blocking=True) for x in block)
            p, state, inc = learn_batch(model, state, *block, learn_movies=self.movies is not None)
            preds = p.float().cpu().numpy()[uidx, rank]
        return state, preds, uidx, inc

    def user_states(self, fusers: list[int], stored: list[Stored], out: _Predicted) -> mstate.State:
        """Stored states as the serving model reads them: states of an older
        version re-derived from their window, states it cannot read at all
        (another model family or layout, a malformed blob) reset -- counted,
        never a crash: a family switch must not stop the stream."""
        blobs = [s.blob for s in stored]
        hashes = sum(s.foreign is not None for s in stored)  # Redis hashes of another key layout
        if hashes:  # read as new users (blob None); the store's next write replaces them
            m.STATES_RESET.labels("redis_layout").inc(hashes)
            out.reset += hashes
        state, stale, foreign = self.model.unpack_states(blobs, self.device)
        out.rederived = int(stale.sum())
        if out.rederived:
            state = self.model.rederive(state, stale)
        if bool(foreign.any()):
            self._count_resets([b for b, f in zip(blobs, foreign.tolist()) if f], out)
        return state

    def _count_resets(self, blobs: list[bytes | None], out: _Predicted) -> None:
        model = self.model
        reasons: dict[str, int] = {}
        for blob in blobs:
            try:
                name = mstate.parse_header(bytes(blob or b""))[0]
                why = "model_family" if name != model.name else "state_layout"
            except mstate.StateMismatch:
                why = "malformed"
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in reasons.items():
            m.STATES_RESET.labels(why).inc(n)
        out.reset += len(blobs)
        if not self._reset_logged:  # once per swap: every user of the old family will follow
            self._reset_logged = True
            log.warning("resetting user states %s cannot read (%s): they start afresh "
                        "(counted in fbp_states_reset_total)", f"{model.name} v{model.version}", reasons)

    def user_top_k(self, state: mstate.State, n_users: int) -> list[list[list[float]]]:
        """One top-K list per user (from its state after all its events here)."""
        if not self.top_k:
            return [[] for _ in range(n_users)]
        with torch.inference_mode():
            ids, scores = top_k(self.model, state, self.top_k)
        return [[[a, b] for a, b in zip(i, s)] for i, s in zip(ids, scores)]

    async def produce_predictions(self, fresh: Work, preds: np.ndarray, uidx: np.ndarray,
                                  tops: list[list[list[float]]], out: _Predicted, t0: float) -> None:
        """Build one prediction record per event and send them all (acks awaited later)."""
        produced_at = time.time()
        batch_ms = round((time.perf_counter() - t0) * 1000.0, 3)
        version = self.model.version
        records: list[tuple[bytes, bytes]] = []
        keys: dict[int, bytes] = {}
        for (ev, rec), predicted, u in zip(fresh, preds.tolist(), uidx.tolist()):
            pr = PredictionRecord(
                event_id=ev.event_id,
                user_id=ev.user_id,
                movie_id=ev.movie_id,
                predicted=predicted,
                actual=float(ev.rating),
                model_version=version,
                top_k=tops[u],
                timings={
                    "event_to_prediction_ms": round((produced_at - rec.timestamp) * 1000.0, 3),
                    "batch_ms": batch_ms,
                },
                ts=ev.ts,
                produced_at=produced_at,
            )
            out.predictions.append(pr)
            out.kafka_ts.append(rec.timestamp)
            value = encode_prediction(pr)
            if self.keep_outputs:
                out.encoded.append(value)
            key = keys.get(ev.user_id)
            if key is None:
                key = keys[ev.user_id] = rating_key(ev.user_id)
            records.append((key, value))
        out.futs += await self.send_many(self.predictions_topic, records)

    async def _send_each(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> list[Awaitable[object]]:
        return [await self.send(topic, key, value) for key, value in records]

    async def acknowledged(self, futs: list[Awaitable[object]], dlq_futs: list[Awaitable[object]],
                           res: BatchResult) -> None:
        """Wait until Kafka has every record of the batch.  A dead letter refused
        as too large is sent once more stripped of payload, key and headers;
        any other produce failure is infrastructure and propagates."""
        await asyncio.gather(*futs)
        results = await asyncio.gather(*dlq_futs, return_exceptions=True)
        retries = []
        for (rej, rec), r in zip(res.dead, results):
            if isinstance(r, BaseException):
                if not is_size_error(r):
                    raise r
                m.DLQ_STRIPPED.inc()
                retries.append(await self.send_dead_letter(rej, rec, stripped=True))
        await asyncio.gather(*retries)  # never a third try: a stripped letter is a few hundred bytes

    async def send_dead_letter(self, rej: Rejection, rec: KafkaRecord, stripped: bool = False
                               ) -> Awaitable[object]:
        """Send one dead letter; a size error at send time (the client checks
        max_request_size before queueing) gets the stripped retry at once."""
        letter = dlq_record(rej, rec, payload_prefix_bytes=self.dlq_payload_prefix_bytes, stripped=stripped)
        try:
            return await self.send(self.dlq_topic, None, letter)
        except INFRASTRUCTURE as exc:
            if stripped or not is_size_error(exc):
                raise
        m.DLQ_STRIPPED.inc()
        return await self.send_dead_letter(rej, rec, stripped=True)

    @staticmethod
    def _reject(res: BatchResult, rej: Rejection, rec: KafkaRecord) -> None:
        res.rejected.append(rej)
        res.dead.append((rej, rec))

    @staticmethod
    def _collect(res: BatchResult, parts: list[_Predicted]) -> _Predicted:
        out = _Predicted()
        for p in parts:
            out.predictions += p.predictions
            out.kafka_ts += p.kafka_ts
            out.rows += p.rows
            out.futs += p.futs
            out.adds += p.adds
            out.skipped += p.skipped
            out.rederived += p.rederived
            out.reset += p.reset
            out.reemit += p.reemit
            out.written.update(p.written)
        res.predictions, res.kafka_ts = out.predictions, out.kafka_ts
        res.reemitted = len(out.reemit)
        res.skipped, res.rederived, res.reset = out.skipped, out.rederived, out.reset
        return out

    def _track_offsets(self, batch: Sequence[KafkaRecord]) -> None:
        for rec in batch:
            if rec.topic != self.repartition_topic and rec.offset > self.last_offset.get(rec.partition, -1):
                self.last_offset[rec.partition] = rec.offset

    def _observe(self, batch: Sequence[KafkaRecord], res: BatchResult) -> None:
        m.BATCH_SIZE.observe(len(batch))
        for stage, s in res.stage_s.items():
            m.STAGE_SECONDS.labels(stage).observe(s)
        m.EVENTS.inc(len(res.predictions))
        m.SKIPPED.inc(res.skipped)
        m.REDERIVED.inc(res.rederived)
        m.REKEYED.inc(res.rekeyed)
        for rej in res.rejected:
            m.REJECTED.labels(rej.reason).inc()
        done = time.time()
        m.observe_many(m.LATENCY, np.maximum(0.0, done - np.asarray(res.kafka_ts, dtype=np.float64)))
        m.publish_errors(self.rolling, [rec.predicted - rec.actual for rec in res.predictions])
        m.LAST_BATCH.set(done)
