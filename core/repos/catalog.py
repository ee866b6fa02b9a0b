"""The movie catalog of one deployment: title, year and genres by movie id.

Key (built by :func:`core.repos.keys.catalog_key`): one hash
``{<prefix>:catalog}:movies``, field = movie id as decimal text, value = the
movie's JSON (:mod:`core.catalog`).  One key, so one slot on a Redis Cluster;
a whole catalog (ML-25M: 62,000 movies) is a few MB.

Who writes: ``fbp catalog load`` and ``fbp replay`` (a data set's movie file),
``fbp catalog follow`` (the ``movies`` topic).  Who reads: what people look
at -- the live page, the query API's top-K, ``fbp tail`` -- through a
:class:`TitleCache`, so a page refresh costs at most one HMGET of the ids not
seen in the last 30 s; and the model's side information
(:func:`core.side_features.fill`, the worker's ``redis_load`` stage through
:class:`AsyncMovieCatalog`): genres and year of the movies the model has
none for, each asked for at most once a minute.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from core.catalog import Movie, decode_movie, encode_movie
from core.repos.keys import catalog_key, check_prefix

_CHUNK = 1000  # fields per HSET / HMGET


class MovieCatalog:
    """Blocking access to the catalog (``client``: sync Redis or RedisCluster)."""

    def __init__(self, client: Any, prefix: str = "fbp") -> None:
        self._r = client
        self._key = catalog_key(check_prefix(prefix), "movies")

    def put_many(self, movies: Iterable[Movie]) -> int:
        """Store (or replace) movies; returns how many were written."""
        n = 0
        batch: dict[str, bytes] = {}
        for m in movies:
            batch[str(m.movie_id)] = encode_movie(m)
            if len(batch) >= _CHUNK:
                n += self._hset(batch)
        return n + self._hset(batch)

    def _hset(self, batch: dict[str, bytes]) -> int:
        if batch:
            self._r.hset(self._key, mapping=batch)
        n = len(batch)
        batch.clear()
        return n

    def remove(self, movie_ids: Sequence[int]) -> int:
        """Forget movies (a tombstone on the ``movies`` topic); returns how many were known."""
        return int(self._r.hdel(self._key, *map(str, movie_ids))) if movie_ids else 0

    def get_many(self, movie_ids: Sequence[int]) -> dict[int, Movie]:
        """The known movies among ``movie_ids`` (a stored value that does not
        decode is treated as unknown: it shows as the id)."""
        out: dict[int, Movie] = {}
        for chunk in _chunks(movie_ids):
            _decoded(chunk, self._r.hmget(self._key, [str(i) for i in chunk]), out)
        return out

    def count(self) -> int:
        return int(self._r.hlen(self._key))

    def drop(self) -> int:
        """Delete the whole catalog; returns 1 if there was one."""
        return int(self._r.unlink(self._key))


class AsyncMovieCatalog:
    """The worker's read of the catalog (``client``: asyncio Redis or
    RedisCluster): :meth:`MovieCatalog.get_many` without blocking the loop."""

    def __init__(self, client: Any, prefix: str = "fbp") -> None:
        self._r = client
        self._key = catalog_key(check_prefix(prefix), "movies")

    async def get_many(self, movie_ids: Sequence[int]) -> dict[int, Movie]:
        out: dict[int, Movie] = {}
        for chunk in _chunks(movie_ids):
            _decoded(chunk, await self._r.hmget(self._key, [str(i) for i in chunk]), out)
        return out


def _chunks(movie_ids: Iterable[int]) -> Iterable[list[int]]:
    ids = list(dict.fromkeys(int(i) for i in movie_ids))
    for at in range(0, len(ids), _CHUNK):
        yield ids[at:at + _CHUNK]


def _decoded(ids: list[int], raws: Sequence[bytes | None], out: dict[int, Movie]) -> None:
    for mid, raw in zip(ids, raws):
        m = decode_movie(raw) if raw is not None else None
        if isinstance(m, Movie):
            out[mid] = m


class TitleCache:
    """Titles by movie id for people-facing outputs, with a small LRU cache.

    ``lookup`` (usually :meth:`MovieCatalog.get_many`) is called once per
    :meth:`titles` call, for the ids not cached; unknown ids are cached too
    (as unknown), and every entry expires after ``ttl_s`` so a newly loaded
    title shows within that time.  Thread-safe (web handlers call it from
    worker threads).
    """

    def __init__(self, lookup: Callable[[Sequence[int]], dict[int, Movie]], *, size: int = 4096,
                 ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup, self._size, self._ttl, self._clock = lookup, size, ttl_s, clock
        self._cache: OrderedDict[int, tuple[float, str | None]] = OrderedDict()
        self.lookups = 0  # calls to ``lookup``: what the cache saves is visible
        self._lock = threading.Lock()

    def titles(self, movie_ids: Iterable[int]) -> dict[int, str]:
        """``{movie_id: title}`` for the known ones among ``movie_ids``."""
        with self._lock:
            return self._titles(movie_ids)

    def _titles(self, movie_ids: Iterable[int]) -> dict[int, str]:
        now = self._clock()
        out: dict[int, str | None] = {}
        missing = []
        for i in dict.fromkeys(int(x) for x in movie_ids):
            hit = self._fresh(i, now)
            if hit is None:
                missing.append(i)
            else:
                out[i] = hit[1]
        if missing:
            self.lookups += 1
            found = self._lookup(missing)
            for i in missing:
                m = found.get(i)
                out[i] = m.title if m is not None else None
                self._put(i, now, out[i])
        return {i: t for i, t in out.items() if t is not None}

    def _fresh(self, movie_id: int, now: float) -> tuple[float, str | None] | None:
        hit = self._cache.get(movie_id)
        if hit is None or now - hit[0] > self._ttl:
            return None
        self._cache.move_to_end(movie_id)
        return hit

    def _put(self, movie_id: int, now: float, title: str | None) -> None:
        self._cache[movie_id] = (now, title)
        self._cache.move_to_end(movie_id)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)

