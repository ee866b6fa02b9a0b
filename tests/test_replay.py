"""Replay pushes a whole data set through the real broker, exactly once, in order."""

from __future__ import annotations

from collections import defaultdict

import orjson
import pytest
import typer
from kafka import TopicPartition
from typer.testing import CliRunner

from stream import replay as replay_mod
from core.events import decode_rating
from core.kafka_io import make_consumer
from core.datasets import load_dataset

pytestmark = pytest.mark.integration
KW = {"max_payload_bytes": 4096, "min_ts": 0, "max_ts": 2**40}


def _read_all(settings, expected: int):
    """Every record of the ratings topic, read with a plain consumer."""
    topic = settings.kafka.ratings_topic
    cons = make_consumer(settings, consumer_timeout_ms=15_000, max_poll_records=5000)
    tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
    cons.assign(tps)
    cons.seek_to_beginning(*tps)
    ends = cons.end_offsets(tps)
    assert sum(ends.values()) == expected
    out = []
    for msg in cons:
        out.append(msg)
        if len(out) >= expected:
            break
    cons.close()
    return out


def test_replay_ml100k_exactly_once_in_order(clean_topics):
    s = clean_topics
    ds = load_dataset("ml-100k")
    summary = replay_mod.replay(s, ds, progress=False)
    assert summary.events == 100_000 and summary.first_index == 0 and summary.last_index == 99_999
    print(f"replay: {summary.events_per_s:,.0f} events/s")

    msgs = _read_all(s, 100_000)
    assert len(msgs) == 100_000
    events = [decode_rating(m.value, **KW) for m in msgs]
    assert all(hasattr(e, "event_id") for e in events), "every record decodes"
    ids = [e.event_id for e in events]
    assert len(set(ids)) == 100_000, "no duplicate event ids"
    assert set(ids) == {f"ml-100k-{i}" for i in range(100_000)}

    by_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    partitions: dict[int, set[int]] = defaultdict(set)
    for m, e in zip(msgs, events):
        assert m.key == str(e.user_id).encode()
        by_user[e.user_id].append((m.offset, e.ts, int(e.event_id.rsplit("-", 1)[1])))
        partitions[e.user_id].add(m.partition)
    assert len(by_user) == 943
    assert all(len(p) == 1 for p in partitions.values()), "one user, one partition"
    for rows in by_user.values():
        rows.sort()  # partition order
        assert [ts for _, ts, _ in rows] == sorted(ts for _, ts, _ in rows)
        assert [i for _, _, i in rows] == sorted(i for _, _, i in rows)

    # The payload matches the source row.
    r = ds.ratings
    for e in events[:: 997]:
        row = r.iloc[int(e.event_id.rsplit("-", 1)[1])]
        assert (e.user_id, e.movie_id, e.rating, e.ts) == (
            row.user_id, row.movie_id, float(row.rating), row.ts,
        )  # fmt: skip


def test_replay_cli_offset_limit_and_json(clean_topics, tmp_path, monkeypatch):
    from core import settings as settings_mod

    monkeypatch.setattr(settings_mod, "get_settings", lambda: clean_topics)
    monkeypatch.setattr(replay_mod, "get_settings", lambda: clean_topics)
    app = typer.Typer()
    app.command()(replay_mod.cli)
    out = tmp_path / "summary.json"
    res = CliRunner().invoke(
        app, ["--source", "ml-100k", "--offset", "500", "--limit", "25", "--json", str(out), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "replayed 25 events" in res.output
    summary = orjson.loads(out.read_bytes())
    assert summary["events"] == 25 and summary["first_index"] == 500 and summary["last_index"] == 524
    assert summary["events_per_s"] > 0
    ids = sorted(decode_rating(m.value, **KW).event_id for m in _read_all(clean_topics, 25))
    assert ids == sorted(f"ml-100k-{i}" for i in range(500, 525))


def test_rate_limit_is_respected(clean_topics):
    ds = load_dataset("synthetic:60:1")
    summary = replay_mod.replay(clean_topics, ds, rate=100.0, progress=False)
    assert summary.events == 60
    assert 0.5 <= summary.seconds < 3.0
    assert {decode_rating(m.value, **KW).event_id for m in _read_all(clean_topics, 60)} == {
        f"synthetic-60-s1-{i}" for i in range(60)
    }
