"""The movie catalog's record: what a movie is called, for people.

Prediction never needs a title (the model knows movies by id): titles are
read only where people look -- the live page, the query API, ``fbp tail``
-- and an id the catalog does not know is shown as the id.  The model reads
genres and year, for movies it has none for (:mod:`core.side_features`).

One JSON shape serves the optional ``movies`` topic (compacted, keyed by the
movie id as decimal text; a null value -- a tombstone -- removes the movie)
and the catalog's values in Redis (:mod:`core.repos.catalog`)::

    {"movie_id": 50, "title": "Star Wars", "year": 1977, "genres": ["Action", "Sci-Fi"]}

``year`` and ``genres`` are optional (``core/schemas/movie.schema.json`` says
the same for other languages).  :func:`decode_movie` trusts nothing:
any bytes give a :class:`Movie` or a :class:`core.events.Rejection` with one
of the stable reject codes, so a bad catalog record is dead-lettered like a
bad rating and the reader goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import orjson

from core.events import MAX_MOVIE_ID, Rejection, exact_int, parse_json

MAX_TITLE_CHARS = 300
MAX_GENRES = 32
MAX_GENRE_CHARS = 64
MAX_RECORD_BYTES = 16 * 1024
_FIELDS = frozenset(("movie_id", "title", "year", "genres"))


@dataclass(frozen=True, slots=True)
class Movie:
    movie_id: int
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"movie_id": self.movie_id, "title": self.title, "year": self.year, "genres": list(self.genres)}


def encode_movie(movie: Movie) -> bytes:
    return orjson.dumps(movie.to_dict())


def movie_key(movie_id: int) -> bytes:
    """The Kafka key of a movie on the ``movies`` topic (compaction keeps the last per key)."""
    return str(int(movie_id)).encode("ascii")


def parse_movie_key(key: bytes | None) -> int | None:
    """The movie id a ``movies`` key names, None when it names none."""
    if key is None or not 0 < len(key) <= 7 or not key.isdigit():
        return None
    v = int(key)
    return v if v < MAX_MOVIE_ID else None


def _reject(reason: str, detail: str, raw: bytes | None) -> Rejection:
    return Rejection(reason, detail, raw)


def decode_movie(raw: bytes, key: bytes | None = None) -> Movie | Rejection:
    """Parse and check one catalog record; never raises for bad input.  With a
    ``key`` (a ``movies`` topic record), it must name the record's movie id."""
    if len(raw) > MAX_RECORD_BYTES:
        return _reject("oversized_payload", f"{len(raw)} bytes > {MAX_RECORD_BYTES}", raw)
    if not raw:
        return _reject("empty_value", "empty catalog record", raw)
    obj = parse_json(raw)
    if isinstance(obj, Rejection):
        return obj
    if not isinstance(obj, dict):
        return _reject("not_an_object", f"a JSON {type(obj).__name__}, expected an object", raw)
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        return _reject("unknown_field", f"unknown field(s) {unknown[:5]}", raw)
    for name in ("movie_id", "title"):
        if name not in obj:
            return _reject("missing_field", f"{name} is required", raw)
    mid, title = exact_int(obj["movie_id"]), obj["title"]
    if mid is None:
        return _reject("wrong_type", "movie_id must be an integer", raw)
    if not 0 <= mid < MAX_MOVIE_ID:
        return _reject("id_out_of_range", f"movie_id {mid} outside [0, {MAX_MOVIE_ID})", raw)
    if not isinstance(title, str) or not title.strip() or len(title) > MAX_TITLE_CHARS:
        return _reject("wrong_type", f"title must be a non-empty string of at most {MAX_TITLE_CHARS} chars", raw)
    year = obj.get("year")
    if year is not None:
        year = exact_int(year)
        if year is None or not 0 < year < 10_000:
            return _reject("wrong_type", "year must be an integer year or null", raw)
    genres = obj.get("genres")
    genres = [] if genres is None else genres
    if (not isinstance(genres, list) or len(genres) > MAX_GENRES
            or not all(isinstance(g, str) and 0 < len(g) <= MAX_GENRE_CHARS for g in genres)):
        return _reject("wrong_type", f"genres must be a list of at most {MAX_GENRES} short strings", raw)
    if key is not None and parse_movie_key(key) != mid:
        return _reject("bad_key", f"key {key[:32]!r} is not the movie id {mid} as decimal text", raw)
    return Movie(mid, title.strip(), year, tuple(genres))


def movies_from_frame(movies: Any) -> Iterator[Movie]:
    """Movies of a data set's ``movies`` frame (``core.datasets``: movie_id,
    title, year float or NaN, genres list)."""
    for mid, title, year, genres in zip(movies["movie_id"].tolist(), movies["title"].tolist(),
                                        movies["year"].tolist(), movies["genres"].tolist()):
        title = str(title).strip()
        if not title:
            continue
        y = None if year is None or not math.isfinite(float(year)) else int(year)
        yield Movie(int(mid), title, y, tuple(str(g) for g in (genres or ())))
