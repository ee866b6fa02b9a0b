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
from dataclasses import dataclass
from pathlib import Path

import httpx

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
        wait_healthy(proc)
    return proc


def start_trainer(port: int, logdir: Path, env: dict[str, str] | None = None) -> Proc:
    env = dict(env or {})
    env["FBP_TRAINER__WEB_PORT"] = str(port)
    return _start("trainer", ["trainer"], port, logdir, env)
