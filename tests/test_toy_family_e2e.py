"""Adding a model family is one file and one registry line: the toy family
(``models/toy.py``, one entry in ``models.registry.MODELS``) is trained,
published and served by a real ``fbp worker`` on the real stack, with no
other change anywhere -- and so is its online movie side, learned by the
worker and shared in Redis through the model protocol alone."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from core.redis_conn import sync_redis
from core.repos.models import ModelStore
from models.checkpoint import load_checkpoint
from stack import procs
from stream.replay import replay
from tests.streamkit import checkpoint, read_topic, redis_movie_bias, redis_states, simulate, state_mismatches

pytestmark = pytest.mark.integration

PORT, ONLINE_PORT = 6121, 6122
TRAIN_EVENTS, LIVE_EVENTS = 5_000, 4_000


def test_toy_family_trains_publishes_and_streams(stack, ns, ml100k, tmp_path):
    ratings = ml100k.ratings
    train, live = ratings.iloc[:TRAIN_EVENTS], ratings.iloc[TRAIN_EVENTS:TRAIN_EVENTS + LIVE_EVENTS]
    path = checkpoint(tmp_path, train, ml100k.movies, ml100k.genre_vocab, name="toy")
    model, _ = load_checkpoint(path)
    assert model.name == "toy"
    pub = ModelStore(sync_redis(stack.redis), ns.prefix).publish(model, reason="toy family e2e")

    env = ns.env(256, PORT)
    env["FBP_WORKER__CHECKPOINT"] = str(tmp_path / "nothing-here")  # must serve the published toy
    worker = procs.start_worker(PORT, tmp_path, env)
    try:
        health = httpx.get(f"{worker.url}/health", timeout=10).json()
        assert (health["model"], health["model_version"]) == ("toy", pub.version), health
        replay(ns.scoped(), live, progress=False, name="toy")
        recs = read_topic(stack, ns.predictions, until=len(live), timeout=300)
        user = int(live.iloc[-1]["user_id"])
        top = httpx.get(f"{worker.url}/api/v1/users/{user}/top?k=5", timeout=10).json()
    finally:
        assert worker.stop() == 0, worker.tail()

    by_id = {r["event_id"]: r for r in recs}
    # simulate() predicts in stream order (by ts, ties by row); replay ids carry the row's index
    order = np.lexsort((np.arange(len(live)), live["ts"].to_numpy()))
    ids = [f"toy-{i}" for i in live.index[order]]
    assert set(by_id) == set(ids), f"{len(set(ids) - set(by_id))} events without a prediction"
    assert {r["model_version"] for r in recs} == {pub.version}
    assert all(len(r["top_k"]) == 10 for r in recs)
    assert len(top["top"]) == 5 and top["known_user"]

    # the worker's predictions and stored states are the in-process reference's
    ref, uindex, ref_states = simulate(model, live)
    got = np.array([by_id[i]["predicted"] for i in ids], dtype=np.float64)
    assert np.max(np.abs(got - ref)) < 1e-3
    assert got.std() > 0.05  # not a constant: the comparison above can fail
    stored, absent = redis_states(ns, model, uindex)
    assert not absent and state_mismatches(stored, ref_states) == 0
    print(f"toy family: {len(recs)} predictions for {len(live)} events, "
          f"max |stream - simulator| {np.max(np.abs(got - ref)):.2e}")


def test_toy_online_side_is_learned_and_shared_through_the_protocol(stack, ns, ml100k, tmp_path):
    """A second online family (the toy's ``online=True``): the worker loads,
    learns and stores its movie side with no code of its own; predictions and
    the rows in Redis equal the in-process reference replaying the worker's
    own batches."""
    ratings = ml100k.ratings
    train, live = ratings.iloc[:TRAIN_EVENTS], ratings.iloc[TRAIN_EVENTS:TRAIN_EVENTS + LIVE_EVENTS]
    path = checkpoint(tmp_path, train, ml100k.movies, ml100k.genre_vocab, name="toy", online=True)
    model, _ = load_checkpoint(path)
    assert model.movie_side() is not None
    before = model.movie_side().t["o"].clone()
    pub = ModelStore(sync_redis(stack.redis), ns.prefix).publish(model, reason="toy online side e2e")

    env = ns.env(256, ONLINE_PORT)
    env["FBP_WORKER__CHECKPOINT"] = str(tmp_path / "nothing-here")
    env["FBP_WORKER__ONLINE_MOVIE_SIDE"] = "true"
    worker = procs.start_worker(ONLINE_PORT, tmp_path, env)
    try:
        replay(ns.scoped(), live, progress=False, name="toy")
        recs = read_topic(stack, ns.predictions, until=len(live), timeout=300)
    finally:
        assert worker.stop() == 0, worker.tail()

    by_id = {r["event_id"]: r for r in recs}
    order = np.lexsort((np.arange(len(live)), live["ts"].to_numpy()))
    ids = [f"toy-{i}" for i in live.index[order]]
    assert set(by_id) == set(ids) and {r["model_version"] for r in recs} == {pub.version}
    # the side learns per batch: replay the worker's own batches (one produced_at each)
    pos = {e: i for i, e in enumerate(ids)}
    groups: dict[float, list[int]] = {}
    for r in by_id.values():
        groups.setdefault(r["produced_at"], []).append(pos[r["event_id"]])
    ref, _, _ = simulate(model, live, batches=[np.array(groups[t]) for t in sorted(groups)], learn_movies=True)
    got = np.array([by_id[i]["predicted"] for i in ids], dtype=np.float64)
    assert np.max(np.abs(got - ref)) < 1e-3

    movies = np.unique(live["movie_id"].to_numpy())
    stored = redis_movie_bias(ns, model, movies.tolist())
    learned = model.movie_side().t["o"][movies]
    moved = int(((stored - before[movies]).abs() > 1e-6).sum())
    assert moved > 100, f"only {moved} of {len(movies)} movie rows moved in Redis"
    assert float((stored - learned).abs().max()) < 1e-4
    print(f"toy online side: {moved} of {len(movies)} rows learned in Redis, "
          f"max |stream - simulator| {np.max(np.abs(got - ref)):.2e}")
