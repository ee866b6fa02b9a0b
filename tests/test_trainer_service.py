"""The fine-tuning service: buffer (bounded, persistent, exactly-once),
triggers (schedule, drift), and a real ``fbp trainer`` process on its own
namespace (request trigger, promotion + announcement, restart without
re-buffering)."""

from __future__ import annotations

import time
import uuid

import httpx
import numpy as np
import pytest

from core.repos.buffer import BufferedEvent, EventBuffer, reservoir_slots
from core.repos.trainer import TrainerStore
from trainer.service import DriftMonitor, Schedule
from tests.streamkit import metric


# -- triggers (pure) ------------------------------------------------------------
def test_schedule_every_n_events_or_t_seconds_whichever_first():
    s = Schedule(every_events=1000, every_s=60, min_new=10, seq=0, now=0.0)
    assert s.due(999, 30) is None
    assert s.due(1000, 30) == "events"
    assert s.due(5, 61) is None  # time is up but too few new events
    assert s.due(10, 61) == "time"
    s.ran(1000, 100.0)
    assert s.due(1500, 120) is None and s.due(2000, 120) == "events"


def test_drift_fires_when_rolling_rmse_exceeds_rmse_at_promotion_by_margin():
    d = DriftMonitor(window=100, margin=0.1)
    rng = np.random.default_rng(0)
    for e in rng.normal(0, 0.9, 100):  # the first window after promotion: RMSE ~0.9
        d.add(2, 3.0 + e, 3.0)
    assert d.baseline is not None and abs(d.baseline - 0.9) < 0.15
    for e in rng.normal(0, 0.9, 100):  # same error level: no drift
        d.add(2, 3.0 + e, 3.0)
    assert not d.due()
    for e in rng.normal(0, 1.4, 100):  # error grows well past the margin
        d.add(2, 3.0 + e, 3.0)
    assert d.due(), (d.rmse, d.baseline)
    d.rearm()
    assert not d.due()  # at most once per window
    d.add(3, 4.0, 3.0)  # a new version starts a new baseline
    assert d.baseline is None and not d.due()


def test_reservoir_is_uniform_and_deterministic():
    seq = np.arange(200_000)
    a = reservoir_slots(7, seq, 1000)
    assert np.array_equal(a, reservoir_slots(7, seq, 1000))  # same on a restart
    assert np.array_equal(a[:1000], np.arange(1000))
    # last writer per slot = the sample; roughly uniform over the stream
    final = np.full(1000, -1)
    for i, s in enumerate(a):
        if s >= 0:
            final[s] = i
    assert (final >= 0).all()
    frac_first_half = np.mean(final < 100_000)
    assert 0.42 < frac_first_half < 0.58, frac_first_half


# -- the buffer in Redis -----------------------------------------------------------
@pytest.fixture
def rprefix(stack):
    from core.redis_conn import sync_redis
    from core.repos.keys import drop_namespace

    r = sync_redis(stack.redis)
    prefix = f"test-buf-{uuid.uuid4().hex[:8]}"
    yield r, prefix
    drop_namespace(r, prefix)


def _evs(a: int, b: int) -> list[BufferedEvent]:
    return [BufferedEvent(i % 37, 1 + i % 500, float(1 + i % 5), 880_000_000 + i, 1e9 + i) for i in range(a, b)]


def test_buffer_is_bounded_and_survives_a_restart(rprefix):
    r, prefix = rprefix
    buf = EventBuffer(r, prefix, capacity=1000, reservoir=300, seed=0)
    for a in range(0, 5000, 700):
        b = min(5000, a + 700)
        buf.append(_evs(a, b), {("ratings", 0): b})
    assert len(buf) == 1000 and buf.seq == 5000
    rec = buf.recent()
    assert rec["seq"].tolist() == list(range(4000, 5000))  # the newest, in order
    assert rec["ts"].tolist() == [880_000_000 + i for i in range(4000, 5000)]
    sample = buf.sample()
    assert len(sample) == 300 and (sample["seq"] < 4000).sum() > 200  # mostly older events
    # a "restart": a new object over the same keys sees the same buffer and offsets
    again = EventBuffer(r, prefix, capacity=1000, reservoir=300, seed=0)
    assert again.seq == 5000 and len(again) == 1000
    assert np.array_equal(again.recent(), rec) and np.array_equal(again.sample(), sample)
    assert not again.fresh("ratings", 0, 4999) and again.fresh("ratings", 0, 5000)
    assert again.fresh("ratings", 1, 0)
    again.append(_evs(5000, 5010), {("ratings", 0): 5010})
    assert again.recent()["seq"][-1] == 5009 and len(again) == 1000


# -- a real trainer process (the ``ns`` fixture of tests/conftest.py) ---------------
def free_port() -> int:
    """A port nothing listens on now (tests share this machine with other test runs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trainer_env(ns, **trainer: str) -> dict[str, str]:
    env = ns.env(256, 0)
    env.pop("FBP_WORKER__WEB_PORT")
    env.update({
        "FBP_TRAINER__APP_ID": f"{ns.prefix}-trainer",
        "FBP_TRAINER__DEVICE": "cpu",
        "FBP_TRAINER__THREADS": "1",
    })
    env.update({f"FBP_TRAINER__{k.upper()}": v for k, v in trainer.items()})
    return env


def wait_http(url: str, proc, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.alive(), proc.tail()
        try:
            return httpx.get(url + "/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            time.sleep(0.5)
    raise TimeoutError(proc.tail())


def wait_for(fn, timeout: float, proc, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        assert proc.alive(), proc.tail()
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n{proc.tail(80)}")


def test_trainer_buffers_exactly_once_across_kill_and_promotes_on_request(stack, ns, tmp_path):
    """Replay 6000 events; kill -9 the trainer after 3000 and restart it in a
    fresh consumer group (so Kafka redelivers all of them): the buffer holds
    each event once.  A request on the Redis list starts a
    fine-tune whose challenger (fine-tuned from an untrained model) wins, is
    published as a new version and announced on model-updates."""
    from stack import procs
    from models.checkpoint import save_checkpoint
    from models.registry import build
    from core.repos.models import ModelStore
    from core.redis_conn import sync_redis
    from stream.replay import replay
    from core.datasets import load_dataset

    df = load_dataset("ml-100k").ratings.iloc[:6000]
    ckpt = tmp_path / "baseline"
    save_checkpoint(build("baseline"), ckpt)  # untrained: any fine-tune beats it
    env = trainer_env(ns, finetune_every_events="1000000", finetune_every_s="100000",
                      buffer_events="4000", reservoir_events="1000", finetune_epochs="2")
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    port = free_port()
    r = sync_redis(stack.redis)
    seq = lambda: EventBuffer(r, ns.prefix, capacity=1).seq  # noqa: E731
    t = procs.start_trainer(port, tmp_path, env)
    try:
        wait_http(t.url, t)
        replay(ns.scoped(), df.iloc[:3000], progress=False)
        wait_for(lambda: seq() >= 1500, 120, t, "half the events buffered")
        t.kill()  # SIGKILL mid-stream
        # Restart in a new consumer group: Kafka has no committed offsets for it, so
        # everything is read again from the start -- the buffer's own offsets in
        # Redis must keep each event to one copy (as after a crash before a commit).
        env["FBP_TRAINER__APP_ID"] = f"{ns.prefix}-trainer-2"
        t = procs.start_trainer(port, tmp_path, env)
        replay(ns.scoped(), df.iloc[3000:], progress=False)
        wait_for(lambda: seq() >= 6000, 120, t, "all events buffered")
        time.sleep(3)
        h = wait_http(t.url, t)
        assert h["seq"] == 6000 and h["buffer_events"] == 4000, h
        buf = EventBuffer(r, ns.prefix, capacity=4000, reservoir=1000)
        rec = buf.recent()
        assert rec["seq"].tolist() == list(range(2000, 6000))
        keys = set(zip(rec["user"].tolist(), rec["movie"].tolist(), rec["ts"].tolist()))
        assert len(keys) == 4000  # (user, movie) is unique in ML-100K: no event twice
        allkeys = set(zip(df.user_id.tolist(), df.movie_id.tolist(), df.ts.tolist()))
        assert keys <= allkeys
        assert metric(t.url, "fbp_trainer_buffer_events") == 4000

        TrainerStore(r, ns.prefix).request_finetune()
        wait_for(lambda: metric(t.url, "fbp_finetune_runs_total", trigger="request") > 0, 150, t,
                 "the requested fine-tune")
        assert metric(t.url, "fbp_finetune_runs_total", outcome="promoted", trigger="request") == 1, t.tail()
        store = ModelStore(r, ns.prefix)
        cur = store.current()
        assert cur is not None and cur.version >= 1
        assert "promoted by trainer (request)" in cur.meta["reason"]
        model = store.load(cur.version)
        assert model.name == "baseline"
        champ = metric(t.url, "fbp_finetune_holdout_rmse", role="champion")
        chall = metric(t.url, "fbp_finetune_holdout_rmse", role="challenger")
        print(f"holdout RMSE champion {champ:.4f} challenger {chall:.4f}")
        assert chall < champ
        assert "finetune decision" in t.tail(200) and '"outcome":"promoted"' in t.tail(200)
        from tests.streamkit import read_topic

        ann = read_topic(stack, ns.model_updates, until=1, timeout=30)
        assert ann and ann[0]["version"] == cur.version and ann[0]["sha256"] == cur.sha256
        assert ann[0]["metrics"]["challenger_rmse"] < ann[0]["metrics"]["champion_rmse"]
    finally:
        t.stop()
