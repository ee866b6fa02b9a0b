"""A throw-away local Redis Cluster for tests: 3 masters + 3 replicas from
Debian's ``redis-server``, joined by ``redis-cli --cluster create`` on
loopback ports 17000-17005.

Until ``fbp stack up --redis-cluster`` exists, the tests start it here (or
reuse one already answering on those ports) and stop only what they started.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

PORTS = tuple(range(17000, 17006))
URL = f"redis://127.0.0.1:{PORTS[0]}/0"


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


def _state_ok(port: int) -> bool:
    try:
        info = redis.Redis(port=port, socket_connect_timeout=0.5).execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"local Redis Cluster: {what} within {timeout:.0f} s")
        time.sleep(0.1)


@dataclass
class LocalCluster:
    """Handle on the cluster; ``owned`` is False when it was already running."""

    url: str = URL
    owned: bool = False
    procs: list[subprocess.Popen] = field(default_factory=list)
    workdir: Path | None = None

    def masters(self) -> list[int]:
        """Ports of the current masters (they change after a failover)."""
        out = []
        for port in PORTS:
            try:
                role = redis.Redis(port=port, socket_connect_timeout=0.5).execute_command("ROLE")
            except redis.ConnectionError:
                continue
            if role[0] in (b"master", "master"):
                out.append(port)
        return out

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start() -> LocalCluster:
    """Start the cluster, or return a handle on the one already up."""
    if all(_ping(p) for p in PORTS) and _state_ok(PORTS[0]):
        return LocalCluster()
    if any(_ping(p) for p in PORTS):
        raise RuntimeError(f"ports {PORTS[0]}-{PORTS[-1]} are partly in use by something that is not a healthy cluster")
    for prog in ("redis-server", "redis-cli"):
        if shutil.which(prog) is None:
            raise RuntimeError(f"{prog} not found: apt-get install redis-server")
    work = Path(tempfile.mkdtemp(prefix="fbp-rcluster-"))
    cl = LocalCluster(owned=True, workdir=work)
    for port in PORTS:
        d = work / str(port)
        d.mkdir()
        cl.procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000", "--appendonly", "no", "--save", "",
             "--logfile", str(d / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        _wait(lambda: all(_ping(p) for p in PORTS), "servers did not answer PING")
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in PORTS],
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        _wait(lambda: all(_state_ok(p) for p in PORTS), "cluster_state did not become ok")
        _wait(lambda: len(cl.masters()) == 3 and _replicas_linked(), "replicas did not sync")
    except (RuntimeError, subprocess.SubprocessError):
        cl.stop()
        raise
    return cl


def _replicas_linked() -> bool:
    for port in PORTS:
        info = redis.Redis(port=port).info("replication")
        if info.get("role") == "slave" and info.get("master_link_status") != "up":
            return False
    return True


# -- fixtures (import them into a test module to use them) ----------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def local_cluster():
    """The local Redis Cluster, started for this session if not already up."""
    try:
        cl = start()
    except RuntimeError as exc:
        pytest.fail(f"local Redis Cluster did not come up: {exc}")
    yield cl
    if cl.owned:
        cl.stop()


@pytest.fixture(params=["single", "cluster"])
def redis_cfg(request, stack):
    """RedisSettings of the stack's single Redis, then of the local cluster,
    each with a fresh key prefix whose keys are dropped afterwards."""
    import uuid

    from core.redis_conn import sync_redis
    from core.repos.keys import drop_namespace

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    if request.param == "single":
        cfg = stack.redis.model_copy(update={"key_prefix": prefix})
    else:
        request.getfixturevalue("local_cluster")
        cfg = stack.redis.model_copy(update={"key_prefix": prefix, "cluster": True, "url": URL,
                                             "username": None, "password": None})
    yield cfg
    client = sync_redis(cfg)
    drop_namespace(client, prefix)
    client.close()
