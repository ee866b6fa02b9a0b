"""``fbp stack``: the local, Docker-free stack (Kafka KRaft, Redis, Prometheus
as plain processes under ``settings.stack.data_dir``), and its local clusters.

Why not Docker: development and CI machines here have no container engine,
and tests need the *real* broker/store/scraper (no mocks).  The services
themselves live in the :mod:`stack` package; this module is only the CLI.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer

from core.settings import get_settings
from fbp_errors import StackError
from stack import (
    SERVICES,
    ServiceStatus,
    clusters_running,
    stack_down,
    stack_status,
    stack_up,
)
from stack.registry import with_options

app = typer.Typer(no_args_is_help=True, help="Run the local Kafka + Redis + Prometheus stack.")

_ServiceOpt = typer.Option(
    None, "--service", "-s",
    help="Only these services (repeatable): kafka, redis, prometheus, or a node (kafka-2, redis-node-4) for down.",
)  # fmt: skip
_BrokersOpt = typer.Option(
    None, "--kafka-brokers", min=1, max=9,
    help="Kafka brokers: 1 = single broker; 3 = a KRaft cluster (topics with RF 3, min.insync.replicas 2). "
    "Default: FBP_STACK__KAFKA_BROKERS (1).",
)  # fmt: skip
_ClusterOpt = typer.Option(
    None, "--redis-cluster/--no-redis-cluster",
    help="Redis as a 3-master + 3-replica Redis Cluster. Default: FBP_STACK__REDIS_CLUSTER (off).",
)  # fmt: skip
_JsonOpt = typer.Option(None, "--json", help="Also write the rows (and clusters) as JSON to this file.")


def _table(rows: list[ServiceStatus]) -> str:
    head = ("service", "pid", "port", "healthy", "detail")
    body = [
        (
            r.name,
            "external" if r.external else (str(r.pid) if r.pid else "-"),
            str(r.port),
            "yes" if r.healthy else "NO",
            r.detail + (f" (started in {r.started_in_s:.1f}s)" if r.started_in_s else ""),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body])


def _clusters_text(clusters: dict[str, dict[str, str]]) -> str:
    """How clients reach each running cluster: lines to paste into a shell."""
    lines = []
    for name, info in clusters.items():
        what = {k: v for k, v in info.items() if not k.startswith("FBP_")}
        lines.append(f"{name} cluster: " + ", ".join(f"{k} {v}" for k, v in what.items()))
        lines += [f"  export {k}={v}" for k, v in info.items() if k.startswith("FBP_")]
    return "\n".join(lines)


def _report(rows: list[ServiceStatus], json_path: Path | None) -> None:
    typer.echo(_table(rows))
    clusters = clusters_running()
    if clusters:
        typer.echo(_clusters_text(clusters))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"services": [vars(r) for r in rows], "clusters": clusters}, indent=2))


@app.command()
def up(
    service: list[str] | None = _ServiceOpt,
    timeout: float = typer.Option(90.0, help="Seconds to wait for each service to be healthy."),
    kafka_brokers: int | None = _BrokersOpt,
    redis_cluster: bool | None = _ClusterOpt,
    json_path: Path | None = _JsonOpt,
) -> None:
    """Start Kafka, Redis and Prometheus (idempotent) and create the topics."""
    try:
        rows = stack_up(services=service or SERVICES, timeout_s=timeout,
                        kafka_brokers=kafka_brokers, redis_cluster=redis_cluster)  # fmt: skip
    except StackError as exc:
        typer.echo(f"stack up failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _report(rows, json_path)


@app.command()
def down(
    service: list[str] | None = _ServiceOpt,
    kill: bool = typer.Option(False, "--kill", help="SIGKILL instead of a clean SIGTERM."),
) -> None:
    """Stop the services started by `fbp stack up` (single and cluster nodes alike)."""
    sig = signal.SIGKILL if kill else signal.SIGTERM
    try:
        stopped = stack_down(services=service or SERVICES, sig=sig)
    except StackError as exc:
        typer.echo(f"stack down failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status(
    service: list[str] | None = _ServiceOpt,
    kafka_brokers: int | None = _BrokersOpt,
    redis_cluster: bool | None = _ClusterOpt,
    json_path: Path | None = _JsonOpt,
) -> None:
    """Show service, pid, port and health, and how clients reach running clusters;
    exit code 1 if any is unhealthy."""
    settings = with_options(get_settings(), kafka_brokers=kafka_brokers, redis_cluster=redis_cluster)
    try:
        rows = stack_status(settings, services=service or SERVICES, include_started=True)
    except StackError as exc:
        typer.echo(f"stack status failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _report(rows, json_path)
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@app.command()
def topics() -> None:
    """Create missing topics on the configured Kafka (settings.kafka) and show record counts.

    Works against any Kafka (also docker-compose's), not only the local stack.
    """
    from core.topics import ensure_topics, topic_counts

    settings = get_settings()
    created = ensure_topics(settings)
    if created:
        typer.echo("created: " + ", ".join(created))
    for name, n in topic_counts(settings).items():
        typer.echo(f"{name:<20} {n:>10,} records")
