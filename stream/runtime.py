"""What a running worker holds: the model, the Redis clients and the predictor.

Built lazily on the first batch (Faust's loop is running by then) so that
importing ``stream.app`` stays cheap and side-effect free.
"""

from __future__ import annotations

import asyncio
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from core.settings import Settings, get_settings
from fbp_errors import ConfigError, ModelRefused
from models.base import RatingModel
from models.devices import pick_device
from models.checkpoint import CheckpointError, load_checkpoint
from stream import heap
from stream import metrics as m
from core.repos.catalog import AsyncMovieCatalog
from core.repos.models import ModelStore
from core.repos.movies import MovieSideStore
from stream.faults import FullRedisPause
from stream.outbox import faust_producer, send_records
from stream.batch.config import BatchConfig
from stream.batch.types import SendFn, SendManyFn
from stream.predictor import Predictor
from stream.transactions import Transactions
from core.redis_conn import amemory, async_redis, sync_redis
from core.repos.erasure import ErasureLog
from core.repos.states import StateStore

log = logging.getLogger(__name__)


def initial_model(settings: Settings, models: ModelStore) -> tuple[RatingModel, dict[str, Any]]:
    """The published current model if there is one, else the local
    checkpoint; with where it came from (the live page's versions table:
    family, version, when, why, checkpoint sha256)."""
    cur = models.current()
    if cur is not None:
        return models.load(cur.version), dict(cur.meta, source="published")
    path = settings.worker.checkpoint
    try:
        model, meta = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(
            f"no model to serve: nothing is published in Redis (prefix {settings.redis.key_prefix!r}) "
            f"and the local checkpoint is unusable: {exc}. Publish one with `fbp model publish PATH` "
            "or point FBP_WORKER__CHECKPOINT at a checkpoint written by `fbp train`"
        ) from None
    return model, {"source": "checkpoint", "version": model.version, "model": model.name,
                   "sha256": meta.get("sha256"), "created": meta.get("created"),
                   "metrics": meta.get("metrics") or {}, "reason": f"local checkpoint {Path(path).name}"}


def make_predictor(s: Settings, model: RatingModel, store: StateStore, send: SendFn,
                   send_many: SendManyFn | None = None) -> Predictor:
    """A worker's Predictor as the settings describe it (device, torch threads,
    topics, limits); also used by ``fbp bench stream``'s no-Faust reference.
    Settles the process's heap (:func:`stream.heap.settle`): what is loaded
    by now lives as long as the process."""
    torch.set_num_threads(s.worker.torch_threads)
    heap.settle()
    movies = MovieSideStore(store.client, store.prefix, on_full=store.on_full) if s.worker.online_movie_side else None
    catalog = AsyncMovieCatalog(store.client, store.prefix) if s.worker.catalog_features else None
    return Predictor(model, store, send, BatchConfig.from_settings(s), movies=movies, send_many=send_many,
                     device=pick_device(s.worker.device), catalog=catalog,
                     catalog_retry_s=s.worker.catalog_retry_s)


class Runtime:
    """The worker process's one of each; settings are read on first use, so
    importing this module reads and builds nothing."""

    def __init__(self) -> None:
        self._predictor: Predictor | None = None
        self._lock = asyncio.Lock()
        self.refused: dict[int, str] = {}
        self.store: StateStore | None = None
        self.models: ModelStore | None = None
        #: where the first model served came from (``initial_model``)
        self.origin: dict[str, Any] = {}
        self.erasures: ErasureLog | None = None

    @cached_property
    def settings(self) -> Settings:
        return get_settings()

    @cached_property
    def transactions(self) -> Transactions | None:
        """Exactly-once mode's transactional producers (None: at least once, Faust's producer)."""
        s = self.settings
        return Transactions(s.kafka, s.worker.app_id) if s.worker.exactly_once else None

    async def predictor(self, app: Any) -> Predictor:
        if self._predictor is not None:
            return self._predictor
        async with self._lock:
            if self._predictor is None:
                s = self.settings
                self.models = ModelStore(sync_redis(s.redis), s.redis.key_prefix)
                self.store = StateStore.from_settings(async_redis(s.redis), s.redis, s.state,
                                                      on_full=FullRedisPause(s.state.full_retry_max_s))
                self.erasures = ErasureLog(sync_redis(s.redis), s.redis.key_prefix)
                model, self.origin = initial_model(s, self.models)

                async def faust_send(topic: str, key: bytes | None, value: bytes,
                                     headers: Any = None, timestamp: float | None = None) -> Any:
                    return await app.producer.send(topic, key, value, None, timestamp, headers)

                async def faust_send_many(topic: str, records: Any) -> Any:
                    return await send_records(faust_producer(app), topic, records)

                txns = self.transactions
                send, send_many = (faust_send, faust_send_many) if txns is None else (txns.send, txns.send_many)
                self._predictor = make_predictor(s, model, self.store, send, send_many)
                log.info("serving %s v%d on %s", model.name, model.version, self._predictor.serving.device)
        return self._predictor

    @property
    def ready(self) -> bool:
        return self._predictor is not None

    @property
    def model(self) -> RatingModel | None:
        p = self._predictor
        if p is None:
            return None
        return p.serving.latest

    async def check_model(self, app: Any) -> None:
        """Load a newly current published version; refuse (and remember) a bad one."""
        if self._predictor is None or self.models is None:
            return
        cur = await asyncio.to_thread(self.models.current)
        serving = self.model
        if cur is None or serving is None or cur.version == serving.version or cur.version in self.refused:
            return
        try:
            model = await asyncio.to_thread(self.models.load, cur.version)
        except ModelRefused as exc:
            self.refused[cur.version] = str(exc)
            m.SWAP_REFUSED.labels(exc.reason).inc()
            log.error("refusing model version %d (%s): %s; still serving v%d",
                      cur.version, exc.reason, exc, serving.version)
            return
        self._predictor.offer_model(model)

    async def refresh_gauges(self, app: Any) -> None:
        if self.store is not None:
            m.USERS.set(await self.store.users())
            for node, (used, most) in (await amemory(self.store.client)).items():
                m.REDIS_USED_MEMORY.labels(node).set(used)
                m.REDIS_MAXMEMORY.labels(node).set(most)
        if self.erasures is not None:
            m.USERS_FORGOTTEN.set(await asyncio.to_thread(self.erasures.count))
        p = self._predictor
        if p is None:
            return
        try:
            assigned = app.consumer.assignment()
        except Exception:  # consumer not started or rebalancing
            return
        for tp in assigned:
            if tp.topic != self.settings.kafka.ratings_topic:
                continue
            high = app.consumer.highwater(tp)
            if high is None:
                continue
            done = p.last_offset.get(tp.partition, -1)
            m.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - done - 1))


runtime = Runtime()
