"""``fbp catalog``: the movie catalog -- load it, publish it, follow its topic.

* ``fbp catalog load SOURCE`` -- a data set's movie file (ML-100K's
  ``u.item``, ``movies.dat``, ``movies.csv``, or ``ml-100k``) into Redis
  (:class:`core.repos.catalog.MovieCatalog`); ``fbp replay`` does the same
  for the data set it replays.
* ``fbp catalog publish SOURCE`` -- the same movies as records on the
  ``movies`` topic (compacted, keyed by movie id), as a producer of new
  titles would.
* ``fbp catalog follow`` -- the small agent that reads the ``movies`` topic
  into Redis: a record that is not a movie (any bytes) is dead-lettered with
  its reason, like a bad rating, and the agent goes on; a tombstone removes
  the movie; only Kafka or Redis failing stops it.
* ``fbp catalog show ID...`` -- what the catalog says about some ids.

Titles are for people; prediction reads only genres and year, for movies
the serving model has none for (``stream.batch.side_features``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import orjson
import typer

from core.catalog import Movie, decode_movie, encode_movie, movie_key, movies_from_frame, parse_movie_key
from core.events import KafkaRecord, Rejection, dlq_record, internal_error
from core.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, help="The movie catalog: titles for the live page, the API and `fbp tail`.")


@dataclass
class FeedCounts:
    """What applying some ``movies`` records did."""

    records: int = 0
    stored: int = 0
    removed: int = 0
    dead_lettered: int = 0

    def add(self, other: "FeedCounts") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def read_record(rec: KafkaRecord) -> Movie | int | Rejection:
    """One ``movies`` record: a movie to store, a movie id to remove (a
    tombstone), or why it is refused.  Never raises."""
    try:
        if rec.value is None:
            mid = parse_movie_key(rec.key)
            if mid is None:
                return Rejection("bad_key", "a tombstone must be keyed by a movie id as decimal text", None)
            return mid
        return decode_movie(bytes(rec.value), rec.key)
    except Exception as exc:  # noqa: BLE001 - a record must never stop the feed
        return internal_error(exc, rec.value)


def apply_records(records: list[KafkaRecord], catalog: Any,
                  dead_letter: Callable[[Rejection, KafkaRecord], None]) -> FeedCounts:
    """Fold records into ``catalog`` (the last record per movie id wins, as
    compaction would keep it); hand each refused one to ``dead_letter``."""
    last: dict[int, Movie | None] = {}
    counts = FeedCounts(records=len(records))
    for rec in records:
        got = read_record(rec)
        if isinstance(got, Rejection):
            dead_letter(got, rec)
            counts.dead_lettered += 1
        elif isinstance(got, Movie):
            last[got.movie_id] = got
        else:
            last[got] = None
    counts.stored = catalog.put_many(m for m in last.values() if m is not None)
    counts.removed = catalog.remove([i for i, m in last.items() if m is None])
    return counts


def _catalog(settings: Settings):
    from core.redis_conn import sync_redis
    from core.repos.catalog import MovieCatalog

    return MovieCatalog(sync_redis(settings.redis), settings.redis.key_prefix)


def load_into_redis(settings: Settings, movies_frame: Any) -> int:
    """Store a data set's movies frame in the catalog; returns movies stored."""
    return _catalog(settings).put_many(movies_from_frame(movies_frame))


def follow(settings: Settings, *, idle_timeout_s: float | None = None, limit: int | None = None,
           from_beginning: bool = True) -> FeedCounts:
    """Read the ``movies`` topic into the catalog until idle for
    ``idle_timeout_s`` (None: forever) or ``limit`` records; offsets are
    committed after each applied poll, so a restart resumes there."""
    from core.kafka_io import make_consumer, make_producer
    from core.topics import ensure_topics

    ensure_topics(settings)
    k = settings.kafka
    catalog = _catalog(settings)
    consumer = make_consumer(settings, k.movies_topic, group_id=f"{settings.worker.app_id}-catalog",
                             enable_auto_commit=False,
                             auto_offset_reset="earliest" if from_beginning else "latest")
    producer = make_producer(settings)
    prefix = settings.worker.dlq_payload_prefix_bytes
    failures: list[BaseException] = []

    def dead_letter(rej: Rejection, rec: KafkaRecord) -> None:
        fut = producer.send(k.dlq_topic, value=dlq_record(rej, rec, payload_prefix_bytes=prefix))
        fut.add_errback(failures.append)

    total = FeedCounts()
    idle_ms = None if idle_timeout_s is None else idle_timeout_s * 1000
    quiet_ms = 0.0
    try:
        while limit is None or total.records < limit:
            polled = consumer.poll(timeout_ms=500, max_records=1000 if limit is None else limit - total.records)
            recs = [_record(r) for batch in polled.values() for r in batch]
            if not recs:
                quiet_ms += 500
                if idle_ms is not None and quiet_ms >= idle_ms:
                    break
                continue
            quiet_ms = 0.0
            total.add(apply_records(recs, catalog, dead_letter))
            producer.flush()
            if failures:  # a dead letter Kafka refused: stop before committing its record
                raise RuntimeError(f"catalog feed: dead letters not written: {failures[0]!r}")
            consumer.commit()
    finally:
        consumer.close()
        producer.close()
    return total


def _record(r: Any) -> KafkaRecord:
    return KafkaRecord(r.value, r.key, tuple(r.headers or ()), r.topic, r.partition, r.offset, r.timestamp / 1000.0)


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))


def _movies_or_exit(source: str) -> Any:
    """The movies of ``source`` (load and publish read it alike), or exit 2
    with what is wrong: an unreadable source, or one with no movie file."""
    from core.datasets import load_movies

    try:
        movies = load_movies(source)
    except ValueError as exc:
        typer.secho(f"catalog: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if movies.empty:
        typer.secho(f"catalog: {source} has no movie file (u.item, movies.dat or movies.csv)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return movies


@app.command("load")
def load_cmd(
    source: str = typer.Argument(..., help="ml-100k, a MovieLens folder, or u.item / movies.dat / movies.csv."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the figures here as JSON."),
) -> None:
    """Load a data set's titles, years and genres into the catalog (Redis)."""
    settings = get_settings()
    stored = load_into_redis(settings, _movies_or_exit(source))
    total = _catalog(settings).count()
    typer.echo(f"catalog: {stored} movies from {source} stored; {total} in the catalog")
    _write_json(json_path, {"source": source, "stored": stored, "catalog_size": total})


@app.command("publish")
def publish_cmd(
    source: str = typer.Argument(..., help="ml-100k, a MovieLens folder, or u.item / movies.dat / movies.csv."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the figures here as JSON."),
) -> None:
    """Publish a data set's movies to the movies topic (keyed by movie id)."""
    from core.kafka_io import make_producer
    from core.topics import ensure_topics

    movies = _movies_or_exit(source)
    settings = get_settings()
    ensure_topics(settings)
    producer = make_producer(settings)
    failures: list[BaseException] = []
    n = 0
    try:
        for m in movies_from_frame(movies):
            producer.send(settings.kafka.movies_topic, key=movie_key(m.movie_id),
                          value=encode_movie(m)).add_errback(failures.append)
            n += 1
        producer.flush()
    finally:
        producer.close()
    if failures:
        typer.secho(f"catalog: {len(failures)} send batch(es) to {settings.kafka.movies_topic} failed: "
                    f"{failures[0]!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"catalog: {n} movies published to {settings.kafka.movies_topic}")
    _write_json(json_path, {"source": source, "published": n, "topic": settings.kafka.movies_topic})


@app.command("follow")
def follow_cmd(
    idle_timeout: float | None = typer.Option(None, help="Exit after this many seconds without records."),
    limit: int | None = typer.Option(None, help="Stop after this many records."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the figures here as JSON."),
) -> None:
    """Read the movies topic into the catalog; bad records go to the DLQ."""
    settings = get_settings()
    try:
        counts = follow(settings, idle_timeout_s=idle_timeout, limit=limit)
    except KeyboardInterrupt:
        return
    typer.echo(f"catalog: {counts.records} records, {counts.stored} movies stored, {counts.removed} removed, "
               f"{counts.dead_lettered} dead-lettered to {settings.kafka.dlq_topic}")
    _write_json(json_path, asdict(counts))


@app.command("show")
def show_cmd(ids: list[int] = typer.Argument(..., help="Movie ids.")) -> None:
    """Print what the catalog knows about some movie ids (unknown ones as the id)."""
    found = _catalog(get_settings()).get_many(ids)
    for i in ids:
        m = found.get(i)
        sys.stdout.write((orjson.dumps(m.to_dict()).decode() if m else f"{i} (not in the catalog)") + "\n")
