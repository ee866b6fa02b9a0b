"""The work of one micro-batch, independent of Faust: the stage list.

Each stage lives in ``stream.batch.<stage>``, the module named like its
``fbp_stage_duration_seconds`` label (the table is in :mod:`stream.batch`):
decode -> redis_load -> model_step -> topk -> outputs -> produce, and, once
Kafka has acknowledged the batch's records, redis_store.

:meth:`Predictor.process` is ``finish(begin(batch))``.  With pipelining the
next batch may ``begin`` before this one ``finish``-es: it then reads the
states and movie rows this one wrote from the overlay (:mod:`.batch.overlay`),
not the older ones still in Redis.  Producing before storing means a crash
can only cause a repeat, never a missing prediction; infrastructure faults
(``stream.faults``) propagate so the caller can fail stop, anything else is
one record's fault and becomes that record's dead letter.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from core.repos.catalog import AsyncMovieCatalog
from core.repos.movies import MovieSideStore
from core.repos.states import StateStore
from core.rolling import RollingError
from models.base import RatingModel
from stream.batch import decode, model_step, outputs, produce, redis_load, redis_store, topk
from stream.batch.config import BatchConfig
from stream.batch.decode import SOURCE_HEADER, watermark
from stream.batch.groups import by_user_on_failure
from stream.batch.movie_rows import MovieRows
from stream.batch.observe import observe, track_offsets
from stream.batch.overlay import Overlay
from stream.batch.serving import Serving
from stream.batch.side_features import SideFeatures
from stream.batch.types import BatchResult, Begun, Incoming, KafkaRecord, Predicted, SendFn, SendManyFn, Work, timed

log = logging.getLogger(__name__)

__all__ = ["BatchConfig", "BatchResult", "Begun", "Incoming", "Predictor", "SOURCE_HEADER", "watermark"]


class Predictor:
    """Turns micro-batches of rating records into prediction records."""

    def __init__(self, model: RatingModel, store: StateStore, send: SendFn, cfg: BatchConfig, *,
                 movies: MovieSideStore | None = None, send_many: SendManyFn | None = None,
                 device: torch.device | str = "cpu", catalog: AsyncMovieCatalog | None = None,
                 catalog_retry_s: float = 60.0) -> None:
        self.cfg, self.store, self.movies = cfg, store, movies
        self.serving = Serving(model, device)
        self.overlay = Overlay()
        self.movie_rows = MovieRows(movies, self.serving, self.overlay)
        self.side_features = SideFeatures(catalog, self.serving, catalog_retry_s)
        self.loader = redis_load.Loader(store, self.movie_rows, self.overlay, self.side_features)
        self.model_step = model_step.ModelStep(self.serving, self.movie_rows)
        self.producer = produce.Producer(send, cfg, send_many)
        self.rolling = RollingError()
        #: highest offset handled per partition of the ratings topic (for the lag gauge)
        self.last_offset: dict[int, int] = {}

    @property
    def model(self) -> RatingModel:
        return self.serving.model

    def offer_model(self, model: RatingModel) -> None:
        """Queue a new model; it takes over at the start of the next batch."""
        self.serving.offer(model)

    async def process(self, batch: Sequence[KafkaRecord]) -> BatchResult:
        """One micro-batch, stage by stage; raises only infrastructure faults."""
        return await self.finish(await self.begin(batch))

    async def begin(self, batch: Sequence[KafkaRecord]) -> Begun:
        """The stages up to sending (acknowledgements not awaited)."""
        await self._swap_if_offered()
        res, t0 = BatchResult(), time.perf_counter()
        if not self.movie_rows.loaded:
            with timed(res, redis_load.STAGE):
                await self.movie_rows.load_all()
        with timed(res, decode.STAGE):
            routed = decode.decode(batch, self.cfg, res)
        with timed(res, produce.STAGE):
            rekey_futs = await self.producer.rekey(routed.misrouted, res)
        done = await by_user_on_failure(routed.work, lambda work: self._stages(work, res, t0), res)
        with timed(res, produce.STAGE):
            dlq_futs = await self.producer.dead_letters(res)
        step = self.overlay.hold(done)
        self.movie_rows.as_stored(done.adds)
        return Begun(batch, res, done, done.futs + rekey_futs, dlq_futs, step)

    async def _stages(self, work: Work, res: BatchResult, t0: float) -> Predicted:
        """redis_load -> model_step -> topk -> outputs -> produce (sent, not awaited)."""
        out = Predicted()
        with timed(res, redis_load.STAGE):
            loaded = await self.loader.load(work)
            fresh = redis_load.filter_applied(work, loaded, self.cfg.repartition_topic)
        out.skipped = len(fresh.applied)
        if self.cfg.keep_outputs:
            outputs.queue_reemits(fresh, out)
        if fresh.work:
            with timed(res, model_step.STAGE):
                self.side_features.apply(loaded.catalog)
                stepped = self.model_step.run(fresh, [loaded.of(u) for u in fresh.users], loaded.bases, out)
                out.adds = [stepped.adds] if stepped.adds is not None else []
            with timed(res, topk.STAGE):
                tops = topk.user_top_k(self.model, stepped.state, len(fresh.users), self.cfg.top_k)
            with timed(res, outputs.STAGE):
                outputs.state_rows(self.model, fresh, loaded, stepped, out)
                records = outputs.prediction_records(fresh, stepped, tops, self.model.version, self.cfg, out, t0)
        with timed(res, produce.STAGE):
            await self.producer.reemit(out)  # after the model stages: a failure there retries, never repeats these
            if fresh.work:
                await self.producer.predictions(records, out)
        if self.cfg.keep_outputs:
            out.rows = outputs.with_outputs(fresh, out, self.cfg.repartition_topic)
        return out

    async def finish(self, b: Begun) -> BatchResult:
        """Wait until Kafka has the batch's records, then store its states and
        movie-side increments.  Batches must finish in the order they began."""
        with timed(b.res, produce.STAGE):
            await self.producer.acknowledged(b.futs, b.dlq_futs, b.res)
        with timed(b.res, redis_store.STAGE):
            await redis_store.store(b.done, self.store, self.movies)
        self.overlay.release(b.step, b.done)
        track_offsets(b.batch, self.last_offset, self.cfg.repartition_topic)
        observe(b.batch, b.res, self.rolling)
        if b.res.reemitted:  # rare: only after a transaction that stored its states did not commit
            log.warning("re-emitted %d stored prediction record(s) of redelivered events", b.res.reemitted)
        return b.res

    async def _swap_if_offered(self) -> None:
        """A swap re-reads the movie side from Redis: the begun batches settle first."""
        if self.serving.pending is not None and self.overlay.busy:
            await self.overlay.settled()
        if self.serving.swap():
            self.movie_rows.loaded = False  # Redis, not the checkpoint, has the learned movie side
