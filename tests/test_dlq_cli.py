"""``fbp dlq stats`` and ``fbp dlq replay`` on a real Kafka (no worker needed).

Dead letters are built with the worker's own ``core.events.dlq_record`` (plus
one in the older shape, and one record that is not a dead letter at all), so
the tool is tested against the bytes the worker writes.  The CLI runs as a
subprocess in the test's namespace, as an operator would run it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kafka import KafkaProducer

from core.events import KafkaRecord, Rejection, dlq_record
from fbp_errors import ConfigError
from stack import procs
from stream.dlq import REPLAY_HEADER, parse_dead_letter, parse_since, replay_key


def letter(reason: str, raw: bytes | None, *, key: bytes | None = None, topic: str = "ratings",
           partition: int = 0, offset: int = 0, rejected_at: float | None = None,
           prefix: int = 1024, stripped: bool = False) -> bytes:
    """A dead letter exactly as the worker writes it (``rejected_at`` pinned if given)."""
    rec = KafkaRecord(value=raw, key=key, topic=topic, partition=partition, offset=offset, timestamp=1.0)
    out = dlq_record(Rejection(reason, f"test {reason}", raw), rec, payload_prefix_bytes=prefix,
                     stripped=stripped)
    if rejected_at is None:
        return out
    obj = orjson.loads(out)
    obj["rejected_at"] = rejected_at
    return orjson.dumps(obj)


def old_letter(reason: str, raw: bytes, partition: int, offset: int, rejected_at: float) -> bytes:
    """The shape written before sizes, hashes, keys and headers were recorded."""
    return orjson.dumps({"reason": reason, "detail": "old", "payload": raw.decode(), "payload_encoding": "utf-8",
                         "source": {"topic": "ratings", "partition": partition, "offset": offset},
                         "rejected_at": rejected_at})


def event(i: int, user: int = 7, pad: int = 0) -> bytes:
    ev = {"event_id": f"dlq-{i}", "user_id": user, "movie_id": 10 + i, "rating": 4.0, "ts": 880000000 + i}
    if pad:
        ev["context"] = {"pad": "x" * pad}
    return orjson.dumps(ev)


def fbp_dlq(ns, *args: str, **env_over: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **ns.env(64, 6099), **env_over}
    return subprocess.run(procs.FBP + ["dlq", *args], cwd=procs.REPO, env=env, capture_output=True,
                          text=True, timeout=180)


# -- parsing, no Kafka ----------------------------------------------------------------


def test_parse_reads_every_shape_the_worker_writes():
    raw = event(1, pad=3000)
    full = parse_dead_letter(letter("bad_key", event(2), key=b"dlq-2", offset=5), 1, 9)
    assert full.payload == event(2) and full.payload_complete and full.key == b"dlq-2" and full.key_complete
    assert (full.source.offset, full.dlq_partition, full.dlq_offset) == (5, 1, 9)

    cut = parse_dead_letter(letter("oversized_payload", raw), 0, 0)
    assert cut.payload == raw[:1024] and not cut.payload_complete
    assert cut.payload_bytes == len(raw) and cut.payload_sha256 == hashlib.sha256(raw).hexdigest()

    binary = parse_dead_letter(letter("bad_encoding", b"\xff\xfe" * 10), 0, 0)
    assert binary.payload == b"\xff\xfe" * 10 and binary.payload_complete

    stripped = parse_dead_letter(letter("oversized_payload", raw, key=b"k", stripped=True), 0, 0)
    assert stripped.payload is None and stripped.payload_bytes == len(raw) and not stripped.payload_complete

    null = parse_dead_letter(letter("null_value", None, key=b"7"), 0, 0)
    assert null.payload is None and null.payload_bytes is None and null.key == b"7"

    old = parse_dead_letter(old_letter("bad_json", b"{nope", 2, 3, 5.0), 0, 0)
    assert old.payload == b"{nope" and old.payload_complete and old.payload_sha256 is None
    assert old.key is None and old.rejected_at == 5.0

    for junk in (b"", b"hello", b"[1,2]", b'{"no":"reason"}', None):
        assert parse_dead_letter(junk, 0, 0) is None


def test_since_takes_unix_seconds_or_iso_8601():
    assert parse_since("1767225600") == 1767225600.0
    assert parse_since("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_since("2026-01-01T00:00:00") == 1767225600.0  # no zone: UTC
    assert parse_since("2026-01-01T01:00:00+01:00") == 1767225600.0
    with pytest.raises(ConfigError):
        parse_since("yesterday")


def test_replay_key_is_the_user_id_else_the_original_key():
    assert replay_key(event(1, user=42), b"wrong") == b"42"
    assert replay_key(b"{not json", b"orig") == b"orig"
    assert replay_key(b'{"user_id": true}', b"orig") == b"orig"
    assert replay_key(b'{"user_id": "42"}', None) is None


# -- on Kafka -------------------------------------------------------------------------


def test_stats_counts_the_whole_topic(stack, ns, tmp_path):
    p = KafkaProducer(**stack.kafka.kafka_python_kwargs())
    letters = [
        ("bad_json", letter("bad_json", b"{x", topic=ns.ratings, rejected_at=1000.0 + i))
        for i in range(5)
    ] + [
        ("bad_key", letter("bad_key", event(i), key=None, topic=f"{ns.ratings}-repartition",
                           rejected_at=2000.0 + i))
        for i in range(3)
    ] + [
        ("null_value", letter("null_value", None, key=b"7", topic=ns.ratings, rejected_at=500.0)),
        ("oversized_payload", letter("oversized_payload", event(9, pad=5000), topic=ns.ratings,
                                     rejected_at=3000.0)),
        ("bad_json", old_letter("bad_json", b"{old", 0, 1, 1500.0)),
    ]
    for i, (_, value) in enumerate(letters):
        p.send(ns.dlq, value=value, partition=i % 4)
    p.send(ns.dlq, value=b"not a dead letter", partition=0)
    p.flush()
    p.close()

    out = tmp_path / "stats.json"
    res = fbp_dlq(ns, "stats", "--json", str(out))
    assert res.returncode == 0, res.stderr
    got = orjson.loads(out.read_bytes())
    sources = [orjson.loads(v)["source"]["topic"] for _, v in letters]
    times = [orjson.loads(v)["rejected_at"] for _, v in letters]
    assert got["topic"] == ns.dlq
    assert got["total"] == len(letters) and got["unreadable"] == 1
    assert got["by_reason"] == dict(Counter(r for r, _ in letters))
    assert got["by_source_topic"] == dict(Counter(sources))
    assert (got["oldest"], got["newest"]) == (min(times), max(times))
    assert f"{len(letters)} dead letters" in res.stdout


def _publish(p: KafkaProducer, topic: str, key: bytes | None, value: bytes | None) -> tuple[int, int]:
    md = p.send(topic, key=key, value=value).get(timeout=30)
    return md.partition, md.offset


def _replayed(stack, ns) -> list[tuple[bytes | None, bytes, bytes]]:
    """(key, value, origin header) of every replayed record on the ratings topic."""
    from kafka import KafkaConsumer

    c = KafkaConsumer(ns.ratings, **stack.kafka.kafka_python_kwargs(), group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        return [(m.key, m.value, dict(m.headers)[REPLAY_HEADER]) for m in c if REPLAY_HEADER in dict(m.headers)]
    finally:
        c.close()


def test_replay_rebuilds_originals_checks_hashes_and_skips_what_it_cannot(stack, ns, tmp_path):
    p = KafkaProducer(**stack.kafka.kafka_python_kwargs(), max_request_size=2**20)
    big = event(1, user=11, pad=6000)  # the DLQ keeps 1024 bytes of it: fetched back from the source
    src_big = _publish(p, ns.ratings, b"wrong", big)
    small = event(2, user=12)  # whole in the DLQ, mis-keyed: replayed keyed by its user id
    src_small = _publish(p, ns.ratings, b"dlq-2", small)
    tampered = event(3, user=13, pad=6000)  # the source no longer holds what the letter hashed
    src_tampered = _publish(p, ns.ratings, b"13", event(3, user=13, pad=6001))
    stripped = event(4, user=14, pad=2000)  # a retried-smaller letter: payload dropped, hash kept
    src_stripped = _publish(p, ns.ratings, b"14", stripped)
    unparsable = b"{still not json"  # replayed under its original key
    p.flush()

    t_old, t_new = 1_000_000.0, 2_000_000.0
    letters = [
        letter("oversized_payload", big, key=b"wrong", topic=ns.ratings, partition=src_big[0],
               offset=src_big[1], rejected_at=t_new),
        letter("bad_key", small, key=b"dlq-2", topic=ns.ratings, partition=src_small[0],
               offset=src_small[1], rejected_at=t_old),
        letter("oversized_payload", tampered, key=b"13", topic=ns.ratings, partition=src_tampered[0],
               offset=src_tampered[1], rejected_at=t_new),
        letter("oversized_payload", stripped, key=b"14", topic=ns.ratings, partition=src_stripped[0],
               offset=src_stripped[1], rejected_at=t_new, stripped=True),
        letter("oversized_payload", big, topic=ns.ratings, partition=0, offset=10**9, rejected_at=t_new),
        letter("bad_json", unparsable, key=b"orig", topic=ns.ratings, rejected_at=t_new),
        letter("null_value", None, key=b"15", topic=ns.ratings, rejected_at=t_new),
        letter("empty_value", b"", key=b"16", topic=ns.ratings, rejected_at=t_new),
    ]
    for value in letters:
        p.send(ns.dlq, value=value)
    p.flush()
    p.close()

    # Filters: dry runs publish nothing.
    def dry(*args: str) -> dict:
        out = tmp_path / "dry.json"
        res = fbp_dlq(ns, "replay", "--dry-run", "--json", str(out), *args)
        assert res.returncode == 0, res.stderr
        return orjson.loads(out.read_bytes())

    assert dry("--reason", "bad_key")["matched"] == 1
    assert dry("--since", "1500000")["matched"] == len(letters) - 1
    assert dry("--since", "1970-01-12T13:46:40Z", "--reason", "bad_key")["matched"] == 1  # t_old exactly
    everything = dry()
    assert everything["replayed"] == 0 and everything["replayable"] == 4
    assert _replayed(stack, ns) == []

    out = tmp_path / "replay.json"
    res = fbp_dlq(ns, "replay", "--json", str(out))
    assert res.returncode == 0, res.stderr
    report = orjson.loads(out.read_bytes())
    assert report["matched"] == len(letters)
    assert report["replayed"] == 4 and report["recovered_from_source"] == 2
    assert report["skipped"] == {"sha256_mismatch": 1, "source_gone": 1, "null_value": 1, "empty_value": 1}

    got = sorted((k, v) for k, v, _ in _replayed(stack, ns))
    assert got == sorted([(b"11", big), (b"12", small), (b"14", stripped), (b"orig", unparsable)])
    origins = {h for _, _, h in _replayed(stack, ns)}
    assert len(origins) == 4 and all(h.startswith(ns.dlq.encode() + b"/") for h in origins)

    # A second run replays nothing: the ledger remembers the four letters.
    res = fbp_dlq(ns, "replay", "--json", str(out))
    assert res.returncode == 0, res.stderr
    again = orjson.loads(out.read_bytes())
    assert again["replayed"] == 0 and again["skipped"]["already_replayed"] == 4
    assert len(_replayed(stack, ns)) == 4
    # --again is the explicit way to publish them once more.
    res = fbp_dlq(ns, "replay", "--again", "--reason", "bad_key", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert orjson.loads(out.read_bytes())["replayed"] == 1
    assert len(_replayed(stack, ns)) == 5


def test_replay_refuses_unknown_reasons_and_bad_times(stack, ns):
    res = fbp_dlq(ns, "replay", "--reason", "bad_jsn")
    assert res.returncode == 2 and "bad_json" in res.stderr  # the message lists the real codes
    res = fbp_dlq(ns, "replay", "--since", "last tuesday")
    assert res.returncode == 2 and "ISO-8601" in res.stderr


def test_a_missing_dlq_topic_is_named_not_a_traceback(stack, ns):
    res = fbp_dlq(ns, "stats", FBP_KAFKA__DLQ_TOPIC=f"{ns.dlq}-nope")
    assert res.returncode == 1 and f"{ns.dlq}-nope" in res.stderr and "FBP_KAFKA__DLQ_TOPIC" in res.stderr
    assert "Traceback" not in res.stderr
