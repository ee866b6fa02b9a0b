"""The Kafka broker stopped and restarted in the middle of a replay."""

from __future__ import annotations

import time

import pytest

from stack import service_healthy, start_service, stop_service

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(420)]


def test_kafka_broker_restart_mid_replay(scenario):
    """Broker down ~5 s at 35% of the stream.  The replay's idempotent producer
    retries (no event lost or duplicated on the ratings topic), and the *same*
    worker process rides out the outage (aiokafka reconnects; nothing is
    restarted by the test)."""
    sc = scenario("kafka_restart", port=6192, seed=1)
    worker = sc.start_worker()
    sc.feed(rate=800)
    try:
        sc.wait_fraction(0.35)
        assert stop_service("kafka", sc.settings) is True
        sc.faults += 1
        down_at = time.monotonic()
        time.sleep(5)
        assert worker.alive(), "worker died while the broker was down:\n" + worker.tail()
        start_service("kafka", sc.settings, timeout_s=120)
        assert service_healthy("kafka", sc.settings)
        print(f"  broker down for {time.monotonic() - down_at:.1f}s")
        sc.join_feed()
        assert worker.alive(), "worker died after the broker came back:\n" + worker.tail()
        sc.verify([worker], timeout=360)
    finally:
        worker.kill()
