"""Replay a rating data set into Kafka as if it were happening live.

Events go out in timestamp order (the data set's stream order), keyed by
user id, so each user's history arrives in order on one partition.  Event ids
are ``<dataset name>-<row index>``, so tests can check exactly which events
arrived.  Replaying the same rows twice publishes them twice: the workers
de-duplicate by Kafka position, not by event id, so a second replay is applied
again (subscribers can still de-duplicate prediction records by event id).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import typer
from tqdm import tqdm

from core.settings import Settings, get_settings
from core.events import RatingEvent, encode_rating, rating_key
from core.datasets import Dataset, load_dataset


@dataclass
class ReplaySummary:
    """What a replay did; ``events_per_s`` counts until the final flush."""

    source: str
    topic: str
    events: int
    first_index: int | None
    last_index: int | None
    seconds: float
    events_per_s: float
    rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay(
    settings: Settings,
    data: Dataset | pd.DataFrame,
    *,
    rate: float = 0.0,
    start: int = 0,
    limit: int | None = None,
    progress: bool = True,
    name: str | None = None,
    topic: str | None = None,
    producer: Any = None,
) -> ReplaySummary:
    """Publish rows ``start .. start+limit`` of ``data`` (time-ordered) to the ratings topic.

    ``rate`` is events per second (0 = as fast as possible).  A data frame's
    index is used as the row index in event ids, so a slice keeps its ids.
    Raises RuntimeError if any send failed after the producer's retries.
    """
    from core.kafka_io import make_producer

    if isinstance(data, Dataset):
        name = name or data.name
        df = data.ratings
    else:
        name = name or "df"
        df = data
    if start < 0 or (limit is not None and limit < 0) or rate < 0:
        raise ValueError("start, limit and rate must not be negative")
    df = df.iloc[start : None if limit is None else start + limit]
    topic = topic or settings.kafka.ratings_topic
    n = len(df)

    idx = df.index.to_numpy().tolist()
    users = df["user_id"].to_numpy().tolist()
    movies = df["movie_id"].to_numpy().tolist()
    ratings = df["rating"].to_numpy(dtype="float64").tolist()
    stamps = df["ts"].to_numpy().tolist()

    own = producer is None
    prod = make_producer(settings) if own else producer
    failures: list[BaseException] = []
    on_error = failures.append  # every send checked: a lost event must not pass silently
    bar = tqdm(total=n, disable=not progress, unit="ev", mininterval=0.5, desc=f"replay {name}")
    t0 = time.perf_counter()
    try:
        for i in range(n):
            if rate > 0:
                ahead = t0 + i / rate - time.perf_counter()
                if ahead > 0.001:
                    time.sleep(ahead)
            ev = RatingEvent(f"{name}-{idx[i]}", users[i], movies[i], ratings[i], stamps[i])
            prod.send(topic, value=encode_rating(ev), key=rating_key(ev)).add_errback(on_error)
            if i % 1024 == 1023 or i == n - 1:
                bar.update(i + 1 - bar.n)
        prod.flush()
    finally:
        bar.close()
        if own:
            prod.close()
    secs = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"replay: {len(failures)} send batch(es) failed: {failures[0]!r}")
    return ReplaySummary(
        source=name,
        topic=topic,
        events=n,
        first_index=idx[0] if n else None,
        last_index=idx[-1] if n else None,
        seconds=round(secs, 3),
        events_per_s=round(n / secs, 1) if secs > 0 else 0.0,
        rate=rate,
    )


def cli(
    source: str = typer.Option("ml-100k", help="ml-100k, synthetic:<n>[:<seed>], or a MovieLens path."),
    rate: float = typer.Option(0.0, help="Events per second; 0 = flat out."),
    limit: int | None = typer.Option(None, help="Publish at most this many events."),
    offset: int = typer.Option(0, help="Skip the first N events of the time-ordered data set."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the summary here as JSON."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    catalog: bool = typer.Option(True, help="Also load the data set's titles into the movie catalog."),
) -> None:
    """Publish a rating data set to Kafka in timestamp order, keyed by user id."""
    from core.topics import ensure_topics
    from stream.catalog import load_into_redis

    settings = get_settings()
    ds = load_dataset(source)
    ensure_topics(settings)
    if catalog and not ds.movies.empty:
        typer.echo(f"catalog: {load_into_redis(settings, ds.movies)} movies of {ds.name} stored")
    summary = replay(settings, ds, rate=rate, start=offset, limit=limit, progress=progress)
    typer.echo(
        f"replayed {summary.events} events from {summary.source} to {summary.topic} "
        f"in {summary.seconds:.2f}s ({summary.events_per_s:,.0f} events/s)"
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(orjson.dumps(summary.to_dict(), option=orjson.OPT_INDENT_2))
