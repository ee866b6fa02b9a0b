"""``fbp model ...``: publish, list and roll back serving models.

Workers poll the current version in Redis every second and swap between
batches, so each of these takes effect on every worker without a restart.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import typer

from core.settings import get_settings
from models.checkpoint import CheckpointError, load_checkpoint
from core.repos.models import ModelStore
from core.redis_conn import sync_redis

app = typer.Typer(no_args_is_help=True, help="Publish, list and roll back serving models")


def _store() -> ModelStore:
    s = get_settings()
    return ModelStore(sync_redis(s.redis), s.redis.key_prefix)


@app.command()
def publish(path: Path = typer.Argument(..., help="checkpoint written by `fbp train`")) -> None:
    """Verify a checkpoint file and make it the serving model (next version number)."""
    try:
        model, meta = load_checkpoint(path)
    except CheckpointError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from None
    pub = _store().publish(model, meta, reason=f"publish {path}")
    typer.echo(f"published {model.name} as version {pub.version} (sha256 {pub.sha256[:12]})")


@app.command("list")
def list_versions(limit: int = 20) -> None:
    """Publication history, newest first."""
    store = _store()
    cur = store.current()
    typer.echo(f"current: {cur.version if cur else None}")
    for h in store.history(limit):
        typer.echo(orjson.dumps(h).decode())


@app.command()
def rollback(to: int = typer.Option(None, help="version to serve (default: the one before current)")) -> None:
    """Serve an earlier version again (states re-derive lazily in the workers)."""
    try:
        pub = _store().rollback(to)
    except CheckpointError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"serving version {pub.version}")
