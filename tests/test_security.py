"""Security: TLS + SASL/SCRAM Kafka, TLS + ACL-user Redis, tokens, safe checkpoints, no leaked secrets.

The secure stack is a *separate* Kafka and Redis (own ports and data dir,
started by :mod:`fbp.stack` in its opt-in secure mode), so the default stack
keeps serving everyone else.  Every setting reaches the worker and the
clients through ``FBP_*`` environment variables only.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from stack import procs
from stack.procs import Namespace
from core.settings import REPO_ROOT, Settings, load_settings
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

KAFKA_PORT = int(os.environ.get("FBP_SECURE_TEST_KAFKA_PORT", "19292"))
REDIS_PORT = int(os.environ.get("FBP_SECURE_TEST_REDIS_PORT", "16579"))
WORKER_PORT = 6175


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _settings_from(env: dict[str, str]) -> Settings:
    with _env(env):
        return load_settings()


class Secure:
    """Secrets, env and settings of the secure stack."""

    def __init__(self, root: Path) -> None:
        from deploy.security.make_certs import make_certs

        self.root = root
        self.tls = make_certs(root / "tls")
        self.kafka_pw = "kp-" + secrets.token_hex(12)
        self.redis_pw = "rp-" + secrets.token_hex(12)
        self.admin_token = "adm-" + secrets.token_hex(12)
        self.read_token = "rd-" + secrets.token_hex(12)
        self.env = {
            "FBP_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{KAFKA_PORT}",
            "FBP_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "FBP_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
            "FBP_KAFKA__SASL_USERNAME": "fbp",
            "FBP_KAFKA__SASL_PASSWORD": self.kafka_pw,
            "FBP_KAFKA__SSL_CAFILE": str(self.tls["ca.pem"]),
            "FBP_REDIS__URL": f"rediss://127.0.0.1:{REDIS_PORT}/0",
            "FBP_REDIS__USERNAME": "fbp-worker",
            "FBP_REDIS__PASSWORD": self.redis_pw,
            "FBP_REDIS__SSL_CA_CERTS": str(self.tls["ca.pem"]),
            "FBP_STACK__DATA_DIR": str(root / "stack"),
            "FBP_STACK__KAFKA_PORT": str(KAFKA_PORT),
            "FBP_STACK__KAFKA_CONTROLLER_PORT": str(KAFKA_PORT + 1),
            "FBP_STACK__REDIS_PORT": str(REDIS_PORT),
            "FBP_STACK__KAFKA_HEAP": "320m",
            "FBP_WORKER__ADMIN_TOKEN": self.admin_token,
            "FBP_WORKER__READ_TOKEN": self.read_token,
        }
        self.settings = _settings_from(self.env)

    @property
    def secrets(self) -> dict[str, str]:
        return {"kafka password": self.kafka_pw, "redis password": self.redis_pw,
                "admin token": self.admin_token, "read token": self.read_token}


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> Iterator[Secure]:
    from stack import StackError, stack_down, stack_up

    root = tmp_path_factory.mktemp("secure")
    sec = Secure(root)
    libs = load_settings().stack.data_dir / "kafka-libs"
    (root / "stack").mkdir()
    if libs.is_dir():
        (root / "stack" / "kafka-libs").symlink_to(libs)
    s = sec.settings
    try:
        rows = stack_up(s, ["kafka", "redis"], topics=False, timeout_s=150)
    except StackError as exc:
        stack_down(s, ["kafka", "redis"], timeout_s=10)
        pytest.fail(f"secure stack did not come up: {exc}")
    if any(r.external for r in rows):
        stack_down(s, ["kafka", "redis"], timeout_s=10)
        pytest.fail("secure-stack ports are taken by processes this run did not start")
    try:
        yield sec
    finally:
        stack_down(s, ["kafka", "redis"], timeout_s=20)


def _worker_env(sec: Secure, ns: Namespace, ckpt: Path, **over: str) -> dict[str, str]:
    env = dict(sec.env)
    env.update(ns.env(256, WORKER_PORT))
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    env.update(over)
    return env


def _wait_exit(proc: procs.Proc, timeout: float) -> int | None:
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


# -- the pipeline over TLS + SASL/SCRAM and TLS + ACL Redis ---------------------------
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_secure_pipeline_end_to_end_tokens_and_no_leaks(secure, ckpt, tmp_path):
    import redis as redis_lib

    from core.redis_conn import sync_redis
    from stream.replay import replay
    from tests.streamkit import read_topic
    from core.datasets import load_dataset

    s = secure.settings
    # the servers really are locked: plain TCP and anonymous access are refused
    plain = redis_lib.Redis(host="127.0.0.1", port=REDIS_PORT, socket_timeout=3, socket_connect_timeout=3)
    with pytest.raises(redis_lib.exceptions.RedisError):
        plain.ping()
    anon = redis_lib.Redis(host="127.0.0.1", port=REDIS_PORT, ssl=True, ssl_ca_certs=str(secure.tls["ca.pem"]),
                           socket_timeout=3)
    with pytest.raises(redis_lib.exceptions.AuthenticationError):
        anon.ping()
    assert sync_redis(s.redis).ping()
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    # PLAINTEXT client against the SASL_SSL listener: it must fail to talk to the
    # broker (a configuration error raised before connecting would prove nothing)
    with pytest.raises((KafkaTimeoutError, KafkaConnectionError)):
        KafkaAdminClient(bootstrap_servers=[f"127.0.0.1:{KAFKA_PORT}"], request_timeout_ms=5000,
                         bootstrap_timeout_ms=5000).list_topics()

    ns = Namespace.fresh(2, s)
    ns.create()
    df = load_dataset("ml-100k").ratings.iloc[:2_000]
    worker = procs.start_worker(WORKER_PORT, tmp_path, _worker_env(secure, ns, ckpt))
    try:
        summary = replay(ns.scoped(), df, progress=False)
        recs = read_topic(s, ns.predictions, until=len(df), timeout=180)
        ids = {r["event_id"] for r in recs}
        print(f"\nsecure pipeline: replayed {summary.events} over SASL_SSL/SCRAM-SHA-256, "
              f"{len(ids)} predictions; Redis over TLS as ACL user fbp-worker")
        assert len(ids) == len(df)

        url = worker.url
        user = int(df.iloc[0]["user_id"])
        admin = {"Authorization": f"Bearer {secure.admin_token}"}
        read = {"Authorization": f"Bearer {secure.read_token}"}
        wrong = {"Authorization": "Bearer not-the-token"}
        codes = {}
        for ep in ("reload", "finetune", "rollback"):
            codes[ep] = (httpx.post(f"{url}/api/v1/admin/{ep}").status_code,
                         httpx.post(f"{url}/api/v1/admin/{ep}", headers=wrong).status_code,
                         httpx.post(f"{url}/api/v1/admin/{ep}", headers=read).status_code,
                         httpx.post(f"{url}/api/v1/admin/{ep}", headers=admin).status_code)
        reads = {}
        for path in (f"/api/v1/users/{user}/profile", f"/api/v1/users/{user}/top?k=3",
                     f"/api/v1/users/{user}/scores?movies=1,2", "/api/v1/model"):
            reads[path] = (httpx.get(url + path).status_code, httpx.get(url + path, headers=wrong).status_code,
                           httpx.get(url + path, headers=read).status_code)
        print(f"admin (none, wrong, read token, admin token): {codes}\nread (none, wrong, read token): {reads}")
        for ep, (none, bad, other, ok) in codes.items():
            assert none == 401 and bad == 401 and other == 401, (ep, codes[ep])
            # rollback with no earlier version is a clean 409 refusal, but authorised
            assert (200 <= ok < 300) or (ep == "rollback" and ok == 409), (ep, ok)
        for path, (none, bad, ok) in reads.items():
            assert none == 401 and bad == 401 and ok == 200, (path, reads[path])

        metrics = httpx.get(url + "/metrics").text
        live = httpx.get(url + "/api/v1/live", headers=read).text
        health = httpx.get(url + "/health").text
    finally:
        assert worker.stop() == 0, worker.tail()
        with contextlib.suppress(Exception):
            ns.drop()

    # no secret in the worker's log, /metrics, /live, /health, or the servers' logs
    texts = {"worker log": worker.log.read_text(errors="replace"), "/metrics": metrics,
             "/api/v1/live": live, "/health": health}
    stack_dir = Path(s.stack.data_dir)
    for f in (stack_dir / "kafka" / "kafka.out", stack_dir / "kafka" / "server.log",
              stack_dir / "redis" / "redis.log", stack_dir / "redis" / "redis.out"):
        if f.is_file():
            texts[str(f.relative_to(stack_dir))] = f.read_text(errors="replace")
    leaks = [(name, where) for name, value in secure.secrets.items()
             for where, text in texts.items() if value in text]
    print(f"secrets searched in {sorted(texts)}: leaks {leaks}")
    assert not leaks
    # the config files that must hold secrets are private to the owner
    for f in (stack_dir / "kafka" / "server.properties", stack_dir / "redis" / "redis.conf"):
        assert f.stat().st_mode & 0o077 == 0, f


def _assert_worker_refused(sec: Secure, ckpt: Path, tmp_path: Path, port: int, password_var: str,
                           log_pattern: str) -> None:
    """A worker given a wrong ``password_var`` exits non-zero within 120 s, says
    why in its log (``log_pattern``), and never writes the wrong password there."""
    ns = Namespace.fresh(1, sec.settings)
    ns.create()
    try:
        env = _worker_env(sec, ns, ckpt, **{password_var: "wrong-" + secrets.token_hex(4)})
        w = procs.start_worker(port, tmp_path, env, wait=False)
        code = _wait_exit(w, 120)
        if code is None:
            w.kill()
        log = w.log.read_text(errors="replace")
        print(f"\nworker with a wrong {password_var}: exit {code}; "
              f"{[ln for ln in log.splitlines() if re.search(log_pattern, ln, re.I)][:2]}")
        assert code not in (None, 0), f"worker must exit non-zero on a wrong {password_var}:\n" + w.tail()
        assert re.search(log_pattern, log, re.I), w.tail()
        assert env[password_var] not in log
    finally:
        with contextlib.suppress(Exception):
            ns.drop()


# -- wrong credentials fail, clearly -------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_wrong_kafka_password_fails_clearly(secure, ckpt, tmp_path):
    from stream.replay import replay
    from core.datasets import load_dataset

    wrong_pw = "wrong-" + secrets.token_hex(4)
    bad = _settings_from({**secure.env, "FBP_KAFKA__SASL_PASSWORD": wrong_pw})
    df = load_dataset("ml-100k").ratings.iloc[:10]
    t0 = time.monotonic()
    with pytest.raises(Exception) as exc:
        replay(bad, df, progress=False, topic="ratings")
    msg = f"{type(exc.value).__name__}: {exc.value}"
    print(f"\nreplay with a wrong SASL password: {msg} ({time.monotonic() - t0:.1f}s)")
    assert re.search(r"authentication", msg, re.I) and "sasl_password" in msg.lower(), msg
    assert wrong_pw not in msg

    _assert_worker_refused(secure, ckpt, tmp_path, WORKER_PORT + 1, "FBP_KAFKA__SASL_PASSWORD", r"authenticat")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_wrong_redis_password_fails_clearly(secure, ckpt, tmp_path):
    import redis as redis_lib

    from core.redis_conn import sync_redis

    bad = _settings_from({**secure.env, "FBP_REDIS__PASSWORD": "wrong-" + secrets.token_hex(4)})
    with pytest.raises(redis_lib.exceptions.AuthenticationError):
        sync_redis(bad.redis).ping()
    _assert_worker_refused(secure, ckpt, tmp_path, WORKER_PORT + 2, "FBP_REDIS__PASSWORD", r"auth|password")


# -- checkpoints: safetensors only, hash-verified -------------------------------------
class _Boom:
    """Unpickling this would create a marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    for i, dump in enumerate((lambda p: torch.save({"w": _Boom(marker)}, p),
                              lambda p: p.write_bytes(pickle.dumps(_Boom(marker))))):
        p = tmp_path / f"evil{i}.pt"
        dump(p)
        with pytest.raises(CheckpointError, match="safetensors"):
            load_checkpoint(p)
    assert not marker.exists(), "a checkpoint load executed pickled code"


def test_tampered_checkpoint_is_refused_by_hash(tmp_path):
    from models.registry import build

    model = build("baseline")
    path = tmp_path / "m"
    sha = save_checkpoint(model, path)
    load_checkpoint(path, expected_sha256=sha)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, expected_sha256="0" * 64)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # flip a bit of the last tensor's data
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_no_pickle_loading_in_the_code_base():
    """No torch.load / pickle.load(s) / joblib outside tests: checkpoints only
    enter through models.checkpoint (safetensors + sha256)."""
    pat = re.compile(r"\b(torch\.load|pickle\.loads?|cPickle|joblib\.load|dill\.load|numpy\.load|np\.load)\s*\(")
    hits = []
    for d in ("models", "stream", "trainer", "fbp", "bench"):
        for f in (REPO_ROOT / d).rglob("*.py"):
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if pat.search(line) and "allow_pickle=False" not in line:
                    hits.append(f"{f.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not hits, hits
