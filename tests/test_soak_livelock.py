"""fbp bench soak counts Faust's livelock warnings from the worker log."""

from __future__ import annotations

from faust.transport.drivers import aiokafka as fa

from bench.soak import livelock_markers, livelock_warnings


def test_every_faust_livelock_message_is_recognised_and_nothing_else():
    messages = [fa.SLOW_PROCESSING_STREAM_IDLE % ("TP(topic='ratings', partition=2)", "3 minutes ago"),
                fa.SLOW_PROCESSING_NO_RECENT_COMMIT % ("TP(topic='ratings', partition=0)", "2 minutes ago"),
                fa.SLOW_PROCESSING_NO_FETCH_SINCE_START % ("TP(topic='ratings', partition=1)", "1 minute ago")]
    log = "\n".join([
        "[2026-12-04 18:00:00,000] [123] [INFO] fbp.worker: started",
        *(f"[2026-12-04 18:00:01,000] [123] [ERROR] [^--AIOKafkaConsumerThread]: {m}" for m in messages),
        "[2026-12-04 18:00:02,000] [123] [WARNING] Heartbeat failed for group fbp: rebalancing",
    ])
    found = livelock_warnings(log)
    assert len(found) == 3 and all(any(m in line for line in found) for m in messages)
    assert len(livelock_markers()) >= 8  # faust's whole SLOW_PROCESSING_* family, not a hand-picked few
