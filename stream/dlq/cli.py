"""The ``fbp dlq`` command group: prints the figures and writes them with ``--json``."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import orjson
import typer

from core.settings import get_settings
from fbp_errors import ConfigError, InfrastructureError
from stream.dlq.replay import parse_since, replay
from stream.dlq.stats import dlq_stats


app = typer.Typer(no_args_is_help=True, help="Dead letters: count them, replay them after a fix")


def _iso(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"fbp dlq: {exc}", err=True)
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


@app.command()
def stats(
    topic: Optional[str] = typer.Option(None, help="DLQ topic (default: FBP_KAFKA__DLQ_TOPIC)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the counts here as JSON."),
) -> None:
    """Count dead letters by reason and by source topic (the whole DLQ, up to its end now)."""
    try:
        s = dlq_stats(get_settings(), topic)
    except (InfrastructureError, ConfigError) as exc:
        raise _fail(exc) from None
    typer.echo(f"{s.topic}: {s.total} dead letters, oldest {_iso(s.oldest)}, newest {_iso(s.newest)}")
    for reason, n in s.by_reason.items():
        typer.echo(f"  {reason:<22} {n:>9}")
    if s.by_source_topic:
        typer.echo("by source topic:")
        for t, n in s.by_source_topic.items():
            typer.echo(f"  {t:<22} {n:>9}")
    if s.unreadable:
        typer.echo(f"  (plus {s.unreadable} records that are not dead letters)")
    _write_json(json_path, s.to_dict())


@app.command("replay")
def replay_cmd(
    reason: Optional[list[str]] = typer.Option(None, "--reason", help="Only this reason (repeatable)."),
    since: Optional[str] = typer.Option(None, help="Only letters rejected at or after this time "
                                                    "(ISO-8601, UTC unless a zone is given, or unix seconds)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be replayed; publish nothing."),
    again: bool = typer.Option(False, "--again", help="Also replay letters an earlier run already replayed."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the counts here as JSON."),
) -> None:
    """Publish the original records of matching dead letters to the ratings topic again.

    For use AFTER fixing what rejected them (a limit raised, a producer fixed):
    records are keyed by the user id in the payload (else their original key).
    Where the DLQ kept only a prefix, the original is fetched from its source
    topic while Kafka's retention lasts and checked against its sha256.
    Letters of null values cannot be replayed (counted as skipped).

    The worker de-duplicates by Kafka position, not event id: each replayed
    record is a new event and is applied to the user's state.  A dead letter
    was never applied, so one replay applies it once; each replayed letter is
    remembered in Redis and skipped by later runs (already_replayed) unless
    --again is given.
    """
    try:
        report = replay(get_settings(), reasons=reason or (), since=parse_since(since), dry_run=dry_run,
                        again=again)
    except (InfrastructureError, ConfigError) as exc:
        raise _fail(exc) from None
    verb = "would replay" if dry_run else "replayed"
    n = report.replayable if dry_run else report.replayed
    typer.echo(f"matched {report.matched} dead letters in {report.dlq_topic}; {verb} {n} to {report.topic}"
               f" ({report.recovered_from_source} fetched back from their source topic)")
    for why, count in report.skipped.items():
        typer.echo(f"  skipped {why:<32} {count:>7}")
    _write_json(json_path, report.to_dict())
    if any(why.startswith("produce_failed") for why in report.skipped):
        raise typer.Exit(1)
