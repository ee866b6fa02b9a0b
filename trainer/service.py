"""``fbp trainer``: the continuous fine-tuning service.

* Consumes ``ratings`` in its own consumer group (``settings.trainer.app_id``),
  decodes each record with the worker's validator (invalid ones are skipped)
  and appends the batch to the persistent Redis buffer
  (:mod:`core.repos.buffer`) together with the offsets it covers; only then
  commits to Kafka.  A restart resumes from the buffer's offsets, so no event
  enters the buffer twice and none is missed.
* Consumes ``predictions`` in a second group (``<app_id>-drift``) for a
  rolling online RMSE per serving version (:class:`DriftMonitor`).
* Triggers a fine-tune (one at a time, in a background thread, while the
  consumers keep going) on the first of:

  - ``events``: ``finetune_every_events`` new events since the last run;
  - ``time``: ``finetune_every_s`` seconds since the last run, if at least
    ``min_new_events`` events arrived;
  - ``request``: a fine-tune request in Redis (:class:`core.repos.trainer.TrainerStore`,
    pushed by the worker's ``POST /api/v1/admin/finetune``, bearer token);
  - ``drift``: the rolling RMSE of the serving version's latest
    ``drift_window`` predictions exceeds the RMSE of its first
    ``drift_window`` predictions (its RMSE right after promotion) by more
    than ``drift_margin``.

* Each run (:mod:`trainer.finetune`) ends as ``promoted``, ``rejected``,
  ``skipped`` (not enough unseen holdout events) or ``failed``, counted in
  ``fbp_finetune_runs_total{outcome,trigger}``, logged as one JSON line, and
  a promotion is published to Redis and announced on ``model-updates``.
* Serves ``/metrics`` (trainer.metrics.REGISTRY) and ``/health`` on
  ``settings.trainer.web_port`` (host ``settings.worker.web_host``).

Redis: the event buffer (:mod:`core.repos.buffer`), the published models
(:mod:`core.repos.models`), and the requests, schedule state (so a restart
does not fine-tune again at once) and decision log (:mod:`core.repos.trainer`);
those modules own the key names.

One trainer per deployment (key prefix): the buffer has a single writer.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
import torch
import typer
from prometheus_client import make_wsgi_app

from core.settings import Settings, get_settings
from models.checkpoint import CheckpointError, load_checkpoint
from core.events import RatingEvent, decode_limits, decode_rating
from core.rolling import RollingError, finite_or_none
from core.repos.catalog import MovieCatalog
from core.repos.models import ModelStore
from core.side_features import fill_from_catalog
from core.redis_conn import sync_redis
from trainer import metrics as tm
from core.repos.buffer import BufferedEvent, EventBuffer
from core.repos.trainer import TrainerStore
from trainer.finetune import (ChampionData, Outcome, finetune, log_decision, promote,
                              split_for_finetune)
from models.devices import pick_device

log = logging.getLogger("fbp.trainer")


# -- triggers ------------------------------------------------------------------
class Schedule:
    """Every N events or T seconds since the last run, whichever comes first."""

    def __init__(self, every_events: int, every_s: float, min_new: int, seq: int, now: float) -> None:
        self.every_events, self.every_s, self.min_new = every_events, every_s, min_new
        self.last_seq, self.last_at = seq, now

    def due(self, seq: int, now: float) -> str | None:
        new = seq - self.last_seq
        if new >= self.every_events:
            return "events"
        if now - self.last_at >= self.every_s and new >= self.min_new:
            return "time"
        return None

    def ran(self, seq: int, now: float) -> None:
        self.last_seq, self.last_at = seq, now


class DriftMonitor:
    """Rolling online RMSE of the serving version against its RMSE at promotion.

    The baseline is the RMSE of the first ``window`` predictions a version
    made (the RMSE right after it was promoted); the rolling RMSE is over its
    latest ``window`` predictions.  Drift is due when rolling > baseline +
    ``margin`` with a full window, at most once per window: after it fires
    (or after any fine-tune run, :meth:`rearm`) the window must fill again.
    """

    def __init__(self, window: int, margin: float) -> None:
        self.window, self.margin = int(window), float(margin)
        self.version: int | None = None
        self.rolling = RollingError(self.window)
        self.baseline: float | None = None
        self._first_sq, self._first_n = 0.0, 0
        self.seen = 0

    def add(self, version: int, predicted: float, actual: float) -> None:
        if version != self.version:  # a new serving version (promotion or rollback)
            self.version = version
            self.rolling.clear()
            self.baseline = None
            self._first_sq, self._first_n = 0.0, 0
        e = float(predicted) - float(actual)
        self.rolling.add(e)
        self.seen += 1
        if self.baseline is None:
            self._first_sq += e * e
            self._first_n += 1
            if self._first_n >= self.window:
                self.baseline = math.sqrt(self._first_sq / self._first_n)
                self.rolling.clear()

    @property
    def rmse(self) -> float:
        return self.rolling.rmse()

    def due(self) -> bool:
        return (self.baseline is not None and self.rolling.full
                and self.rmse > self.baseline + self.margin)

    def rearm(self) -> None:
        """Start a fresh rolling window (after a run, or after firing)."""
        self.rolling.clear()


# -- HTTP: /metrics and /health ------------------------------------------------
class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def serve_http(host: str, port: int, health: Any) -> _Server:
    metrics_app = make_wsgi_app(tm.REGISTRY)

    def app(environ: dict, start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") == "/health":
            body = orjson.dumps(health())
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    srv = make_server(host, port, app, server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=srv.serve_forever, name="trainer-http", daemon=True).start()
    return srv


# -- the service ---------------------------------------------------------------
class TrainerService:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        t = settings.trainer
        self.r = sync_redis(settings.redis)
        prefix = settings.redis.key_prefix
        self.store = ModelStore(self.r, prefix)
        self.buffer = EventBuffer(self.r, prefix, capacity=t.buffer_events,
                                  reservoir=t.reservoir_events, seed=t.seed)
        self.buffer_key = self.buffer.k_recent
        self.control = TrainerStore(self.r, prefix)
        self.catalog = MovieCatalog(self.r, prefix) if settings.worker.catalog_features else None
        st = self.control.state()
        now = time.time()
        last_seq = int(st.get("last_run_seq", self.buffer.seq))
        last_at = float(st.get("last_run_at", now))
        self.schedule = Schedule(t.finetune_every_events, t.finetune_every_s, t.min_new_events,
                                 last_seq, min(last_at, now))
        self.drift = DriftMonitor(t.drift_window, t.drift_margin)
        self.drift_lock = threading.Lock()
        self.runs = int(st.get("runs", 0))
        self.promotions = int(st.get("promotions", 0))
        self.device = str(pick_device(t.device))
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune")
        self.job: Future | None = None
        self.job_trigger: str | None = None
        self.last: dict[str, Any] | None = None
        self.serving: int | None = None
        self.started = time.time()
        self.producer: Any = None
        tm.BUFFER.set(len(self.buffer))

    # -- health ----------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "serving_version": self.serving, "buffer_events": len(self.buffer),
                "seq": self.buffer.seq, "running": self.job_trigger, "runs": self.runs,
                "promotions": self.promotions, "online_rmse": _f(self.drift.rmse),
                "drift_baseline": _f(self.drift.baseline), "last": self.last}

    # -- ingest ----------------------------------------------------------------
    def ingest(self, polled: dict) -> int:
        """Append a poll's valid, not yet buffered ratings; returns events added."""
        limits = decode_limits(self.s.worker)
        events: list[BufferedEvent] = []
        offsets: dict[tuple[str, int], int] = {}
        for tp, msgs in polled.items():
            for msg in msgs:
                if not self.buffer.fresh(tp.topic, tp.partition, msg.offset):
                    continue
                ev = decode_rating(msg.value, **limits)
                if isinstance(ev, RatingEvent):
                    events.append(BufferedEvent(ev.user_id, ev.movie_id, ev.rating, ev.ts,
                                                msg.timestamp / 1000.0))
                offsets[(tp.topic, tp.partition)] = msg.offset + 1
        if offsets:
            self.buffer.append(events, offsets)
            tm.BUFFER.set(min(self.buffer.seq, self.buffer.capacity))
        return len(events)

    def observe_predictions(self, polled: dict) -> None:
        rows = []
        for msgs in polled.values():
            for msg in msgs:
                try:
                    d = orjson.loads(msg.value)
                    rows.append((int(d["model_version"]), float(d["predicted"]), float(d["actual"])))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
        with self.drift_lock:
            for v, p, a in rows:
                self.drift.add(v, p, a)

    def _watch_predictions(self) -> None:
        """Thread: the predictions consumer (its own group) feeding the drift monitor.
        (A consumer of its own thread: kafka-python cannot finish a group join
        inside the zero-timeout polls a shared loop would give it.)"""
        from core.kafka_io import make_consumer

        s = self.s
        preds = make_consumer(s, s.kafka.predictions_topic, group_id=f"{s.trainer.app_id}-drift",
                              enable_auto_commit=True, auto_offset_reset="latest",
                              max_poll_records=5000, client_id="fbp-trainer-drift")
        try:
            while not self.stop.is_set():
                self.observe_predictions(preds.poll(timeout_ms=500, max_records=5000))
        except Exception:  # noqa: BLE001 - drift is advisory; the service goes on without it
            log.exception("predictions consumer stopped; drift trigger off")
        finally:
            preds.close()

    # -- triggers --------------------------------------------------------------
    def next_trigger(self, now: float) -> str | None:
        req = self.control.pop_request()
        if req is not None:
            return "request"
        with self.drift_lock:
            drift = self.drift.due()
            if drift:
                log.warning("drift: online RMSE %.4f > %.4f at promotion + margin %.4f",
                            self.drift.rmse, self.drift.baseline or math.nan, self.drift.margin)
                self.drift.rearm()
        if drift:
            return "drift"
        return self.schedule.due(self.buffer.seq, now)

    # -- one fine-tune -----------------------------------------------------------
    def load_champion(self) -> tuple[Any, ChampionData, int | None]:
        """(model, what it may have seen, published version or None for a local checkpoint)."""
        from models.checkpoint import _read_meta

        cur = self.store.current()
        if cur is not None:
            model = self.store.load(cur.version)
            blob = self.store.blob(cur.version)
            try:
                meta = _read_meta(blob, f"model v{cur.version}")
            except CheckpointError:
                meta = {}
            cdata = ChampionData.from_meta(cur.version, meta, self.buffer_key,
                                           published_at=cur.meta.get("published_at"))
            return model, cdata, cur.version
        model, meta = load_checkpoint(self.s.worker.checkpoint)
        return model, ChampionData.from_meta(model.version, meta, self.buffer_key), None

    def run_once(self, trigger: str) -> dict[str, Any]:
        """Fine-tune, compare, maybe promote; never raises (outcome 'failed')."""
        t = self.s.trainer
        t0 = time.perf_counter()
        result = None
        outcome, new_version, error, champ_v = Outcome.FAILED, None, None, None
        seq_at_start = self.buffer.seq
        try:
            if t.threads:
                torch.set_num_threads(t.threads)
            champion, cdata, published = self.load_champion()
            champ_v = champion.version
            self.serving = champ_v
            tm.SERVING_VERSION.set(champ_v)
            recent, res = self.buffer.snapshot()
            split = split_for_finetune(recent, res, holdout_fraction=t.holdout_fraction,
                                       replay_fraction=t.replay_fraction, champion=cdata,
                                       seed=t.seed + self.runs)
            if self.catalog is not None:  # the worker serves these movies with the catalog's features too
                fill_from_catalog(champion, self.catalog, (m for f in (split.context, split.train, split.holdout)
                                                           if "movie_id" in f for m in f["movie_id"].tolist()))
            if len(split.holdout) < t.min_holdout_events or len(split.recent_train) == 0:
                outcome = Outcome.SKIPPED
                error = (f"not enough data: {len(split.holdout)} unseen holdout events "
                         f"(need {t.min_holdout_events}), {len(split.recent_train)} to train on")
            else:
                result = finetune(champion, split, epochs=t.finetune_epochs, lr=t.finetune_lr,
                                  device=self.device, seed=t.seed + self.runs,
                                  margin=t.promote_margin, min_holdout=t.min_holdout_events)
                d = result.decision
                tm.LOSS.set(result.train_loss)
                tm.HOLDOUT_RMSE.labels("champion").set(d.champion_rmse)
                tm.HOLDOUT_RMSE.labels("challenger").set(d.challenger_rmse)
                outcome = Outcome.REJECTED
                if d.promote:
                    cur = self.store.current()
                    if (cur.version if cur else None) != published:
                        error = (f"serving version changed from {published} to "
                                 f"{cur.version if cur else None} during the fine-tune")
                    else:
                        pub = promote(self.store, self._producer(), self.s.kafka.model_updates_topic,
                                      result, trigger=trigger, buffer_key=self.buffer_key)
                        outcome, new_version = Outcome.PROMOTED, pub.version
                        self.serving = pub.version
                        self.promotions += 1
                        tm.PROMOTIONS.inc()
                        tm.LAST_PROMOTION.set(time.time())
                        tm.SERVING_VERSION.set(pub.version)
        except Exception as exc:  # noqa: BLE001 - a failed run must not stop the service
            log.exception("fine-tune (%s) failed", trigger)
            outcome, error = Outcome.FAILED, f"{type(exc).__name__}: {exc}"
        dur = time.perf_counter() - t0
        self.runs += 1
        tm.RUNS.labels(outcome, trigger).inc()
        if outcome in (Outcome.PROMOTED, Outcome.REJECTED):
            tm.DURATION.observe(dur)
        tm.LAST_RUN.set(time.time())
        rec = log_decision(result, trigger=trigger, outcome=outcome, new_version=new_version,
                           error=error, champion_version=champ_v)
        rec["seq_at_start"] = seq_at_start
        rec["total_s"] = round(dur, 3)
        self.control.save_state(last_run_seq=seq_at_start, last_run_at=time.time(),
                                runs=self.runs, promotions=self.promotions)
        self.control.log_decision(rec)
        return rec

    def _producer(self) -> Any:
        if self.producer is None:
            from core.kafka_io import make_producer

            self.producer = make_producer(self.s, client_id="fbp-trainer")
        return self.producer

    # -- main loop --------------------------------------------------------------
    def _start_job(self, trigger: str) -> None:
        self.job_trigger = trigger
        self.schedule.ran(self.buffer.seq, time.time())
        log.info("fine-tune triggered by %s at seq %d", trigger, self.buffer.seq)
        self.job = self.pool.submit(self.run_once, trigger)

    def _finish_job(self) -> None:
        assert self.job is not None
        try:
            self.last = self.job.result()
        except Exception:  # noqa: BLE001 - run_once never raises; belt and braces
            log.exception("fine-tune job crashed")
        self.job, self.job_trigger = None, None
        self.schedule.ran(self.schedule.last_seq, time.time())
        with self.drift_lock:
            self.drift.rearm()

    def run(self) -> None:
        from core.kafka_io import make_consumer
        from core.topics import ensure_topics

        s = self.s
        ensure_topics(s)
        cur = self.store.current()
        self.serving = cur.version if cur else None
        if self.serving is not None:
            tm.SERVING_VERSION.set(self.serving)
        # a restart keeps the time of the last promotion (alerts watch it)
        last = next((h for h in self.store.history(200) if str(h.get("reason", "")).startswith("promoted")), None)
        if last is not None:
            tm.LAST_PROMOTION.set(float(last.get("published_at", 0.0)))
        ratings = make_consumer(s, s.kafka.ratings_topic, group_id=s.trainer.app_id,
                                enable_auto_commit=False, max_poll_records=5000,
                                max_poll_interval_ms=600_000, client_id="fbp-trainer")
        watcher = threading.Thread(target=self._watch_predictions, name="drift", daemon=True)
        watcher.start()
        log.info("trainer up: buffer %d events (seq %d), serving v%s, device %s",
                 len(self.buffer), self.buffer.seq, self.serving, self.device)
        last_version_check = 0.0
        try:
            while not self.stop.is_set():
                polled = ratings.poll(timeout_ms=200, max_records=5000)
                if polled:
                    self.ingest(polled)
                    try:
                        ratings.commit()
                    except Exception as exc:  # noqa: BLE001 - rebalance; Redis offsets are authoritative
                        log.warning("commit failed (%s); the buffer's offsets stay authoritative", exc)
                now = time.time()
                if self.job is not None and self.job.done():
                    self._finish_job()
                if now - last_version_check > 2.0:
                    last_version_check = now
                    cur = self.store.current()
                    if cur is not None and self.job is None:
                        self.serving = cur.version
                        tm.SERVING_VERSION.set(cur.version)
                if self.job is None:
                    trig = self.next_trigger(now)
                    if trig is not None:
                        self._start_job(trig)
        finally:
            if self.job is not None:
                log.info("waiting for the running fine-tune to finish")
                self.job.result()
            self.pool.shutdown(wait=True)
            ratings.close()
            watcher.join(timeout=5)
            if self.producer is not None:
                self.producer.flush(10)
                self.producer.close(10)


def _f(x: float | None) -> float | None:
    return finite_or_none(x, 6)


def cli(
    log_level: str = typer.Option(None, help="DEBUG, INFO, WARNING (default: settings.log_level)"),
) -> None:
    """Continuous fine-tuning: buffer ratings, fine-tune on schedule / request / drift,
    promote better models (published in Redis, announced on model-updates)."""
    s = get_settings()
    logging.basicConfig(level=(log_level or s.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    svc = TrainerService(s)

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the current poll", signum)
        svc.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    srv = serve_http(s.worker.web_host, s.trainer.web_port, svc.health)
    log.info("metrics and health on http://%s:%d", s.worker.web_host, s.trainer.web_port)
    try:
        svc.run()
    finally:
        srv.shutdown()
