"""Print records as they arrive -- by default predictions, one compact line each.

A debugging and demo aid: ``fbp tail --limit 5`` shows the pipeline is alive.
"""

from __future__ import annotations

import sys

import typer

from core.settings import get_settings
from core.events import decode_prediction


def format_prediction_line(raw: bytes) -> str:
    """One line for a prediction; falls back to the raw text for other records."""
    try:
        p = decode_prediction(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")
    top = ",".join(str(int(m)) for m, _ in p.top_k[:5])
    lat = p.timings.get("event_to_prediction_ms")
    lat_s = f" e2e={lat:.1f}ms" if lat is not None else ""
    return (
        f"{p.event_id} user={p.user_id} movie={p.movie_id} predicted={p.predicted:.2f} "
        f"actual={p.actual:g} v{p.model_version}{lat_s} top=[{top}]"
    )


def cli(
    limit: int | None = typer.Option(None, help="Stop after this many records."),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Start at the oldest record."),
    topic: str | None = typer.Option(None, help="Topic to read (default: the predictions topic)."),
    raw: bool = typer.Option(False, "--raw", help="Print the JSON as received."),
    idle_timeout: float | None = typer.Option(None, help="Exit after this many seconds without records."),
) -> None:
    """Print records from a topic (default predictions) as they arrive."""
    from core.kafka_io import make_consumer

    settings = get_settings()
    consumer = make_consumer(
        settings,
        topic or settings.kafka.predictions_topic,
        auto_offset_reset="earliest" if from_beginning else "latest",
        consumer_timeout_ms=int(idle_timeout * 1000) if idle_timeout else float("inf"),
    )
    n = 0
    try:
        for msg in consumer:
            line = msg.value.decode("utf-8", "replace") if raw else format_prediction_line(msg.value)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            n += 1
            if limit is not None and n >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
