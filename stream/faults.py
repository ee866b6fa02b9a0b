"""Which failures stop a worker, in one place.

A worker fails stop (exit 75, batch unacknowledged, redelivered to its
replacement) only for *infrastructure* faults, where redelivery is the right
answer: Redis or Kafka unavailable after their clients' own retries.
Anything else raised while handling one record is that record's problem:
it is dead-lettered as ``internal_error`` and the batch goes on.

Every Redis error counts as infrastructure, not only connection errors and
timeouts: the worker sends Redis its own keys and blobs, never a record's
bytes, so a Redis error (OOM, a replica in read-only mode, a missing script)
says something about Redis, not about the record.

One Redis error is neither: a *full* Redis (``maxmemory`` reached under
``noeviction``) refusing a write.  Exiting would not help -- the restarted
worker meets the same full Redis and crash-loops -- so the worker's
repositories wait on :class:`FullRedisPause` instead: the batch in hand stays
unfinished, so nothing further is consumed or committed, the refused writes
are retried with backoff, and the worker goes on by itself once memory is
freed (README, "A full Redis").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiokafka.errors
import faust.exceptions
import kafka.errors
import redis.exceptions

from fbp_errors import InfrastructureError

log = logging.getLogger(__name__)

INFRASTRUCTURE: tuple[type[BaseException], ...] = (
    InfrastructureError,
    redis.exceptions.RedisError,       # ConnectionError / TimeoutError after the client's retries, ...
    redis.exceptions.RedisClusterException,  # cluster client: no reachable node / slots uncovered (not a RedisError)
    aiokafka.errors.KafkaError,        # Kafka refusing or timing out a produce
    kafka.errors.KafkaError,
    faust.exceptions.ProducerSendError,  # Faust's wrapper around the two above
)

_SIZE_ERRORS = (aiokafka.errors.MessageSizeTooLargeError, kafka.errors.MessageSizeTooLargeError)


def is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, INFRASTRUCTURE)


def is_size_error(exc: BaseException) -> bool:
    """True when a produce failed because the record is too large (client's
    max_request_size or broker's message.max.bytes), through Faust's wrapping."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, _SIZE_ERRORS) or "MessageSizeTooLarge" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return "MessageSizeTooLarge" in str(exc) or "RecordTooLarge" in str(exc)


def is_redis_full(exc: BaseException) -> bool:
    """True for Redis refusing a write because it reached ``maxmemory``."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError)


FULL_MESSAGE = (
    "Redis is full: it refused a state write (used memory > maxmemory, policy noeviction). "
    "Not consuming: the batch in hand is neither stored nor committed; retrying the write every "
    "<= {retry:.0f} s and resuming by itself once Redis has room. To fix: raise Redis `maxmemory` "
    "(CONFIG SET maxmemory / redis.conf; `fbp bench state` sizes it), or lower FBP_STATE__IDLE_TTL_S "
    "so that idle users expire sooner, or add Redis Cluster shards. Redis said: {exc}")


class FullRedisPause:
    """The worker's answer to a full Redis (:class:`core.redis_conn.OnFull`):
    wait with exponential backoff (50 ms doubling up to ``max_s``) and let the
    repository send the refused writes again; say loudly what is wrong once
    and then every ``remind_s`` while it lasts, with ``fbp_redis_full`` at 1.

    Why pause rather than fail stop: the writes are idempotent to resend
    (the state script is conditional on the watermarks; the movie side resends
    only refused calls), and a restarted worker would meet the same full
    Redis.  While paused the worker holds its partitions: the Kafka consumer
    keeps heart-beating, so nothing moves to another worker."""

    def __init__(self, max_s: float = 5.0, remind_s: float = 60.0) -> None:
        self.max_s = float(max_s)
        self.remind_s = float(remind_s)
        self._since: float | None = None
        self._told: float | None = None

    async def refused(self, exc: BaseException, refusals: int) -> None:
        from stream import metrics as m

        now = time.monotonic()
        if self._since is None:
            self._since = now
            m.REDIS_FULL_PAUSES.inc()
        m.REDIS_FULL.set(1)
        if self._told is None or now - self._told >= self.remind_s:
            self._told = now
            log.error(FULL_MESSAGE.format(retry=self.max_s, exc=exc) +
                      (f" (paused for {now - self._since:.0f} s)" if now > self._since else ""))
        await asyncio.sleep(min(self.max_s, 0.05 * 2 ** min(refusals - 1, 16)))

    def resumed(self, refusals: int) -> None:
        from stream import metrics as m

        if self._since is None:
            return
        log.warning("Redis has room again: resumed after %.1f s paused (%d refused write(s) sent again)",
                    time.monotonic() - self._since, refusals)
        self._since = None
        self._told = None
        m.REDIS_FULL.set(0)


def evicting_redis(settings: Any) -> str | None:
    """Why this Redis must not hold the worker's states, or None when it may.

    Any eviction policy can delete a user's hash: with allkeys-* any key, with
    volatile-* any key with an expiry -- every state under ``state.idle_ttl_s``.
    An evicted state silently resets a user mid-history, and its evicted
    watermarks let a redelivered event be applied twice.  ``noeviction``
    with an idle TTL bounds memory as well, and a full Redis then only pauses
    the worker (:class:`FullRedisPause`)."""
    from core.redis_conn import SAFE_POLICIES, eviction_policies, sync_redis

    client = sync_redis(settings.redis)
    try:
        policies = eviction_policies(client)
    finally:
        client.close()
    bad = {node: p for node, (p, _) in policies.items() if p not in SAFE_POLICIES}
    if not bad:
        return None
    nodes = ", ".join(f"{n}: {p}" for n, p in sorted(bad.items()))
    return (f"Redis runs an eviction policy ({nodes}) that can evict user states and their watermarks: "
            "users would silently start over and redelivered events would be applied twice. Set "
            "`maxmemory-policy noeviction` (CONFIG SET / redis.conf) and size maxmemory with "
            "`fbp bench state` (idle users expire after FBP_STATE__IDLE_TTL_S), or set "
            "FBP_STATE__ALLOW_EVICTION=true to run anyway")
