"""A real Docker engine for tests/test_docker.py: set up the way the rest of the
machine is (Debian's docker.io, dockerd started as root when none runs), a
local Debian base image, and local stand-ins for the upstream images that
public registries would serve.

Everything here is idempotent and cached by image tag, so a second run reuses
the base image, the stand-ins and the project image's layers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from core.settings import REPO_ROOT, load_settings

DOCKER_DIR = REPO_ROOT / "tests" / "docker"
BASE_IMAGE = "fbp-test/debian:bookworm"
STAND_INS = {"kafka": "fbp-test/kafka:stand-in", "redis": "fbp-test/redis:stand-in",
             "prometheus": "fbp-test/prometheus:stand-in"}
DOCKERD_LOG = Path("/tmp/fbp-dockerd.log")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """No engine: a failure in CI (the Docker path must be exercised there), a
    skip with the reason elsewhere."""
    if in_ci():
        pytest.fail(f"CI: the Docker test cannot run: {reason}")
    pytest.skip(reason)


def run(cmd: list[str], *, timeout: float = 600, env: dict | None = None, check: bool = True,
        cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                             f"{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def _engine_up() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def ensure_engine() -> None:
    """A running engine: as root, install Debian's docker.io/debootstrap if
    missing (scripts/install-system-deps.sh) and start dockerd if none runs."""
    if _engine_up():
        return
    if os.geteuid() != 0:
        unavailable("no running Docker engine, and starting one needs root "
                    "(sudo make test-docker, or start dockerd first)")
    deps = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install-system-deps.sh")],
                          capture_output=True, text=True, timeout=900)
    if deps.returncode != 0 or shutil.which("dockerd") is None:
        unavailable(f"installing docker.io failed:\n{(deps.stdout + deps.stderr)[-2000:]}")
    with DOCKERD_LOG.open("ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if _engine_up():
            return
        time.sleep(1)
    unavailable(f"dockerd did not come up in 90 s; see {DOCKERD_LOG}:\n{DOCKERD_LOG.read_text()[-2000:]}")


def compose_cmd() -> list[str]:
    """`docker compose` (v2 plugin) when present, else Compose v1 `docker-compose`."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    unavailable("neither `docker compose` nor `docker-compose` is installed")
    raise AssertionError("unreachable")


def build_images() -> dict[str, float]:
    """The base image (debootstrap, once) and the stand-ins; seconds each took."""
    took = {}
    t0 = time.monotonic()
    run(["bash", str(DOCKER_DIR / "base-image.sh"), BASE_IMAGE], timeout=1200)
    took["base"] = time.monotonic() - t0
    for name, tag in STAND_INS.items():
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"fbp-{name}-ctx.") as ctx:
            shutil.copytree(DOCKER_DIR / name, ctx, dirs_exist_ok=True)
            if name == "kafka":
                _kafka_context(Path(ctx))
            run(["docker", "build", "-q", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, ctx],
                timeout=900)
        took[name] = time.monotonic() - t0
    return took


def _kafka_context(ctx: Path) -> None:
    """The broker jars the local stack caches (fetched from Maven Central on first use)."""
    from stack.kafka_jars import KAFKA_LOG4J, ensure_kafka_libs

    libs = ensure_kafka_libs(load_settings())
    shutil.copytree(libs, ctx / "libs")
    shutil.copy(KAFKA_LOG4J, ctx / "log4j.properties")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_leftovers(project: str) -> dict[str, list[str]]:
    """Containers, volumes and networks that still carry the compose project's label."""
    flt = f"label=com.docker.compose.project={project}"
    out = {}
    for kind, cmd in (("containers", ["docker", "ps", "-aq"]), ("volumes", ["docker", "volume", "ls", "-q"]),
                      ("networks", ["docker", "network", "ls", "-q"])):
        out[kind] = run([*cmd, "--filter", flt]).stdout.split()
    return out
