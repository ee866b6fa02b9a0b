"""Print records as they arrive -- by default predictions, one compact line each.

A debugging and demo aid: ``fbp tail --limit 5`` shows the pipeline is alive.
Movies are shown by title where the movie catalog knows them (``fbp catalog``;
the id where it does not), read through a small cache so a busy topic costs
about one Redis read per new batch of movies; ``--ids`` prints the raw ids.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

import typer

from core.settings import get_settings
from core.events import decode_prediction


Titles = Callable[[Iterable[int]], dict[int, str]]


def format_prediction_line(raw: bytes, titles: Titles | None = None) -> str:
    """One line for a prediction; falls back to the raw text for other records.
    With ``titles`` (ids -> known titles), movies show as ``Title (id)``."""
    try:
        p = decode_prediction(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")
    picks = [int(m) for m, _ in p.top_k[:5]]
    names = titles([p.movie_id, *picks]) if titles is not None else {}

    def movie(i: int) -> str:
        return f'"{names[i]}" ({i})' if i in names else str(i)

    top = ",".join(movie(m) for m in picks)
    lat = p.timings.get("event_to_prediction_ms")
    lat_s = f" e2e={lat:.1f}ms" if lat is not None else ""
    return (
        f"{p.event_id} user={p.user_id} movie={movie(p.movie_id)} predicted={p.predicted:.2f} "
        f"actual={p.actual:g} v{p.model_version}{lat_s} top=[{top}]"
    )


def catalog_titles(settings) -> Titles:
    """Titles from the deployment's movie catalog, cached (the id where
    unknown); while Redis cannot be read, ids only (said once on stderr)."""
    from redis.exceptions import RedisError

    from core.redis_conn import sync_redis
    from core.repos.catalog import MovieCatalog, TitleCache

    cache = TitleCache(MovieCatalog(sync_redis(settings.redis), settings.redis.key_prefix).get_many)
    warned = []

    def titles(ids: Iterable[int]) -> dict[int, str]:
        try:
            return cache.titles(ids)
        except RedisError as exc:
            if not warned:
                warned.append(exc)
                typer.secho(f"tail: movie titles unavailable ({exc}); showing ids", err=True,
                            fg=typer.colors.YELLOW)
            return {}

    return titles


def cli(
    limit: int | None = typer.Option(None, help="Stop after this many records."),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="Start at the oldest record."),
    topic: str | None = typer.Option(None, help="Topic to read (default: the predictions topic)."),
    raw: bool = typer.Option(False, "--raw", help="Print the JSON as received."),
    idle_timeout: float | None = typer.Option(None, help="Exit after this many seconds without records."),
    ids: bool = typer.Option(False, "--ids", help="Movie ids only (no titles from the movie catalog)."),
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
    titles = None if raw or ids else catalog_titles(settings)
    n = 0
    try:
        for msg in consumer:
            line = msg.value.decode("utf-8", "replace") if raw else format_prediction_line(msg.value, titles)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            n += 1
            if limit is not None and n >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
