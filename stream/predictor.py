"""The work of one micro-batch, independent of Faust.

For a batch of raw Kafka messages:

1. decode and validate each (bad ones become dead-letter records with a reason);
2. load the states of the batch's users from Redis in one round trip, and
   drop events at or below a user's watermark (already applied: redelivery);
3. step the model in *rounds*: round r holds the r-th event of every user in
   the batch, so one user's events are applied in order while different
   users share one batched ``step`` call;
4. score every movie for the users of each round to get their top-K;
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
from stream.events import PredictionRecord, Rejection, decode_rating, dlq_record, encode_prediction
from stream.state_store import StateStore

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
        now = time.time()
        max_ts = int(now) + self.max_future_s
        events, coords = [], []
        for msg in batch:
            ev = decode_rating(
                msg.raw, max_payload_bytes=self.max_payload_bytes, min_ts=self.min_ts, max_ts=max_ts
            )
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
        self._observe(batch, res, now)
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
        last_coord: dict[int, tuple[int, int]] = {}
        for ev, msg in events:
            if stored[users[ev.user_id]].covers(msg.partition, msg.offset):
                res.skipped += 1
                continue
            fresh.append((ev, msg))
            last_coord[ev.user_id] = (msg.partition, msg.offset)
        if not fresh:
            return [], []

        max_movie = max(ev.movie_id for ev, _ in fresh)
        model.ensure_capacity(max_movie)
        state, stale = mstate.unpack_batch(model, [s.blob for s in stored], self.device)
        if stale.any():
            idx = torch.nonzero(stale).flatten().to(self.device)
            state = mstate.scatter(state, idx, mstate.rederive(model, mstate.select(state, idx)))
            res.rederived = int(idx.numel())

        # Rank of each event within its user's events in this batch -> rounds.
        uidx = np.fromiter((users[ev.user_id] for ev, _ in fresh), dtype=np.int64, count=len(fresh))
        rank = np.zeros(len(fresh), dtype=np.int64)
        seen: dict[int, int] = {}
        for i, u in enumerate(uidx.tolist()):
            rank[i] = seen.get(u, 0)
            seen[u] = rank[i] + 1
        movie = torch.tensor([ev.movie_id for ev, _ in fresh], dtype=torch.int64)
        rating = torch.tensor([ev.rating for ev, _ in fresh], dtype=torch.float32)
        ts = torch.tensor([ev.ts for ev, _ in fresh], dtype=torch.int64)

        preds = np.empty(len(fresh), dtype=np.float32)
        top_ids: list[list[int]] = [[] for _ in fresh]
        top_sc: list[list[float]] = [[] for _ in fresh]
        t_topk = 0.0
        with torch.inference_mode():
            for r in range(int(rank.max()) + 1):
                ev_idx = np.nonzero(rank == r)[0]
                u_t = torch.from_numpy(uidx[ev_idx]).to(self.device)
                e_t = torch.from_numpy(ev_idx)
                sub = mstate.select(state, u_t)
                sub, p = model.step(
                    sub, movie[e_t].to(self.device), rating[e_t].to(self.device), ts[e_t].to(self.device)
                )
                state = mstate.scatter(state, u_t, sub)
                preds[ev_idx] = p.float().cpu().numpy()
                if self.top_k:
                    tk = time.perf_counter()
                    ids, sc = self._top_k(sub)
                    for j, i in enumerate(ev_idx.tolist()):
                        top_ids[i], top_sc[i] = ids[j], sc[j]
                    t_topk += time.perf_counter() - tk
        t3 = time.perf_counter()
        res.stage_s["topk"] = t_topk
        res.stage_s["model_step"] = t3 - t2 - t_topk

        blobs = mstate.pack_batch(model, state)
        rows = [
            (u, blobs[users[u]], *last_coord[u]) for u in user_ids if u in last_coord
        ]
        m.STATE_BYTES.set(len(blobs[0]))

        futs = []
        produced_at = time.time()
        batch_ms = (t3 - t1) * 1000.0
        for i, (ev, msg) in enumerate(fresh):
            rec = PredictionRecord(
                event_id=ev.event_id,
                user_id=ev.user_id,
                movie_id=ev.movie_id,
                predicted=float(preds[i]),
                actual=float(ev.rating),
                model_version=model.version,
                top_k=[[a, round(b, 4)] for a, b in zip(top_ids[i], top_sc[i])],
                timings={
                    "event_to_prediction_ms": round((produced_at - msg.kafka_ts) * 1000.0, 3),
                    "batch_ms": round(batch_ms, 3),
                },
                ts=ev.ts,
                produced_at=produced_at,
            )
            res.predictions.append(rec)
            res.kafka_ts.append(msg.kafka_ts)
            futs.append(
                await self.send(self.predictions_topic, str(ev.user_id).encode(), encode_prediction(rec))
            )
        return rows, futs

    def _top_k(self, sub: mstate.State) -> tuple[list[list[int]], list[list[float]]]:
        """Best ``top_k`` movies per user, excluding those in the user's window."""
        model = self.model
        cands = model.known_movies() if hasattr(model, "known_movies") else None
        if cands is None:
            cands = torch.arange(1, _capacity(model), device=self.device)
        scores = model.score(sub, cands)
        if "win_movie" in sub:
            seen = (sub["win_movie"].unsqueeze(-1) == cands.view(1, 1, -1)).any(1)
            scores = scores.masked_fill(seen, float("-inf"))
        k = min(self.top_k, scores.shape[1])
        sc, ix = torch.topk(scores, k, dim=1)
        return cands[ix].cpu().tolist(), sc.float().cpu().tolist()

    def _observe(self, batch: Sequence[Incoming], res: BatchResult, started: float) -> None:
        m.BATCH_SIZE.observe(len(batch))
        for stage, s in res.stage_s.items():
            m.STAGE_SECONDS.labels(stage).observe(s)
        m.EVENTS.inc(len(res.predictions))
        m.SKIPPED.inc(res.skipped)
        m.REDERIVED.inc(res.rederived)
        for rej in res.rejected:
            m.REJECTED.labels(rej.reason).inc()
        done = time.time()
        for rec, kts in zip(res.predictions, res.kafka_ts):
            self.rolling.add(rec.predicted, rec.actual)
            m.LATENCY.observe(max(0.0, done - kts))
        self.rolling.publish()
        m.LAST_BATCH.set(done)


def _capacity(model: RatingModel) -> int:
    return int(getattr(model, "capacity", 2048))
