"""The worker SIGKILLed at seeded random points, several times in one replay."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(420)]

KILLS = 4
SEED = 20240606


def test_worker_sigkill_at_random_points(scenario):
    """Four kill -9s at random progress points (and random delays within a
    batch); a fresh worker is started after each.  Produce-before-store plus
    the Redis watermark: repeats allowed, nothing missing, state exact."""
    sc = scenario("worker_sigkill", port=6191, seed=SEED)
    # Kill points: sorted random fractions of the predictions seen, and a
    # random 0-0.7 s delay after reaching each, so kills land inside batches.
    points = sorted(sc.rng.uniform(0.05, 0.9) for _ in range(KILLS))
    delays = [sc.rng.uniform(0.0, 0.7) for _ in range(KILLS)]
    worker = sc.start_worker()
    sc.feed(rate=700)
    worker = sc.kill_at(worker, points, delays)
    try:
        sc.join_feed()
        sc.verify([worker])
    finally:
        worker.kill()
    assert sc.faults == KILLS
