"""The worker's live page: what this worker is doing right now, in a browser.

Routes (registered on the Faust ``app``):
  GET /live           the page (stream/static/live.html: plain JS + inline SVG,
                      no external resources); it polls the JSON below every second.
  GET /api/v1/live    JSON: events processed, events/s, latency p50/p99 of recent
                      predictions, online RMSE/MAE, a per-second history of those
                      (bounded), the model version history and the last 20 predictions;
                      ``titles`` ({"<movie id>": title}) of the movies those show that
                      the movie catalog knows, and ``versions``: one row per model
                      version (family, version, when, why, checkpoint sha256 prefix).

The agent feeds it: after each micro-batch, ``stats.observe(result)`` with the
``BatchResult`` from ``Predictor.process``.  A 1 s timer samples the running
figures into the history.  Everything is per worker process (Prometheus has the
fleet view); memory is bounded by the deques' lengths.

When ``FBP_WORKER__READ_TOKEN`` is set, /api/v1/live wants
``Authorization: Bearer <token>``; open the page as ``/live?token=<token>`` and
it sends the header.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from faust.web import Request, Response, View

from core.events import PredictionRecord
from core.rolling import RollingError, finite_or_none

from stream.api import ApiError, json_endpoint, require_read
from stream.batch.types import BatchResult
from stream.routes import Routes
from stream.faults import INFRASTRUCTURE
from stream.runtime import runtime
from stream.titles import titles

log = logging.getLogger(__name__)
#: this module's pages (and timers), registered by ``stream.app.build_app``
routes = Routes()

STATIC = Path(__file__).resolve().parent / "static"
LIVE_HTML = STATIC / "live.html"


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile of an already sorted list (None when empty)."""
    n = len(sorted_values)
    if n == 0:
        return None
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def _num(x: float | None, nd: int = 4) -> float | None:
    return finite_or_none(x, nd)


def _record(rec: PredictionRecord) -> dict[str, Any]:
    """A PredictionRecord as the page shows it."""
    timings = rec.timings or {}
    predicted = float(rec.predicted)
    actual = float(rec.actual)
    return {
        "event_id": rec.event_id,
        "user_id": rec.user_id,
        "movie_id": rec.movie_id,
        "predicted": round(predicted, 3),
        "actual": actual,
        "error": round(predicted - actual, 3),
        "model_version": rec.model_version,
        "top_k": [[int(m), float(s)] for m, s in (rec.top_k or [])[:5]],
        "timings": {k: _num(v, 3) for k, v in timings.items()},
        "produced_at": rec.produced_at,
    }


class LiveStats:
    """Running figures of one worker, fed by ``observe`` and sampled every second.

    ``observe`` runs in the agent after each batch, so it only appends to
    bounded deques (O(batch)); sorting and summing happen once a second in
    ``sample``.
    """

    LATENCY_SAMPLES_PER_BATCH = 1000

    def __init__(
        self,
        *,
        history: int = 600,          # seconds of per-second samples kept
        rate_window_s: float = 5.0,  # events/s over this many seconds
        latency_window_s: float = 30.0,
        latency_keep: int = 20_000,  # most recent latencies kept for the percentiles
        error_window: int = 2000,    # predictions in the rolling RMSE/MAE (as stream.metrics)
        last: int = 20,
        clock=time.time,
    ) -> None:
        self.clock = clock
        self.started_at = clock()
        self.rate_window_s = rate_window_s
        self.latency_window_s = latency_window_s
        self.events = 0
        self.rejected = 0
        self.skipped = 0
        self.batches = 0
        self.last_batch_at: float | None = None
        self.model_version: int | None = None
        self._latency: deque[tuple[float, float]] = deque(maxlen=latency_keep)  # (t, ms)
        self._batch_ms: deque[tuple[float, float]] = deque(maxlen=1000)          # (t, ms)
        self._errors = RollingError(error_window)
        self._last: deque[Any] = deque(maxlen=last)
        self._counts: deque[tuple[float, int]] = deque()  # (t, events) for events/s
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.current: dict[str, Any] = self._empty_sample(self.started_at)
        self._versions: list[tuple[float, int]] = []  # (first seen, version), for the page

    # -- fed by the agent ------------------------------------------------
    def observe(self, result: BatchResult) -> None:
        """Fold one ``BatchResult`` in.  Never raises (it runs on the hot path)."""
        try:
            self._observe(result)
        except Exception:  # pragma: no cover - defensive: stats must not break the stream
            log.exception("live stats: could not observe a batch")

    def _observe(self, result: BatchResult) -> None:
        now = self.clock()
        preds = result.predictions
        self.batches += 1
        self.events += len(preds)
        self.rejected += len(result.rejected)
        self.skipped += result.skipped
        self.last_batch_at = now
        # Bounded work per batch, whatever its size: the error window only ever
        # holds the last ``error_window`` predictions, and latencies are an even
        # subsample (at most LATENCY_SAMPLES_PER_BATCH) of the batch.
        self._errors.extend(float(rec.predicted) - float(rec.actual) for rec in preds[-self._errors.window:])
        stride = max(1, len(preds) // self.LATENCY_SAMPLES_PER_BATCH)
        batch_ms = None
        for rec in preds[::stride]:
            t = rec.timings or {}
            lat = t.get("event_to_prediction_ms")
            if lat is not None:
                self._latency.append((now, float(lat)))
            batch_ms = t.get("batch_ms", batch_ms)
        if batch_ms is None and result.stage_s:
            batch_ms = 1000.0 * sum(result.stage_s.values())
        if batch_ms is not None:
            self._batch_ms.append((now, float(batch_ms)))
        if preds:
            self._last.extend(preds[-self._last.maxlen:])
            version = preds[-1].model_version
            if version != self.model_version:
                self.model_version = version
                self._versions.append((now, version))
                del self._versions[:-50]

    # -- sampled every second -------------------------------------------
    def _empty_sample(self, t: float) -> dict[str, Any]:
        return {"t": round(t, 3), "events": 0, "events_per_s": 0.0, "p50_ms": None, "p99_ms": None,
                "batch_ms": None, "rmse": None, "mae": None, "model_version": None}

    def sample(self) -> dict[str, Any]:
        """Compute the current figures and append them to the history."""
        now = self.clock()
        self._counts.append((now, self.events))
        while len(self._counts) > 2 and self._counts[1][0] <= now - self.rate_window_s:
            self._counts.popleft()
        t0, n0 = self._counts[0]
        eps = (self.events - n0) / (now - t0) if now > t0 else 0.0

        horizon = now - self.latency_window_s
        lat = sorted(ms for t, ms in self._latency if t >= horizon)
        bms = [ms for t, ms in self._batch_ms if t >= horizon]
        rmse, mae = self._errors.rmse(), self._errors.mae()
        s = {
            "t": round(now, 3),
            "events": self.events,
            "events_per_s": round(eps, 2),
            "p50_ms": _num(_quantile(lat, 0.50), 2),
            "p99_ms": _num(_quantile(lat, 0.99), 2),
            "batch_ms": _num(sum(bms) / len(bms), 2) if bms else None,
            "rmse": _num(rmse),
            "mae": _num(mae),
            "model_version": self.model_version,
        }
        self.current = s
        self.history.append(s)
        return s

    # -- read by the API --------------------------------------------------
    def snapshot(self, *, model: dict[str, Any] | None = None,
                 model_history: Iterable[dict[str, Any]] | None = None,
                 history_points: int | None = None) -> dict[str, Any]:
        now = self.clock()
        cur = self.current
        hist = list(self.history)
        if history_points is not None:
            hist = hist[-history_points:]
        return {
            "now": round(now, 3),
            "started_at": round(self.started_at, 3),
            "uptime_s": round(now - self.started_at, 1),
            "events_processed": self.events,
            "events_rejected": self.rejected,
            "events_skipped": self.skipped,
            "batches": self.batches,
            "last_batch_at": self.last_batch_at,
            "events_per_s": cur["events_per_s"],
            "latency_ms": {"p50": cur["p50_ms"], "p99": cur["p99_ms"], "batch_mean": cur["batch_ms"],
                           "window_s": self.latency_window_s},
            "error": {"rmse": cur["rmse"], "mae": cur["mae"], "window": self._errors.window,
                      "n": len(self._errors)},
            "history": hist,
            "model": model or {"version": self.model_version},
            "versions_seen": [{"t": round(t, 3), "version": v} for t, v in self._versions],
            "model_history": list(model_history or []),
            "recent": [_record(r) for r in reversed(self._last)],
        }


stats = LiveStats()

# Model history from Redis is cached briefly: every open page polls each second.
_MODEL_HISTORY_TTL_S = 5.0
_model_history_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])


async def _model_history() -> list[dict[str, Any]]:
    global _model_history_cache
    if runtime.models is None:
        return []
    at, cached = _model_history_cache
    now = time.monotonic()
    if now - at < _MODEL_HISTORY_TTL_S:
        return cached
    try:
        hist = await asyncio.to_thread(runtime.models.history, 20)
    except INFRASTRUCTURE as exc:  # Redis hiccup: keep the page alive with the last copy
        log.warning("live page: model history unavailable: %s", exc)
        return cached
    _model_history_cache = (now, hist)
    return hist


def _serving_model() -> dict[str, Any]:
    model = runtime.model
    if model is None:
        return {"ready": False, "name": None, "version": stats.model_version, "device": None}
    return {"ready": True, "name": model.name, "version": model.version, "device": str(model.device)}


def _why(h: dict[str, Any]) -> str:
    """Why a version serves: its reason (a promotion's names the challenger's
    and the champion's holdout RMSE), with the validation RMSE of an offline fit."""
    reason = str(h.get("reason") or "")
    metrics = h.get("metrics") or {}
    ch, cp = metrics.get("challenger_rmse"), metrics.get("champion_rmse")
    if ch is not None and cp is not None and "RMSE" not in reason:
        return f"{reason}: challenger RMSE {ch:.4f} vs champion {cp:.4f}"
    valid = metrics.get("best_valid_rmse")
    if valid is not None and "RMSE" not in reason:
        return f"{reason} (validation RMSE {valid:.4f})"
    return reason


def version_rows(model_history: list[dict[str, Any]], versions_seen: list[dict[str, Any]],
                 origin: dict[str, Any], serving: dict[str, Any]) -> list[dict[str, Any]]:
    """The versions table, newest first: the published history when there is
    one, else the versions this worker served (a local checkpoint described
    by ``origin``, what ``initial_model`` said of it)."""
    def row(version: Any, family: Any, when: Any, why: str, sha: Any) -> dict[str, Any]:
        return {"version": version, "family": family, "when": when, "why": why,
                "sha256": str(sha)[:12] if sha else None}

    if model_history:
        return [row(h.get("version"), h.get("model"), h.get("published_at"), _why(h), h.get("sha256"))
                for h in model_history]
    rows = []
    for seen in reversed(versions_seen):
        v = seen["version"]
        if origin and origin.get("version") == v:
            rows.append(row(v, origin.get("model"), seen["t"], _why(origin), origin.get("sha256")))
        else:
            family = serving.get("name") if serving.get("version") == v else None
            rows.append(row(v, family, seen["t"], "first served here", None))
    return rows


def _shown_movies(recent: list[dict[str, Any]]) -> list[int]:
    """The movie ids the page shows: each prediction's movie and top picks."""
    ids = [r["movie_id"] for r in recent]
    ids += [m for r in recent for m, _ in r["top_k"]]
    return list(dict.fromkeys(int(i) for i in ids))


async def live_data(history_points: int | None) -> dict[str, Any]:
    """/api/v1/live's body: the snapshot, the movies' titles and the versions table."""
    serving = _serving_model()
    hist = await _model_history()
    snap = stats.snapshot(model=serving, model_history=hist, history_points=history_points)
    names = await titles(_shown_movies(snap["recent"]))
    snap["titles"] = {str(i): t for i, t in names.items()}
    snap["versions"] = version_rows(hist, snap["versions_seen"], runtime.origin, serving)
    return snap


@routes.timer(interval=1.0)
async def sample_live_stats() -> None:
    """Once a second: events/s, latency percentiles, RMSE/MAE into the history."""
    stats.sample()


@routes.page("/live")
class LivePage(View):
    async def get(self, request: Request) -> Response:
        try:
            html = LIVE_HTML.read_text(encoding="utf-8")
        except OSError:
            log.exception("live page: %s missing", LIVE_HTML)
            return self.text("live page not installed", status=500)
        return self.html(html, headers={"Cache-Control": "no-store"})


@routes.page("/api/v1/live")
class LiveData(View):
    @json_endpoint(require_read, headers={"Cache-Control": "no-store"})
    async def get(self, request: Request) -> Any:
        points = request.query.get("points")
        try:
            n = max(1, min(int(points), 3600)) if points else None
        except ValueError:
            raise ApiError(400, "bad_parameter", "points must be an integer") from None
        return await live_data(n)
