"""Helpers for end-to-end tests of the streaming path (real Kafka, Redis, workers).

Every test runs in its own :class:`stack.procs.Namespace` (topics and Redis key
prefix), so tests never see each other's events or states.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd
import torch
from kafka import KafkaConsumer

from stack.procs import Namespace
from core.settings import Settings
from models import state as mstate
from models.base import RatingModel, State
from core.redis_conn import async_redis
from core.repos.states import StateStore
from trainer.prequential import step_online_events, stream_order

#: events the shared bootstrap checkpoint (tests/conftest.py ``ckpt``) trains on
BOOTSTRAP_EVENTS = 10_000

#: Worker environment for oracles that compare a worker's exact states with
#: ``simulate(model, df)`` (movie side frozen).  With ``worker.online_movie_side``
#: on (the default) every batch also learns the shared movie side, so states
#: and predictions depend on how the worker happened to batch the events:
#: test_stream_e2e replays the worker's own batches, and the fault suite's
#: ``online`` scenario compares within a tolerance.  Tests about delivery,
#: keys, watermarks and swaps pin the frozen path to keep their exact oracle.
FROZEN_MOVIE_SIDE = {"FBP_WORKER__ONLINE_MOVIE_SIDE": "false"}


def read_topic(settings: Settings, topic: str, *, until: int, timeout: float,
               on_progress=None, by_event_id: bool = True) -> list[dict]:
    """All records of ``topic`` from the beginning, until ``until`` distinct
    event ids (or, with ``by_event_id=False``, records) were seen or
    ``timeout`` seconds passed."""
    c = KafkaConsumer(topic, **settings.kafka.kafka_python_kwargs(), group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=500)
    out: list[dict] = []
    ids: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(ids) < until and time.monotonic() < deadline:
            for msg in c:
                rec = orjson.loads(msg.value)
                out.append(rec)
                ids.add(rec.get("event_id") if by_event_id else len(out))
                if on_progress is not None:
                    on_progress(len(ids))
                if len(ids) >= until:
                    break
    finally:
        c.close()
    return out


def simulate(model: RatingModel, ratings: pd.DataFrame, batch_events: int = 1024,
             batches: Sequence[np.ndarray] | None = None, learn_movies: bool = False
             ) -> tuple[np.ndarray, dict[int, int], State]:
    """The in-process reference (``trainer.prequential`` with fine-tuning off):
    predictions in stream order, user index, final states.  Each batch goes
    through :func:`models.batch.learn_batch`, the worker's own batch code.

    The online movie side learns within and across batches, so a prediction
    depends on how the events were batched: ``batches`` (stream-order
    positions per batch, in the order a worker ran them -- e.g. grouped by
    the ``produced_at`` of its prediction records) replays a worker's exact
    batching; by default, consecutive chunks of ``batch_events``.
    ``learn_movies``: as a worker with ``worker.online_movie_side`` on (off,
    the default, the movie side stays as the checkpoint has it and the
    result does not depend on the batching)."""
    df = stream_order(ratings)
    users = df["user_id"].to_numpy(np.int64)
    uniq = np.unique(users)
    uidx = np.searchsorted(uniq, users)
    states = model.init_state(len(uniq), model.device)
    mv, rt, ts = (df[c].to_numpy() for c in ("movie_id", "rating", "ts"))
    preds = np.empty(len(df), np.float32)
    model.eval()
    if batches is None:
        batches = [np.arange(a, min(len(df), a + batch_events)) for a in range(0, len(df), batch_events)]
    for pos in batches:
        pos = np.sort(np.asarray(pos, np.int64))  # a user's events in stream order, as Kafka delivers them
        model.ensure_capacity(int(mv[pos].max()))
        preds[pos] = step_online_events(model, states, uidx[pos], mv[pos].astype(np.int64),
                                        rt[pos].astype(np.float32), ts[pos].astype(np.int64), learn_movies)
    return preds, {int(u): i for i, u in enumerate(uniq)}, states


def redis_states(ns: Namespace, model: RatingModel, users: Iterable[int]) -> tuple[State, list[int]]:
    """States stored by the workers for ``users`` (missing users -> init state)."""
    users = list(users)

    async def load() -> list:
        client = async_redis(ns.settings.redis)
        try:
            return await StateStore(client, ns.prefix).load(users)
        finally:
            await client.aclose()

    blobs = [s.blob for s in asyncio.run(load())]
    missing = [u for u, b in zip(users, blobs) if b is None]
    st, _, _ = mstate.unpack_batch(model, blobs, "cpu")
    return st, missing


def state_mismatches(a: State, b: State, atol: float = 1e-4) -> int:
    """Users whose states differ (exact for integer fields, ``atol`` for floats)."""
    bad = torch.zeros(next(iter(a.values())).shape[0], dtype=torch.bool)
    for k, x in a.items():
        y = b[k].to(x.device)
        if x.dtype.is_floating_point:
            diff = ~torch.isclose(x, y, atol=atol, rtol=1e-4)
        else:
            diff = x != y
        bad |= diff.reshape(diff.shape[0], -1).any(1).cpu()
    return int(bad.sum())


def checkpoint(tmp: Path, ratings: pd.DataFrame, movies: pd.DataFrame, genre_vocab: list[str],
               name: str = "lstm", epochs: int = 1, **hparams) -> Path:
    """A small trained checkpoint (seeded) for stream tests."""
    from models.checkpoint import save_checkpoint
    from trainer.train import fit, make_model

    torch.manual_seed(0)
    model = make_model(name, movies, genre_vocab, int(ratings["movie_id"].max()), **hparams)
    fit(model, ratings, epochs=epochs, device="cpu", valid_frac=0.0, seed=0, progress=False)
    model.version = 1
    path = tmp / f"{name}-model"
    save_checkpoint(model, path, {"note": "stream test bootstrap"})
    return path


def redis_movie_bias(ns: Namespace, model: RatingModel, movies: Iterable[int]) -> torch.Tensor:
    """The online movie bias ``b`` of ``movies`` as the workers stored it in
    Redis (NaN where a movie has no row there)."""
    from core.repos.movies import MovieSideStore
    from models import online_pack as opk

    movies = list(movies)
    ms = model.movie_side()

    async def load() -> tuple:
        client = async_redis(ns.settings.redis)
        try:
            rows, found, _ = await MovieSideStore(client, ns.prefix).load(movies, opk.row_len(ms), opk.global_len(ms))
            return rows, found
        finally:
            await client.aclose()

    rows, found = asyncio.run(load())
    return torch.tensor(np.where(found, rows[:, 0], np.nan) if len(movies) else [], dtype=torch.float32)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (matching ``labels``) on a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
