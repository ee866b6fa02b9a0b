"""Poison pills: no record, and no model switch, stops a worker.

Each kind of bad record -- a null value (tombstone), an empty value, a value
just under the broker's maximum message size, invalid UTF-8, an unkeyed and a
mis-keyed event -- is followed on the *same partition* by a valid event; that
event must be predicted by the same worker process (pid unchanged, never
restarted), and each bad record must be in the DLQ with its reason (the
unkeyed and mis-keyed ones are valid events: re-keyed and predicted).

Then a model of another family (``mf`` while users hold ``lstm`` states) is
published with ``fbp model publish``: the same worker keeps predicting, and
the users' states are reset and counted in ``fbp_states_reset_total``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from core.events import RatingEvent, encode_rating, rating_key
from stack import procs

pytestmark = pytest.mark.integration

#: the broker's default message.max.bytes is 1,048,588; the producer's max_request_size 1,048,576
NEAR_MAX = 1_040_000
PARTITION = 1


class Tap:
    """Reads a topic from the beginning, keeping everything seen so far."""

    def __init__(self, settings, topic: str) -> None:
        self.c = KafkaConsumer(**settings.kafka.kafka_python_kwargs(), group_id=None,
                               enable_auto_commit=False, value_deserializer=orjson.loads)
        parts = self.c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        self.c.assign(tps)
        self.c.seek_to_beginning(*tps)
        self.records: list[dict] = []

    def until(self, pred, timeout: float) -> list[dict]:
        """Poll until ``pred(records)`` holds (or ``timeout`` s, a liveness bound)."""
        deadline = time.monotonic() + timeout
        while not pred(self.records) and time.monotonic() < deadline:
            for batch in self.c.poll(timeout_ms=200).values():
                self.records.extend(m.value for m in batch)
        return self.records

    def close(self) -> None:
        self.c.close()


def _event(i: int, user: int = 4242) -> RatingEvent:
    return RatingEvent(f"pill-{i}", user, 1 + i % 50, 4.0, 880_000_000 + i)


def _worker(ns, ckpt: Path, tmp_path: Path, port: int) -> procs.Proc:
    env = ns.env(64, port)
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    env["FBP_WORKER__DEVICE"] = "cpu"
    return procs.start_worker(port, tmp_path, env)


def _metric(url: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def test_after_each_bad_record_the_same_worker_predicts_the_next_one(stack, ns, ckpt, tmp_path):
    good = encode_rating(_event(0))
    bad = {  # kind -> (key, value, the DLQ reason, or None when the record is valid and re-keyed)
        "null_value": (b"4242", None, "null_value"),
        "empty_value": (b"4242", b"", "empty_value"),
        "near_max": (b"4242", b'{"pad":"' + b"x" * (NEAR_MAX - 10) + b'"}', "oversized_payload"),
        "invalid_utf8": (b"4242", good[:20] + b"\xff\xfe" + good[20:], "bad_encoding"),
        "unkeyed": (None, encode_rating(_event(900, user=77)), None),
        "mis_keyed": (b"event-901", encode_rating(_event(901, user=78)), None),
    }
    worker = _worker(ns, ckpt, tmp_path, 6181)
    pid = worker.popen.pid
    prod = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all", max_request_size=1_048_576)
    preds, dlq = Tap(stack, ns.predictions), Tap(stack, ns.dlq)
    outcome = {}
    try:
        for i, (kind, (key, value, _)) in enumerate(bad.items(), start=1):
            prod.send(ns.ratings, key=key, value=value, partition=PARTITION).get(timeout=30)
            nxt = _event(i)
            prod.send(ns.ratings, key=rating_key(nxt), value=encode_rating(nxt), partition=PARTITION).get(timeout=30)
            got = preds.until(lambda rs: any(r["event_id"] == nxt.event_id for r in rs), timeout=60)
            outcome[kind] = (any(r["event_id"] == nxt.event_id for r in got), worker.alive(), worker.popen.pid)
            assert outcome[kind] == (True, True, pid), (kind, outcome, worker.tail())
        want = [r for _, _, r in bad.values() if r]
        letters = dlq.until(lambda rs: len(rs) >= len(want), timeout=60)
        rekeyed = preds.until(lambda rs: {"pill-900", "pill-901"} <= {r["event_id"] for r in rs}, timeout=60)
        counters = _metric(worker.url, "fbp_events_rekeyed_total")
        assert worker.alive() and worker.popen.pid == pid, worker.tail()
    finally:
        prod.close()
        preds.close()
        dlq.close()
        code = worker.stop()
    print(f"\npoison pills: {outcome}; dead letters {[(d['reason'], d['payload_bytes']) for d in letters]}")
    assert code == 0, worker.tail()
    assert sorted(d["reason"] for d in letters) == sorted(want)
    big = next(d for d in letters if d["reason"] == "oversized_payload")
    assert big["payload_bytes"] == NEAR_MAX and big["payload_truncated"] and len(orjson.dumps(big)) < 16_384
    assert all(d["source"]["topic"] == ns.ratings and d["source"]["partition"] == PARTITION for d in letters)
    # the unkeyed and mis-keyed events are valid: re-keyed, then predicted (once each)
    ids = [r["event_id"] for r in rekeyed]
    assert ids.count("pill-900") == 1 and ids.count("pill-901") == 1
    assert sum(counters.values()) == 2, counters


def _train_mf(ml100k, tmp_path: Path) -> Path:
    from tests.streamkit import checkpoint

    return checkpoint(tmp_path, ml100k.ratings.iloc[:3000], ml100k.movies, ml100k.genre_vocab, name="mf")


def _publish(ns, path: Path) -> None:
    """``fbp model publish PATH`` in the namespace."""
    env = dict(os.environ, **ns.env(64, 6182))
    pub = subprocess.run([sys.executable, "-m", "fbp.cli", "model", "publish", str(path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert pub.returncode == 0, pub.stdout + pub.stderr


def test_publishing_another_model_family_resets_states_and_the_same_worker_goes_on(
        stack, ns, ckpt, ml100k, tmp_path):
    """lstm states in Redis, then ``fbp model publish`` of an mf checkpoint:
    no crash loop -- the worker (same pid) predicts with mf, resetting the
    lstm states it cannot read (counted by reason)."""
    users = [11, 12, 13]
    _publish(ns, ckpt)  # lstm v1
    worker = _worker(ns, ckpt, tmp_path, 6182)
    pid = worker.popen.pid
    prod = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all")
    preds = Tap(stack, ns.predictions)
    try:
        first = [_event(i, user=u) for i, u in enumerate(users)]
        for ev in first:
            prod.send(ns.ratings, key=rating_key(ev), value=encode_rating(ev))
        prod.flush()
        got = preds.until(lambda rs: len(rs) >= len(first), timeout=60)
        assert {r["event_id"] for r in got} == {ev.event_id for ev in first}, worker.tail()

        _publish(ns, _train_mf(ml100k, tmp_path))  # mf v2
        deadline = time.monotonic() + 60
        while httpx.get(worker.url + "/health", timeout=5).json()["model"] != "mf":
            assert time.monotonic() < deadline and worker.alive(), worker.tail()
            time.sleep(0.5)

        second = [_event(10 + i, user=u) for i, u in enumerate(users)]
        for ev in second:
            prod.send(ns.ratings, key=rating_key(ev), value=encode_rating(ev))
        prod.flush()
        got = preds.until(lambda rs: len(rs) >= len(first) + len(second), timeout=60)
        resets = _metric(worker.url, "fbp_states_reset_total")
        profile = httpx.get(f"{worker.url}/api/v1/users/{users[0]}/profile", timeout=10).json()
        assert worker.alive() and worker.popen.pid == pid, worker.tail()
    finally:
        prod.close()
        preds.close()
        code = worker.stop()
    assert code == 0, worker.tail()
    after = [r for r in got if r["event_id"] in {ev.event_id for ev in second}]
    print(f"\nfamily switch: {len(after)} predictions by model versions {sorted({r['model_version'] for r in after})}; "
          f"resets {resets}")
    assert len(after) == len(second) and all(r["model_version"] == 2 for r in after)
    assert resets.get('fbp_states_reset_total{reason="model_family"}') == len(users), resets
    assert profile["ratings"] == 1  # reset, then this one event
