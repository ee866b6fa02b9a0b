"""The fine-tuning service SIGKILLed in the middle of a fine-tune."""

from __future__ import annotations

import time

import httpx
import pytest

from stack import procs

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(480)]


def _health(proc: procs.Proc) -> dict | None:
    try:
        return httpx.get(proc.url + "/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


def _serving(worker: procs.Proc) -> int:
    return int(httpx.get(worker.url + "/health", timeout=5).json()["model_version"])


def test_trainer_sigkill_during_finetune(scenario):
    """Kill -9 the trainer while a fine-tune runs: the serving model (published
    pointer, the worker's model, every stored version) is untouched; a new
    trainer resumes its buffer where the Redis offsets say (each event buffered
    exactly once) and its next run completes.  Promotion is disabled (margin
    100) so the stream's state can still be compared with the reference."""
    from core.repos.models import ModelStore
    from core.redis_conn import sync_redis
    from core.repos.buffer import EventBuffer
    from core.repos.trainer import TrainerStore

    sc = scenario("trainer_sigkill", port=6195, seed=3)
    ns = sc.ns
    tport = 6196
    tenv = sc.env()
    tenv.update({
        "FBP_TRAINER__APP_ID": f"{ns.prefix}-trainer",
        "FBP_KAFKA__MODEL_UPDATES_TOPIC": f"{ns.prefix}-updates",
        "FBP_TRAINER__FINETUNE_EVERY_EVENTS": "10000000",  # only requests trigger runs
        "FBP_TRAINER__FINETUNE_EVERY_S": "1000000",
        "FBP_TRAINER__PROMOTE_MARGIN": "100",
        "FBP_TRAINER__DRIFT_MARGIN": "100",
        "FBP_TRAINER__FINETUNE_EPOCHS": "3",
        "FBP_TRAINER__BUFFER_EVENTS": "20000",
        "FBP_TRAINER__THREADS": "1",
        "FBP_TRAINER__DEVICE": "cpu",
    })
    r = sync_redis(sc.settings.redis)
    store = ModelStore(r, ns.prefix)
    control = TrainerStore(r, ns.prefix)

    worker = sc.start_worker()
    before = (store.current(), store.versions(), _serving(worker))
    trainer = procs.start_trainer(tport, sc.logdir, tenv)
    procs.wait_healthy(trainer, timeout=120)
    sc.feed(rate=800)
    try:
        sc.wait_fraction(0.3)
        control.request_finetune(by="fault-test")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            h = _health(trainer)
            if h and h.get("running"):
                break
            assert trainer.alive(), trainer.tail()
            time.sleep(0.05)
        else:
            pytest.fail("the requested fine-tune never started:\n" + trainer.tail())
        time.sleep(sc.rng.uniform(0.2, 1.0))
        running = _health(trainer)
        trainer.kill()
        sc.faults += 1
        print(f"  trainer killed during a fine-tune ({running and running.get('running')}), "
              f"{sc.progress} predicted")
        # the serving model is unaffected
        after = (store.current(), store.versions(), _serving(worker))
        assert after == before, (before, after)
        assert control.decisions() == [], "the killed run must not have recorded a decision"

        trainer = procs.start_trainer(tport, sc.logdir, tenv)
        procs.wait_healthy(trainer, timeout=120)
        control.request_finetune(by="fault-test")
        deadline = time.monotonic() + 240
        while not control.decisions(1) and time.monotonic() < deadline:
            assert trainer.alive(), trainer.tail()
            time.sleep(0.5)
        assert control.decisions(1), "the restarted trainer never finished a run:\n" + trainer.tail()
        rec = control.decisions(1)[0]
        print(f"  next run: outcome={rec.get('outcome')} trigger={rec.get('trigger')} "
              f"error={rec.get('error')}")
        assert rec["outcome"] in ("rejected", "skipped", "promoted") and rec["outcome"] != "failed"
        assert (store.current(), store.versions()) == before[:2]  # margin 100: nothing promoted

        sc.join_feed()
        # every event buffered exactly once across the kill (Redis offsets authoritative)
        deadline = time.monotonic() + 120
        seq = -1
        while time.monotonic() < deadline:
            seq = EventBuffer(r, ns.prefix, capacity=20000, reservoir=0).seq
            if seq >= len(sc.df):
                break
            time.sleep(0.5)
        assert seq == len(sc.df), f"trainer buffer holds seq {seq} for {len(sc.df)} events"
        assert _serving(worker) == before[2]
        sc.verify([worker])
    finally:
        trainer.kill()
        worker.kill()
