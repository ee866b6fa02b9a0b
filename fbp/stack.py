"""The local, Docker-free stack: Kafka (KRaft), Redis and Prometheus as plain
processes under ``settings.stack.data_dir``.

Why not Docker: development and CI machines here have no container engine,
and tests need the *real* broker/store/scraper (no mocks).  So ``fbp stack up``
generates each service's config from :mod:`core.settings`, starts it with
``subprocess.Popen(start_new_session=True)`` (it outlives the caller), writes a
pid file, and waits until the service answers a real health check.  It is
idempotent (a running service is detected by pid file + live process + port
answering a health check), and ``down`` only ever signals pids it started.
A file lock serialises concurrent ``up``/``down`` calls from several processes.

Layout under ``data_dir``: ``kafka-libs/`` (broker jars, fetched once with
Maven), and per service ``<name>/`` with its generated config, pid file,
console output (``<name>.out``) and data.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import typer

from core.settings import REPO_ROOT, Settings, get_settings

SERVICES: tuple[str, ...] = ("kafka", "redis", "prometheus")
DEPLOY = REPO_ROOT / "deploy"
KAFKA_POM = DEPLOY / "kafka" / "pom.xml"
KAFKA_LOG4J = DEPLOY / "kafka" / "log4j.properties"
PROMETHEUS_RULES_GLOB = DEPLOY / "prometheus" / "rules" / "*.yml"

# What /proc/<pid>/cmdline must contain for a pid to count as our service
# (guards against a recycled pid belonging to something else).
_CMD_MARKER = {"kafka": "kafka.Kafka", "redis": "redis-server", "prometheus": "prometheus"}
_EXECUTABLE = {"kafka": "java", "redis": "redis-server", "prometheus": "prometheus"}
_INSTALL_HINT = {
    "java": "install a Java 17 runtime (apt-get install -y openjdk-17-jre-headless)",
    "mvn": "install Maven (apt-get install -y maven) to fetch the Kafka jars",
    "redis-server": "apt-get install -y redis-server",
    "prometheus": "apt-get install -y prometheus",
}

# Processes started by this Python process, so we can reap them (a killed
# child stays a zombie -- and looks alive -- until its parent waits for it).
_children: dict[int, subprocess.Popen[bytes]] = {}

app = typer.Typer(no_args_is_help=True, help="Run the local Kafka + Redis + Prometheus stack.")


from fbp_errors import StackError


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


# --------------------------------------------------------------------------- small helpers


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else get_settings()


def _check_name(name: str) -> None:
    if name not in SERVICES:
        raise StackError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")


def service_dir(name: str, settings: Settings) -> Path:
    return Path(settings.stack.data_dir) / name


def _pid_file(name: str, settings: Settings) -> Path:
    return service_dir(name, settings) / f"{name}.pid"


def service_port(name: str, settings: Settings) -> int:
    st = settings.stack
    return {"kafka": st.kafka_port, "redis": st.redis_port, "prometheus": st.prometheus_port}[name]


def _ports(name: str, settings: Settings) -> list[int]:
    if name == "kafka":
        return [settings.stack.kafka_port, settings.stack.kafka_controller_port]
    return [service_port(name, settings)]


def _require(exe: str) -> str:
    path = shutil.which(exe)
    if path is None:
        raise StackError(f"{exe} not found on PATH: {_INSTALL_HINT.get(exe, 'install it')}")
    return path


def _port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _who_listens(port: int) -> str:
    """Best-effort description of the process holding a port (for error messages)."""
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=3
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown process"
    return out.split("users:", 1)[-1] if "users:" in out else (out or "unknown process")


def _read_pid(name: str, settings: Settings) -> int | None:
    try:
        return int(_pid_file(name, settings).read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int, name: str) -> bool:
    """True if ``pid`` is a live (non-zombie) process running service ``name``."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and _CMD_MARKER[name] in cmdline


def _log_tail(name: str, settings: Settings, lines: int = 25) -> str:
    d = service_dir(name, settings)
    chunks = []
    for f in (d / f"{name}.out", d / "server.log", d / "redis.log"):
        if f.is_file() and f.stat().st_size:
            text = f.read_text(errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {f} ---\n" + "\n".join(text))
    return "\n".join(chunks) or "(no log output)"


_lock_state = threading.local()


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
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


# --------------------------------------------------------------------------- health checks


@contextlib.contextmanager
def _quiet_kafka_logs() -> Iterator[None]:
    import logging

    lg = logging.getLogger("kafka")
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(old)


def _kafka_health(settings: Settings, timeout_s: float = 3.0) -> tuple[bool, str]:
    port = settings.stack.kafka_port
    if not _port_open(port):
        return False, f"nothing listening on {port}"
    from kafka import KafkaAdminClient

    ms = int(timeout_s * 1000)
    with _quiet_kafka_logs():
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=[f"127.0.0.1:{port}"],
                client_id="fbp-stack-health",
                bootstrap_timeout_ms=ms,
                request_timeout_ms=ms,
                **_kafka_client_security(settings),
            )
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy yet"
            return False, f"admin client: {exc}"
        try:
            topics = admin.list_topics()
            return True, f"{len([t for t in topics if not t.startswith('__')])} topics"
        except Exception as exc:  # noqa: BLE001
            return False, f"metadata: {exc}"
        finally:
            with contextlib.suppress(Exception):
                admin.close()


def _redis_health(settings: Settings, timeout_s: float = 2.0) -> tuple[bool, str]:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    r = settings.redis
    tls: dict = {}
    if _secure_redis(settings):  # secure mode: TLS only, verified against the configured CA
        tls = {"ssl": True, "ssl_ca_certs": str(r.ssl_ca_certs) if r.ssl_ca_certs else None}
    client = redis.Redis(
        host="127.0.0.1",
        port=settings.stack.redis_port,
        username=r.username,
        password=r.password.get_secret_value() if r.password else None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # a health probe must answer now, not after retries
        **tls,
    )
    try:
        return bool(client.ping()), "PONG"
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)
    finally:
        client.close()


def _prometheus_health(settings: Settings, timeout_s: float = 2.0) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{settings.stack.prometheus_port}/-/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - local URL
            return resp.status == 200, f"GET /-/ready {resp.status}"
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)


_HEALTH = {"kafka": _kafka_health, "redis": _redis_health, "prometheus": _prometheus_health}


def service_healthy(name: str, settings: Settings | None = None) -> bool:
    """Does the service answer a real request (Kafka metadata, Redis PING, Prometheus ready)?"""
    _check_name(name)
    return _HEALTH[name](_settings(settings))[0]


# --------------------------------------------------------------------------- service commands


def ensure_kafka_libs(settings: Settings) -> Path:
    """The broker jars, fetched once with Maven into ``data_dir/kafka-libs``."""
    libs = Path(settings.stack.data_dir) / "kafka-libs"
    if list(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = _require("mvn")
    libs.mkdir(parents=True, exist_ok=True)
    cmd = [mvn, "-q", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={libs}", "-DincludeScope=runtime"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not list(libs.glob("kafka_2.13-*.jar")):
        raise StackError(
            f"fetching Kafka jars failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-2000:]}"
        )
    return libs


def _java_base(settings: Settings, libs: Path, log_dir: Path, heap: str) -> list[str]:
    return [
        _require("java"),
        f"-Xmx{heap}",
        f"-Xms{heap}",
        # Small, quick-starting JVM for a 2-core box: no parallel GC threads, C1 only.
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{KAFKA_LOG4J}",
        f"-Dkafka.logs.dir={log_dir}",
        "-cp",
        f"{libs}/*",
    ]


# --------------------------------------------------------------------------- secure mode
#
# Opt-in, from configuration alone: when ``settings.kafka.security_protocol``
# is not PLAINTEXT, the local broker's client listener speaks that protocol
# (TLS and/or SASL with the configured mechanism; SCRAM credentials of
# ``sasl_username``/``sasl_password`` are created when the storage is
# formatted), and when ``settings.redis.url`` is ``rediss://`` Redis listens
# with TLS only.  The server certificate and key are read from the directory
# of the configured CA file (``ssl_cafile`` / ``ssl_ca_certs``), as written by
# ``deploy/security/make_certs.py``.  The KRaft controller listener stays
# PLAINTEXT on 127.0.0.1.  With the defaults (PLAINTEXT, redis://) nothing here
# applies and the stack is exactly as before.

_TLS_FILES = ("ca.pem", "server.pem", "server.key", "server-keystore.pem", "server-keystore.pass")
_CRED_FORBIDDEN = set('"\\,=[]\n\r ')


def _secure_kafka(settings: Settings) -> bool:
    return settings.kafka.security_protocol != "PLAINTEXT"


def _secure_redis(settings: Settings) -> bool:
    return settings.redis.url.startswith("rediss://")


def _kafka_client_security(settings: Settings) -> dict:
    """kafka-python security options for our own probes ({} for PLAINTEXT)."""
    if not _secure_kafka(settings):
        return {}
    kw = settings.kafka.kafka_python_kwargs()
    kw.pop("bootstrap_servers", None)
    return kw


def _tls_dir(ca_file: Path | None, what: str) -> Path:
    if ca_file is None:
        raise StackError(f"secure mode for {what} needs the CA file setting (FBP_KAFKA__SSL_CAFILE / "
                         "FBP_REDIS__SSL_CA_CERTS); create one with deploy/security/make_certs.py --out DIR")
    d = Path(ca_file).resolve().parent
    missing = [n for n in _TLS_FILES if not (d / n).is_file()]
    if missing:
        raise StackError(f"secure mode for {what}: {', '.join(missing)} missing in {d}; "
                         f"run: python deploy/security/make_certs.py --out {d}")
    return d


def _check_credential(value: str, what: str) -> str:
    if not value or _CRED_FORBIDDEN & set(value):
        raise StackError(f"{what} must be non-empty without quotes, backslashes, spaces, ',', '=', '[' or ']' "
                         "(it is written into the broker's JAAS and SCRAM configuration)")
    return value


def _sasl_credentials(settings: Settings) -> tuple[str, str] | None:
    k = settings.kafka
    if not k.sasl_mechanism:
        return None
    if not k.sasl_username or k.sasl_password is None:
        raise StackError("a SASL protocol needs FBP_KAFKA__SASL_USERNAME and FBP_KAFKA__SASL_PASSWORD")
    return (_check_credential(k.sasl_username, "sasl_username"),
            _check_credential(k.sasl_password.get_secret_value(), "sasl_password"))


def _secure_kafka_properties(settings: Settings) -> dict[str, str]:
    st, k = settings.stack, settings.kafka
    proto = k.security_protocol
    props = {
        "listeners": f"SECURE://127.0.0.1:{st.kafka_port},CONTROLLER://127.0.0.1:{st.kafka_controller_port}",
        "advertised.listeners": f"SECURE://127.0.0.1:{st.kafka_port}",
        "inter.broker.listener.name": "SECURE",
        "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,SECURE:{proto}",
    }
    if proto in ("SSL", "SASL_SSL"):
        d = _tls_dir(k.ssl_cafile, "Kafka")
        props.update({
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(d / "server-keystore.pem"),
            "ssl.key.password": (d / "server-keystore.pass").read_text().strip(),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(Path(k.ssl_cafile).resolve()),
            "ssl.client.auth": "required" if k.ssl_certfile else "none",
            "ssl.endpoint.identification.algorithm": "https",
        })
    creds = _sasl_credentials(settings) if proto.startswith("SASL") else None
    if creds is not None:
        user, pw = creds
        mech = k.sasl_mechanism or ""
        if mech == "PLAIN":
            module = (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                      f'username="{user}" password="{pw}" user_{user}="{pw}";')
        else:
            module = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{user}" password="{pw}";'
        props.update({
            "sasl.enabled.mechanisms": mech,
            "sasl.mechanism.inter.broker.protocol": mech,
            f"listener.name.secure.{mech.lower()}.sasl.jaas.config": module,
        })
    return props


def _scram_format_args(settings: Settings) -> list[str]:
    """``--add-scram`` for the storage format: the SCRAM user exists from the first start."""
    k = settings.kafka
    if not (_secure_kafka(settings) and k.security_protocol.startswith("SASL")
            and (k.sasl_mechanism or "").startswith("SCRAM")):
        return []
    user, pw = _sasl_credentials(settings) or ("", "")
    return ["--add-scram", f"{k.sasl_mechanism}=[name={user},password={pw}]"]


def kafka_server_properties(settings: Settings) -> str:
    """Single-node KRaft (broker + controller in one JVM) bound to 127.0.0.1."""
    st = settings.stack
    d = service_dir("kafka", settings)
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{st.kafka_controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{st.kafka_port},"
        f"CONTROLLER://127.0.0.1:{st.kafka_controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{st.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(d / "data"),
        "num.partitions": str(settings.kafka.partitions),
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        # 50 offsets partitions cost seconds on first group join; 8 is plenty locally.
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "log.retention.hours": "168",
        "log.segment.bytes": str(64 * 1024 * 1024),
        "log.retention.check.interval.ms": "300000",
        "num.recovery.threads.per.data.dir": "2",
        # After a crash the restarted broker must wait out its old session before
        # it is unfenced; the 9 s default would make every kill-restart slow.
        "broker.session.timeout.ms": "2500",
        "broker.heartbeat.interval.ms": "500",
    }
    if _secure_kafka(settings):
        props.update(_secure_kafka_properties(settings))
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _kafka_cmd(settings: Settings) -> list[str]:
    d = service_dir("kafka", settings)
    libs = ensure_kafka_libs(settings)
    props = d / "server.properties"
    props.write_text(kafka_server_properties(settings))
    if _secure_kafka(settings):  # holds the broker's own SASL password and key password
        props.chmod(0o600)
    if not (d / "data" / "meta.properties").is_file():
        cid_file = d / "cluster.id"
        if not cid_file.is_file():
            cid_file.write_text(_new_cluster_id() + "\n")
        cid = cid_file.read_text().strip()
        cmd = _java_base(settings, libs, d, "256m") + [
            "kafka.tools.StorageTool", "format", "-t", cid, "-c", str(props), "--ignore-formatted",
            *_scram_format_args(settings),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise StackError(f"kafka storage format failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return _java_base(settings, libs, d, settings.stack.kafka_heap) + ["kafka.Kafka", str(props)]


def redis_config(settings: Settings) -> str:
    st, r = settings.stack, settings.redis
    d = service_dir("redis", settings)
    lines = [
        "bind 127.0.0.1",
        f"port {st.redis_port}",
        "daemonize no",
        f'dir "{d}"',
        f'logfile "{d / "redis.log"}"',
        "appendonly yes",
        f"appendfsync {st.redis_appendfsync}",
        "save 300 100",
        "protected-mode yes",
    ]
    if r.password is not None:
        pw = r.password.get_secret_value()
        if r.username and r.username != "default":
            lines.append(f"user {r.username} on >{pw} ~* &* +@all")
            lines.append("user default off")  # only the configured ACL user may connect
        else:
            lines.append(f'requirepass "{pw}"')
    if _secure_redis(settings):  # TLS only: the plain port is closed
        d = _tls_dir(r.ssl_ca_certs, "Redis")
        lines[1] = "port 0"
        lines += [
            f"tls-port {st.redis_port}",
            f'tls-cert-file "{d / "server.pem"}"',
            f'tls-key-file "{d / "server.key"}"',
            f'tls-ca-cert-file "{Path(r.ssl_ca_certs).resolve()}"',
            "tls-auth-clients no",
        ]
    return "\n".join(lines) + "\n"


def _redis_cmd(settings: Settings) -> list[str]:
    exe = _require("redis-server")
    conf = service_dir("redis", settings) / "redis.conf"
    conf.write_text(redis_config(settings))
    conf.chmod(0o600)
    return [exe, str(conf)]


def _duration(seconds: float) -> str:
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{int(seconds * 1000)}ms"


def prometheus_config(settings: Settings) -> str:
    """prometheus.yml: job ``fbp`` over the scrape targets, plus any rule files."""
    import yaml

    st = settings.stack
    every = _duration(st.scrape_interval_s)
    cfg = {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "rule_files": [str(PROMETHEUS_RULES_GLOB)],
        "scrape_configs": [
            {"job_name": "fbp", "static_configs": [{"targets": list(st.scrape_targets)}]},
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{st.prometheus_port}"]}],
            },
        ],
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def _prometheus_cmd(settings: Settings) -> list[str]:
    exe = _require("prometheus")
    d = service_dir("prometheus", settings)
    yml = d / "prometheus.yml"
    yml.write_text(prometheus_config(settings))
    return [
        exe,
        f"--config.file={yml}",
        f"--storage.tsdb.path={d / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{settings.stack.prometheus_port}",
        "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=7d",
        "--log.level=warn",
    ]


def _reload_prometheus(settings: Settings) -> None:
    """Rewrite prometheus.yml and hot-reload it, so targets and rule files
    added since the server started are picked up without a restart."""
    yml = service_dir("prometheus", settings) / "prometheus.yml"
    yml.write_text(prometheus_config(settings))
    req = urllib.request.Request(
        f"http://127.0.0.1:{settings.stack.prometheus_port}/-/reload", method="POST"
    )
    with contextlib.suppress(OSError):
        urllib.request.urlopen(req, timeout=5).close()  # noqa: S310 - local URL


_COMMAND = {"kafka": _kafka_cmd, "redis": _redis_cmd, "prometheus": _prometheus_cmd}


# --------------------------------------------------------------------------- lifecycle


def _status_one(name: str, settings: Settings, timeout_s: float = 3.0) -> ServiceStatus:
    port = service_port(name, settings)
    pid = _read_pid(name, settings)
    ours = pid is not None and _pid_alive(pid, name)
    healthy, detail = _HEALTH[name](settings, timeout_s)
    if ours:
        return ServiceStatus(name, pid, port, True, healthy, detail=detail)
    if healthy:
        return ServiceStatus(name, None, port, True, True, external=True, detail=detail)
    return ServiceStatus(name, None, port, False, False, detail="not running")


def _launch(name: str, settings: Settings) -> int:
    d = service_dir(name, settings)
    d.mkdir(parents=True, exist_ok=True)
    for port in _ports(name, settings):
        if _port_open(port):
            raise StackError(
                f"cannot start {name}: port {port} is taken by another process "
                f"({_who_listens(port)}); stop it or choose another port in settings.stack"
            )
    cmd = _COMMAND[name](settings)
    with open(d / f"{name}.out", "ab") as out:
        out.write(f"\n=== {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=d, start_new_session=True,
        )  # fmt: skip
    _children[proc.pid] = proc
    _pid_file(name, settings).write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_healthy(name: str, settings: Settings, pid: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    detail = ""
    while True:
        if not _pid_alive(pid, name):
            _pid_file(name, settings).unlink(missing_ok=True)
            raise StackError(f"{name} (pid {pid}) exited during start-up:\n{_log_tail(name, settings)}")
        ok, detail = _HEALTH[name](settings, 2.0)
        if ok:
            return detail
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} (pid {pid}) not healthy after {timeout_s:.0f}s ({detail}):\n"
                f"{_log_tail(name, settings)}"
            )
        time.sleep(0.2)


def _start_many(names: Sequence[str], settings: Settings, timeout_s: float) -> list[ServiceStatus]:
    """Launch every stopped service first, then wait for each: start-ups overlap."""
    for n in names:
        _check_name(n)
    with _locked(settings):
        pending: list[tuple[str, int, float]] = []
        done: dict[str, ServiceStatus] = {}
        for n in names:
            pid = _read_pid(n, settings)
            if pid is not None and _pid_alive(pid, n):
                pending.append((n, pid, -1.0))  # ours, maybe still starting: just wait
                if n == "prometheus":
                    _reload_prometheus(settings)
                continue
            _pid_file(n, settings).unlink(missing_ok=True)
            ok, detail = _HEALTH[n](settings, 2.0)
            if ok:  # someone else's instance answers properly on our port: reuse it
                done[n] = ServiceStatus(n, None, service_port(n, settings), True, True,
                                        external=True, detail=detail)  # fmt: skip
                continue
            pending.append((n, _launch(n, settings), time.monotonic()))
        for n, pid, t0 in pending:
            detail = _wait_healthy(n, settings, pid, timeout_s)
            took = round(time.monotonic() - t0, 2) if t0 >= 0 else None
            done[n] = ServiceStatus(n, pid, service_port(n, settings), True, True,
                                    started_in_s=took, detail=detail)  # fmt: skip
        return [done[n] for n in names]


def start_service(name: str, settings: Settings | None = None, *, timeout_s: float = 90.0) -> ServiceStatus:
    """Start one service (no-op if running) and wait until it is healthy."""
    return _start_many([name], _settings(settings), timeout_s)[0]


def stop_service(
    name: str,
    settings: Settings | None = None,
    sig: int = signal.SIGTERM,
    *,
    timeout_s: float = 30.0,
) -> bool:
    """Signal the service we started (SIGTERM, then SIGKILL after ``timeout_s``).

    Returns False if it was not running.  ``sig=SIGKILL`` simulates a crash.
    """
    _check_name(name)
    settings = _settings(settings)
    with _locked(settings):
        pid = _read_pid(name, settings)
        if pid is None or not _pid_alive(pid, name):
            _pid_file(name, settings).unlink(missing_ok=True)
            return False
        for s, wait in ((sig, timeout_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, s)
            deadline = time.monotonic() + wait
            while _pid_alive(pid, name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _pid_alive(pid, name):
                break
        child = _children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        if _pid_alive(pid, name):
            raise StackError(f"{name} (pid {pid}) survived SIGKILL")
        _pid_file(name, settings).unlink(missing_ok=True)
        # Wait until the port is released so an immediate restart can bind it.
        deadline = time.monotonic() + 10
        while any(_port_open(p) for p in _ports(name, settings)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return True


def stack_up(
    settings: Settings | None = None,
    services: Iterable[str] = SERVICES,
    *,
    topics: bool = True,
    timeout_s: float = 90.0,
) -> list[ServiceStatus]:
    """Start what is not running, wait for health, create Kafka topics; idempotent."""
    settings = _settings(settings)
    names = list(services)
    with _locked(settings):
        statuses = _start_many(names, settings, timeout_s)
        if topics and "kafka" in names:
            from core.topics import ensure_topics

            ensure_topics(settings)
    return statuses


def stack_down(
    settings: Settings | None = None,
    services: Iterable[str] = SERVICES,
    *,
    sig: int = signal.SIGTERM,
    timeout_s: float = 30.0,
) -> list[str]:
    """Stop the services this stack started (others are left alone); returns those stopped."""
    settings = _settings(settings)
    return [n for n in reversed(list(services)) if stop_service(n, settings, sig, timeout_s=timeout_s)]


def stack_status(
    settings: Settings | None = None, services: Iterable[str] = SERVICES
) -> list[ServiceStatus]:
    """Pid, port and health of each service (quick; starts nothing)."""
    settings = _settings(settings)
    out = []
    for n in services:
        _check_name(n)
        out.append(_status_one(n, settings))
    return out


# --------------------------------------------------------------------------- CLI


def _table(rows: list[ServiceStatus]) -> str:
    head = ("service", "pid", "port", "healthy", "detail")
    body = [
        (
            r.name,
            "external" if r.external else (str(r.pid) if r.pid else "-"),
            str(r.port),
            "yes" if r.healthy else "NO",
            r.detail + (f" (started in {r.started_in_s:.1f}s)" if r.started_in_s else ""),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body])


_ServiceOpt = typer.Option(None, "--service", "-s", help="Only these services (repeatable).")


@app.command()
def up(
    service: list[str] | None = _ServiceOpt,
    timeout: float = typer.Option(90.0, help="Seconds to wait for each service to be healthy."),
) -> None:
    """Start Kafka, Redis and Prometheus (idempotent) and create the topics."""
    try:
        rows = stack_up(services=service or SERVICES, timeout_s=timeout)
    except StackError as exc:
        typer.echo(f"stack up failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(_table(rows))


@app.command()
def down(
    service: list[str] | None = _ServiceOpt,
    kill: bool = typer.Option(False, "--kill", help="SIGKILL instead of a clean SIGTERM."),
) -> None:
    """Stop the services started by `fbp stack up`."""
    stopped = stack_down(services=service or SERVICES, sig=signal.SIGKILL if kill else signal.SIGTERM)
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status(service: list[str] | None = _ServiceOpt) -> None:
    """Show service, pid, port and health; exit code 1 if any is unhealthy."""
    rows = stack_status(services=service or SERVICES)
    typer.echo(_table(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@app.command()
def topics() -> None:
    """Create missing topics on the configured Kafka (settings.kafka) and show record counts.

    Works against any Kafka (also docker-compose's), not only the local stack.
    """
    from core.topics import ensure_topics, topic_counts

    settings = get_settings()
    created = ensure_topics(settings)
    if created:
        typer.echo("created: " + ", ".join(created))
    for name, n in topic_counts(settings).items():
        typer.echo(f"{name:<20} {n:>10,} records")
