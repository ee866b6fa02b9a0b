"""Redis restarted gracefully, and Redis killed with SIGKILL, mid-replay.

Durability: the suite's Redis runs with ``appendonly yes`` and
``appendfsync always`` (``StackSettings.redis_appendfsync``), so every state
write the worker was told succeeded is on disk before the reply.  That is what
makes a SIGKILL lossless here: a state+watermark that Redis acknowledged can
only be *ahead of or equal to* what the worker later commits to Kafka, never
lost behind it.  With ``everysec`` a SIGKILL may drop up to ~1 s of
acknowledged writes while the Kafka offsets of those events are already
committed; those events are then never redelivered and the state silently
falls behind (see README.md, "Guarantees") -- that is a configuration this suite
does not claim to survive, so it is not tested here (it would be a flaky
"sometimes loses" test).
"""

from __future__ import annotations

import signal
import time

import pytest

from stack import service_dir, start_service, stop_service

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(420)]


def _appendfsync(settings) -> str:
    conf = (service_dir("redis", settings) / "redis.conf").read_text()
    return next(line.split()[1] for line in conf.splitlines() if line.startswith("appendfsync"))


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_redis_restart_mid_replay(scenario, how):
    sig = signal.SIGTERM if how == "sigterm" else signal.SIGKILL
    sc = scenario(f"redis_{how}", port=6193 if how == "sigterm" else 6194, seed=2)
    assert _appendfsync(sc.settings) == "always"
    workers = [sc.start_worker()]
    sc.feed(rate=800)
    try:
        sc.wait_fraction(0.4)
        assert stop_service("redis", sc.settings, sig) is True
        sc.faults += 1
        time.sleep(1.0)
        start_service("redis", sc.settings, timeout_s=60)
        sc.wait_fraction(0.7)
        # A second outage, longer than redis-py's own retries ride out.
        assert stop_service("redis", sc.settings, sig) is True
        sc.faults += 1
        time.sleep(4.0)
        start_service("redis", sc.settings, timeout_s=60)
        sc.join_feed()
        if not workers[0].alive():
            # Documented behaviour when Redis is away longer than the client's
            # retries: the worker exits non-zero *without* committing the failed
            # batch; a supervisor (systemd, k8s, compose restart) starts it again.
            print(f"  worker exited ({workers[0].popen.returncode}) during the outage; restarting")
            workers.append(sc.start_worker())
        sc.verify(workers, timeout=360)
    finally:
        for w in workers:
            w.kill()


def test_redis_outage_longer_than_retries_fails_stop(scenario):
    """Redis away for longer than the worker's ~60 s of retries: the worker must
    *fail stop* (exit 75) before acknowledging the batch it could not store,
    so that batch is redelivered to its replacement -- nothing missing, state
    exact.  (Without the fail-stop, Faust's take_events would acknowledge the
    failed batch and its events would never be applied.)"""
    sc = scenario("redis_long_outage", port=6198, seed=4)
    workers = [sc.start_worker()]
    sc.feed(rate=800)
    try:
        sc.wait_fraction(0.4)
        assert stop_service("redis", sc.settings, signal.SIGKILL) is True
        sc.faults += 1
        t0 = time.monotonic()
        try:
            code = workers[0].popen.wait(timeout=150)
        except Exception:  # noqa: BLE001
            code = None
        print(f"  worker exited with {code} after {time.monotonic() - t0:.0f}s of Redis outage")
        assert code == 75, "worker must fail stop (75) when Redis stays away:\n" + workers[0].tail()
        assert "without committing it" in workers[0].log.read_text(errors="replace")
        start_service("redis", sc.settings, timeout_s=60)
        workers.append(sc.start_worker())
        sc.join_feed()
        sc.verify(workers, timeout=360)
    finally:
        for w in workers:
            w.kill()
