"""The key policy, through a real worker.

* ``refuse``: a valid event keyed otherwise than by its user id goes to the
  DLQ as ``bad_key`` (the worker goes on);
* ``rekey`` (default): such an event is re-published to the repartition
  topic keyed by user id and predicted from there; a second copy of the same
  re-keyed record -- what a crash between re-publishing and committing leaves
  behind -- is recognised by its original position and not applied twice.
"""

from __future__ import annotations

import httpx
import pytest
from kafka import KafkaProducer

from core.events import RatingEvent, encode_rating, rating_key
from core.topics import repartition_topic
from stack import procs
from tests.test_poison_pill import Tap

pytestmark = pytest.mark.integration


def _worker(ns, ckpt, tmp_path, port: int, **env_extra: str) -> procs.Proc:
    env = ns.env(64, port)
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    env["FBP_WORKER__DEVICE"] = "cpu"
    env.update(env_extra)
    return procs.start_worker(port, tmp_path, env)


def test_refuse_policy_dead_letters_wrong_keys_as_bad_key(stack, ns, ckpt, tmp_path):
    worker = _worker(ns, ckpt, tmp_path, 6183, FBP_WORKER__KEY_POLICY="refuse")
    prod = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all")
    preds, dlq = Tap(stack, ns.predictions), Tap(stack, ns.dlq)
    wrong = [(None, RatingEvent("k-1", 31, 5, 4.0, 880_000_000)),
             (b"32 ", RatingEvent("k-2", 32, 5, 4.0, 880_000_001)),
             (b"33", RatingEvent("k-3", 34, 5, 4.0, 880_000_002))]
    right = RatingEvent("k-4", 35, 5, 4.0, 880_000_003)
    try:
        for key, ev in wrong:
            prod.send(ns.ratings, key=key, value=encode_rating(ev), partition=0)
        prod.send(ns.ratings, key=rating_key(right), value=encode_rating(right), partition=0)
        prod.flush()
        got = preds.until(lambda rs: any(r["event_id"] == "k-4" for r in rs), timeout=60)
        letters = dlq.until(lambda rs: len(rs) >= len(wrong), timeout=60)
        assert worker.alive(), worker.tail()
    finally:
        prod.close()
        preds.close()
        dlq.close()
        code = worker.stop()
    assert code == 0, worker.tail()
    assert [r["event_id"] for r in got] == ["k-4"]
    assert [d["reason"] for d in letters] == ["bad_key"] * 3
    letters.sort(key=lambda d: d["source"]["offset"])  # dead letters are spread over the DLQ's partitions
    assert [d["key"] for d in letters] == [None, "32 ", "33"]


def test_rekeyed_event_is_predicted_once_even_if_republished(stack, ns, ckpt, tmp_path):
    worker = _worker(ns, ckpt, tmp_path, 6184)
    prod = KafkaProducer(**stack.kafka.kafka_python_kwargs(), acks="all")
    preds = Tap(stack, ns.predictions)
    rp = repartition_topic(ns.scoped())
    user = 4711
    ev = RatingEvent("rk-1", user, 7, 5.0, 880_000_000)
    try:
        # unkeyed: the worker re-keys it through the repartition topic
        md = prod.send(ns.ratings, key=None, value=encode_rating(ev)).get(timeout=30)
        preds.until(lambda rs: any(r["event_id"] == "rk-1" for r in rs), timeout=60)
        # the copy a crash before the commit would leave: same original position
        src = f"{ns.ratings}:{md.partition}:{md.offset}".encode()
        prod.send(rp, key=rating_key(user), value=encode_rating(ev), headers=[("fbp-source", src)])
        # a later, different unkeyed event of the same user is applied
        later = RatingEvent("rk-2", user, 8, 3.0, 880_000_001)
        prod.send(ns.ratings, key=b"not-a-user", value=encode_rating(later))
        prod.flush()
        got = preds.until(lambda rs: any(r["event_id"] == "rk-2" for r in rs), timeout=60)
        profile = httpx.get(f"{worker.url}/api/v1/users/{user}/profile", timeout=10).json()
        assert worker.alive(), worker.tail()
    finally:
        prod.close()
        preds.close()
        code = worker.stop()
    assert code == 0, worker.tail()
    ids = [r["event_id"] for r in got]
    assert ids.count("rk-1") == 1 and ids.count("rk-2") == 1, ids
    assert profile["ratings"] == 2 and profile["recent_movies"] == [8, 7], profile
