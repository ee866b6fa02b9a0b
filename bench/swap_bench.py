"""``fbp bench swap``: event-to-prediction latency around a model hot swap.

One real ``fbp worker`` in its own namespace (topics, group, Redis prefix,
model-updates topic) serves a bootstrap LSTM (v1, trained for one epoch on
the first ``boot`` ML-100K events) while this process sends the following
events at a steady ``rate``.  Half-way through, a challenger -- fine-tuned
from v1 by the trainer's own code (:func:`trainer.finetune.finetune`) before
the run, so training does not compete for the CPU during the measurement --
is promoted exactly as the trainer promotes (:func:`trainer.finetune.promote`:
new version in Redis + announcement on model-updates).  The worker picks it
up between batches and re-derives each user's state lazily on the user's next
event, which is the cost this measures.

Latency per event is the worker's own ``timings.event_to_prediction_ms``
(rating's Kafka timestamp -> prediction produced); the client-side figure
(send -> prediction read here) is reported too.  The swap window is the
``window_s`` seconds of events centred on the first prediction made by the
new version; steady state is every other event of the same run after
``warmup_s``.  ``events_lost`` = sent ids never seen on ``predictions``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer

from stack.procs import Namespace
from core.settings import Settings, get_settings
from core.events import RatingEvent, encode_rating, rating_key


def _p(a: list[float] | np.ndarray, q: float) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return round(float(np.percentile(a, q)), 3) if len(a) else None


def _models(source: str, boot: int) -> tuple[Any, Any, Any]:
    """(dataset, bootstrap v1, fine-tune result whose challenger is v2)."""
    import torch

    from core.repos.buffer import REC
    from core.datasets import load_dataset
    from trainer.finetune import finetune, split_for_finetune
    from trainer.train import fit, make_model

    ds = load_dataset(source)
    df = ds.ratings
    torch.manual_seed(0)
    model = make_model("lstm", ds.movies, ds.genre_vocab, int(df["movie_id"].max()))
    fit(model, df.iloc[:boot], epochs=1, device="cpu", valid_frac=0.0, seed=0, progress=False)
    model.eval()
    part = df.iloc[max(0, boot - 4000):boot]
    recs = np.zeros(len(part), REC)
    recs["seq"] = np.arange(len(part))
    for a, c in (("user", "user_id"), ("movie", "movie_id"), ("rating", "rating"), ("ts", "ts")):
        recs[a] = part[c].to_numpy()
    sp = split_for_finetune(recs, recs[:0], holdout_fraction=0.1, replay_fraction=0.0)
    res = finetune(model, sp, epochs=1, device="cpu", min_holdout=1)
    return ds, model, res


def bench_swap(*, source: str = "ml-100k", rate: float = 200.0, duration_s: float = 90.0,
               swap_at_s: float | None = None, window_s: float = 30.0, warmup_s: float = 10.0,
               boot: int = 10_000, batch_size: int = 256, partitions: int = 2,
               logdir: Path = Path("runs/bench/logs"), port: int = 0,
               settings: Settings | None = None, progress: Any = None) -> dict[str, Any]:
    from stack import procs
    from core.repos.buffer import EventBuffer
    from core.repos.models import ModelStore
    from core.redis_conn import sync_redis
    from trainer.finetune import promote

    say = progress or (lambda _m: None)
    if not port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    settings = settings or get_settings()
    swap_at_s = duration_s / 2 if swap_at_s is None else swap_at_s
    say(f"training bootstrap v1 on {boot} events and a fine-tuned challenger")
    ds, v1, challenger = _models(source, boot)
    n = int(rate * duration_s)
    df = ds.ratings.iloc[boot:boot + n]
    if len(df) < n:
        raise ValueError(f"{source} has only {len(df)} events after the first {boot}; lower rate or duration")
    events = [RatingEvent(f"swap-{i}", int(u), int(m), float(r), int(t)) for i, u, m, r, t in zip(
        df.index, df.user_id.to_numpy(), df.movie_id.to_numpy(), df.rating.to_numpy(), df.ts.to_numpy())]

    ns = Namespace.fresh(partitions, settings)
    ns.create()
    store = ModelStore(sync_redis(settings.redis), ns.prefix)
    store.publish(v1, {"model": v1.name}, reason="bench bootstrap")
    env = dict(ns.env(batch_size, port), FBP_WORKER__DEVICE="cpu")
    worker = None
    kafka_kw = settings.kafka.kafka_python_kwargs()
    try:
        say(f"starting a worker on :{port}")
        worker = procs.start_worker(port, logdir, env)
        cons = KafkaConsumer(ns.predictions, **kafka_kw, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False)
        records: list[dict] = []
        received_at: dict[str, float] = {}
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                for msgs in cons.poll(timeout_ms=100, max_records=5000).values():
                    now = time.time()
                    for msg in msgs:
                        rec = orjson.loads(msg.value)
                        records.append(rec)
                        received_at.setdefault(rec["event_id"], now)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        prod = KafkaProducer(**kafka_kw, acks="all", linger_ms=1)
        sent_at: dict[str, float] = {}
        say(f"sending {n} events at {rate:.0f}/s; promotion at {swap_at_s:.0f}s")
        t0 = time.perf_counter()
        wall0 = time.time()
        promoted_at = None
        pub = None
        for i, ev in enumerate(events):
            due = t0 + i / rate
            ahead = due - time.perf_counter()
            if ahead > 0.001:
                time.sleep(ahead)
            sent_at[ev.event_id] = time.time()
            prod.send(ns.ratings, key=rating_key(ev), value=encode_rating(ev))
            if i % 20 == 19:
                prod.flush()
            if pub is None and time.perf_counter() - t0 >= swap_at_s:
                prod.flush()
                promoted_at = time.time()
                pub = promote(store, prod, ns.model_updates, challenger, trigger="bench",
                              buffer_key=EventBuffer.recent_key(ns.prefix))
                say(f"promoted v{pub.version} at {promoted_at - wall0:.1f}s")
        prod.flush()
        deadline = time.monotonic() + 120
        while len(received_at) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # late duplicates, if any
        stop.set()
        th.join(timeout=5)
        cons.close()
        prod.close()
        rederived = _metric(worker.url, "fbp_states_rederived_total")
        swaps = _metric(worker.url, "fbp_model_swaps_total")
    finally:
        if worker is not None:
            worker.stop()
        ns.drop()

    ids = {e.event_id for e in events}
    got = {r["event_id"]: r for r in records if r["event_id"] in ids}
    lost = len(ids - set(got))
    dups = sum(1 for r in records if r["event_id"] in ids) - len(got)
    new_v = pub.version if pub else None
    first_new = min((r["produced_at"] for r in got.values() if r["model_version"] == new_v), default=None)
    swap_t = first_new if first_new is not None else (promoted_at or wall0)
    lo, hi = swap_t - window_s / 2, swap_t + window_s / 2
    steady, swap, steady_c, swap_c = [], [], [], []
    for eid, r in got.items():
        lat = float(r["timings"]["event_to_prediction_ms"])
        ev_t = r["produced_at"] - lat / 1000.0  # the rating's Kafka timestamp
        client = (received_at[eid] - sent_at[eid]) * 1000.0
        if lo <= ev_t <= hi:
            swap.append(lat)
            swap_c.append(client)
        elif ev_t >= wall0 + warmup_s:
            steady.append(lat)
            steady_c.append(client)
    return {
        "p99_ms_steady": _p(steady, 99), "p99_ms_swap": _p(swap, 99), "events_lost": lost,
        "p50_ms_steady": _p(steady, 50), "p50_ms_swap": _p(swap, 50),
        "max_ms_swap": _p(swap, 100),
        "client_p99_ms_steady": _p(steady_c, 99), "client_p99_ms_swap": _p(swap_c, 99),
        "events_sent": n, "events_steady": len(steady), "events_swap_window": len(swap),
        "duplicates": dups, "rate": rate, "duration_s": duration_s, "window_s": window_s,
        "promoted_version": new_v, "promoted_at_s": round(promoted_at - wall0, 2) if promoted_at else None,
        "first_new_prediction_s": round(first_new - wall0, 2) if first_new else None,
        "worker_swaps": swaps, "states_rederived": rederived,
        "versions_seen": sorted({r["model_version"] for r in got.values()}),
    }


def _metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
