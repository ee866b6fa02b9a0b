"""docker-compose.yml and deploy/ configs are valid and agree with settings.

No container engine is needed: ``docker-compose config`` only parses and
validates, and Prometheus configs are checked with promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.settings import REPO_ROOT, load_settings

COMPOSE = REPO_ROOT / "docker-compose.yml"


def _with_defaults(text: str) -> str:
    """``${VAR:-default}`` -> default: the file as users get it with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_with_defaults(COMPOSE.read_text()))


def _host_ports(service: dict) -> set[int]:
    out = set()
    for p in service.get("ports", []):
        parts = str(p).split(":")
        out.add(int(parts[-2]))  # [ip:]host:container
    return out


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
@pytest.mark.parametrize("profile", [[], ["--profile", "cluster"]], ids=["default", "cluster"])
def test_compose_config_is_valid(profile):
    res = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


CLUSTER_SERVICES = {f"kafka-{i}" for i in (1, 2, 3)} | {f"redis-node-{i}" for i in range(1, 7)} | {
    "redis-cluster-init", "init-topics-cluster"}


def test_cluster_profile_is_separate(compose):
    svc = compose["services"]
    assert CLUSTER_SERVICES <= set(svc)
    assert all(svc[n].get("profiles") == ["cluster"] for n in CLUSTER_SERVICES)
    assert not any("profiles" in v for n, v in svc.items() if n not in CLUSTER_SERVICES)


def test_cluster_profile_kafka_matches_local_cluster(compose):
    """Same ports, replication and min.insync as `fbp stack up --kafka-brokers 3`."""
    from stack.kafka_cluster import client_env, client_ports

    s = load_settings(stack={"kafka_brokers": 3})
    want = client_env(s)
    svc = compose["services"]
    for i, port in enumerate(client_ports(s), start=1):
        node = svc[f"kafka-{i}"]
        env = node["environment"]
        assert _host_ports(node) == {port}
        assert env["KAFKA_NODE_ID"] == str(i)
        assert f"EXTERNAL://127.0.0.1:{port}" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].count("@") == 3
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == want["FBP_KAFKA__REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == want["FBP_KAFKA__MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_NUM_PARTITIONS"] == str(s.kafka.partitions)
    assert len({svc[f"kafka-{i}"]["environment"]["CLUSTER_ID"] for i in (1, 2, 3)}) == 1


def test_cluster_profile_topics_env_is_valid_config(compose, monkeypatch):
    env = compose["services"]["init-topics-cluster"]["environment"]
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    s = load_settings()
    assert len(s.kafka.servers) == 3
    assert (s.kafka.replication_factor, s.kafka.min_insync_replicas) == (3, 2)


def test_cluster_profile_redis_matches_local_cluster(compose):
    """Six nodes on the local cluster's ports, joined 1 replica per master."""
    from stack.redis_cluster import REPLICAS_PER_MASTER, ports

    want = ports(load_settings())
    svc = compose["services"]
    got = []
    for i in range(1, 7):
        cmd = svc[f"redis-node-{i}"]["command"]
        assert cmd[cmd.index("--cluster-enabled") + 1] == "yes"
        assert "--appendonly" in cmd
        got.append(int(cmd[cmd.index("--port") + 1]))
    assert got == want
    init = svc["redis-cluster-init"]["command"]
    assert [a for a in init if a.startswith("127.0.0.1:")] == [f"127.0.0.1:{p}" for p in want]
    assert init[init.index("--cluster-replicas") + 1] == str(REPLICAS_PER_MASTER)


def test_compose_ports_match_settings(compose):
    s = load_settings()
    svc = compose["services"]
    assert s.stack.kafka_port in _host_ports(svc["kafka"])
    assert s.stack.redis_port in _host_ports(svc["redis"])
    assert s.stack.prometheus_port in _host_ports(svc["prometheus"])
    assert s.worker.web_port in _host_ports(svc["worker"])
    assert s.trainer.web_port in _host_ports(svc["trainer"])
    kafka_env = svc["kafka"]["environment"]
    assert f"127.0.0.1:{s.stack.kafka_port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka_env["KAFKA_NUM_PARTITIONS"] == str(s.kafka.partitions)
    assert kafka_env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_compose_services_present(compose):
    assert {"kafka", "redis", "prometheus", "grafana", "worker", "trainer", "producer", "init-topics",
            "bootstrap"} <= set(
        compose["services"]
    )
    assert compose["services"]["kafka"]["image"] == "apache/kafka:3.9.1"
    assert "--appendonly" in compose["services"]["redis"]["command"]


def test_compose_app_env_is_valid_config(compose, monkeypatch):
    """The FBP_ variables given to the app containers load without error."""
    for name in ("worker", "trainer", "producer"):
        env = compose["services"][name]["environment"]
        assert env["FBP_KAFKA__BOOTSTRAP_SERVERS"].startswith("kafka:")
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        s = load_settings()
        assert s.redis.url.startswith("redis://redis:")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_prometheus_configs_pass_promtool(tmp_path):
    from stack import prometheus_config

    res = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(REPO_ROOT / "deploy/prometheus/prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    local = tmp_path / "prometheus.yml"
    local.write_text(prometheus_config(load_settings()))
    res = subprocess.run(["promtool", "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_datasource_matches_dashboards():
    ds = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    assert "prometheus" in uids
    used: set[str] = set()

    def walk(o):
        if isinstance(o, dict):
            d = o.get("datasource")
            if isinstance(d, dict) and d.get("type") == "prometheus" and "uid" in d:
                used.add(d["uid"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for f in Path(REPO_ROOT / "deploy/grafana/dashboards").glob("*.json"):
        walk(json.loads(f.read_text()))
    assert used <= uids | {"${DS_PROMETHEUS}", "${datasource}"}, used


# -- Grafana: no Debian package, so the Docker test cannot run it; its
# provisioning is checked here, statically.
GRAFANA = REPO_ROOT / "deploy" / "grafana"


def test_grafana_provisioning_points_at_the_compose_prometheus_and_dashboard():
    compose = yaml.safe_load(_with_defaults(COMPOSE.read_text()))["services"]["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in compose["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["./deploy/grafana/dashboards"]

    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090"

    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fbp.yml").read_text())
    assert [p["options"]["path"] for p in prov["providers"]] == [dash_dir]
    home = compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == dash_dir
    dash = json.loads((GRAFANA / "dashboards" / Path(home).name).read_text())
    uids = {d.get("uid") for d in ds["datasources"]}
    used = {p["datasource"]["uid"] for p in dash["panels"] if isinstance(p.get("datasource"), dict)}
    assert used and used <= uids, (used, uids)


def _data_layer_copies() -> list[tuple[list[str], str]]:
    """The Dockerfile's COPY (sources, destination) pairs of the layer that
    runs ``load_dataset``: the instructions between the RUN before it and it."""
    copies: list[tuple[list[str], str]] = []
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("RUN "):
            if "load_dataset" in line:
                return copies
            copies = []
        elif line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            copies.append((sources, dest))
    raise AssertionError("no RUN of load_dataset in the Dockerfile")


def test_dockerfile_data_layer_copies_all_the_loader_imports(tmp_path):
    """The image bakes ML-100K in before the project is copied, from a few
    files only; the loader must import nothing else of the project (it once
    grew `from fbp_errors import DataError` and the image stopped building).
    Checked without an engine: only those files, plus third-party packages
    (site-packages without its .pth files, no PYTHON* variables, so the
    editable install cannot supply a missing module), must import
    ``core.datasets``."""
    import sys
    import sysconfig

    for sources, dest in _data_layer_copies():
        for src in sources:
            target = tmp_path / dest / (Path(src).name if dest.endswith("/") else "")
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO_ROOT / src).is_dir():
                shutil.copytree(REPO_ROOT / src, target)
            else:
                shutil.copy(REPO_ROOT / src, target)
    code = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {sysconfig.get_paths()['purelib']!r}]; "
            "from core.datasets import load_dataset")
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
