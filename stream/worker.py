"""``fbp worker``: start one Faust stream processor.

Equivalent to ``faust -A stream.app worker``; settings (ports, batch size,
device, checkpoint) come from ``core.settings``.  Several workers with the same
app id share the ``ratings`` partitions; give each its own web port
(``FBP_WORKER__WEB_PORT``).
"""

from __future__ import annotations

import os
import sys

import typer

from core.settings import ConfigError, Settings, load_settings


def cli(
    web_port: int = typer.Option(None, help="HTTP port for the API and /metrics (default from settings)"),
    batch_size: int = typer.Option(None, help="events per micro-batch"),
    device: str = typer.Option(None, help="auto, cpu or cuda"),
    loglevel: str = typer.Option("info", help="Faust log level"),
) -> None:
    """Consume ratings, update per-user state in Redis, publish predictions."""
    for name, value in (("WEB_PORT", web_port), ("BATCH_SIZE", batch_size), ("DEVICE", device)):
        if value is not None:
            os.environ[f"FBP_WORKER__{name}"] = str(value)
    try:
        settings = load_settings()  # fail fast, with a readable message
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    refuse_evicting_redis(settings)
    warn_if_kafka_outlives_expiry(settings)
    from stream.app import app

    sys.argv = [
        "fbp-worker", "worker", "-l", loglevel,
        "--web-port", str(settings.worker.web_port),
        "--web-host", settings.worker.web_host,
        "--with-web",
    ]
    app.main()


def refuse_evicting_redis(settings: Settings) -> None:
    """Exit 2 when Redis may evict states (warn instead with state.allow_eviction);
    see :func:`stream.faults.evicting_redis`."""
    from stream.faults import evicting_redis

    problem = evicting_redis(settings)
    if problem is None:
        return
    if settings.state.allow_eviction:
        typer.echo(f"WARNING: {problem} (FBP_STATE__ALLOW_EVICTION is set: starting anyway)", err=True)
        return
    typer.echo(f"refusing to start: {problem}", err=True)
    raise typer.Exit(2)


def warn_if_kafka_outlives_expiry(settings: Settings) -> None:
    """Warn when the ratings topics keep events longer than users' states live
    (:func:`core.topics.expiry_outlives_kafka`); a broker that cannot be asked
    is not a reason to refuse (the worker itself will wait for it)."""
    from core.topics import expiry_outlives_kafka, retention_windows

    try:
        problem = expiry_outlives_kafka(settings.state.idle_ttl_s, retention_windows(settings))
    except Exception as exc:  # noqa: BLE001 - a check, not a dependency
        typer.echo(f"note: topic retention not checked against state.idle_ttl_s ({exc})", err=True)
        return
    if problem is not None:
        typer.echo(f"WARNING: {problem}", err=True)
