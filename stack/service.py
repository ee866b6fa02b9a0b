"""What every local service declares, and the small OS helpers they share.

A service is a value that knows its own name, ports, command line (writing its
config files first), log files and health check; the supervisor
(:mod:`stack.supervisor`) knows nothing service-specific beyond this.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import Settings
from fbp_errors import StackError

# One place for "how do I get this program" (Debian package names).
INSTALL_HINT = {
    "java": "install a Java 17 runtime (apt-get install -y openjdk-17-jre-headless)",
    "mvn": "install Maven (apt-get install -y maven) to fetch the Kafka jars",
    "redis-server": "apt-get install -y redis-server (or run scripts/install-system-deps.sh as root)",
    "redis-cli": "apt-get install -y redis-tools (comes with redis-server)",
    "prometheus": "apt-get install -y prometheus (or run scripts/install-system-deps.sh as root)",
}


@dataclass
class ServiceStatus:
    """One service as seen right now."""

    name: str
    pid: int | None
    port: int
    running: bool
    healthy: bool
    external: bool = False  # answering on our port but not started by us
    started_in_s: float | None = None  # set when this call started it
    detail: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def service_dir(name: str, settings: Settings) -> Path:
    """Config, pid file, console output and data of service ``name``."""
    return Path(settings.stack.data_dir) / name


class Service(ABC):
    """One supervised process.  Subclasses are bound to the settings they run with."""

    name: str
    #: What /proc/<pid>/cmdline must contain for a pid to count as this service
    #: (guards against a recycled pid belonging to something else).
    marker: str
    #: Log files (relative to the service dir) shown when start-up fails.
    log_files: tuple[str, ...] = ()

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def dir(self) -> Path:
        return service_dir(self.name, self.settings)

    @property
    def port(self) -> int:
        """The port shown in status tables (the client-facing one)."""
        return self.ports()[0]

    @abstractmethod
    def ports(self) -> list[int]:
        """Every port the process binds: all must be free before a start."""

    @abstractmethod
    def command(self) -> list[str]:
        """Write the config files into :attr:`dir` and return the argv to run."""

    @abstractmethod
    def health(self, timeout_s: float) -> tuple[bool, str]:
        """A real request (metadata, PING, /-/ready): (answers properly, detail)."""

    def refresh(self) -> None:  # noqa: B027 - optional hook
        """Called by ``up`` when the service already runs (e.g. reload a config)."""


def require(exe: str) -> str:
    """Absolute path of a program, or a StackError that says how to install it."""
    path = shutil.which(exe)
    if path is None:
        raise StackError(f"{exe} not found on PATH: {INSTALL_HINT.get(exe, 'install it')}")
    return path


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def who_listens(port: int) -> str:
    """Best-effort description of the process holding a port (for error messages)."""
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=3
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown process"
    return out.split("users:", 1)[-1] if "users:" in out else (out or "unknown process")
