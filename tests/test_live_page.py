"""The worker's live page (stream/live.py, stream/static/live.html).

* ``LiveStats`` unit tests (no stack);
* the page's JavaScript, run in headless Chromium against a tiny local server
  that serves the real page and a real ``LiveStats`` snapshot (no stack);
* integration: a real ``fbp worker`` (stack.procs) on the local
  stack, events produced to Kafka while Chromium loads ``/live`` twice a few
  seconds apart; the figures must move.

Chromium runs with ``--dump-dom`` after a ``--virtual-time-budget`` (no driver,
no extra dependency); the page writes each figure into a ``data-value``
attribute so the DOM dump can be read back.
"""

from __future__ import annotations

import contextlib
import html
import http.server
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
LIVE_HTML = REPO / "stream" / "static" / "live.html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="chromium not installed (apt-get install -y chromium)")


# ----------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dump_dom(url: str, tmp: Path, budget_ms: int = 3000, timeout_s: float = 60) -> str:
    """The page's DOM after ``budget_ms`` of (virtual) time in headless Chromium."""
    profile = tmp / f"chromium-{uuid.uuid4().hex[:8]}"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
    ]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert r.returncode == 0, f"chromium failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}"
    return r.stdout.decode("utf-8", errors="replace")


def dom_value(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*?data-value="([^"]*)"', dom) or \
        re.search(rf'data-value="([^"]*)"[^>]*?id="{element_id}"', dom)
    assert m, f"#{element_id} not in the page"
    return m.group(1)


def dom_number(dom: str, element_id: str) -> float | None:
    v = dom_value(dom, element_id)
    return float(v) if v not in ("", "null", "undefined") else None


def fake_result(n: int, *, version: int = 1, err: float = 0.5, lat_ms: float = 20.0, start: int = 0,
                rejected: int = 0):
    from core.events import PredictionRecord
    from stream.batch.types import BatchResult

    recs = [
        PredictionRecord(
            event_id=f"e{start + i}", user_id=i % 7, movie_id=100 + i, predicted=3.0 + err, actual=3.0,
            model_version=version, top_k=[[5, 4.5], [9, 4.25]],
            timings={"event_to_prediction_ms": lat_ms + i, "batch_ms": 4.0}, produced_at=0.0,
        )
        for i in range(n)
    ]
    return BatchResult(predictions=recs, rejected=[object()] * rejected, stage_s={"decode": 0.001})


# ----------------------------------------------------------------- LiveStats
def test_livestats_counts_rates_percentiles_and_errors():
    from stream.live import LiveStats

    now = [1000.0]
    s = LiveStats(clock=lambda: now[0], rate_window_s=5, history=30, last=20)
    snap = s.snapshot()
    assert snap["events_processed"] == 0 and snap["recent"] == [] and snap["error"]["rmse"] is None

    for k in range(10):  # 10 s at 50 events/s, 1 rejected per batch
        s.observe(fake_result(50, start=50 * k, rejected=1, lat_ms=10.0))
        now[0] += 1.0
        s.sample()
    snap = s.snapshot(model={"version": 1}, model_history=[{"version": 1, "reason": "publish"}])
    assert snap["events_processed"] == 500 and snap["events_rejected"] == 10 and snap["batches"] == 10
    assert snap["events_per_s"] == pytest.approx(50.0)
    assert snap["error"]["rmse"] == pytest.approx(0.5) and snap["error"]["mae"] == pytest.approx(0.5)
    # latencies 10..59 ms -> p50 34.5, p99 ~58.5
    assert snap["latency_ms"]["p50"] == pytest.approx(34.5)
    assert 58 <= snap["latency_ms"]["p99"] <= 59
    assert len(snap["history"]) == 10 and snap["history"][-1]["events"] == 500
    assert [h["events"] for h in snap["history"]] == sorted(h["events"] for h in snap["history"])
    assert len(snap["recent"]) == 20 and snap["recent"][0]["event_id"] == "e499"  # newest first
    assert snap["recent"][0]["error"] == pytest.approx(0.5)
    assert snap["model_history"] == [{"version": 1, "reason": "publish"}]
    orjson.dumps(snap)  # JSON-serialisable as the API sends it

    # History and recent predictions stay bounded; a new model version is noted.
    for k in range(40):
        s.observe(fake_result(5, version=2, start=10_000 + 5 * k, err=-1.0))
        now[0] += 1.0
        s.sample()
    snap = s.snapshot(history_points=7)
    assert len(s.history) == 30 and len(snap["history"]) == 7
    assert [v["version"] for v in snap["versions_seen"]] == [1, 2]
    assert snap["events_per_s"] == pytest.approx(5.0)
    # Idle: the rate falls to zero, the latency window empties.
    for _ in range(40):
        now[0] += 1.0
        s.sample()
    snap = s.snapshot()
    assert snap["events_per_s"] == 0 and snap["latency_ms"]["p50"] is None
    assert snap["error"]["rmse"] is not None  # error window is by count, not time


def test_livestats_bounds_the_work_of_a_big_batch():
    from stream.live import LiveStats

    s = LiveStats(error_window=2000)
    s.observe(fake_result(10_000, lat_ms=0.0))  # latencies 0..9999 ms
    assert s.events == 10_000
    assert len(s._errors) == 2000 and len(s._latency) <= 1000
    cur = s.sample()
    assert cur["p50_ms"] == pytest.approx(5000, rel=0.02) and cur["p99_ms"] == pytest.approx(9900, rel=0.02)


def test_livestats_observe_never_raises():
    from stream.live import LiveStats

    s = LiveStats()
    s.observe(object())  # not a BatchResult: logged, the stream goes on
    s.observe(types.SimpleNamespace(predictions=[types.SimpleNamespace(predicted="x", actual=1)]))
    before = s.events
    s.observe(fake_result(3))
    assert math.isfinite(s.sample()["events_per_s"]) and s.events - before == 3


def test_page_is_self_contained():
    html = LIVE_HTML.read_text()
    # No external scripts, styles, fonts or images (no network here, and none needed).
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html), "external resource"
    assert "@import" not in html and "url(http" not in html
    for element_id in ("events-processed", "events-per-s", "p50", "p99", "rmse", "mae", "model-version",
                       "chart-throughput", "chart-latency", "chart-error", "recent", "versions"):
        assert f'id="{element_id}"' in html


# ----------------------------------------------------------------- the page's JS in Chromium (no stack)
@contextlib.contextmanager
def serve_snapshot(snapshot: dict) -> Iterator[str]:
    body_page = LIVE_HTML.read_bytes()
    body_json = orjson.dumps(snapshot)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0]
            if path == "/live":
                body, ctype = body_page, "text/html; charset=utf-8"
            elif path == "/api/v1/live":
                body, ctype = body_json, "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@needs_chromium
def test_page_renders_a_snapshot_in_chromium(tmp_path):
    from stream.live import LiveStats, version_rows

    now = [1_700_000_000.0]
    s = LiveStats(clock=lambda: now[0])
    for k in range(15):
        s.observe(fake_result(40, start=40 * k, rejected=k % 2))
        now[0] += 1.0
        s.sample()
    snap = s.snapshot(model={"ready": True, "name": "lstm", "version": 3, "device": "cpu"},
                      model_history=[{"version": 3, "published_at": now[0] - 60, "reason": "promote",
                                      "model": "lstm"}])
    snap["versions"] = version_rows(snap["model_history"], snap["versions_seen"], {}, snap["model"])
    with serve_snapshot(snap) as base:
        dom = dump_dom(base + "/live", tmp_path)
    assert dom_number(dom, "events-processed") == 600
    assert dom_number(dom, "events-rejected") == 7
    assert dom_number(dom, "events-per-s") == pytest.approx(snap["events_per_s"])
    assert dom_number(dom, "p99") == pytest.approx(snap["latency_ms"]["p99"])
    assert dom_number(dom, "rmse") == pytest.approx(0.5)
    assert dom_number(dom, "model-version") == 3
    assert 'class="ok"' in dom and 'data-updates="0"' not in dom
    assert dom.count("<polyline") >= 5  # throughput, p50, p99, RMSE, MAE
    assert dom.count("<tr><td>e") == 20  # the last 20 predictions
    assert "e599" in dom and "promote" in dom


def movie_cells(dom: str) -> dict[str, tuple[str, str | None]]:
    """The page's movie cells: data-movie-id -> (text shown, hover title or None)."""
    out = {}
    for m in re.finditer(r'<span class="movie" data-movie-id="(\d+)"(?: title="([^"]*)")?>([^<]*)</span>', dom):
        out[m.group(1)] = (html.unescape(m.group(3)), m.group(2))
    return out


def version_table(dom: str) -> list[list[str]]:
    """The rows of the versions table, cell texts."""
    body = re.search(r'<table id="versions">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


@needs_chromium
def test_page_shows_titles_with_the_id_on_hover_and_a_filled_versions_table(tmp_path):
    """A movie the catalog knows shows its title (its id on hover), one it
    does not shows its id; the versions table says family, when, why, sha."""
    from stream.live import LiveStats, version_rows

    s = LiveStats(clock=lambda: 1_700_000_000.0)
    from core.events import PredictionRecord
    from stream.batch.types import BatchResult

    rec = PredictionRecord(
        event_id="e1", user_id=7, movie_id=50, predicted=4.2, actual=5.0, model_version=2,
        top_k=[[172, 4.6], [424242, 4.5]], timings={"event_to_prediction_ms": 9.0}, produced_at=0.0)
    s.observe(BatchResult(predictions=[rec]))
    s.sample()
    hist = [{"version": 2, "model": "lstm", "published_at": 1_700_000_000.0 - 30, "sha256": "0123456789abcdef" * 4,
             "reason": "promoted by trainer (events): holdout RMSE 0.9700 vs champion v1 0.9747",
             "metrics": {"challenger_rmse": 0.97, "champion_rmse": 0.9747}},
            {"version": 1, "model": "lstm", "published_at": 1_700_000_000.0 - 90, "sha256": "fedcba9876543210" * 4,
             "reason": "bootstrap", "metrics": {"best_valid_rmse": 1.0123}}]
    snap = s.snapshot(model={"ready": True, "name": "lstm", "version": 2, "device": "cpu"}, model_history=hist)
    snap["titles"] = {"50": "Star Wars", "172": "Empire Strikes Back, The <1980> & co"}
    snap["versions"] = version_rows(hist, snap["versions_seen"], {}, snap["model"])
    with serve_snapshot(snap) as base:
        dom = dump_dom(base + "/live", tmp_path)
    cells = movie_cells(dom)
    assert cells["50"] == ("Star Wars", "movie 50")
    assert cells["172"] == ("Empire Strikes Back, The <1980> & co", "movie 172")  # escaped, not markup
    assert cells["424242"] == ("424242", None)  # unknown: the id, no hover
    rows = version_table(dom)
    assert [r[:2] for r in rows] == [["2", "lstm"], ["1", "lstm"]]
    assert rows[0][2] == "2023-11-14 22:12:50" and "0.9700" in rows[0][3] and "0.9747" in rows[0][3]
    assert rows[1][3] == "bootstrap (validation RMSE 1.0123)"
    assert [r[4] for r in rows] == ["0123456789ab", "fedcba987654"]


@needs_chromium
def test_page_shows_an_error_when_the_api_fails(tmp_path):
    with serve_snapshot({}) as base:  # a snapshot without the expected keys -> render error
        dom = dump_dom(base + "/live", tmp_path, budget_ms=1500)
    assert 'class="err"' in dom


# ----------------------------------------------------------------- integration: real worker + Kafka
class Feeder:
    """Produces rating events (and some malformed ones) to Kafka at a steady rate."""

    def __init__(self, settings, *, rate: float = 100.0, bad_every: int = 25, users: int = 300,
                 movies: int = 400) -> None:
        self.settings, self.rate, self.bad_every = settings, rate, bad_every
        self.users, self.movies = users, movies
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import random

        from core.events import RatingEvent, encode_rating, rating_key
        from core.kafka_io import make_producer

        rnd = random.Random(7)
        topic = self.settings.kafka.ratings_topic
        try:
            prod = make_producer(self.settings)
            tick = 0.1
            per_tick = max(1, int(self.rate * tick))
            while not self._stop.is_set():
                t0 = time.monotonic()
                for _ in range(per_tick):
                    self.sent += 1
                    if self.bad_every and self.sent % self.bad_every == 0:
                        prod.send(topic, key=b"0", value=b'{"event_id": "broken", "user_id": ')
                        continue
                    ev = RatingEvent(
                        event_id=f"ops-{uuid.uuid4().hex}", user_id=rnd.randint(1, self.users),
                        movie_id=rnd.randint(1, self.movies), rating=float(rnd.randint(1, 5)),
                        ts=int(time.time()),
                    )
                    prod.send(topic, key=rating_key(ev), value=encode_rating(ev))
                prod.flush(timeout=10)
                self._stop.wait(max(0.0, tick - (time.monotonic() - t0)))
            prod.close(timeout=10)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


@contextlib.contextmanager
def worker_with_traffic(stack, tmp_path: Path, port: int, *, rate: float = 100.0,
                        extra_env: dict[str, str] | None = None):
    """A real worker on ``port`` with its own topics, consumer group and Redis prefix
    (so it cannot disturb, or be disturbed by, other tests), fed by a Feeder.

    Yields a namespace: ``proc``, ``settings`` (with this test's topics/prefix),
    ``feeder`` and ``env`` (the FBP_* overrides, for other processes to share)."""
    from stack.procs import start_worker, wait_healthy
    from models.checkpoint import save_checkpoint
    from models.registry import build
    from core.topics import ensure_topics

    tag = uuid.uuid4().hex[:8]
    kafka = stack.kafka.model_copy(update={
        "ratings_topic": f"ops-{tag}-ratings", "predictions_topic": f"ops-{tag}-predictions",
        "dlq_topic": f"ops-{tag}-dlq", "model_updates_topic": f"ops-{tag}-model-updates",
    })
    redis = stack.redis.model_copy(update={"key_prefix": f"ops{tag}"})
    s = stack.model_copy(update={"kafka": kafka, "redis": redis})
    ensure_topics(s)
    ckpt = tmp_path / "model" / "baseline.safetensors"
    save_checkpoint(build("baseline"), ckpt)
    env = {
        "FBP_KAFKA__RATINGS_TOPIC": kafka.ratings_topic,
        "FBP_KAFKA__PREDICTIONS_TOPIC": kafka.predictions_topic,
        "FBP_KAFKA__DLQ_TOPIC": kafka.dlq_topic,
        "FBP_KAFKA__MODEL_UPDATES_TOPIC": kafka.model_updates_topic,
        "FBP_REDIS__KEY_PREFIX": redis.key_prefix,
        "FBP_WORKER__APP_ID": f"fbp-ops-{tag}",
        "FBP_WORKER__CHECKPOINT": str(ckpt),
        "FBP_WORKER__DEVICE": "cpu",
        "FBP_WORKER__TOP_K": "5",
        **(extra_env or {}),
    }
    proc = start_worker(port, tmp_path / "logs", env, wait=False)
    feeder = Feeder(s, rate=rate).start()
    try:
        try:
            wait_healthy(proc, timeout=180)  # healthy once the first batch loaded the model
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"worker did not become healthy: {exc}")
        yield types.SimpleNamespace(proc=proc, settings=s, feeder=feeder, env=env)
    finally:
        feeder.stop()
        proc.stop()
        _cleanup(s)


def _cleanup(s) -> None:
    """Drop this test's topics and Redis keys (best effort)."""
    with contextlib.suppress(Exception):
        from core.kafka_io import make_admin

        admin = make_admin(s)
        k = s.kafka
        admin.delete_topics([k.ratings_topic, k.predictions_topic, k.dlq_topic, k.model_updates_topic])
        admin.close()
    with contextlib.suppress(Exception):
        from core.redis_conn import sync_redis
        from core.repos.keys import drop_namespace

        r = sync_redis(s.redis)
        drop_namespace(r, s.redis.key_prefix)
        r.close()


@pytest.mark.integration
@needs_chromium
def test_live_page_moves_while_events_flow(stack, tmp_path):
    port = free_port()
    token = "live-read-token"
    auth = {"Authorization": f"Bearer {token}"}
    with worker_with_traffic(stack, tmp_path, port, rate=100.0,
                             extra_env={"FBP_WORKER__READ_TOKEN": token}) as w:
        proc, feeder = w.proc, w.feeder
        # ML-100K's titles of the even ids only: odd ids must show as ids
        from core.datasets import load_movies
        from stream.catalog import load_into_redis

        movies = load_movies("ml-100k")
        ml_titles = dict(zip(movies["movie_id"].tolist(), movies["title"].tolist()))
        load_into_redis(w.settings, movies[movies["movie_id"] % 2 == 0])
        r = httpx.get(f"{proc.url}/live", timeout=10)
        assert r.status_code == 200, (
            f"/live answered {r.status_code}: stream/app.py must end with `from stream import live`")
        assert "text/html" in r.headers["content-type"]
        # The data wants the read token (the page sends the one from its ?token=).
        assert httpx.get(f"{proc.url}/api/v1/live", timeout=10).status_code == 401

        # The API moves: events processed grows (needs `live.stats.observe(result)` in the agent).
        deadline = time.monotonic() + 60
        first = httpx.get(f"{proc.url}/api/v1/live", headers=auth, timeout=10).json()
        # Counters are live; RMSE and rates come from the 1 s sampler, so wait for
        # a sample taken after the first batch before reading the page.
        while time.monotonic() < deadline and (first["events_processed"] == 0 or first["error"]["rmse"] is None):
            time.sleep(1)
            first = httpx.get(f"{proc.url}/api/v1/live", headers=auth, timeout=10).json()
        assert first["events_processed"] > 0, (
            "LiveStats saw no batch: the agent must call `live.stats.observe(result)` after each batch\n"
            + proc.tail())

        page = f"{proc.url}/live?token={token}"
        dom1 = dump_dom(page, tmp_path)
        time.sleep(3)
        dom2 = dump_dom(page, tmp_path)
        assert feeder.error is None, feeder.error

        n1, n2 = dom_number(dom1, "events-processed"), dom_number(dom2, "events-processed")
        assert n1 is not None and n1 > 0, dom1[-3000:]
        assert n2 > n1, f"events processed did not move: {n1} -> {n2}"
        for dom in (dom1, dom2):
            assert 'class="ok"' in dom
            assert dom_number(dom, "model-version") is not None
            assert dom_number(dom, "rmse") is not None
        assert dom_number(dom2, "events-per-s") > 0
        assert dom_number(dom2, "p99") is not None
        assert dom_number(dom2, "events-rejected") > 0  # the feeder sends some malformed events
        assert dom2.count("<tr><td>ops-") == 20  # the last 20 predictions, by event id
        assert dom2.count("<polyline") >= 3
        # movies by title (id on hover) where the catalog knows them, by id where not
        cells = movie_cells(dom2)
        known = {int(i): c for i, c in cells.items() if int(i) % 2 == 0 and int(i) in ml_titles}
        unknown = {int(i): c for i, c in cells.items() if int(i) not in known}
        assert known and unknown, cells
        assert known == {i: (ml_titles[i], f"movie {i}") for i in known}
        assert unknown == {i: (str(i), None) for i in unknown}
        # nothing published: the versions table describes the local checkpoint served
        rows = version_table(dom2)
        assert rows[-1][:2] == ["0", "baseline"] and rows[-1][3] == "local checkpoint baseline.safetensors"
        assert re.fullmatch(r"[0-9a-f]{12}", rows[-1][4]), rows

        data = httpx.get(f"{proc.url}/api/v1/live?points=5", headers=auth, timeout=10).json()
        assert len(data["history"]) <= 5 and data["model"]["ready"] is True
        assert data["recent"][0]["timings"]["event_to_prediction_ms"] is not None
