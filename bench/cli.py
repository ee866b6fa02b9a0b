"""``fbp bench ...``: benchmarks that print figures and write them with ``--json``.

Every figure is measured side by side with its reference in the same run and
reported as a ratio, because this machine is shared and noisy.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import typer

app = typer.Typer(no_args_is_help=True, help="Benchmarks (print figures; --json PATH writes them)")


def _write_json(path: Path | None, data: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        typer.echo(f"wrote {path}")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


@app.command()
def stream(
    source: str = typer.Option("ml-100k", help="dataset whose events are streamed"),
    events: int = typer.Option(30_000, help="events per measured run"),
    batch_sizes: str = typer.Option(None, help="comma-separated worker batch sizes to sweep (default: the worker's batch_size)"),
    workers: str = typer.Option("1", help="comma-separated worker counts to compare, e.g. 1,2"),
    lingers: str = typer.Option("", help="comma-separated micro-batch time bounds (s) to sweep, e.g. 0.01,0.2"),
    partitions: int = typer.Option(4, help="partitions of the bench topics"),
    latency_fraction: float = typer.Option(0.5, help="latency run's rate as a fraction of measured throughput"),
    latency_rate: float = typer.Option(None, min=1, help="latency run's rate in events/s instead (to compare configs at one load)"),
    logdir: Path = typer.Option(Path("runs/bench/logs"), help="worker logs"),
    checkpoint: Path = typer.Option(None, help="model to serve (default: the worker checkpoint, else an untrained LSTM)"),
    json_path: Path = typer.Option(None, "--json", help="write the figures here"),
    exactly_once: bool = typer.Option(True, help="also run the full path with worker.exactly_once on"),
) -> None:
    """Full path vs a bare aiokafka consume-and-produce loop over the same events."""
    from bench.stream_bench import bench_stream

    if batch_sizes is None:
        from core.settings import get_settings

        batch_sizes = str(get_settings().worker.batch_size)
    res = bench_stream(source=source, events=events, batch_sizes=_ints(batch_sizes),
                       workers=_ints(workers), partitions=partitions,
                       latency_fraction=latency_fraction, latency_rate=latency_rate, logdir=logdir, checkpoint=checkpoint,
                       lingers=[float(x) for x in lingers.split(",") if x.strip()], exactly_once=exactly_once)
    r, cpu = res["ratios"], res["events_per_cpu_s"]
    base = res["baseline_events_per_s"]
    typer.echo(f"{'path':38s} {'events/s':>10s} {'ratio':>6s} {'ev/CPU-s':>9s}")
    for label, eps, ratio, c in (
        ("bare aiokafka loop", base, 1.0, cpu["bare"]),
        ("no-op handler on the worker's Faust path", res["faust_noop_events_per_s"],
         r["faust_noop_over_bare"], cpu["faust_noop"]),
        ("batch code on the bare loop", res["no_faust_events_per_s"], res["no_faust_events_per_s"] / base,
         cpu["bare_batch"]),
        ("full path (fbp worker)", res["events_per_s"], r["full_over_bare"], cpu["full"]),
    ):
        typer.echo(f"{label:38s} {eps:10.0f} {ratio:6.2f} {c:9.0f}")
    eo = res.get("exactly_once")
    if eo:
        typer.echo(f"{'full path, exactly once':38s} {eo['events_per_s']:10.0f} "
                   f"{eo['events_per_s'] / base:6.2f} {eo['events_per_cpu_s']:9.0f}"
                   f"   ({eo['over_at_least_once']:.2f} x at least once)")
    typer.echo(f"ratios: full/bare {r['full_over_bare']:.2f}   faust no-op/bare {r['faust_noop_over_bare']:.2f}   "
               f"full/batch-code-on-bare-loop {r['faust_batch_over_bare_batch']:.2f}")
    typer.echo(f"latency at {res['latency_rate_events_per_s']:.0f} ev/s : "
               f"p50 {res['latency_ms']['p50']:.1f} ms   p99 {res['latency_ms']['p99']:.1f} ms   "
               f"(sent -> appended to the predictions log; sender {res['latency_sender_cpu_us_per_event']:.1f} us CPU/event)")
    typer.echo("sweep:")
    for s in res["sweep"]:
        eff = s.get("scaling_efficiency")
        typer.echo(f"  batch {s['batch_size']:6d}  linger {s['linger_s']:5.3f}s  workers {s['workers']}  "
                   f"{s['events_per_s']:9.0f} ev/s  ratio {s['ratio']:.2f}  "
                   f"{s['events_per_s_per_worker']:7.0f} ev/s per worker"
                   + (f"  scaling efficiency {eff:.2f}" if eff is not None and s["workers"] > 1 else ""))
    if res["stage_share"]:
        typer.echo("where the time goes (share of measured stage time, first config; with worker.pipeline a "
                   "batch's waits (produce, redis_store) overlap the next batch's compute, and what the "
                   "stages leave of the busy span is faust_overhead):")
        us = res.get("stage_us_per_event", {})
        for k, v in sorted(res["stage_share"].items(), key=lambda kv: -kv[1]):
            typer.echo(f"  {k:14s} {100 * v:5.1f}%  {us.get(k, 0.0):7.2f} us/event")
    _write_json(json_path, res)
    if json_path:
        from bench import plots

        bs = sorted({s["batch_size"] for s in res["sweep"]})
        lg0 = res["sweep"][0]["linger_s"]
        series = {f"{w} worker(s)": [next((s["events_per_s"] for s in res["sweep"] if s["batch_size"] == b
                                           and s["workers"] == w and s["linger_s"] == lg0), None) for b in bs]
                  for w in sorted({s["workers"] for s in res["sweep"]})}
        typer.echo(f"wrote {plots.plot_throughput_vs_batch(bs, series, json_path.with_suffix('.png'))}")
        lt = res["latency_over_time"]
        typer.echo(f"wrote {plots.plot_latency_over_time(lt['t'], lt['p50'], lt['p99'], json_path.with_name(json_path.stem + '-latency.png'))}")


@app.command()
def model(
    models: str = typer.Option("lstm,cnn,mf,baseline", help="comma-separated models"),
    batch_sizes: str = typer.Option("1,16,256,4096,65536", help="comma-separated batch sizes"),
    devices: str = typer.Option(None, help="cpu and/or cuda (default: cpu, plus cuda when present)"),
    threads: int = typer.Option(1, help="torch CPU threads (CPU figures are CPU time)"),
    json_path: Path = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """Batched incremental step throughput, and its cost vs recomputing from history."""
    from bench.model_bench import bench_model

    res = bench_model([m for m in models.split(",") if m], _ints(batch_sizes),
                      devices.split(",") if devices else None, threads)
    typer.echo("user-steps/s of the batched incremental step:")
    typer.echo(f"  {'model':9s} {'device':6s} {'amp':4s} " + " ".join(f"{b:>10d}" for b in _ints(batch_sizes)))
    rows: dict[tuple, list[float]] = {}
    for r in res["throughput"]:
        rows.setdefault((r["model"], r["device"], r["amp"]), []).append(r["user_steps_per_s"])
    for (m, d, a), v in rows.items():
        typer.echo(f"  {m:9s} {d:6s} {'bf16' if a else '-':4s} " + " ".join(f"{x:10.0f}" for x in v))
    typer.echo("per-event cost, incremental step vs recompute from the full history:")
    for r in res["history"]:
        typer.echo(f"  {r['model']:9s} {r['device']:5s} L={r['history']:5d}  step {r['incremental_s_per_event'] * 1e6:8.2f} us"
                   f"  recompute {r['recompute_s_per_event'] * 1e6:9.2f} us  speed-up {r['speedup']:8.1f}x")
    typer.echo(f"{res['model']} on {res['device']}: history cost ratio (L=1000 / L=10) "
               f"{res['history_cost_ratio']:.2f}; speed-up over recompute "
               + ", ".join(f"L={k}: {v:.0f}x" for k, v in res["recompute_speedup"].items()))
    for m, d in res["amp_max_abs_prediction_diff"].items():
        typer.echo(f"  bf16 autocast max |prediction diff| {m}: {d:.4f}")
    _write_json(json_path, res)
    if json_path:
        from bench import plots

        bs = _ints(batch_sizes)
        series = {f"{m} {d} {'bf16' if a else 'fp32'}": v for (m, d, a), v in rows.items()}
        typer.echo(f"wrote {plots.plot_throughput_vs_batch(bs, series, json_path.with_suffix('.png'), logy=True)}")


@app.command()
def swap(
    source: str = typer.Option("ml-100k", help="dataset whose events are streamed"),
    rate: float = typer.Option(200.0, help="steady send rate, events/s"),
    duration: float = typer.Option(90.0, help="seconds of sending"),
    swap_at: float = typer.Option(None, help="seconds into the run to promote (default: half-way)"),
    window: float = typer.Option(30.0, help="seconds of events around the swap measured separately"),
    warmup: float = typer.Option(10.0, help="seconds at the start left out of steady state"),
    batch_size: int = typer.Option(256, help="worker batch size"),
    port: int = typer.Option(0, help="worker web port (0: any free one)"),
    logdir: Path = typer.Option(Path("runs/bench/logs"), help="worker logs"),
    json_path: Path = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """p99 event-to-prediction latency around a promoted model's hot swap vs steady state."""
    from bench.swap_bench import bench_swap

    res = bench_swap(source=source, rate=rate, duration_s=duration, swap_at_s=swap_at, window_s=window,
                     warmup_s=warmup, batch_size=batch_size, port=port, logdir=logdir,
                     progress=lambda m: typer.echo(f"  {m}"))
    typer.echo(f"p99 event-to-prediction, steady state   : {res['p99_ms_steady']} ms "
               f"(p50 {res['p50_ms_steady']} ms, {res['events_steady']} events)")
    typer.echo(f"p99 event-to-prediction, {res['window_s']:.0f} s around swap: {res['p99_ms_swap']} ms "
               f"(p50 {res['p50_ms_swap']} ms, max {res['max_ms_swap']} ms, {res['events_swap_window']} events)")
    typer.echo(f"client-side p99 (send -> read)         : steady {res['client_p99_ms_steady']} ms, "
               f"swap {res['client_p99_ms_swap']} ms")
    typer.echo(f"events lost: {res['events_lost']} of {res['events_sent']} (duplicates {res['duplicates']}); "
               f"promoted v{res['promoted_version']} at {res['promoted_at_s']} s, first prediction by it at "
               f"{res['first_new_prediction_s']} s; states re-derived {res['states_rederived']:.0f}")
    _write_json(json_path, res)


@app.command()
def report(
    results: Path = typer.Option(Path("bench/results"), help="folder of benchmark JSON files"),
    out: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown file to write"),
) -> None:
    """Write BENCHMARKS.md (with plots under docs/bench/) from the benchmark JSON files."""
    from bench.report import write_report

    typer.echo(f"wrote {write_report(results, out)}")


@app.command()
def soak(
    minutes: float = typer.Option(10.0, help="how long to run at the fixed rate"),
    fraction: float = typer.Option(0.5, help="rate as a fraction of the measured maximum"),
    rate: float = typer.Option(None, help="fixed events/s instead of calibrating (skips step 1)"),
    sample_s: float = typer.Option(10.0, help="seconds between samples"),
    calibrate_events: int = typer.Option(20_000, help="backlog size of the max-rate calibration"),
    batch_size: int = typer.Option(512, help="worker batch size"),
    port: int = typer.Option(6179, help="web port of the soak worker"),
    max_rss_growth_mb: float = typer.Option(50.0, help="flat: RSS growth below this (MB)"),
    max_lag_growth: float = typer.Option(1000.0, help="flat: lag growth below this (messages)"),
    json_path: Path = typer.Option(None, "--json", help="write time series and growth here"),
) -> None:
    """Full path at a fixed fraction of max rate; RSS, lag and latency over time, and Faust's
    livelock warnings (exit 1 unless flat, without livelock warnings and a clean worker exit)."""
    from bench.soak import run_soak

    res = run_soak(minutes, fraction=fraction, rate=rate, sample_s=sample_s,
                   calibrate_events=calibrate_events, batch_size=batch_size, port=port,
                   max_rss_growth_mb=max_rss_growth_mb, max_lag_growth=max_lag_growth,
                   echo=typer.echo)
    g = res["growth_first_to_last_minute"]
    typer.echo(f"soak {minutes} min at {res['rate_events_per_s']:.0f} events/s: {res['events_sent']} sent; "
               f"growth first->last minute: RSS {g['rss_mb']} MB, lag {g['lag']} messages, "
               f"latency mean {g['latency_mean_ms']} ms, p99 {g['latency_p99_ms']} ms -> "
               f"{'FLAT' if res['flat'] else 'NOT FLAT'}; {res['livelock_warnings']} livelock warning(s); "
               f"worker exit {res['worker_exit_code']}")
    for line in res["livelock_examples"]:
        typer.echo(f"  livelock: {line}")
    _write_json(json_path, res)
    if not res["ok"]:
        raise typer.Exit(1)


@app.command()
def state(
    users: int = typer.Option(1000, min=10, help="users per family measured"),
    events_per_user: int = typer.Option(10, min=1, help="events streamed per user"),
    families: str = typer.Option("", help="comma-separated model families (default: every registered one)"),
    shards: str = typer.Option("3,10", help="comma-separated cluster sizes (masters) to project for"),
    movies: int = typer.Option(100_000, min=1, help="movies in the projection's catalogue"),
    json_path: Path = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """Bytes per user (per model family) and per movie in Redis, and a projection for 1M/10M/100M users."""
    from bench.state_bench import bench_state
    from core.settings import get_settings

    res = bench_state(get_settings(), users=users, events_per_user=events_per_user,
                      families=[f for f in families.split(",") if f.strip()] or None,
                      shards=_ints(shards), movies=movies)
    typer.echo(f"Redis: {res['redis']}, idle TTL {res['idle_ttl_s']} s, top_k {res['top_k']}")
    typer.echo(f"{'family':22s} {'B/user':>8s} {'MEMORY USAGE':>13s} {'state blob':>11s} {'B/movie':>8s}")
    for r in res["runs"]:
        name = r["family"] + ("+exactly_once" if r["exactly_once"] else "")
        typer.echo(f"{name:22s} {r['used_memory_per_user']:8.0f} {r['memory_usage_per_user']:13.0f} "
                   f"{r['state_blob_bytes']:11.0f} {r['used_memory_per_movie']:8.0f}")
    ks = res["shards"]
    typer.echo(f"\nprojection ({res['movies_projected']:,} movies), GiB: one Redis"
               + "".join(f" | per master of {k}" for k in ks))
    for name, rows in res["projection"].items():
        cells = "; ".join(f"{row['users'] // 1_000_000}M: {row['single_redis_bytes'] / 2**30:.2f}"
                          + "".join(f" / {row[f'per_master_{k}_shards_bytes'] / 2**30:.2f}" for k in ks)
                          for row in rows)
        typer.echo(f"{name:22s} {cells}")
    _write_json(json_path, res)
