"""Producers and a subscriber that are not ours, end to end through a real worker.

Kafka's own console producer and consumer (the stack's Maven jars plus
``kafka-tools`` for the consumer), Debian's kcat and plain kafka-python
publish rating events keyed by user id, unkeyed, and keyed wrongly (by event
id), mixed with records no worker can use (null and empty values, bad JSON,
invalid UTF-8, a rating out of range).  What must hold, whatever the client:

* every valid event gets its prediction, keyed by its user id;
* every bad record is in the DLQ with the reason for it, and
  ``fbp dlq stats`` counts exactly those;
* the same worker process does all of it (never restarted);
* with ``key_policy=refuse``, wrongly keyed events are dead-lettered as
  ``bad_key`` and ``fbp dlq replay --reason bad_key`` re-keys them; an
  oversized event replayed after the limit is raised is fetched back whole
  from its source topic (the DLQ keeps a prefix) and predicted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kafka import KafkaProducer

from core.settings import Settings
from stack import procs
from tests.streamkit import read_topic, redis_states

pytestmark = pytest.mark.integration

# -- the foreign clients ------------------------------------------------------------


def _kafka_version(libs: Path) -> str:
    jars = sorted(libs.glob("kafka_2.13-*.jar"))
    assert jars, f"no Kafka broker jar in {libs}: run `fbp stack up` first"
    return re.fullmatch(r"kafka_2\.13-(.+)\.jar", jars[0].name).group(1)


def kafka_tools_classpath(settings: Settings) -> str:
    """The stack's broker jars (they hold ``kafka.tools.ConsoleProducer``) plus
    ``kafka-tools`` of the same version (``ConsoleConsumer`` moved there in
    Kafka 3.7), fetched once with Maven next to the broker jars."""
    data = Path(settings.stack.data_dir)
    libs = data / "kafka-libs"
    version = _kafka_version(libs)
    tools = data / "kafka-tools" / f"kafka-tools-{version}.jar"
    if not tools.exists():
        mvn = shutil.which("mvn")
        assert mvn, "Maven is needed to fetch kafka-tools (apt-get install maven)"
        subprocess.run([mvn, "-q", "dependency:copy", f"-Dartifact=org.apache.kafka:kafka-tools:{version}",
                        f"-DoutputDirectory={tools.parent}"], check=True, capture_output=True, timeout=600)
    return f"{libs}/*:{tools}"


def _java(settings: Settings) -> list[str]:
    java = shutil.which("java")
    assert java, "java is not installed"
    # A small client JVM: serial GC, C1 only (two cores are shared with the stack).
    return [java, "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-cp", kafka_tools_classpath(settings)]


def console_produce(settings: Settings, topic: str, lines: list[bytes], *, keyed: bool) -> None:
    """``kafka-console-producer.sh``: one record per line; ``key|value`` when
    keyed; the literal NULL stands for a null value."""
    props = ["--property", "null.marker=NULL"]
    if keyed:
        props += ["--property", "parse.key=true", "--property", "key.separator=|"]
    subprocess.run(_java(settings) + ["kafka.tools.ConsoleProducer", "--bootstrap-server",
                                      settings.kafka.bootstrap_servers, "--topic", topic, *props],
                   input=b"\n".join(lines) + b"\n", check=True, capture_output=True, timeout=120)


def kcat_produce(settings: Settings, topic: str, lines: list[bytes], *, keyed: bool) -> None:
    """kcat -P: ``key|value`` with ``-K'|'``; ``-Z`` sends an empty value as null."""
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed (apt-get install kcat)"
    args = [kcat, "-P", "-b", settings.kafka.bootstrap_servers, "-t", topic, "-Z"]
    if keyed:
        args += ["-K", "|"]
    subprocess.run(args, input=b"\n".join(lines) + b"\n", check=True, capture_output=True, timeout=120)


class ConsoleConsumer:
    """Kafka's own ``kafka-console-consumer.sh`` reading a topic from the
    beginning in the background, one ``key|value`` line per record."""

    def __init__(self, settings: Settings, topic: str, out: Path) -> None:
        self.out = out
        self._fh = open(out, "wb")
        self.proc = subprocess.Popen(
            _java(settings) + ["org.apache.kafka.tools.consumer.ConsoleConsumer", "--bootstrap-server",
                               settings.kafka.bootstrap_servers, "--topic", topic, "--from-beginning",
                               "--property", "print.key=true", "--property", "key.separator=|"],
            stdout=self._fh, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def records(self) -> list[tuple[bytes, dict]]:
        out = []
        for line in self.out.read_bytes().splitlines():
            key, sep, value = line.partition(b"|")
            if sep and value.startswith(b"{"):
                out.append((key, orjson.loads(value)))
        return out

    def wait_for(self, event_ids: set[str], timeout: float = 180) -> list[tuple[bytes, dict]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = self.records()
            if event_ids <= {r["event_id"] for _, r in recs}:
                return recs
            assert self.proc.poll() is None, "the console consumer exited"
            time.sleep(0.5)
        return self.records()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


# -- helpers ----------------------------------------------------------------------


def ev(eid: str, user: int, movie: int, **over) -> dict:
    return {"event_id": eid, "user_id": user, "movie_id": movie, "rating": 4.0, "ts": 880000000, **over}


def j(e: dict) -> bytes:
    return orjson.dumps(e)


def worker_env(ns, ckpt, port: int, **extra: str) -> dict[str, str]:
    env = ns.env(64, port)
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    env.update(extra)
    return env


def fbp_dlq(ns, *args: str) -> dict:
    """``fbp dlq ... --json`` in the test's namespace; the JSON it wrote."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"dlq-{ns.tag}-{time.monotonic_ns()}.json"
    env = dict(os.environ, **ns.env(64, 6099))
    res = subprocess.run(procs.FBP + ["dlq", *args, "--json", str(out)], cwd=procs.REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        return orjson.loads(out.read_bytes())
    finally:
        out.unlink()


def wait_dlq(stack, ns, n: int) -> list[dict]:
    return read_topic(stack, ns.dlq, until=n, timeout=120, by_event_id=False)


# -- the scenarios ----------------------------------------------------------------


def test_foreign_clients_keyed_unkeyed_and_miskeyed_through_one_worker(stack, ns, ckpt, tmp_path):
    """key_policy=rekey: every valid event is predicted whoever produced it and
    however it was keyed; each bad record is dead-lettered with its reason."""
    worker = procs.start_worker(6094, tmp_path, worker_env(ns, ckpt, 6094, FBP_WORKER__KEY_POLICY="rekey"))
    pid = worker.popen.pid
    valid: list[dict] = []
    bad: list[str] = []  # expected DLQ reasons
    try:  # a consumer that cannot start must not leave the worker holding its port
        consumer = ConsoleConsumer(stack, ns.predictions, tmp_path / "predictions.txt")
    except BaseException:
        worker.stop()
        raise
    try:
        # Kafka's console producer, keyed and unkeyed.
        cp_keyed = [ev(f"cp-k{i}", 301 + i % 2, 50 + i) for i in range(4)]
        console_produce(stack, ns.ratings,
                        [b"301|NULL", b"301|"] + [f"{e['user_id']}|".encode() + j(e) for e in cp_keyed],
                        keyed=True)
        bad += ["null_value", "empty_value"]
        cp_unkeyed = [ev(f"cp-u{i}", 303 + i % 2, 60 + i) for i in range(4)]
        console_produce(stack, ns.ratings, [j(ev("cp-bad", 303, 1, rating=9))] + [j(e) for e in cp_unkeyed],
                        keyed=False)
        bad += ["rating_out_of_range"]
        valid += cp_keyed + cp_unkeyed

        # kcat, keyed and unkeyed (-Z: an empty value is sent as null).
        kc_keyed = [ev(f"kc-k{i}", 305 + i % 2, 70 + i) for i in range(4)]
        kcat_produce(stack, ns.ratings, [b"305|"] + [f"{e['user_id']}|".encode() + j(e) for e in kc_keyed],
                     keyed=True)
        bad += ["null_value"]
        kc_unkeyed = [ev(f"kc-u{i}", 307 + i % 2, 80 + i) for i in range(4)]
        kcat_produce(stack, ns.ratings, [b"{oops"] + [j(e) for e in kc_unkeyed], keyed=False)
        bad += ["bad_json"]
        valid += kc_keyed + kc_unkeyed

        # kafka-python keyed by event id (a wrong key) and unkeyed, and raw bad values.
        p = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all")
        py_by_event = [ev(f"py-e{i}", 309 + i % 2, 90 + i) for i in range(4)]
        py_unkeyed = [ev(f"py-u{i}", 311 + i % 2, 100 + i) for i in range(4)]
        p.send(ns.ratings, key=b"309", value=None)
        p.send(ns.ratings, key=None, value=b"\xff\xfe\xfd")
        p.send(ns.ratings, key=b"309", value=b"")
        bad += ["null_value", "bad_encoding", "empty_value"]
        for e in py_by_event:
            p.send(ns.ratings, key=e["event_id"].encode(), value=j(e))
        for e in py_unkeyed:
            p.send(ns.ratings, key=None, value=j(e))
        p.flush()
        p.close()
        valid += py_by_event + py_unkeyed

        # Kafka's console consumer reads the predictions back.
        want = {e["event_id"] for e in valid}
        recs = consumer.wait_for(want)
        dlq = wait_dlq(stack, ns, len(bad))
        stats = fbp_dlq(ns, "stats")
        alive = worker.alive()
    finally:
        consumer.stop()
        worker.stop()

    got = Counter(r["event_id"] for _, r in recs)
    assert set(got) == want, (sorted(want - set(got)), sorted(set(got) - want), worker.tail())
    assert max(got.values()) == 1  # no crash, so no repeat
    by_id = {e["event_id"]: e for e in valid}
    for key, r in recs:
        assert key == str(by_id[r["event_id"]]["user_id"]).encode()  # keyed by user id, whoever sent it
        assert r["user_id"] == by_id[r["event_id"]]["user_id"] and r["actual"] == 4.0
    assert alive and worker.popen.pid == pid, worker.tail()
    assert Counter(d["reason"] for d in dlq) == Counter(bad)
    assert all(d["source"]["topic"] == ns.ratings for d in dlq)
    assert stats["total"] == len(bad) and stats["by_reason"] == dict(Counter(bad))


def test_refused_keys_and_oversized_events_are_replayed_after_a_fix(stack, ns, ckpt, tmp_path):
    """key_policy=refuse: wrongly keyed events go to the DLQ as bad_key, and
    ``fbp dlq replay --reason bad_key`` re-publishes them keyed by user id; an
    oversized event replayed after ``max_payload_bytes`` is raised is fetched
    back whole from the ratings topic and predicted."""
    env = worker_env(ns, ckpt, 6095, FBP_WORKER__KEY_POLICY="refuse")
    worker = procs.start_worker(6095, tmp_path, env)
    pid = worker.popen.pid
    try:
        keyed = [ev(f"ok-{i}", 401 + i % 2, 20 + i) for i in range(4)]
        console_produce(stack, ns.ratings, [f"{e['user_id']}|".encode() + j(e) for e in keyed], keyed=True)
        unkeyed_console = [ev(f"cu-{i}", 403, 30 + i) for i in range(2)]
        console_produce(stack, ns.ratings, [j(e) for e in unkeyed_console], keyed=False)
        unkeyed_kcat = [ev(f"ku-{i}", 404, 40 + i) for i in range(3)]
        kcat_produce(stack, ns.ratings, [j(e) for e in unkeyed_kcat], keyed=False)
        p = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all")
        by_event = [ev(f"pe-{i}", 405, 50 + i) for i in range(3)]
        for e in by_event:
            p.send(ns.ratings, key=e["event_id"].encode(), value=j(e))
        big = ev("big-1", 406, 60, context={"note": "x" * 6000})  # over the default 4096-byte limit
        p.send(ns.ratings, key=b"406", value=j(big))
        p.flush()
        p.close()
        refused = unkeyed_console + unkeyed_kcat + by_event

        first = read_topic(stack, ns.predictions, until=len(keyed), timeout=180)
        dlq = wait_dlq(stack, ns, len(refused) + 1)
        stats = fbp_dlq(ns, "stats")
        replayed = fbp_dlq(ns, "replay", "--reason", "bad_key")
        second = read_topic(stack, ns.predictions, until=len(keyed) + len(refused), timeout=180)
        alive = worker.alive() and worker.popen.pid == pid
    finally:
        worker.stop()

    assert {r["event_id"] for r in first} == {e["event_id"] for e in keyed}
    assert Counter(d["reason"] for d in dlq) == Counter({"bad_key": len(refused), "oversized_payload": 1})
    big_letter = next(d for d in dlq if d["reason"] == "oversized_payload")
    assert big_letter["payload_truncated"] and big_letter["payload_bytes"] == len(j(big))
    assert stats["by_reason"] == {"bad_key": len(refused), "oversized_payload": 1}
    assert replayed["matched"] == len(refused) and replayed["replayed"] == len(refused)
    assert replayed["skipped"] == {}
    assert {r["event_id"] for r in second} == {e["event_id"] for e in keyed + refused}
    assert alive, worker.tail()

    # The fix for the oversized one: a higher limit.  Then replay fetches it back whole.
    worker = procs.start_worker(6095, tmp_path, dict(env, FBP_WORKER__MAX_PAYLOAD_BYTES="65536"))
    try:
        again = fbp_dlq(ns, "replay", "--reason", "oversized_payload")
        third = read_topic(stack, ns.predictions, until=len(keyed) + len(refused) + 1, timeout=180)
    finally:
        worker.stop()
    assert again["replayed"] == 1 and again["recovered_from_source"] == 1
    assert {r["event_id"] for r in third} == {e["event_id"] for e in keyed + refused + [big]}
    assert Counter(r["event_id"] for r in third)["big-1"] == 1
    # Each replayed event was folded into its user's state exactly once.
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    per_user = Counter(e["user_id"] for e in keyed + refused + [big])
    states, missing = redis_states(ns, model, list(per_user))
    assert missing == []
    seen, _ = model.rating_stats(states)
    assert dict(zip(per_user, seen.tolist())) == dict(per_user)
