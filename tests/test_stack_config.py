"""The stack's generated configs and the system-package script, without
starting anything: cluster nodes get distinct ports and one quorum, and the
install script names exactly the missing packages."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from core.settings import REPO_ROOT, load_settings
from fbp_errors import StackError
from stack import kafka_cluster, redis_cluster
from stack.kafka import single_node
from stack.registry import configured, node, with_options

SCRIPT = REPO_ROOT / "scripts" / "install-system-deps.sh"


def test_kafka_cluster_nodes_share_one_quorum_on_distinct_ports(tmp_path):
    s = load_settings(stack={"data_dir": tmp_path, "kafka_brokers": 3})
    nodes = kafka_cluster.nodes(s)
    props = [n.properties() for n in nodes]
    assert [p["node.id"] for p in props] == ["1", "2", "3"]
    assert len({p["controller.quorum.voters"] for p in props}) == 1
    assert props[0]["controller.quorum.voters"].count("@") == 3
    ports = [port for n in nodes for port in n.ports()]
    assert len(set(ports)) == 6 and s.stack.kafka_port not in ports
    assert {p["log.dirs"] for p in props} == {str(tmp_path / f"kafka-{i}" / "data") for i in (1, 2, 3)}
    for p in props:
        assert (p["default.replication.factor"], p["min.insync.replicas"]) == ("3", "2")
        assert p["offsets.topic.replication.factor"] == "3"
    assert len({n.cluster_id_file for n in nodes}) == 1


def test_single_broker_keeps_replication_one(tmp_path):
    p = single_node(load_settings(stack={"data_dir": tmp_path})).properties()
    assert p["default.replication.factor"] == "1" and "min.insync.replicas" not in p


def test_cluster_client_settings(tmp_path):
    s = load_settings(stack={"data_dir": tmp_path, "kafka_brokers": 3, "kafka_cluster_port": 9500})
    k = kafka_cluster.client_settings(s).kafka
    assert k.servers == ["127.0.0.1:9500", "127.0.0.1:9501", "127.0.0.1:9502"]
    assert (k.replication_factor, k.min_insync_replicas) == (3, 2)


def test_redis_cluster_nodes_have_own_dirs_and_cluster_config(tmp_path):
    s = load_settings(stack={"data_dir": tmp_path, "redis_cluster": True, "redis_cluster_port": 7500})
    nodes = configured("redis", s)
    assert [n.name for n in nodes] == [f"redis-node-{i}" for i in range(1, 7)]
    assert [n.port for n in nodes] == list(range(7500, 7506))
    for n in nodes:
        conf = n.config()
        assert "cluster-enabled yes" in conf and "appendonly yes" in conf
        assert f'cluster-config-file "{n.dir / "nodes.conf"}"' in conf
        assert n.ports() == [n.port, n.port + 10000]
    assert redis_cluster.client_env(s)["FBP_REDIS__URL"] == "redis://127.0.0.1:7500/0"


def test_redis_cluster_with_password_authenticates_replicas(tmp_path):
    s = load_settings(stack={"data_dir": tmp_path, "redis_cluster": True}, redis={"password": "pw"})
    conf = configured("redis", s)[0].config()
    assert 'requirepass "pw"' in conf and 'masterauth "pw"' in conf


def test_redis_cluster_refuses_tls(tmp_path):
    s = load_settings(stack={"data_dir": tmp_path, "redis_cluster": True}, redis={"url": "rediss://127.0.0.1:6379/0"})
    with pytest.raises(StackError, match="without TLS"):
        configured("redis", s)


def test_node_names_and_unknown_names(tmp_path):
    s = with_options(load_settings(stack={"data_dir": tmp_path}), kafka_brokers=3)
    assert node("kafka-3", s).name == "kafka-3"
    assert node("redis-node-6", s).port == s.stack.redis_cluster_port + 5
    for bad in ("kafka-4", "redis-node-7", "zookeeper"):
        with pytest.raises(StackError, match="unknown service"):
            node(bad, s)


def _path_without(tmp_path: Path, *hidden: str, fake_uid: int | None = None) -> str:
    """A PATH with every program of /usr/bin and /bin except ``hidden``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for exe in Path(d).iterdir() if Path(d).is_dir() else []:
            if exe.name not in hidden and not (bin_dir / exe.name).exists():
                (bin_dir / exe.name).symlink_to(exe)
    if fake_uid is not None:
        (bin_dir / "id").unlink(missing_ok=True)
        (bin_dir / "id").write_text(f"#!/bin/sh\necho {fake_uid}\n")
        (bin_dir / "id").chmod(0o755)
    return str(bin_dir)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="Debian/apt only")
def test_install_script_check_names_the_missing_packages(tmp_path):
    env = {**os.environ, "PATH": _path_without(tmp_path, "redis-server", "kcat", "promtool")}
    res = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1
    assert "apt-get install -y --no-install-recommends redis-server prometheus kcat" in res.stderr


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="Debian/apt only")
def test_install_script_as_non_root_prints_the_command(tmp_path):
    env = {**os.environ, "PATH": _path_without(tmp_path, "mvn", fake_uid=1000)}
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1
    assert "run as root: sudo apt-get update && sudo apt-get install -y --no-install-recommends maven" in res.stderr


def test_install_script_is_a_no_op_when_skipped(tmp_path):
    env = {**os.environ, "PATH": _path_without(tmp_path, "redis-server"), "FBP_SKIP_SYSTEM_DEPS": "1"}
    res = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, env=env, timeout=60)
    assert (res.returncode, res.stderr) == (0, "")
