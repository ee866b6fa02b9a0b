"""Redis connections built from settings, so TLS, ACL users and Redis Cluster
work everywhere.

``RedisSettings.cluster`` picks redis-py's cluster client (sync
``redis.RedisCluster``, asyncio ``redis.asyncio.RedisCluster``); the
repositories in ``core.repos`` use either the same way: their keys carry hash
tags, every script declares its keys, and pipelines are split per node by the
client (no slot routing here).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import OutOfMemoryError
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


class OnFull(Protocol):
    """What a repository does when Redis refuses a write because it is full
    (``maxmemory`` reached under ``noeviction``): ``refused`` is awaited
    before each resend (it pauses; it may raise to give up), ``resumed`` is
    called once the write went through after ``refusals`` refusals.  The
    worker's policy is :class:`stream.faults.FullRedisPause`."""

    async def refused(self, exc: OutOfMemoryError, refusals: int) -> None: ...

    def resumed(self, refusals: int) -> None: ...


def first_full(replies: Sequence[Any]) -> OutOfMemoryError | None:
    """The first reply of a pipeline that is Redis refusing a write as full."""
    return next((x for x in replies if isinstance(x, OutOfMemoryError)), None)


async def resend_refused(send: Any, calls: Sequence[Any], replies: list[Any],
                         refused: type[Exception]) -> list[Any]:
    """Send again the calls whose reply is a ``refused`` error, and only those:
    the others were applied, and a write that is not idempotent (a delete's
    count, an increment) must count once.  Their new replies replace the old
    ones in ``replies``; returns what ``send`` answered past them (WAIT acks).

    ``send(calls)`` pipelines one script call per item and returns their
    replies first.  Refused means a node without the script cache (restarted
    or promoted) or a full Redis: either refuses a script before it writes."""
    again = [i for i, x in enumerate(replies) if isinstance(x, refused)]
    out = await send([calls[i] for i in again])
    for i, x in zip(again, out):
        replies[i] = x
    return out[len(again):]


#: maxmemory policies that never delete a key on their own
SAFE_POLICIES = frozenset({"noeviction"})


def eviction_policies(client: Any) -> dict[str, tuple[str, int]]:
    """(maxmemory-policy, maxmemory bytes) of every master, by node name (sync
    client).  Read from INFO memory, which managed Redis services that hide
    CONFIG still answer."""
    if is_cluster(client):
        infos = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    else:
        infos = {"redis": client.info("memory")}
    return {str(node): (str(i.get("maxmemory_policy", "noeviction")), int(i.get("maxmemory", 0)))
            for node, i in infos.items()}


async def amemory(client: Any) -> dict[str, tuple[int, int]]:
    """(used_memory, maxmemory) bytes of every master, by node name (asyncio client)."""
    if is_cluster(client):
        infos = await client.info("memory", target_nodes=AsyncRedisCluster.PRIMARIES)
    else:
        infos = {"redis": await client.info("memory")}
    return {str(node): (int(i.get("used_memory", 0)), int(i.get("maxmemory", 0))) for node, i in infos.items()}


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
