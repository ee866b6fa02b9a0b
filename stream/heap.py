"""Garbage-collector settings for a predictor process.

Why: CPython's cyclic collector scans every tracked object of a generation
when it runs, and a worker's heap after start-up is large (torch, numba,
Faust, aiokafka, pandas: ~10^6 objects) while each batch allocates tens of
thousands of short-lived ones.  Issue #13 measured the collector at 8-16 us
of CPU per event in ``python -m bench.predictor_cpu`` (a quarter of the
batch path at 4,000 events per batch), nearly all of it in full collections
re-scanning the start-up heap.  Freezing that heap (``gc.freeze``: moved to
a generation the collector never scans) and collecting the young generation
less often took it to ~1 us.  Nothing is leaked: the frozen objects live for
the whole process anyway, and cycles created later are still collected.
"""

from __future__ import annotations

import gc

#: allocations between young-generation collections (CPython's default: 700);
#: a 512-event batch allocates ~10^4 tracked objects, most freed by refcount
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Collect once, freeze what survives (the long-lived start-up heap) and
    collect the young generation every :data:`YOUNG_THRESHOLD` allocations."""
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, mid, old)
