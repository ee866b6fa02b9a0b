"""Start, stop and inspect :class:`~stack.service.Service` processes.

Each service runs as a plain process (``start_new_session=True``, so it outlives
the caller) with a pid file and its console output in its own directory under
``settings.stack.data_dir``.  A running service is recognised by pid file +
live process whose command line carries the service's marker; ``stop`` only
ever signals pids it started.  A file lock serialises concurrent changes from
several processes (tests, benchmarks and the CLI share one stack).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from core.settings import Settings
from fbp_errors import StackError
from stack.service import Service, ServiceStatus, port_open, who_listens

# Processes started by this Python process, so we can reap them (a killed
# child stays a zombie -- and looks alive -- until its parent waits for it).
_children: dict[int, subprocess.Popen[bytes]] = {}
_lock_state = threading.local()


@contextlib.contextmanager
def locked(settings: Settings) -> Iterator[None]:
    """Serialise stack changes across processes (re-entrant within a thread)."""
    depth = getattr(_lock_state, "depth", 0)
    if depth:
        _lock_state.depth = depth + 1
        try:
            yield
        finally:
            _lock_state.depth -= 1
        return
    data = Path(settings.stack.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    with open(data / ".stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _lock_state.depth = 1
        try:
            yield
        finally:
            _lock_state.depth = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- pid files and logs


def pid_file(svc: Service) -> Path:
    return svc.dir / f"{svc.name}.pid"


def read_pid(svc: Service) -> int | None:
    try:
        return int(pid_file(svc).read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int, svc: Service) -> bool:
    """True if ``pid`` is a live (non-zombie) process running ``svc``."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and svc.marker in cmdline


def ours(svc: Service) -> int | None:
    """The pid of our running instance of ``svc``, or None."""
    pid = read_pid(svc)
    return pid if pid is not None and pid_alive(pid, svc) else None


def log_tail(svc: Service, lines: int = 25) -> str:
    chunks = []
    for f in [svc.dir / f"{svc.name}.out", *(svc.dir / n for n in svc.log_files)]:
        if f.is_file() and f.stat().st_size:
            text = f.read_text(errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {f} ---\n" + "\n".join(text))
    return "\n".join(chunks) or "(no log output)"


# --------------------------------------------------------------------------- lifecycle


def status_of(svc: Service, timeout_s: float = 3.0) -> ServiceStatus:
    pid = ours(svc)
    healthy, detail = svc.health(timeout_s)
    if pid is not None:
        return ServiceStatus(svc.name, pid, svc.port, True, healthy, detail=detail)
    if healthy:
        return ServiceStatus(svc.name, None, svc.port, True, True, external=True, detail=detail)
    return ServiceStatus(svc.name, None, svc.port, False, False, detail="not running")


def launch(svc: Service) -> int:
    """Check the ports are free, write the configs, start the process, write its pid file."""
    svc.dir.mkdir(parents=True, exist_ok=True)
    for port in svc.ports():
        if port_open(port):
            raise StackError(
                f"cannot start {svc.name}: port {port} is taken by another process "
                f"({who_listens(port)}); stop it or choose another port in settings.stack"
            )
    cmd = svc.command()
    with open(svc.dir / f"{svc.name}.out", "ab") as out:
        out.write(f"\n=== {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=svc.dir, start_new_session=True,
        )  # fmt: skip
    _children[proc.pid] = proc
    pid_file(svc).write_text(f"{proc.pid}\n")
    return proc.pid


def wait_healthy(svc: Service, pid: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        if not pid_alive(pid, svc):
            pid_file(svc).unlink(missing_ok=True)
            raise StackError(f"{svc.name} (pid {pid}) exited during start-up:\n{log_tail(svc)}")
        ok, detail = svc.health(2.0)
        if ok:
            return detail
        if time.monotonic() > deadline:
            raise StackError(
                f"{svc.name} (pid {pid}) not healthy after {timeout_s:.0f}s ({detail}):\n{log_tail(svc)}"
            )
        time.sleep(0.2)


def start_many(services: Sequence[Service], settings: Settings, timeout_s: float) -> list[ServiceStatus]:
    """Launch every stopped service first, then wait for each: start-ups overlap
    (a Kafka quorum of several nodes only becomes healthy once a majority runs)."""
    with locked(settings):
        pending: list[tuple[Service, int, float]] = []
        done: dict[str, ServiceStatus] = {}
        for svc in services:
            pid = ours(svc)
            if pid is not None:
                pending.append((svc, pid, -1.0))  # ours, maybe still starting: just wait
                svc.refresh()
                continue
            pid_file(svc).unlink(missing_ok=True)
            ok, detail = svc.health(2.0)
            if ok:  # someone else's instance answers properly on our port: reuse it
                done[svc.name] = ServiceStatus(svc.name, None, svc.port, True, True,
                                               external=True, detail=detail)  # fmt: skip
                continue
            pending.append((svc, launch(svc), time.monotonic()))
        for svc, pid, t0 in pending:
            detail = wait_healthy(svc, pid, timeout_s)
            took = round(time.monotonic() - t0, 2) if t0 >= 0 else None
            done[svc.name] = ServiceStatus(svc.name, pid, svc.port, True, True,
                                           started_in_s=took, detail=detail)  # fmt: skip
        return [done[s.name] for s in services]


def stop_many(services: Sequence[Service], settings: Settings, sig: int = signal.SIGTERM, *,
              timeout_s: float = 30.0) -> list[str]:  # fmt: skip
    """Signal our running instances together (``sig``, then SIGKILL for those
    still alive after ``timeout_s``) and wait until their ports are free;
    returns the names stopped.  Together, because the last nodes of a Kafka
    quorum stopped one by one wait out their timeouts for the departed ones."""
    with locked(settings):
        running = []
        for svc in services:
            pid = ours(svc)
            if pid is None:
                pid_file(svc).unlink(missing_ok=True)
            else:
                running.append((svc, pid))
        for s, wait in ((sig, timeout_s), (signal.SIGKILL, 10.0)):
            alive = [(svc, pid) for svc, pid in running if pid_alive(pid, svc)]
            for _, pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, s)
            deadline = time.monotonic() + wait
            while any(pid_alive(pid, svc) for svc, pid in alive) and time.monotonic() < deadline:
                time.sleep(0.1)
        for svc, pid in running:
            child = _children.pop(pid, None)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
            if pid_alive(pid, svc):
                raise StackError(f"{svc.name} (pid {pid}) survived SIGKILL")
            pid_file(svc).unlink(missing_ok=True)
        # Wait until the ports are released so an immediate restart can bind them.
        ports = [p for svc, _ in running for p in svc.ports()]
        deadline = time.monotonic() + 10
        while any(port_open(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [svc.name for svc, _ in running]


def stop(svc: Service, settings: Settings, sig: int = signal.SIGTERM, *, timeout_s: float = 30.0) -> bool:
    """Stop our instance of one service; False if it was not running."""
    return bool(stop_many([svc], settings, sig, timeout_s=timeout_s))
