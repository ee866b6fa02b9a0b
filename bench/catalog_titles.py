"""What titles cost where people look: ``python -m bench.catalog_titles [--json PATH]``.

Loads ML-100K's catalog into a fresh key prefix of the configured Redis, then
times the lookup one ``/api/v1/live`` poll makes (120 ids: 20 predictions'
movies and their top-5 picks) through :class:`core.repos.catalog.TitleCache`,
cold (one HMGET and the decoding) and warm (from the cache), and drops the
prefix.  Why: the worker's batch path never reads the catalog; this says what
a page poll or a top-K query pays instead.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import orjson


def _q(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def measure(settings, *, ids: int = 120, cold_runs: int = 200, warm_runs: int = 2000) -> dict[str, float]:
    from core.catalog import movies_from_frame
    from core.datasets import load_movies
    from core.redis_conn import sync_redis
    from core.repos.catalog import MovieCatalog, TitleCache
    from core.repos.keys import drop_namespace

    prefix = f"bench-titles-{uuid.uuid4().hex[:8]}"
    client = sync_redis(settings.redis)
    try:
        catalog = MovieCatalog(client, prefix)
        t0 = time.perf_counter()
        stored = catalog.put_many(movies_from_frame(load_movies("ml-100k")))
        load_s = time.perf_counter() - t0
        wanted = list(range(1, ids + 1))
        cold, warm = [], []
        for _ in range(cold_runs):
            cache = TitleCache(catalog.get_many)
            t0 = time.perf_counter()
            cache.titles(wanted)
            cold.append(time.perf_counter() - t0)
        for _ in range(warm_runs):
            t0 = time.perf_counter()
            cache.titles(wanted)
            warm.append(time.perf_counter() - t0)
    finally:
        drop_namespace(client, prefix)
        client.close()
    cold.sort()
    warm.sort()
    return {"movies_stored": stored, "load_ms": round(load_s * 1e3, 1), "ids_per_lookup": ids,
            "cold_median_ms": round(_q(cold, 0.5) * 1e3, 3), "cold_p99_ms": round(_q(cold, 0.99) * 1e3, 3),
            "warm_median_us": round(_q(warm, 0.5) * 1e6, 1), "warm_p99_us": round(_q(warm, 0.99) * 1e6, 1)}


def main(argv: list[str]) -> None:
    from core.settings import get_settings

    res = measure(get_settings())
    print(f"catalog: {res['movies_stored']} ML-100K movies stored in {res['load_ms']:.0f} ms")
    print(f"{res['ids_per_lookup']} ids, cold (one HMGET + decode): median {res['cold_median_ms']:.2f} ms, "
          f"p99 {res['cold_p99_ms']:.2f} ms")
    print(f"{res['ids_per_lookup']} ids, warm (cache): median {res['warm_median_us']:.0f} us, "
          f"p99 {res['warm_p99_us']:.0f} us")
    if "--json" in argv:
        path = Path(argv[argv.index("--json") + 1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main(sys.argv[1:])
