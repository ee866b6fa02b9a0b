"""A local Redis Cluster: 3 masters + 3 replicas (``fbp stack up --redis-cluster``).

Six :class:`~stack.redis.RedisNode` services (``redis-node-1`` ... ``-6``) on
``redis_cluster_port`` ... ``+5`` (cluster bus: each port + 10000), each with
its own data dir, AOF and ``nodes.conf``.  Once all six answer PING, fresh
nodes are joined with ``redis-cli --cluster create --cluster-replicas 1``; a
restarted cluster re-forms from its ``nodes.conf`` files, so the create step
runs only once per data dir.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

import redis

from core.settings import Settings
from fbp_errors import StackError
from stack.redis import RedisNode
from stack.service import require

NODES = 6
REPLICAS_PER_MASTER = 1


@dataclass
class ClusterState:
    """What the cluster looks like from its first node."""

    ok: bool
    masters: int
    replicas: int
    detail: str


def ports(settings: Settings) -> list[int]:
    return [settings.stack.redis_cluster_port + i for i in range(NODES)]


def nodes(settings: Settings) -> list[RedisNode]:
    return [RedisNode(settings, name=f"redis-node-{i + 1}", port=p, cluster=True)
            for i, p in enumerate(ports(settings))]  # fmt: skip


def state(settings: Settings, timeout_s: float = 2.0) -> ClusterState:
    """CLUSTER INFO + CLUSTER NODES of every node: ok only when all six agree."""
    masters = replicas = 0
    for i, node in enumerate(nodes(settings)):
        client = node.client(timeout_s)
        try:
            info = client.cluster("info")
            if i == 0:
                flags = [n.get("flags", "") for n in client.cluster("nodes").values()]
                masters = sum("master" in f and "fail" not in f for f in flags)
                replicas = sum("slave" in f and "fail" not in f for f in flags)
        except redis.RedisError as exc:
            return ClusterState(False, 0, 0, f"{node.name}: {exc}")
        finally:
            client.close()
        if info.get("cluster_state") != "ok":
            return ClusterState(False, masters, replicas, f"{node.name}: cluster_state "
                                f"{info.get('cluster_state')}, {info.get('cluster_slots_assigned')} slots")
    want = NODES // (REPLICAS_PER_MASTER + 1)
    ok = masters == want and replicas == NODES - want
    return ClusterState(ok, masters, replicas, f"cluster_state ok, {masters} masters, {replicas} replicas")


def _fresh(settings: Settings) -> bool:
    """No node has joined a cluster yet (each knows only itself)."""
    for node in nodes(settings):
        client = node.client(2.0)
        try:
            if int(client.cluster("info").get("cluster_known_nodes", 1)) > 1:
                return False
        except redis.RedisError as exc:
            raise StackError(f"{node.name}: CLUSTER INFO failed: {exc}") from exc
        finally:
            client.close()
    return True


def _create(settings: Settings) -> None:
    cmd = [require("redis-cli"), "--cluster", "create",
           *(f"127.0.0.1:{p}" for p in ports(settings)),
           "--cluster-replicas", str(REPLICAS_PER_MASTER), "--cluster-yes"]  # fmt: skip
    r = settings.redis
    if r.username and r.username != "default":
        cmd += ["--user", r.username]
    env = dict(os.environ)
    if r.password is not None:  # through the environment, not argv (ps would show it)
        env["REDISCLI_AUTH"] = r.password.get_secret_value()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise StackError(f"redis-cli --cluster create failed:\n{(proc.stdout + proc.stderr)[-2000:]}")


def form(settings: Settings, timeout_s: float = 90.0) -> ClusterState:
    """Join fresh nodes into a cluster, then wait until all six report it healthy."""
    if _fresh(settings):
        _create(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        st = state(settings)
        if st.ok:
            return st
        if time.monotonic() > deadline:
            raise StackError(
                f"Redis Cluster not healthy after {timeout_s:.0f}s ({st.detail}); to start over, "
                f"`fbp stack down` and delete {settings.stack.data_dir}/redis-node-*"
            )
        time.sleep(0.25)


def client_env(settings: Settings) -> dict[str, str]:
    """The variables a worker, trainer or producer needs to use the cluster."""
    from core.settings import RedisSettings

    env = {"FBP_REDIS__URL": f"redis://127.0.0.1:{settings.stack.redis_cluster_port}/0"}
    if "cluster" in RedisSettings.model_fields:  # the cluster-client switch, where the client has one
        env["FBP_REDIS__CLUSTER"] = "true"
    if "cluster_nodes" in RedisSettings.model_fields:  # seeds, so the first node is no single point of failure
        env["FBP_REDIS__CLUSTER_NODES"] = ",".join(f"127.0.0.1:{p}" for p in ports(settings)[1:])
    return env
