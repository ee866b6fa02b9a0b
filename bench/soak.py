"""``fbp bench soak``: the full path at a fixed fraction of its maximum rate, for minutes.

1. Calibrate: a backlog of events is produced flat out into an isolated
   namespace and one real ``fbp worker`` drains it; max rate = events /
   (first produce .. last one processed, from the worker's own counter).
2. Soak: a paced producer thread sends fresh synthetic events (new event
   ids, increasing timestamps) at ``fraction`` x max rate for ``minutes``.
3. Every ~``sample_s`` seconds: the worker's resident memory (psutil, else
   /proc/<pid>/status), its consumer lag (sum of ``fbp_consumer_lag_messages``
   over partitions, from /metrics) and the event-to-prediction latency over
   the interval (mean and p99 from the delta of the
   ``fbp_event_to_prediction_seconds`` histogram).
4. Growth = mean of the last minute - mean of the first minute, for each;
   "flat" means RSS grew less than ``max_rss_growth_mb`` and lag less than
   ``max_lag_growth`` messages.
5. Livelock warnings: the lines Faust's livelock detector wrote to the soak
   worker's log (its own messages, ``faust.transport.drivers.aiokafka``'s
   ``SLOW_PROCESSING_*``: a stream idle, a partition not fetched or not
   committed for longer than ``stream_processing_timeout``).  The batch path
   feeds that detector itself (stream.consumer), so a healthy soak has none;
   ``ok`` = flat, no livelock warning and a clean exit.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from stack import procs
from stack.procs import Namespace
from core.settings import REPO_ROOT, Settings, get_settings


def rss_bytes(pid: int) -> int:
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def livelock_markers() -> tuple[str, ...]:
    """The fixed start of each warning of Faust's livelock detector (the text
    before its first placeholder), read from faust itself so a new release's
    wording is followed."""
    from faust.transport.drivers import aiokafka as fa

    names = [n for n in dir(fa) if n.startswith("SLOW_PROCESSING_")
             and not n.startswith("SLOW_PROCESSING_CAUSE") and n != "SLOW_PROCESSING_EXPLAINED"]
    return tuple(getattr(fa, n).split("%", 1)[0].strip() for n in names)


def livelock_warnings(log_text: str) -> list[str]:
    """The lines of ``log_text`` that are livelock warnings."""
    markers = livelock_markers()
    return [line for line in log_text.splitlines() if any(m in line for m in markers)]


def scrape(url: str) -> dict[str, Any]:
    """The figures soak needs from one /metrics page."""
    text = httpx.get(url + "/metrics", timeout=10).text
    lag = 0.0
    processed = 0.0
    buckets: dict[float, float] = {}
    lat_sum = lat_count = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        if name.startswith("fbp_consumer_lag_messages"):
            lag += v
        elif name == "fbp_events_processed_total":
            processed = v
        elif name.startswith("fbp_event_to_prediction_seconds_bucket"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if le == "+Inf" else float(le)] = v
        elif name == "fbp_event_to_prediction_seconds_sum":
            lat_sum = v
        elif name == "fbp_event_to_prediction_seconds_count":
            lat_count = v
    return {"lag": lag, "processed": processed, "buckets": buckets, "lat_sum": lat_sum, "lat_count": lat_count}


def _quantile(buckets_a: dict[float, float], buckets_b: dict[float, float], q: float) -> float | None:
    """q-quantile (upper bucket bound) of the observations between two scrapes."""
    les = sorted(buckets_b)
    deltas = [(le, buckets_b[le] - buckets_a.get(le, 0.0)) for le in les]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return None
    for le, cum in deltas:
        if cum >= q * total:
            return le
    return les[-1]


def _checkpoint(settings: Settings, out: Path) -> Path:
    """The configured checkpoint, or a small seeded one trained on ML-100K."""
    if Path(settings.worker.checkpoint).is_file():
        return Path(settings.worker.checkpoint)
    path = out / "soak-ckpt" / "model"
    if path.is_file():
        return path
    import torch

    from models.checkpoint import save_checkpoint
    from core.datasets import load_dataset
    from trainer.train import fit, make_model

    ds = load_dataset("ml-100k")
    torch.manual_seed(0)
    model = make_model("lstm", ds.movies, ds.genre_vocab, int(ds.ratings["movie_id"].max()))
    fit(model, ds.ratings.iloc[:10_000], epochs=1, device="cpu", valid_frac=0.0, seed=0, progress=False)
    model.version = 1
    save_checkpoint(model, path, {"note": "soak bootstrap"})
    return path


class _Feeder(threading.Thread):
    """Sends synthetic rating events at ``rate`` per second until stopped."""

    def __init__(self, settings: Settings, topic: str, rate: float, seed: int = 7) -> None:
        super().__init__(name="soak-feeder", daemon=True)
        from core.kafka_io import make_producer

        self.topic, self.rate, self.seed = topic, rate, seed
        self.prod = make_producer(settings, client_id="fbp-soak")
        self.stop = threading.Event()
        self.sent = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        import numpy as np

        from core.events import RatingEvent, encode_rating, rating_key

        rng = np.random.default_rng(self.seed)
        n_users, n_movies, chunk = 2000, 1600, 4096
        ts = 1_600_000_000
        t0 = time.perf_counter()
        try:
            while not self.stop.is_set():
                users = rng.zipf(1.3, chunk) % n_users + 1
                movies = rng.integers(1, n_movies, chunk)
                ratings = rng.integers(1, 6, chunk)
                for u, mv, r in zip(users.tolist(), movies.tolist(), ratings.tolist()):
                    if self.stop.is_set():
                        break
                    ahead = t0 + self.sent / self.rate - time.perf_counter()
                    if ahead > 0.002:
                        time.sleep(ahead)
                    ts += 1
                    ev = RatingEvent(f"soak-{self.sent}", u, mv, float(r), ts)
                    self.prod.send(self.topic, key=rating_key(ev), value=encode_rating(ev)).add_errback(self.errors.append)
                    self.sent += 1
        finally:
            self.prod.flush(30)
            self.prod.close(10)


def _calibrate(settings: Settings, ckpt: Path, logdir: Path, events: int, port: int, batch: int) -> float:
    ns = Namespace.fresh(settings.kafka.partitions, settings)
    ns.create()
    env = ns.env(batch, port)
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    worker = procs.start_worker(port, logdir, env)
    try:
        feeder = _Feeder(ns.scoped(), ns.ratings, rate=1e9)
        t0 = time.perf_counter()
        feeder.start()
        while feeder.sent < events:
            time.sleep(0.05)
        feeder.stop.set()
        feeder.join()
        target = feeder.sent
        deadline = time.monotonic() + 600
        done = 0.0
        while done < target and time.monotonic() < deadline:
            done = scrape(worker.url)["processed"]
            time.sleep(0.2)
        return target / (time.perf_counter() - t0)
    finally:
        worker.stop()
        ns.drop()


def run_soak(minutes: float, *, fraction: float = 0.5, sample_s: float = 10.0,
             calibrate_events: int = 20_000, batch_size: int = 512, port: int = 6179,
             logdir: Path | None = None, rate: float | None = None,
             max_rss_growth_mb: float = 50.0, max_lag_growth: float = 1000.0,
             echo=print) -> dict[str, Any]:
    settings = get_settings()
    logdir = Path(logdir or REPO_ROOT / "runs" / "bench" / "soak")
    logdir.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(settings, logdir)
    if rate is None:
        max_rate = _calibrate(settings, ckpt, logdir, calibrate_events, port, batch_size)
        rate = fraction * max_rate
        echo(f"calibration: max {max_rate:.0f} events/s -> soak at {rate:.0f} events/s ({fraction:.0%})")
    else:
        max_rate = None
    ns = Namespace.fresh(settings.kafka.partitions, settings)
    ns.create()
    env = ns.env(batch_size, port)
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    log_from = (logdir / f"worker-{port}.log").stat().st_size if (logdir / f"worker-{port}.log").exists() else 0
    worker = procs.start_worker(port, logdir, env)
    samples: list[dict[str, Any]] = []
    feeder = _Feeder(ns.scoped(), ns.ratings, rate=rate)
    try:
        prev = scrape(worker.url)
        t0 = time.monotonic()
        feeder.start()
        end = t0 + minutes * 60
        while time.monotonic() < end:
            time.sleep(min(sample_s, max(0.0, end - time.monotonic())))
            if not worker.alive():
                raise RuntimeError(f"worker died during the soak:\n{worker.tail()}")
            cur = scrape(worker.url)
            dn = cur["lat_count"] - prev["lat_count"]
            s = {
                "t_s": round(time.monotonic() - t0, 1),
                "rss_mb": round(rss_bytes(worker.popen.pid) / 2**20, 2),
                "lag": cur["lag"],
                "sent": feeder.sent,
                "processed": cur["processed"],
                "latency_mean_ms": round(1000 * (cur["lat_sum"] - prev["lat_sum"]) / dn, 2) if dn > 0 else None,
                "latency_p99_ms": (lambda q: None if q is None else (round(1000 * q, 1) if math.isfinite(q) else None))(
                    _quantile(prev["buckets"], cur["buckets"], 0.99)),
                "events_per_s": round(dn / max(sample_s, 1e-9), 1),
            }
            samples.append(s)
            prev = cur
            echo(f"  t={s['t_s']:7.1f}s rss={s['rss_mb']:8.1f} MB lag={s['lag']:8.0f} "
                 f"latency mean={s['latency_mean_ms']} ms p99<={s['latency_p99_ms']} ms "
                 f"rate={s['events_per_s']:.0f}/s")
    finally:
        feeder.stop.set()
        feeder.join(60)
        code = worker.stop()
        ns.drop()

    def window(first: bool) -> list[dict[str, Any]]:
        t_end = samples[-1]["t_s"] if samples else 0
        sel = [s for s in samples if (s["t_s"] <= 60 if first else s["t_s"] >= t_end - 60)]
        return sel or samples[:1]

    def mean(rows: list[dict[str, Any]], k: str) -> float | None:
        vals = [r[k] for r in rows if r.get(k) is not None]
        return sum(vals) / len(vals) if vals else None

    growth = {}
    for k in ("rss_mb", "lag", "latency_mean_ms", "latency_p99_ms"):
        a, b = mean(window(True), k), mean(window(False), k)
        growth[k] = None if a is None or b is None else round(b - a, 3)
    flat = (growth["rss_mb"] is not None and growth["rss_mb"] < max_rss_growth_mb
            and growth["lag"] is not None and growth["lag"] < max_lag_growth)
    with open(worker.log, "rb") as fh:  # this run's part of the (appended) log
        fh.seek(log_from)
        livelock = livelock_warnings(fh.read().decode("utf-8", "replace"))
    return {
        "minutes": minutes, "fraction": fraction, "max_rate_events_per_s": max_rate,
        "rate_events_per_s": rate, "sample_s": sample_s, "events_sent": feeder.sent,
        "send_errors": len(feeder.errors), "worker_exit_code": code,
        "samples": samples, "growth_first_to_last_minute": growth,
        "thresholds": {"max_rss_growth_mb": max_rss_growth_mb, "max_lag_growth": max_lag_growth},
        "flat": flat, "livelock_warnings": len(livelock), "livelock_examples": livelock[:5],
        "ok": flat and not livelock and code == 0,
        "pid_note": f"worker log in {logdir}", "cpus": os.cpu_count(),
    }
