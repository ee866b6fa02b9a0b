"""Redis connections built from settings, so TLS, ACL users and Redis Cluster
work everywhere.

``RedisSettings.cluster`` picks redis-py's cluster client (sync
``redis.RedisCluster``, asyncio ``redis.asyncio.RedisCluster``); the
repositories in ``core.repos`` use either the same way: their keys carry hash
tags, every script declares its keys, and pipelines are split per node by the
client (no slot routing here).
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

from core.settings import RedisSettings

T = TypeVar("T")

#: How long the worker's async client keeps retrying a command through a Redis
#: outage (restart, failover, AOF loading) before giving up: ~60 tries spaced
#: up to 1 s.  Every command the worker sends is safe to repeat (reads, and the
#: watermark-guarded state store script).  Beyond this the worker fails stop
#: (stream.app) and is restarted; the batch in hand is redelivered.
ASYNC_RETRIES = 60

#: Either client kind; the repositories accept both.
AsyncClient = aioredis.Redis | AsyncRedisCluster
SyncClient = redis.Redis | RedisCluster


def _kwargs(cfg: RedisSettings) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if cfg.username:
        kw["username"] = cfg.username
    if cfg.password:
        kw["password"] = cfg.password.get_secret_value()
    if cfg.url.startswith("rediss://") and cfg.ssl_ca_certs:
        kw["ssl_ca_certs"] = str(cfg.ssl_ca_certs)
    return kw


def async_redis(cfg: RedisSettings) -> AsyncClient:
    """An asyncio client; bytes in, bytes out (states are binary)."""
    retry = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), ASYNC_RETRIES)
    if cfg.cluster:
        seeds = [AsyncClusterNode(h, p) for h, p in cfg.cluster_seeds()]
        return AsyncRedisCluster.from_url(cfg.url, decode_responses=False, retry=retry,
                                          startup_nodes=seeds, **_kwargs(cfg))
    return aioredis.Redis.from_url(cfg.url, decode_responses=False, retry=retry, **_kwargs(cfg))


def sync_redis(cfg: RedisSettings) -> SyncClient:
    """A blocking client for tools, tests and the trainer."""
    if cfg.cluster:
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), 10)
        seeds = [ClusterNode(h, p) for h, p in cfg.cluster_seeds()]
        return RedisCluster.from_url(cfg.url, decode_responses=False, retry=retry,
                                     startup_nodes=seeds, **_kwargs(cfg))
    return redis.Redis.from_url(cfg.url, decode_responses=False, **_kwargs(cfg))


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def by_slot(client: Any, named: Sequence[tuple[str, T]]) -> list[list[tuple[str, T]]]:
    """(key, item) pairs grouped so that one script call per group touches one
    slot: a single group on a single Redis, one per hash slot on a cluster
    (a script's keys must share a slot there).  Order is kept within a group."""
    if not is_cluster(client):
        return [list(named)] if named else []
    groups: dict[int, list[tuple[str, T]]] = {}
    for name, item in named:
        groups.setdefault(key_slot(name.encode()), []).append((name, item))
    return list(groups.values())


def queue_wait(client: Any, pipe: Any, replicas: int, timeout_ms: int) -> int:
    """Queue ``WAIT replicas timeout_ms`` behind the writes already in ``pipe``;
    returns how many WAIT replies the pipeline's results end with.

    WAIT covers the writes sent earlier *on the same connection*, so it must
    ride in the same pipeline: on a cluster, one WAIT per master (the client
    sends each node's share of a pipeline on one connection, in order)."""
    if not is_cluster(client):
        pipe.execute_command("WAIT", replicas, timeout_ms)
        return 1
    masters = client.get_primaries()
    for node in masters:
        pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
    return len(masters)


async def unlink_matching(client: Any, patterns: Sequence[str], also: Sequence[str] = ()) -> int:
    """Delete every key matching ``patterns`` (SCAN, so the server is never
    blocked) plus the keys ``also``, in UNLINKs of 1,000; returns keys removed.
    What each repository's ``drop`` does with its own keyspace's patterns."""
    names = [k for pat in patterns async for k in client.scan_iter(match=pat, count=5000)]
    names += list(also)
    n = 0
    for i in range(0, len(names), 1000):
        n += int(await client.unlink(*names[i:i + 1000]))
    return n
