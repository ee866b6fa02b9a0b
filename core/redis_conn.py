"""Redis connections built from settings, so TLS and ACL users work everywhere."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from core.settings import RedisSettings

#: How long the worker's async client keeps retrying a command through a Redis
#: outage (restart, failover, AOF loading) before giving up: ~60 tries spaced
#: up to 1 s.  Every command the worker sends is safe to repeat (reads, and the
#: watermark-guarded state store script).  Beyond this the worker fails stop
#: (stream.app) and is restarted; the batch in hand is redelivered.
ASYNC_RETRIES = 60


def _kwargs(cfg: RedisSettings) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cfg.username:
        kw["username"] = cfg.username
    if cfg.password:
        kw["password"] = cfg.password.get_secret_value()
    if cfg.url.startswith("rediss://") and cfg.ssl_ca_certs:
        kw["ssl_ca_certs"] = str(cfg.ssl_ca_certs)
    return kw


def async_redis(cfg: RedisSettings) -> aioredis.Redis:
    """An asyncio client; bytes in, bytes out (states are binary)."""
    retry = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), ASYNC_RETRIES)
    return aioredis.Redis.from_url(cfg.url, decode_responses=False, retry=retry, **_kwargs(cfg))


def sync_redis(cfg: RedisSettings) -> redis.Redis:
    """A blocking client for tools, tests and the trainer."""
    return redis.Redis.from_url(cfg.url, decode_responses=False, **_kwargs(cfg))
