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
    batch_sizes: str = typer.Option("512", help="comma-separated worker batch sizes to sweep"),
    workers: str = typer.Option("1", help="comma-separated worker counts to compare, e.g. 1,2"),
    partitions: int = typer.Option(4, help="partitions of the bench topics"),
    latency_fraction: float = typer.Option(0.5, help="latency run's rate as a fraction of measured throughput"),
    logdir: Path = typer.Option(Path("runs/bench/logs"), help="worker logs"),
    json_path: Path = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """Full path vs a bare aiokafka consume-and-produce loop over the same events."""
    from bench.stream_bench import bench_stream

    res = bench_stream(source=source, events=events, batch_sizes=_ints(batch_sizes),
                       workers=_ints(workers), partitions=partitions,
                       latency_fraction=latency_fraction, logdir=logdir)
    typer.echo(f"baseline aiokafka loop : {res['baseline_events_per_s']:10.0f} events/s")
    typer.echo(f"full path              : {res['events_per_s']:10.0f} events/s   ratio {res['ratio']:.2f}")
    typer.echo(f"latency at {res['latency_rate_events_per_s']:.0f} ev/s : "
               f"p50 {res['latency_ms']['p50']:.1f} ms   p99 {res['latency_ms']['p99']:.1f} ms")
    typer.echo("sweep:")
    for s in res["sweep"]:
        typer.echo(f"  batch {s['batch_size']:6d}  workers {s['workers']}  "
                   f"{s['events_per_s']:9.0f} ev/s  ratio {s['ratio']:.2f}")
    if res["stage_share"]:
        typer.echo("where the time goes (share of measured stage time, first config):")
        for k, v in sorted(res["stage_share"].items(), key=lambda kv: -kv[1]):
            typer.echo(f"  {k:12s} {100 * v:5.1f}%")
    _write_json(json_path, res)
