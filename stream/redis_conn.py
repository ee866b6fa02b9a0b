"""Redis connections built from settings, so TLS and ACL users work everywhere."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

from fbp.settings import RedisSettings


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
    return aioredis.Redis.from_url(cfg.url, decode_responses=False, **_kwargs(cfg))


def sync_redis(cfg: RedisSettings) -> redis.Redis:
    """A blocking client for tools, tests and the trainer."""
    return redis.Redis.from_url(cfg.url, decode_responses=False, **_kwargs(cfg))
