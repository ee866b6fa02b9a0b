"""Start and stop the project's own processes (workers, trainer) for tests, benchmarks and the demo.

Each process is a real ``fbp`` subprocess talking to the local stack; its
output goes to a log file under the test's tmp dir so a failure can be read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
FBP = [sys.executable, "-m", "fbp.cli"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            self.popen.wait(timeout=60)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait (a clean shutdown finishes the batch in hand)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def _start(name: str, args: list[str], port: int, logdir: Path, env: dict[str, str] | None) -> Proc:
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}-{port}.log"
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    fh = open(log, "ab")
    popen = subprocess.Popen(
        FBP + args, cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    return Proc(name, popen, port, log)


def wait_healthy(proc: Proc, timeout: float = 90) -> None:
    """Until /health says ok (model loaded) or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            r = httpx.get(proc.url + "/health", timeout=2)
            if r.status_code == 200 and r.json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name} not healthy after {timeout}s:\n{proc.tail()}")


def start_worker(port: int, logdir: Path, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
    """A real ``fbp worker`` on ``port`` (settings from ``env`` overrides)."""
    env = dict(env or {})
    env["FBP_WORKER__WEB_PORT"] = str(port)
    proc = _start("worker", ["worker", "--loglevel", "warn"], port, logdir, env)
    if wait:
        try:
            wait_healthy(proc)
        except BaseException:
            proc.kill()  # the caller never gets it: do not leave it holding the port
            raise
    return proc


def start_trainer(port: int, logdir: Path, env: dict[str, str] | None = None) -> Proc:
    env = dict(env or {})
    env["FBP_TRAINER__WEB_PORT"] = str(port)
    return _start("trainer", ["trainer"], port, logdir, env)


@dataclass
class Namespace:
    """Isolated topics and Redis prefix for one measured configuration."""

    tag: str
    partitions: int
    settings: Settings

    @classmethod
    def fresh(cls, partitions: int, settings: Settings) -> "Namespace":
        return cls(uuid.uuid4().hex[:10], partitions, settings)

    @property
    def prefix(self) -> str:
        """Redis key prefix, consumer group and the stem of every topic name."""
        return f"bench-{self.tag}"

    @property
    def ratings(self) -> str:
        return f"{self.prefix}-ratings"

    @property
    def predictions(self) -> str:
        return f"{self.prefix}-predictions"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}-dlq"

    @property
    def model_updates(self) -> str:
        return f"{self.prefix}-model-updates"

    @property
    def movies(self) -> str:
        return f"{self.prefix}-movies"

    def scoped(self) -> Settings:
        """Settings as a process in this namespace sees them."""
        s = self.settings
        return s.model_copy(update={
            "kafka": s.kafka.model_copy(update={
                "ratings_topic": self.ratings, "predictions_topic": self.predictions,
                "dlq_topic": self.dlq, "model_updates_topic": self.model_updates,
                "movies_topic": self.movies, "partitions": self.partitions}),
            "redis": s.redis.model_copy(update={"key_prefix": self.prefix}),
            "worker": s.worker.model_copy(update={"app_id": self.prefix}),
        })

    def env(self, batch_size: int, port: int) -> dict[str, str]:
        return {
            "FBP_KAFKA__RATINGS_TOPIC": self.ratings,
            "FBP_KAFKA__PREDICTIONS_TOPIC": self.predictions,
            "FBP_KAFKA__DLQ_TOPIC": self.dlq,
            "FBP_KAFKA__MODEL_UPDATES_TOPIC": self.model_updates,
            "FBP_KAFKA__MOVIES_TOPIC": self.movies,
            "FBP_KAFKA__PARTITIONS": str(self.partitions),
            "FBP_REDIS__KEY_PREFIX": self.prefix,
            "FBP_WORKER__APP_ID": self.prefix,
            "FBP_WORKER__BATCH_SIZE": str(batch_size),
            "FBP_WORKER__WEB_PORT": str(port),
        }

    def create(self, configs: dict[str, dict[str, str]] | None = None) -> None:
        """Create the namespace's topics; ``configs``: topic-level settings
        to set on some of them (e.g. a latency run's LogAppendTime)."""
        from core.topics import ensure_topics

        ensure_topics(self.scoped())
        if configs:
            from kafka.admin import ConfigResource, ConfigResourceType

            from core.kafka_io import make_admin

            admin = make_admin(self.settings)
            try:
                admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, configs=c) for t, c in configs.items()])
            finally:
                admin.close()

    def drop(self) -> None:
        from core.kafka_io import make_admin

        admin = make_admin(self.settings)
        try:
            admin.delete_topics([self.ratings, f"{self.ratings}-repartition", self.predictions, self.dlq,
                                 self.model_updates, self.movies])
        except Exception:  # noqa: BLE001 - best-effort clean-up
            pass
        finally:
            admin.close()
        from core.redis_conn import sync_redis
        from core.repos.keys import drop_namespace

        r = sync_redis(self.settings.redis)
        drop_namespace(r, self.prefix)
