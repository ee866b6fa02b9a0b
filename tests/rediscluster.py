"""The stack's local Redis Cluster for tests: 3 masters + 3 replicas started
by ``fbp stack up --redis-cluster`` (stack.redis_cluster, ports 7100-7105 by
default), brought up once per session and left running like the rest of the
stack.  Tests use their own key prefix and drop it; nothing is flushed.

Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import redis

from core.settings import Settings


@dataclass(frozen=True)
class LocalCluster:
    settings: Settings  # settings whose stack part has redis_cluster on
    url: str
    ports: tuple[int, ...]

    @property
    def seeds(self) -> list[str]:
        """The other nodes, as ``RedisSettings.cluster_nodes``."""
        return [f"127.0.0.1:{p}" for p in self.ports[1:]]

    def restart_missing_nodes(self) -> None:
        """Start any node that is down (it rejoins from its nodes.conf) and wait
        until the cluster is whole again (3 masters, 3 replicas, state ok)."""
        from stack.control import stack_up

        stack_up(self.settings, services=["redis"], topics=False)

    def foreign_nodes(self) -> list[str]:
        """Nodes whose data dir is not under this checkout's stack data dir: a
        cluster started by another checkout's stack, which a restart from here
        would replace with a fresh, empty node instead of the one it stopped."""
        home = str(self.settings.stack.data_dir.resolve())
        out = []
        for port in self.ports:
            d = self.node(port).config_get("dir")["dir"]
            if not d.startswith(home):
                out.append(f"{port}: {d}")
        return out

    def node(self, port: int) -> redis.Redis:
        r = self.settings.redis
        return redis.Redis(port=port, socket_connect_timeout=1, username=r.username,
                           password=r.password.get_secret_value() if r.password else None)


@pytest.fixture(scope="session")
def local_cluster(stack) -> LocalCluster:
    """The stack's Redis Cluster, started if it is not running."""
    from fbp_errors import StackError
    from stack import redis_cluster as rc
    from stack.control import stack_up

    s = stack.model_copy(update={"stack": stack.stack.model_copy(update={"redis_cluster": True})})
    try:
        stack_up(s, services=["redis"], topics=False)
    except StackError as exc:
        pytest.fail(f"local Redis Cluster did not come up: {exc}")
    return LocalCluster(s, rc.client_env(s)["FBP_REDIS__URL"], tuple(rc.ports(s)))


@pytest.fixture(params=["single", "cluster"])
def redis_cfg(request, stack):
    """RedisSettings of the stack's single Redis, then of its Redis Cluster,
    each with a fresh key prefix whose keys are dropped afterwards."""
    from core.redis_conn import sync_redis
    from core.repos.keys import drop_namespace

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    if request.param == "single":
        cfg = stack.redis.model_copy(update={"key_prefix": prefix})
    else:
        cl = request.getfixturevalue("local_cluster")
        cfg = stack.redis.model_copy(update={"key_prefix": prefix, "cluster": True, "url": cl.url,
                                             "cluster_nodes": cl.seeds})
    yield cfg
    client = sync_redis(cfg)
    drop_namespace(client, prefix)
    client.close()
