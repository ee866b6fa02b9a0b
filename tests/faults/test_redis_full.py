"""Redis reaches ``maxmemory`` mid-replay, and Redis runs an eviction policy.

Full (``noeviction``): the worker must not exit (a restarted one would meet
the same full Redis) nor commit what it did not store.  It pauses with a
message naming what to raise, resends the refused writes with backoff, and
goes on by itself once Redis has room: every event predicted once, every
user's state exactly the undisturbed run's (nothing lost, nothing applied
twice).

Eviction policy: the worker refuses to start (see tests/test_redis_full.py for
what such a policy does to states and watermarks).
"""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from stack import procs

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(420)]


def _wait_for(what: str, cond, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _produced(sc) -> int:
    """Events in the ratings topic so far (its end offsets summed)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(**sc.settings.kafka.kafka_python_kwargs(), group_id=None)
    try:
        tps = [TopicPartition(sc.ns.ratings, p) for p in range(sc.ns.partitions)]
        return sum(c.end_offsets(tps).values())
    finally:
        c.close()


@pytest.mark.parametrize("online", [False, True], ids=["frozen", "online_movie_side"])
def test_a_full_redis_pauses_the_worker_and_loses_nothing(scenario, online):
    """Also with the online movie side (the default), whose refused
    increments are resent once each: then the online oracle (network states
    exact, online RMSE within 0.002 of the undisturbed run)."""
    from tests.streamkit import read_topic

    sc = scenario("redis_full" + ("_online" if online else ""), port=6203 if online else 6201, seed=5,
                  online_movie_side=online)
    r = redis.Redis.from_url(sc.settings.redis.url)
    workers = [sc.start_worker()]
    sc.feed(rate=800)
    try:
        sc.wait_fraction(0.3)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) - 512 * 1024))
        sc.faults += 1
        log = workers[0].log
        _wait_for("the full-Redis message", lambda: "Redis is full" in log.read_text(errors="replace"))
        text = log.read_text(errors="replace")
        assert "maxmemory" in text and "FBP_STATE__IDLE_TTL_S" in text
        # paused: 1,000+ more events arrive while Redis gains no key
        keys_then, produced_then = r.dbsize(), _produced(sc)
        _wait_for("1,000 more events", lambda: _produced(sc) > produced_then + 1000)
        assert r.dbsize() == keys_then and workers[0].alive()
        assert "fbp_redis_full 1.0" in httpx.get(workers[0].url + "/metrics", timeout=5).text
        print(f"  Redis full: worker paused while events {produced_then} -> {_produced(sc)} arrived; "
              f"{keys_then} keys")
        r.config_set("maxmemory", "0")
        sc.join_feed()
        if online:
            sc.verify_online(workers, timeout=360)
        else:
            sc.verify(workers, timeout=360)
        text = log.read_text(errors="replace")
        assert "resumed after" in text and "exiting (75)" not in text
        recs = read_topic(sc.settings, sc.ns.predictions, until=len(sc.df), timeout=60)
        repeats = len(recs) - len({x["event_id"] for x in recs})
        print(f"  prediction records {len(recs)}, repeats {repeats}")
        assert repeats == 0, "a pause must not redeliver anything"
    finally:
        r.config_set("maxmemory", "0")
        r.close()
        for w in workers:
            w.kill()


def test_the_worker_refuses_to_start_under_an_eviction_policy(scenario):
    sc = scenario("redis_evicting", port=6202, seed=6)
    r = redis.Redis.from_url(sc.settings.redis.url)
    r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        w = procs.start_worker(sc.port, sc.logdir, sc.env(), wait=False)
        try:
            code = w.popen.wait(timeout=60)
        finally:
            w.kill()
        print(f"  worker exit code {code}: {w.tail(3)}")
        assert code == 2
        assert "refusing to start" in w.tail() and "noeviction" in w.tail()
        env = dict(sc.env(), FBP_STATE__ALLOW_EVICTION="true")
        w = procs.start_worker(sc.port, sc.logdir, env)  # healthy: started anyway, warning
        try:
            assert "WARNING" in w.tail(200) and "allkeys-lru" in w.tail(200)
        finally:
            w.kill()
    finally:
        r.config_set("maxmemory-policy", "noeviction")
        r.close()
