"""The work of one micro-batch, independent of Faust.

For a batch of raw Kafka messages:

1. decode and validate each (bad ones become dead-letter records with a reason);
2. load the states of the batch's users from Redis in one round trip, and
   drop events at or below a user's watermark (already applied: redelivery);
3. run the model once for the whole batch: with one event per user that is
   one batched ``step``; when a user has several events in the batch, their
   new events form a padded [users, T] sequence fed to ``forward_sequence``
   *from the stored state* (property-tested to equal T steps), so one user's
   events apply in order and no history is ever re-read;
4. score the known movies for each user once, after all of its events in
   the batch, to get the top-K attached to that user's records;
5. produce predictions and dead letters, and wait until Kafka has them;
6. only then store states and watermarks in one atomic Redis call.

Producing before storing means a crash can only cause a repeat (same event
id, same predicted value: the state it came from was not yet replaced),
never a missing prediction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import numpy as np
import torch

from models import state as mstate
from models.base import RatingModel
from stream import metrics as m
from core.events import (
    PredictionRecord, Rejection, decode_limits, decode_rating, dlq_record, encode_prediction, rating_key,
)
from core.repos.states import StateStore

log = logging.getLogger(__name__)

SendFn = Callable[[str, bytes | None, bytes], Awaitable[Awaitable[object]]]


@dataclass(slots=True)
class Incoming:
    """One Kafka message as the worker received it."""

    raw: bytes
    partition: int
    offset: int
    kafka_ts: float  # seconds, the producer's timestamp
    topic: str = "ratings"


@dataclass
class BatchResult:
    predictions: list[PredictionRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    kafka_ts: list[float] = field(default_factory=list)
    skipped: int = 0
    rederived: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)


class Predictor:
    """Turns micro-batches of rating messages into prediction records."""

    def __init__(
        self,
        model: RatingModel,
        store: StateStore,
        send: SendFn,
        *,
        predictions_topic: str,
        dlq_topic: str,
        top_k: int = 10,
        max_payload_bytes: int = 4096,
        min_ts: int = 0,
        max_future_s: int = 7 * 24 * 3600,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.store = store
        self.send = send
        self.predictions_topic = predictions_topic
        self.dlq_topic = dlq_topic
        self.top_k = top_k
        self.max_payload_bytes = max_payload_bytes
        self.min_ts = min_ts
        self.max_future_s = max_future_s
        self.rolling = m.RollingError()
        self._pending: RatingModel | None = None
        #: highest offset handled per partition (for the lag gauge)
        self.last_offset: dict[int, int] = {}
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
        m.MODEL_INFO.remove(old.name, self.device.type)
        m.MODEL_INFO.labels(model=new.name, device=self.device.type).set(1)
        m.MODEL_VERSION.set(new.version)
        m.SWAPS.inc()
        log.info("model swapped: %s v%d -> %s v%d", old.name, old.version, new.name, new.version)

    # -- the batch -------------------------------------------------------
    async def process(self, batch: Sequence[Incoming]) -> BatchResult:
        self._maybe_swap()
        res = BatchResult()
        t0 = time.perf_counter()
        limits = decode_limits(self)  # this predictor's own max_payload_bytes / min_ts / max_future_s
        events, coords = [], []
        for msg in batch:
            ev = decode_rating(msg.raw, **limits)
            if isinstance(ev, Rejection):
                res.rejected.append(ev)
                coords.append(msg)
            else:
                events.append((ev, msg))
        t1 = time.perf_counter()
        res.stage_s["decode"] = t1 - t0

        dlq_futs = [
            await self.send(
                self.dlq_topic, None,
                dlq_record(rej, topic=msg.topic, partition=msg.partition, offset=msg.offset),
            )
            for rej, msg in zip(res.rejected, coords)
        ]

        rows: list[tuple[int, bytes, int, int]] = []
        pred_futs: list[Awaitable[object]] = []
        if events:
            rows, pred_futs = await self._predict(events, res, t1)
        t4 = time.perf_counter()
        if pred_futs or dlq_futs:
            await asyncio.gather(*pred_futs, *dlq_futs)
        t5 = time.perf_counter()
        res.stage_s["produce"] = t5 - t4
        if rows:
            await self.store.store(rows)
        res.stage_s["redis_store"] = time.perf_counter() - t5
        for msg in batch:
            if msg.offset > self.last_offset.get(msg.partition, -1):
                self.last_offset[msg.partition] = msg.offset
        self._observe(batch, res)
        return res

    async def _predict(
        self, events: list, res: BatchResult, t1: float
    ) -> tuple[list[tuple[int, bytes, int, int]], list[Awaitable[object]]]:
        model = self.model
        # Unique users in first-seen order; their stored states and watermarks.
        users: dict[int, int] = {}
        for ev, _ in events:
            users.setdefault(ev.user_id, len(users))
        user_ids = list(users)
        stored = await self.store.load(user_ids)
        t2 = time.perf_counter()
        res.stage_s["redis_load"] = t2 - t1

        fresh = []
        last_coord: dict[int, dict[tuple[str, int], int]] = {}
        for ev, msg in events:
            if stored[users[ev.user_id]].covers(msg.topic, msg.partition, msg.offset):
                res.skipped += 1
                continue
            fresh.append((ev, msg))
            last_coord.setdefault(ev.user_id, {})[(msg.topic, msg.partition)] = msg.offset
        if not fresh:
            return [], []

        max_movie = max(ev.movie_id for ev, _ in fresh)
        model.ensure_capacity(max_movie)
        # Only users with something new; their stored states (stale ones re-derived).
        fusers = list(last_coord)
        frow = {u: i for i, u in enumerate(fusers)}
        state, stale = mstate.unpack_batch(
            model, [stored[users[u]].blob for u in fusers], self.device
        )
        res.rederived = int(stale.sum())
        if res.rederived:
            state = mstate.after_swap(model, state, stale)

        # Each user's new events as a row of a padded [U, T] batch, in order.
        uidx = np.fromiter((frow[ev.user_id] for ev, _ in fresh), dtype=np.int64, count=len(fresh))
        rank = np.zeros(len(fresh), dtype=np.int64)
        seen: dict[int, int] = {}
        for i, u in enumerate(uidx.tolist()):
            rank[i] = seen.get(u, 0)
            seen[u] = rank[i] + 1
        U, T = len(fusers), int(rank.max()) + 1
        # Built on the host; pinned when the model is on a GPU so the four
        # copies below are asynchronous DMA transfers, one per tensor per batch.
        pin = self.device.type == "cuda"
        movie = torch.zeros((U, T), dtype=torch.int64, pin_memory=pin)
        rating = torch.zeros((U, T), dtype=torch.float32, pin_memory=pin)
        ts = torch.zeros((U, T), dtype=torch.int64, pin_memory=pin)
        mask = torch.zeros((U, T), dtype=torch.bool, pin_memory=pin)
        ui, ri = torch.from_numpy(uidx), torch.from_numpy(rank)
        movie[ui, ri] = torch.tensor([ev.movie_id for ev, _ in fresh], dtype=torch.int64)
        rating[ui, ri] = torch.tensor([ev.rating for ev, _ in fresh], dtype=torch.float32)
        ts[ui, ri] = torch.tensor([ev.ts for ev, _ in fresh], dtype=torch.int64)
        mask[ui, ri] = True

        with torch.inference_mode():
            movie, rating, ts, mask = (x.to(self.device, non_blocking=True) for x in (movie, rating, ts, mask))
            if T == 1:  # the common steady-state case: one event per user
                state, p = model.step(state, movie[:, 0], rating[:, 0], ts[:, 0])
                preds = p.float().cpu().numpy()[uidx]
            else:  # several events of a user in this batch: same result as T steps
                p, state = model.forward_sequence(movie, rating, ts, mask, state=state, return_state=True)
                preds = p.float().cpu().numpy()[uidx, rank]
            t3 = time.perf_counter()
            res.stage_s["model_step"] = t3 - t2
            # Top-K once per user, from the state after all of its events in this batch.
            top_ids, top_sc = self._top_k(state) if self.top_k else ([[]] * U, [[]] * U)
        res.stage_s["topk"] = time.perf_counter() - t3

        blobs = mstate.pack_batch(model, state)
        rows = [(u, blobs[frow[u]], [(t, p, o) for (t, p), o in last_coord[u].items()]) for u in fusers]
        m.STATE_BYTES.set(len(blobs[0]))

        # One top-K list per user, shared by that user's records in this batch.
        user_top = [[[a, b] for a, b in zip(ids, sc)] for ids, sc in zip(top_ids, top_sc)]
        futs = []
        produced_at = time.time()
        batch_ms = round((time.perf_counter() - t1) * 1000.0, 3)
        version = model.version
        for i, (ev, msg) in enumerate(fresh):
            rec = PredictionRecord(
                event_id=ev.event_id,
                user_id=ev.user_id,
                movie_id=ev.movie_id,
                predicted=float(preds[i]),
                actual=float(ev.rating),
                model_version=version,
                top_k=user_top[uidx[i]],
                timings={
                    "event_to_prediction_ms": round((produced_at - msg.kafka_ts) * 1000.0, 3),
                    "batch_ms": batch_ms,
                },
                ts=ev.ts,
                produced_at=produced_at,
            )
            res.predictions.append(rec)
            res.kafka_ts.append(msg.kafka_ts)
            futs.append(await self.send(self.predictions_topic, rating_key(ev.user_id), encode_prediction(rec)))
        return rows, futs

    def _top_k(self, sub: mstate.State) -> tuple[list[list[int]], list[list[float]]]:
        """Best ``top_k`` known movies per user, excluding those in the user's window."""
        cands = candidate_movies(self.model)
        scores = self.model.score(sub, cands).masked_fill(seen_mask(sub, cands), float("-inf"))
        k = min(self.top_k, scores.shape[1])
        sc, ix = torch.topk(scores, k, dim=1)
        return cands[ix].cpu().tolist(), np.round(sc.float().cpu().numpy().astype(np.float64), 4).tolist()

    def _observe(self, batch: Sequence[Incoming], res: BatchResult) -> None:
        m.BATCH_SIZE.observe(len(batch))
        for stage, s in res.stage_s.items():
            m.STAGE_SECONDS.labels(stage).observe(s)
        m.EVENTS.inc(len(res.predictions))
        m.SKIPPED.inc(res.skipped)
        m.REDERIVED.inc(res.rederived)
        for rej in res.rejected:
            m.REJECTED.labels(rej.reason).inc()
        done = time.time()
        for kts in res.kafka_ts:  # a histogram takes one observation at a time
            m.LATENCY.observe(max(0.0, done - kts))
        self.rolling.extend([rec.predicted - rec.actual for rec in res.predictions])
        self.rolling.publish()
        m.LAST_BATCH.set(done)


def candidate_movies(model: RatingModel) -> torch.Tensor:
    """Movies worth recommending: rows the model knows (trained bias or side
    features).  Cached on the model object (a swapped-in model brings its own)
    and recomputed when its tables grow."""
    cap = int(getattr(model, "capacity", 0))
    hit = getattr(model, "_fbp_candidates", None)
    # keyed by device too: a model queued for a swap may be asked (by the API)
    # before ``.to(device)`` moves its weights -- and not this cached tensor
    if hit is not None and hit[0] == cap and hit[1].device == model.device:
        return hit[1]
    known = None
    for name in ("movie_bias", "movie_features"):
        t = getattr(model, name, None)
        if isinstance(t, torch.Tensor) and t.shape[0] == cap:
            rows = (t.detach().reshape(cap, -1) != 0).any(1)
            known = rows if known is None else known | rows
    if known is None or not bool(known.any()):
        cands = torch.arange(cap, device=model.device)
    else:
        cands = torch.nonzero(known).flatten().to(model.device)
    model._fbp_candidates = (cap, cands)
    return cands


def seen_mask(state: mstate.State, cands: torch.Tensor) -> torch.Tensor:
    """[B, M] True where the candidate is among the user's stored window events
    (the window is right-aligned: the last ``win_len`` slots are real).

    Each window id is located among the sorted candidates (binary search) and
    marked in a [B, M + 1] table: O(B·W·log M + B·M), no [B, W, M] comparison
    and no device-to-host sync."""
    win = state["win_movie"]
    B, W = win.shape
    M = cands.numel()
    real = torch.arange(W, device=win.device)[None, :] >= (W - state["win_len"].to(torch.int64))[:, None]
    sorted_c, order = torch.sort(cands)
    pos = torch.searchsorted(sorted_c, win).clamp(max=max(M - 1, 0))
    found = real & (sorted_c[pos] == win) if M else torch.zeros_like(real)
    # found -> its candidate's column in sorted order; else the spare column M
    col = torch.where(found, pos, torch.full_like(pos, M))
    table = torch.zeros((B, M + 1), dtype=torch.bool, device=win.device)
    table.scatter_(1, col, True)
    out = torch.empty((B, M), dtype=torch.bool, device=win.device)
    out[:, order] = table[:, :M]
    return out
