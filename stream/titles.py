"""Movie titles for the worker's people-facing outputs (the live page, the
query API's top-K), from the movie catalog (:mod:`core.repos.catalog`).

Only the HTTP handlers call this, never the batch path: a page poll or a
top-K query asks for a few dozen ids, answered from a small cache (one HMGET
for the ids not seen in the last 30 s, in a thread off the event loop).  A
movie the catalog does not know has no title (the caller shows its id); while
Redis cannot be read, nothing has a title and the page and API still answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from core.repos.catalog import MovieCatalog, TitleCache
from stream.faults import INFRASTRUCTURE
from stream.runtime import runtime

log = logging.getLogger(__name__)

_cache: TitleCache | None = None


def _titles_cache() -> TitleCache:
    global _cache
    if _cache is None:
        from core.redis_conn import sync_redis

        s = runtime.settings
        _cache = TitleCache(MovieCatalog(sync_redis(s.redis), s.redis.key_prefix).get_many)
    return _cache


async def titles(movie_ids: Iterable[int]) -> dict[int, str]:
    """``{movie_id: title}`` of the known movies among ``movie_ids``."""
    ids = list(movie_ids)
    if not ids:
        return {}
    try:
        return await asyncio.to_thread(_titles_cache().titles, ids)
    except INFRASTRUCTURE as exc:
        log.warning("movie titles unavailable, showing ids: %s", exc)
        return {}
