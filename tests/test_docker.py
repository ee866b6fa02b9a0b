"""`docker compose up` runs the main job, on a real Docker engine.

The users' docker-compose.yml, plus tests/docker/compose.test.yml, which only
swaps image sources that a machine without registry access cannot pull (see
that file).  One `up`, nothing typed in between, then the outcome: every
replayed ML-100K event has a prediction on `predictions`, the worker's
/health is ok, Prometheus scrapes the worker and the trainer, the trainer
logged a fine-tune decision, and `down -v` leaves no container, network or
volume behind.  Host ports are free ones picked per run (published on
127.0.0.1 only), so the local stack the rest of the suite uses is untouched.

Heavy (cold: a ~4 GB image build): run by `make test-docker` (FBP_TEST_DOCKER=1),
which .ci/run calls after `make test`; `make test` skips it.
FBP_TEST_DOCKER_KEEP=1 leaves a failed run's containers up for a look.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request

import orjson
import pytest

from core.settings import REPO_ROOT
from tests import dockerkit as dk

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.environ.get("FBP_TEST_DOCKER") != "1",
                       reason="heavy: run with `make test-docker` (FBP_TEST_DOCKER=1)"),
]

PROJECT = "fbpdockertest"
REPLAYED = 80_000  # ML-100K after the 20,000 the bootstrap model trained on
COMPOSE_FILES = ["-f", str(REPO_ROOT / "docker-compose.yml"), "-f", str(dk.DOCKER_DIR / "compose.test.yml")]


class ComposeProject:
    """One compose project on free loopback ports."""

    def __init__(self) -> None:
        self.compose = [*dk.compose_cmd(), "-p", PROJECT, *COMPOSE_FILES]
        self.ports = {name: dk.free_port() for name in ("kafka", "redis", "prometheus", "grafana", "worker", "trainer")}
        self.env = {f"{name.upper()}_HOST_PORT": str(p) for name, p in self.ports.items()}

    def __call__(self, *args: str, timeout: float = 900, check: bool = True):
        return dk.run([*self.compose, *args], env=self.env, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def state(self, service: str) -> tuple[str, int]:
        cid = self.container(service)
        if not cid:
            return "absent", -1
        out = dk.run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", cid]).stdout.split()
        return out[0], int(out[1])

    def timeline(self, t0: float) -> dict[str, list[float]]:
        """[started, finished] seconds after ``t0`` of each service (finished: one-shots only)."""
        from datetime import datetime

        def secs(stamp: str) -> float | None:
            if stamp.startswith("0001-"):
                return None
            return round(datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp() - t0, 1)
        out = {}
        for svc in ("kafka", "redis", "init-topics", "bootstrap", "worker", "trainer", "producer"):
            fmt = "{{.State.StartedAt}} {{.State.FinishedAt}}"
            started, finished = dk.run(["docker", "inspect", "-f", fmt, self.container(svc)]).stdout.split()
            out[svc] = [secs(started), secs(finished)]
        return out

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", service, check=False).stdout


def _wait(what: str, check, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return orjson.loads(resp.read())


def _read_topic(port: int, topic: str, want: int | None, timeout: float) -> list[tuple[dict, int]]:
    """(record, Kafka timestamp ms) for every record of ``topic``: up to the end
    offsets at call time, or until ``want`` distinct event ids were read."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}", group_id=None, enable_auto_commit=False,
                      auto_offset_reset="earliest", consumer_timeout_ms=2000)
    try:
        parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
        c.assign(parts)
        c.seek_to_beginning(*parts)
        end = c.end_offsets(parts)
        out, ids = [], set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in c:
                rec = orjson.loads(msg.value)
                out.append((rec, msg.timestamp))
                ids.add(rec.get("event_id"))
            if want is not None and len(ids) >= want:
                break
            if want is None and all(c.position(p) >= end[p] for p in parts):
                break
        return out
    finally:
        c.close()


def _finetune_decisions(log: str) -> list[dict]:
    return [orjson.loads(m) for m in re.findall(r"finetune decision (\{.*\})", log)]


@pytest.fixture(scope="module")
def project():
    dk.ensure_engine()
    took = dk.build_images()
    proj = ComposeProject()
    proj("down", "-v", "--remove-orphans", timeout=300, check=False)  # a crashed earlier run
    t0 = time.monotonic()
    proj("build", timeout=3600)
    took["project image"] = time.monotonic() - t0
    size = dk.run(["docker", "image", "inspect", "-f", "{{.Size}}", "feedback-predictor:latest"]).stdout
    print(f"\nbuild seconds: { {k: round(v, 1) for k, v in took.items()} }, "
          f"feedback-predictor:latest {int(size) / 1e9:.2f} GB")
    try:
        yield proj
    finally:
        if os.environ.get("FBP_TEST_DOCKER_KEEP") != "1":
            proj("down", "-v", "--remove-orphans", timeout=300, check=False)


def test_compose_up_runs_the_main_job_and_down_leaves_nothing(project):
    t_up = time.time()
    up = project("up", "-d", timeout=1200, check=False)
    assert up.returncode == 0, _diagnose(project, up.stdout + up.stderr)
    try:
        _check_main_job(project, t_up)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(project, '')}") from None

    down = project("down", "-v", timeout=300)
    assert down.returncode == 0
    assert dk.project_leftovers(PROJECT) == {"containers": [], "volumes": [], "networks": []}


def _check_main_job(project: ComposeProject, t_up: float) -> None:
    ports = project.ports
    # The producer replays the 80,000 later ML-100K events once the worker and trainer are healthy.
    _wait("the producer to finish", lambda: project.state("producer")[0] == "exited", timeout=900)
    assert project.state("producer") == ("exited", 0), project.logs("producer")[-3000:]
    assert project.state("bootstrap") == ("exited", 0)
    assert project.state("init-topics") == ("exited", 0)

    ratings = {rec["event_id"] for rec, _ in _read_topic(ports["kafka"], "ratings", None, timeout=300)}
    assert len(ratings) == REPLAYED
    preds = _read_topic(ports["kafka"], "predictions", REPLAYED, timeout=900)
    predicted = {rec["event_id"] for rec, _ in preds}
    assert ratings - predicted == set(), f"{len(ratings - predicted)} replayed events without a prediction"
    first = min(ts for _, ts in preds) / 1000.0
    print(f"\nup -> first prediction: {first - t_up:.1f} s; up -> all {len(predicted)} predicted: "
          f"{max(ts for _, ts in preds) / 1000.0 - t_up:.1f} s; seconds after up: {project.timeline(t_up)}")

    health = _get_json(f"http://127.0.0.1:{ports['worker']}/health")
    assert health["status"] == "ok" and health["model_version"] is not None, health
    assert _get_json(f"http://127.0.0.1:{ports['trainer']}/health")["status"] == "ok"

    def fbp_targets_up():
        active = _get_json(f"http://127.0.0.1:{ports['prometheus']}/api/v1/targets")["data"]["activeTargets"]
        up = {t["labels"]["instance"] for t in active if t["labels"]["job"] == "fbp" and t["health"] == "up"}
        return up == {"worker:6066", "trainer:6068"}
    _wait("Prometheus to report the worker and trainer targets up", fbp_targets_up, timeout=120)

    def finetuned():  # a fine-tune that trained and was judged ("skipped" = too little data)
        return [d for d in _finetune_decisions(project.logs("trainer")) if d["outcome"] in ("promoted", "rejected")]
    decisions = _wait("the trainer to log a fine-tune that was promoted or rejected", finetuned, timeout=600, every=5)
    print(f"fine-tune decisions: {[(d['outcome'], d.get('new_version')) for d in decisions]}")


def _diagnose(project: ComposeProject, out: str) -> str:
    tails = "\n".join(f"--- {svc} ---\n{project.logs(svc)[-1500:]}"
                      for svc in ("kafka", "redis", "init-topics", "bootstrap", "worker", "trainer", "producer"))
    return f"{out[-3000:]}\n{project('ps', check=False).stdout}\n{tails}"
