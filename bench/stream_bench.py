"""``fbp bench stream``: the full path against a bare aiokafka loop, side by side.

Both consume the *same* pre-loaded events from the same topic in the same
run, so their ratio is meaningful on a shared, noisy machine:

* baseline: aiokafka ``getmany`` -> produce one small record per message
  (not awaited one by one) -> commit.  Kafka's floor on this machine.
* full path: real ``fbp worker`` processes (Faust, Redis state, model step,
  top-K, predictions), each in its own isolated topic/prefix namespace.
* two references that split the gap between them: the worker's Faust path
  (``stream.consumer``) with a handler that does only the bare loop's work
  (``bench.faust_noop``: the price of hosting in Faust), and the worker's batch
  code (``stream.predictor``, with real Redis and Kafka) driven by the bare
  loop instead of Faust (our own per-event cost, without Faust's).

With ``exactly_once`` (the default), the full path runs once more right after
its first row with ``worker.exactly_once`` on (one Kafka transaction per
partition batch), its output counted as a ``read_committed`` subscriber sees
it: ``exactly_once.over_at_least_once`` is that mode's throughput cost.

The ratios that matter side by side: full / bare, Faust no-op / bare, and full
/ batch-code-on-the-bare-loop (what hosting the batch code in Faust costs).
Events per CPU-second of the worker process(es) say what a core buys.

Throughput is measured from a backlog (first to last output record), so
worker start-up is excluded.  Latency is measured separately at a fixed
fraction of the measured throughput: rating send time -> prediction appended
to the predictions log (broker LogAppendTime, read back after the run:
:func:`run_latency`).  Stage timings come from the workers' own histograms.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer

from stack.procs import Namespace
from core.settings import Settings, get_settings
from core.events import RatingEvent, encode_rating, rating_key

#: the latency run's sender hands over the records due every this many seconds
_TICK_S = 0.005

STAGES = ("decode", "redis_load", "model_step", "topk", "outputs", "produce", "redis_store")
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _events(source: str, n: int) -> list[RatingEvent]:
    from core.datasets import load_dataset

    df = load_dataset(source).ratings.iloc[:n]
    return [
        RatingEvent(f"b{i}", int(u), int(mv), float(r), int(t))
        for i, (u, mv, r, t) in enumerate(
            zip(df.user_id.to_numpy(), df.movie_id.to_numpy(), df.rating.to_numpy(), df.ts.to_numpy())
        )
    ]


def preload(settings: Settings, topic: str, events: list[RatingEvent]) -> None:
    p = KafkaProducer(**settings.kafka.kafka_python_kwargs(), acks="all", linger_ms=20,
                      batch_size=256 * 1024)
    for ev in events:
        p.send(topic, key=rating_key(ev), value=encode_rating(ev))
    p.flush()
    p.close()


@dataclass
class Output:
    """What a measured path wrote to its output topic."""

    first: float  # Kafka timestamp (s) of the earliest record
    last: float  # ... and of the latest
    seen: int  # events accounted for
    at_first: int  # events in records stamped ``first`` (a batch written at its end)

    @property
    def events_per_s(self) -> float:
        """Sustained rate over (first, last]: the events stamped at ``first`` were
        processed before the clock starts, so they are not counted."""
        return (self.seen - self.at_first) / max(self.last - self.first, 1e-6)


def _count_until(settings: Settings, topic: str, n: int, timeout: float,
                 events_in: Any = None, isolation: str = "read_uncommitted") -> Output:
    """Read ``topic`` from the start until ``n`` events are accounted for, by the
    records' Kafka (create) timestamps.  ``events_in(msg)`` says how many events a
    record stands for (default 1)."""
    c = KafkaConsumer(topic, **settings.kafka.kafka_python_kwargs(), group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=1000, isolation_level=isolation)
    per_ts: dict[float, int] = {}
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < n and time.monotonic() < deadline:
            for msg in c:
                k = 1 if events_in is None else events_in(msg)
                ts = msg.timestamp / 1000.0
                per_ts[ts] = per_ts.get(ts, 0) + k
                seen += k
                if seen >= n:
                    break
    finally:
        c.close()
    if not per_ts:
        return Output(0.0, 0.0, 0, 0)
    first = min(per_ts)
    return Output(first, max(per_ts), seen, per_ts[first])


async def _baseline_loop(settings: Settings, src: str, dst: str, n: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    kw = {"bootstrap_servers": settings.kafka.bootstrap_servers}
    cons = AIOKafkaConsumer(src, group_id=f"bench-base-{uuid.uuid4().hex[:6]}",
                            auto_offset_reset="earliest", enable_auto_commit=False, **kw)
    prod = AIOKafkaProducer(acks="all", linger_ms=5, **kw)
    await cons.start()
    await prod.start()
    done = 0
    try:
        while done < n:
            batches = await cons.getmany(timeout_ms=200, max_records=settings.worker.max_poll_records)  # the worker's fetch size
            futs = []
            for tp, msgs in batches.items():
                for msg in msgs:
                    ev = orjson.loads(msg.value)
                    out = orjson.dumps({"event_id": ev["event_id"], "user_id": ev["user_id"]})
                    futs.append(await prod.send(dst, out, key=msg.key))
            if futs:
                await asyncio.gather(*futs)
                await cons.commit()
                done += len(futs)
    finally:
        await cons.stop()
        await prod.stop()


@dataclass
class PathResult:
    events_per_s: float
    stages_s: dict[str, float] = field(default_factory=dict)
    #: events per CPU-second of the process(es) that did the work
    events_per_cpu_s: float | None = None


def run_baseline(settings: Settings, events: list[RatingEvent], partitions: int) -> PathResult:
    ns = Namespace.fresh(partitions, settings)
    ns.create()
    try:
        preload(settings, ns.ratings, events)
        cpu0 = time.process_time()
        asyncio.run(_baseline_loop(settings, ns.ratings, ns.predictions, len(events)))
        cpu = time.process_time() - cpu0
        out = _count_until(settings, ns.predictions, len(events), 60)
        return PathResult(out.events_per_s, events_per_cpu_s=len(events) / max(cpu, 1e-9))
    finally:
        ns.drop()


async def _predictor_loop(settings: Settings, ns: Namespace, n: int, batch_size: int) -> None:
    """The bare loop with the worker's batch code in the middle: getmany ->
    ``Predictor.process`` (Redis load, model, top-K, produce, Redis store) -> commit."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from models.checkpoint import load_checkpoint
    from stream.predictor import Incoming
    from core.redis_conn import async_redis
    from stream.outbox import send_records
    from stream.runtime import make_predictor
    from core.repos.states import StateStore

    kw = {"bootstrap_servers": settings.kafka.bootstrap_servers}
    cons = AIOKafkaConsumer(ns.ratings, group_id=f"{ns.prefix}-pred", auto_offset_reset="earliest",
                            enable_auto_commit=False, **kw)
    prod = AIOKafkaProducer(acks="all", linger_ms=5, **kw)
    redis = async_redis(settings.redis)
    await cons.start()
    await prod.start()

    async def send(topic: str, key: bytes | None, value: bytes) -> Any:
        return await prod.send(topic, value, key=key)

    model, _ = load_checkpoint(settings.worker.checkpoint)
    scoped = ns.scoped()
    async def send_many(topic: str, records: Any) -> Any:  # as the worker: stream.outbox
        return await send_records(prod, topic, records)

    pred = make_predictor(scoped, model, StateStore.from_settings(redis, scoped.redis), send, send_many)
    w = settings.worker
    done = 0
    try:
        while done < n:
            got = await cons.getmany(timeout_ms=int(w.batch_timeout_s * 1000), max_records=batch_size)
            msgs = [Incoming(m.value, m.partition, m.offset, m.timestamp / 1000.0, m.topic, m.key)
                    for recs in got.values() for m in recs]
            if msgs:
                await pred.process(msgs)
                await cons.commit()
                done += len(msgs)
    finally:
        await cons.stop()
        await prod.stop()
        await redis.aclose()


def run_predictor_without_faust(settings: Settings, events: list[RatingEvent], *, batch_size: int,
                                partitions: int) -> PathResult:
    """Events/s of the worker's batch code fed by the bare loop (no Faust)."""
    import torch

    ns = Namespace.fresh(partitions, settings)
    ns.create()
    threads = torch.get_num_threads()  # make_predictor sets the worker's
    try:
        preload(settings, ns.ratings, events)
        cpu0 = time.process_time()
        asyncio.run(_predictor_loop(settings, ns, len(events), batch_size))
        cpu = time.process_time() - cpu0  # includes loading the model once
        out = _count_until(settings, ns.predictions, len(events), 120)
        return PathResult(out.events_per_s, events_per_cpu_s=len(events) / max(cpu, 1e-9))
    finally:
        torch.set_num_threads(threads)
        ns.drop()


def run_faust_noop(settings: Settings, events: list[RatingEvent], *, batch_size: int,
                   partitions: int, logdir: Path, port: int = 6178) -> PathResult:
    """Events/s of the worker's Faust path doing only the bare loop's work."""
    import subprocess
    import sys

    ns = Namespace.fresh(partitions, settings)
    ns.create()
    logdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **ns.env(batch_size, port))
    try:
        preload(settings, ns.ratings, events)
        with open(logdir / f"faust-noop-{port}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "faust", "-A", "bench.faust_noop", "worker",
                                     "-l", "warn", "--web-port", str(port)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                out = _count_until(settings, ns.predictions, len(events), 300)
                cpu = cpu_seconds(proc.pid)  # includes start-up (imports, joining the group)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        if out.seen < len(events):
            raise RuntimeError(f"faust no-op: only {out.seen}/{len(events)} records; see {logdir}")
        return PathResult(out.events_per_s, events_per_cpu_s=len(events) / max(cpu, 1e-9))
    finally:
        ns.drop()


def _stage_sums(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("fbp_stage_duration_seconds_sum{"):
            stage = line.split('stage="')[1].split('"')[0]
            out[stage] = float(line.rsplit(" ", 1)[1])
    return out


def run_full_path(settings: Settings, events: list[RatingEvent], *, workers: int, batch_size: int,
                  partitions: int, logdir: Path, base_port: int = 6170,
                  linger_s: float | None = None, exactly_once: bool = False) -> PathResult:
    from stack import procs

    ns = Namespace.fresh(partitions, settings)
    ns.create()
    started = []
    try:
        if workers == 1:  # a backlog first: the worker runs flat out from its first fetch
            preload(settings, ns.ratings, events)
        for i in range(workers):
            env = ns.env(batch_size, base_port + i)
            if linger_s is not None:
                env["FBP_WORKER__BATCH_TIMEOUT_S"] = str(linger_s)
            if exactly_once:
                env["FBP_WORKER__EXACTLY_ONCE"] = "true"
            started.append(procs.start_worker(base_port + i, logdir, env))
        if workers > 1:
            # Several workers: all join (and the group settles) before any event
            # exists; a backlog would be eaten by the first worker while the
            # others start, and every join would pause the group mid-run.
            _wait_group_stable(settings, ns.prefix, workers)
        cpu0 = sum(cpu_seconds(p.popen.pid) for p in started)  # from /health ok (model loaded)
        if workers > 1:
            preload(settings, ns.ratings, events)
        out = _count_until(settings, ns.predictions, len(events), 600,
                           isolation="read_committed" if exactly_once else "read_uncommitted")
        cpu = sum(cpu_seconds(p.popen.pid) for p in started) - cpu0
        stages: dict[str, float] = {}
        for p in started:
            for k, v in _stage_sums(p.url).items():
                stages[k] = stages.get(k, 0.0) + v
        if out.seen < len(events):
            raise RuntimeError(f"only {out.seen}/{len(events)} predictions; worker log:\n{started[0].tail()}")
        # What the stages do not account for: Faust's consumer/stream machinery,
        # fetching, acking, the event loop (per worker, over the busy span).
        stages["faust_overhead"] = max(0.0, (out.last - out.first) * workers - sum(stages.values()))
        return PathResult(out.events_per_s, stages, events_per_cpu_s=out.seen / max(cpu, 1e-9))
    finally:
        for p in started:
            p.stop()
        ns.drop()


def _scaling(sweep: list[dict[str, Any]]) -> None:
    """Per-worker rate and scaling efficiency (rate / (workers x the one-worker
    rate at the same batch size and linger)) on each sweep row that has a
    one-worker row to compare with."""
    one = {(r["batch_size"], r["linger_s"]): r["events_per_s"] for r in sweep if r["workers"] == 1}
    for r in sweep:
        r["events_per_s_per_worker"] = r["events_per_s"] / r["workers"]
        base = one.get((r["batch_size"], r["linger_s"]))
        r["scaling_efficiency"] = r["events_per_s"] / (r["workers"] * base) if base else None


def _wait_group_stable(settings: Settings, group: str, members: int, timeout_s: float = 120.0) -> None:
    """Until consumer group ``group`` is Stable with ``members`` members."""
    from core.kafka_io import make_admin

    admin = make_admin(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = admin.describe_groups([group]).get(group) or {}
            state = info.get("group_state", info.get("state"))
            if state == "Stable" and len(info.get("members") or ()) == members:
                return
            time.sleep(0.5)
        raise RuntimeError(f"consumer group {group} not stable with {members} members after {timeout_s:.0f}s")
    finally:
        admin.close()


def run_latency(settings: Settings, events: list[RatingEvent], *, rate: float, batch_size: int,
                partitions: int, logdir: Path, port: int = 6179) -> dict[str, Any]:
    """Send at ``rate`` events/s to a warm worker; latency = event sent ->
    its prediction appended to the predictions log.

    The run's predictions topic stamps each record with the broker's append
    time (``message.timestamp.type=LogAppendTime``), the moment a subscriber
    can fetch it, so the latencies are read back *after* the run and no
    consumer competes with the worker for the CPU while it is measured: on a
    2-core machine a live kafka-python consumer reading the predictions took
    ~0.5 of a core at 7,600 events/s and pushed the worker into saturation.
    A subscriber's own fetch adds its poll delay on top (a long-polling
    consumer is answered as soon as the record is appended).

    Warm first: a fresh worker's first batches pay one-off costs (model load,
    the online kernel's compile or cache load, group join), which used to put
    500-1,000 ms into the first two seconds' latencies and so into p99."""
    from stack import procs

    ns = Namespace.fresh(partitions, settings)
    ns.create(configs={ns.predictions: {"message.timestamp.type": "LogAppendTime"}})
    worker = procs.start_worker(port, logdir, ns.env(batch_size, port))
    try:
        cons = KafkaConsumer(ns.predictions, **settings.kafka.kafka_python_kwargs(), group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=200)
        prod = KafkaProducer(**settings.kafka.kafka_python_kwargs(), acks="all", linger_ms=1)
        _warm_up(ns, prod, cons, events[: max(200, min(len(events) // 4, int(rate * 2)))], rate)
        prod.close()
        c0 = time.process_time()
        sent_at = _send_at_rate(settings, ns.ratings, events, rate)
        sender_cpu = time.process_time() - c0
        appended = _appended_at(cons, {ev.event_id: i for i, ev in enumerate(events)},
                                timeout_s=len(events) / rate + 60)
        cons.close()
        got = ~np.isnan(appended)
        lat = (appended[got] - sent_at[got]) * 1000.0
        arr = lat if len(lat) else np.array([np.nan])
        return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
                "n": int(got.sum()), "rate": rate, "over_time": _per_second(list(sent_at[got]), list(lat)),
                "clock": "sent -> appended to the predictions log (LogAppendTime)",
                "sender_cpu_us_per_event": 1e6 * sender_cpu / max(len(events), 1)}
    finally:
        worker.stop()
        ns.drop()


def _send_at_rate(settings: Settings, topic: str, events: list[RatingEvent], rate: float) -> np.ndarray:
    """Produce ``events`` (encoded beforehand) at ``rate``; the wall-clock time
    each was handed to the producer.

    Every 5 ms the records due so far leave as whole record batches
    (``stream.outbox``, ~4 us of CPU each): kafka-python's per-record ``send``
    took ~79 us of CPU per record (its sender thread included), most of a
    core at 11,000 events/s, taken from the worker it measures."""
    records = [(rating_key(ev), encode_rating(ev)) for ev in events]
    return asyncio.run(_send_ticks(settings, topic, records, rate))


async def _send_ticks(settings: Settings, topic: str, records: list[tuple[bytes, bytes]], rate: float) -> np.ndarray:
    from aiokafka import AIOKafkaProducer

    from stream.outbox import send_records

    prod = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", linger_ms=1)
    await prod.start()
    sent_at = np.zeros(len(records))
    futs: list[Any] = []
    try:
        i, t0 = 0, time.perf_counter()
        while i < len(records):
            due = min(len(records), int((time.perf_counter() - t0) * rate) + 1)
            if due > i:
                sent_at[i:due] = time.time()
                futs += await send_records(prod, topic, records[i:due])
                i = due
            await asyncio.sleep(_TICK_S)
        await asyncio.gather(*futs)
    finally:
        await prod.stop()
    return sent_at


def _appended_at(cons: KafkaConsumer, index: dict[str, int], timeout_s: float) -> np.ndarray:
    """The broker append time (s) of each indexed event's prediction, read
    until every one is found or ``timeout_s`` passes (NaN where none came)."""
    out = np.full(len(index), np.nan)
    missing = len(index)
    deadline = time.monotonic() + timeout_s
    while missing and time.monotonic() < deadline:
        for msg in _poll(cons):
            if msg.timestamp_type != 1:
                raise RuntimeError("the latency run's predictions topic does not use LogAppendTime")
            i = index.get(orjson.loads(msg.value)["event_id"])
            if i is not None and np.isnan(out[i]):
                out[i] = msg.timestamp / 1000.0
                missing -= 1
    return out


def _warm_up(ns: Namespace, prod: KafkaProducer, cons: KafkaConsumer, events: list[RatingEvent],
             rate: float, timeout_s: float = 120.0) -> None:
    """Send ``events`` (ids prefixed ``warm-``) at ``rate`` and wait until
    every one has its prediction; nothing of this is measured."""
    want = {f"warm-{ev.event_id}" for ev in events}
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        prod.send(ns.ratings, key=rating_key(ev), value=encode_rating(replace(ev, event_id=f"warm-{ev.event_id}")))
        ahead = i / rate - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(ahead)
    prod.flush()
    while want and time.perf_counter() - t0 < timeout_s:
        for msg in _poll(cons):
            want.discard(orjson.loads(msg.value)["event_id"])


def _per_second(at: list[float], lat: list[float]) -> dict[str, list]:
    """p50/p99 latency of the events sent in each second of the run (``at``: send times)."""
    if not at:
        return {"t": [], "p50": [], "p99": []}
    a, l = np.array(at) - at[0], np.array(lat)
    t, p50, p99 = [], [], []
    for s in range(int(a.max()) + 1):
        sel = l[(a >= s) & (a < s + 1)]
        if len(sel):
            t.append(s)
            p50.append(float(np.percentile(sel, 50)))
            p99.append(float(np.percentile(sel, 99)))
    return {"t": t, "p50": p50, "p99": p99}


def _poll(cons: KafkaConsumer) -> list[Any]:
    out = []
    for recs in cons.poll(timeout_ms=20, max_records=5000).values():
        out.extend(recs)
    return out


def bench_checkpoint(settings: Settings, path: Path | None) -> Path:
    """The model the benchmark serves: ``path``, else the configured worker
    checkpoint, else a seeded untrained LSTM of the default size (speed does not
    depend on the weights' values)."""
    for p in (path, settings.worker.checkpoint):
        if p is not None and Path(str(p) + ".json").is_file():
            return Path(p)
    import torch

    from models.checkpoint import save_checkpoint
    from core.datasets import load_dataset
    from trainer.train import make_model

    ds = load_dataset("ml-100k")
    torch.manual_seed(0)
    model = make_model("lstm", ds.movies, ds.genre_vocab, int(ds.ratings["movie_id"].max()))
    out = Path("runs/bench/untrained-lstm")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, {"note": "untrained, for speed benchmarks"})
    return out


def bench_stream(*, source: str, events: int, batch_sizes: list[int], workers: list[int],
                 partitions: int, latency_fraction: float, logdir: Path,
                 checkpoint: Path | None = None, lingers: list[float] | None = None,
                 exactly_once: bool = True, latency_rate: float | None = None) -> dict[str, Any]:
    """Every path side by side; latency at ``latency_fraction`` of the full
    path's rate, or at ``latency_rate`` events/s (one load for every config)."""
    settings = get_settings()
    ckpt = bench_checkpoint(settings, checkpoint)
    os.environ["FBP_WORKER__CHECKPOINT"] = str(ckpt)  # inherited by the worker processes
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"checkpoint": ckpt})})
    evs = _events(source, events)
    base = run_baseline(settings, evs, partitions)
    noop = run_faust_noop(settings, evs, batch_size=batch_sizes[0], partitions=partitions, logdir=logdir)
    no_faust = run_predictor_without_faust(settings, evs, batch_size=batch_sizes[0], partitions=partitions)
    sweep = []
    eo: PathResult | None = None
    for b in batch_sizes:
        for w in workers:
            r = run_full_path(settings, evs, workers=w, batch_size=b, partitions=partitions, logdir=logdir)
            sweep.append({"batch_size": b, "workers": w, "linger_s": settings.worker.batch_timeout_s,
                          "events_per_s": r.events_per_s, "ratio": r.events_per_s / base.events_per_s,
                          "events_per_cpu_s": r.events_per_cpu_s, "stages_s": r.stages_s})
            if exactly_once and eo is None:  # right after the row it is compared with
                eo = run_full_path(settings, evs, workers=w, batch_size=b, partitions=partitions,
                                   logdir=logdir, exactly_once=True)
    for lg in lingers or []:  # micro-batch time bound, at the first batch size, one worker
        r = run_full_path(settings, evs, workers=1, batch_size=batch_sizes[0], partitions=partitions,
                          logdir=logdir, linger_s=lg)
        sweep.append({"batch_size": batch_sizes[0], "workers": 1, "linger_s": lg,
                      "events_per_s": r.events_per_s, "ratio": r.events_per_s / base.events_per_s,
                      "events_per_cpu_s": r.events_per_cpu_s, "stages_s": r.stages_s})
    _scaling(sweep)
    main = sweep[0]  # first batch size, first worker count, default linger
    rate = latency_rate or main["events_per_s"] * latency_fraction
    n_lat = min(len(evs), max(2000, int(rate * 20)))
    lat = run_latency(settings, evs[:n_lat], rate=rate,
                      batch_size=batch_sizes[0], partitions=partitions, logdir=logdir)
    total_stage = sum(main["stages_s"].values())
    full = main["events_per_s"]
    return {
        "events_per_s": full,
        "baseline_events_per_s": base.events_per_s,
        "ratio": full / base.events_per_s,
        "ratios": {
            "full_over_bare": full / base.events_per_s,
            "faust_noop_over_bare": noop.events_per_s / base.events_per_s,
            "faust_batch_over_bare_batch": full / no_faust.events_per_s,
        },
        "faust_noop_events_per_s": noop.events_per_s,
        "no_faust_events_per_s": no_faust.events_per_s,
        "no_faust_ratio": no_faust.events_per_s / base.events_per_s,  # kept for bench/report.py
        "ratio_to_faust_noop": full / noop.events_per_s,
        "events_per_cpu_s": {
            "full": main["events_per_cpu_s"], "bare": base.events_per_cpu_s,
            "faust_noop": noop.events_per_cpu_s, "bare_batch": no_faust.events_per_cpu_s,
        },
        "latency_ms": {"p50": lat["p50"], "p99": lat["p99"]},
        "latency_rate_events_per_s": lat["rate"],
        "latency_over_time": lat["over_time"],
        "latency_clock": lat["clock"],
        "latency_sender_cpu_us_per_event": lat["sender_cpu_us_per_event"],
        "events": len(evs),
        "partitions": partitions,
        "sweep": sweep,
        "stage_share": {k: v / total_stage for k, v in main["stages_s"].items()} if total_stage else {},
        # per event, from the same worker run as the ratios (its fbp_stage_duration_seconds
        # sums over the events it handled); wall time: with the pipeline, produce and
        # redis_store overlap the next batch's stages
        "stage_us_per_event": {k: 1e6 * v / len(evs) for k, v in main["stages_s"].items()},
        "exactly_once": None if eo is None else {
            "events_per_s": eo.events_per_s, "over_at_least_once": eo.events_per_s / full,
            "events_per_cpu_s": eo.events_per_cpu_s,
            "events_per_cpu_s_over_at_least_once": eo.events_per_cpu_s / main["events_per_cpu_s"],
            "stages_s": eo.stages_s,
        },
        "checkpoint": str(ckpt),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
