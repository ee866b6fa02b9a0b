"""The streaming predictor end to end: real Kafka, Redis, Prometheus and
``fbp worker`` processes.  Each test uses its own topics and Redis prefix."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

from stack.procs import Namespace

import httpx
import numpy as np
import orjson
import pytest
from kafka import KafkaProducer

from stack import procs
from models.checkpoint import load_checkpoint
from stream.replay import replay
from tests.streamkit import FROZEN_MOVIE_SIDE, metric, read_topic, redis_movie_bias, redis_states, simulate, state_mismatches
from trainer.prequential import stream_order

pytestmark = pytest.mark.integration


def _env(ns: Namespace, ckpt: Path, port: int, batch: int = 512) -> dict[str, str]:
    env = {**ns.env(batch, port), **FROZEN_MOVIE_SIDE}  # exact-state oracles; the learned path opts in
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    return env


def _by_event(records: list[dict]) -> dict[str, dict]:
    return {r["event_id"]: r for r in records}


def test_replay_ml100k_matches_prequential_simulator(stack, ns, ckpt, ml100k, tmp_path):
    """One record per event id; online RMSE from the records equals the
    in-process simulator's for the same checkpoint (and so do the predictions)."""
    df = ml100k.ratings
    env = _env(ns, ckpt, 6081)
    env["FBP_WORKER__ONLINE_MOVIE_SIDE"] = "true"  # the path under test: movie side learned, shared in Redis
    worker = procs.start_worker(6081, tmp_path, env)
    try:
        replay(ns.scoped(), ml100k, progress=False)
        recs = read_topic(stack, ns.predictions, until=len(df), timeout=600)
    finally:
        assert worker.stop() == 0, worker.tail()
    by_id = _by_event(recs)
    assert len(by_id) == len(df), f"{len(by_id)} distinct predictions for {len(df)} events"
    assert len(recs) == len(df), "an undisturbed run must not repeat a record"

    model, _ = load_checkpoint(ckpt)
    order = stream_order(df)
    ids = [f"ml-100k-{i}" for i in order.index]  # replay ids use the row index
    # the online movie side learns per batch, so the simulator replays the
    # worker's own batches: one produced_at per batch, in the order it ran them
    pos = {e: i for i, e in enumerate(ids)}
    groups: dict[float, list[int]] = {}
    for r in by_id.values():
        groups.setdefault(r["produced_at"], []).append(pos[r["event_id"]])
    ref, _, _ = simulate(model, df, batches=[np.array(groups[t]) for t in sorted(groups)], learn_movies=True)
    before = load_checkpoint(ckpt)[0].movie_side().t["b"]
    learned = redis_movie_bias(ns, model, range(before.shape[0]))
    moved = int(((learned - before[: len(learned)]).abs() > 1e-6).sum())  # NaN (no row) never counts
    print(f"movie biases changed in Redis: {moved} of {len(learned)}")
    assert moved > 100, "the movie side in Redis must have learned"
    got = np.array([by_id[i]["predicted"] for i in ids], dtype=np.float64)
    actual = order["rating"].to_numpy(np.float64)
    rmse_stream = math.sqrt(np.mean((got - actual) ** 2))
    rmse_sim = math.sqrt(np.mean((ref - actual) ** 2))
    print(f"online RMSE stream {rmse_stream:.5f} vs simulator {rmse_sim:.5f}")
    assert abs(rmse_stream - rmse_sim) < 0.002
    assert np.max(np.abs(got - ref)) < 1e-3
    rec = by_id[ids[-1]]
    assert rec["model_version"] == 1 and len(rec["top_k"]) == 10
    assert rec["timings"]["event_to_prediction_ms"] >= 0


def test_sigkill_mid_replay_loses_nothing(stack, ns, ckpt, ml100k, tmp_path):
    """Kill -9 the worker twice mid-replay: no missing prediction, and the final
    Redis state equals the undisturbed reference."""
    df = ml100k.ratings.iloc[:20_000]
    env = _env(ns, ckpt, 6082, batch=256)
    worker = procs.start_worker(6082, tmp_path, env)
    feeder = threading.Thread(target=replay, args=(ns.scoped(), df), kwargs={"rate": 1500, "progress": False})
    feeder.start()  # paced, so the kills land mid-stream
    kills = 0
    seen = 0

    def note(n: int) -> None:
        nonlocal seen
        seen = n

    for frac in (0.3, 0.65):
        read_topic(stack, ns.predictions, until=int(len(df) * frac), timeout=300, on_progress=note)
        worker.kill()
        kills += 1
        worker = procs.start_worker(6082, tmp_path, env)
    feeder.join()
    recs = read_topic(stack, ns.predictions, until=len(df), timeout=300)
    worker.stop()
    by_id = _by_event(recs)
    missing = len(df) - len(by_id)
    model, _ = load_checkpoint(ckpt)
    ref_preds, uindex, ref_states = simulate(model, df)
    got, absent = redis_states(ns, model, uindex)
    mismatches = state_mismatches(got, ref_states)
    print(f"events {len(df)} kills {kills} missing {missing} duplicates {len(recs) - len(by_id)} "
          f"state mismatches {mismatches}")
    assert kills == 2 and missing == 0 and not absent and mismatches == 0
    # a repeated record (redelivery) carries the same prediction as the first
    first: dict[str, float] = {}
    for r in recs:
        assert abs(first.setdefault(r["event_id"], r["predicted"]) - r["predicted"]) < 1e-5


def test_two_workers_share_and_take_over(stack, ns, ckpt, ml100k, tmp_path):
    """Two workers in one group; one stops mid-stream; the other takes over."""
    df = ml100k.ratings.iloc[:20_000]
    a = procs.start_worker(6083, tmp_path, _env(ns, ckpt, 6083))
    b = procs.start_worker(6084, tmp_path, _env(ns, ckpt, 6084))
    t = threading.Thread(target=replay, args=(ns.scoped(), df), kwargs={"rate": 2000, "progress": False})
    t.start()
    read_topic(stack, ns.predictions, until=6000, timeout=300)
    done_b = metric(b.url, "fbp_events_processed_total")
    assert b.stop() == 0
    t.join()
    recs = read_topic(stack, ns.predictions, until=len(df), timeout=300)
    done_a = metric(a.url, "fbp_events_processed_total")
    a.stop()
    by_id = _by_event(recs)
    model, _ = load_checkpoint(ckpt)
    _, uindex, ref_states = simulate(model, df)
    got, absent = redis_states(ns, model, uindex)
    print(f"worker A {done_a:.0f} events, worker B {done_b:.0f} before stopping; "
          f"missing {len(df) - len(by_id)}")
    assert done_b > 0 and done_a > 0, "both workers must have had partitions"
    assert len(by_id) == len(df) and not absent
    assert state_mismatches(got, ref_states) == 0


def test_bad_events_go_to_dlq_and_worker_keeps_going(stack, ns, ckpt, tmp_path):
    worker = procs.start_worker(6085, tmp_path, _env(ns, ckpt, 6085))
    p = KafkaProducer(**stack.kafka.kafka_python_kwargs())
    bad = {
        b"{not json": "bad_json",
        b"\xff\xfe": "bad_encoding",
        b'{"event_id":"x1","user_id":1,"movie_id":2,"rating":9,"ts":880000000}': "rating_out_of_range",
        b'{"event_id":"x2","user_id":1,"movie_id":2,"ts":880000000}': "missing_field",
    }
    for raw in bad:
        p.send(ns.ratings, key=b"1", value=raw)
    good = [{"event_id": f"g{i}", "user_id": 1, "movie_id": 10 + i, "rating": 4, "ts": 880000000 + i}
            for i in range(5)]
    for ev in good:
        p.send(ns.ratings, key=b"1", value=orjson.dumps(ev))
    p.flush()
    preds = read_topic(stack, ns.predictions, until=5, timeout=120)
    dlq = read_topic(stack, ns.dlq, until=4, timeout=60, by_event_id=False)
    worker.stop()
    assert sorted(r["event_id"] for r in preds) == [f"g{i}" for i in range(5)]
    reasons = sorted(r["reason"] for r in dlq)
    assert reasons == sorted(bad.values())


def test_api_and_prometheus_scrape(stack, ns, ckpt, ml100k, tmp_path):
    """The query API answers (and 4xx's bad requests); the stack's Prometheus
    scrapes the worker's /metrics (port 6066 is a configured scrape target)."""
    port = stack.stack.scrape_targets[0].rsplit(":", 1)[1]
    worker = procs.start_worker(int(port), tmp_path, _env(ns, ckpt, int(port)))
    try:
        replay(ns.scoped(), ml100k.ratings.iloc[:3000], progress=False)
        read_topic(stack, ns.predictions, until=3000, timeout=120)
        user = int(ml100k.ratings.iloc[0]["user_id"])
        url = worker.url
        prof = httpx.get(f"{url}/api/v1/users/{user}/profile").json()
        assert prof["known_user"] and prof["ratings"] > 0
        top = httpx.get(f"{url}/api/v1/users/{user}/top?k=5").json()
        assert len(top["top"]) == 5
        sc = httpx.get(f"{url}/api/v1/users/{user}/scores?movies=1,50,999999").json()
        assert set(sc["scores"]) == {"1", "50", "999999"}
        assert httpx.get(f"{url}/api/v1/users/999999999/profile").json()["known_user"] is False
        for bad in ("/api/v1/users/abc/top", "/api/v1/users/1/top?k=0", "/api/v1/users/1/scores",
                    "/api/v1/users/1/scores?movies=a,b", "/api/v1/users/-1/profile"):
            r = httpx.get(url + bad)
            assert r.status_code == 400, (bad, r.status_code, r.text)
            assert "error" in r.json()
        assert httpx.post(f"{url}/api/v1/admin/reload").status_code == 403  # no admin token set

        prom = f"http://127.0.0.1:{stack.stack.prometheus_port}/api/v1/query"
        deadline = time.monotonic() + 60
        value = 0.0
        while time.monotonic() < deadline and value < 3000:
            res = httpx.get(prom, params={"query": f'fbp_events_processed_total{{instance="127.0.0.1:{port}"}}'}).json()
            value = float(res["data"]["result"][0]["value"][1]) if res["data"]["result"] else 0.0
            time.sleep(1)
        assert value >= 3000, "Prometheus did not scrape the worker's series"
    finally:
        worker.stop()


