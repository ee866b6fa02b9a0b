"""Rolling online error: RMSE and MAE over the last N predictions.

One home for a figure three places report -- the worker's gauges
(``stream.metrics``), its live page (``stream.live``) and the trainer's drift
trigger (``trainer.service.DriftMonitor``) -- so they cannot disagree about
what "online RMSE" means.  Pure Python, no Prometheus: callers publish it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable


class RollingError:
    """Errors (predicted - actual) of the latest ``window`` predictions.

    RMSE and MAE are recomputed from the window with ``math.fsum`` when asked
    (at most ``window`` terms: exact, and no running sum to drift)."""

    def __init__(self, window: int = 2000) -> None:
        self.errors: deque[float] = deque(maxlen=int(window))

    @property
    def window(self) -> int:
        return self.errors.maxlen or 0

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def full(self) -> bool:
        return len(self.errors) >= self.window

    def add(self, error: float) -> None:
        self.errors.append(float(error))

    def extend(self, errors: Iterable[float]) -> None:
        self.errors.extend(errors)

    def clear(self) -> None:
        self.errors.clear()

    def rmse(self) -> float:
        """RMSE over the window (NaN when empty)."""
        n = len(self.errors)
        return math.sqrt(math.fsum(e * e for e in self.errors) / n) if n else math.nan

    def mae(self) -> float:
        """MAE over the window (NaN when empty)."""
        n = len(self.errors)
        return math.fsum(abs(e) for e in self.errors) / n if n else math.nan


def finite_or_none(x: float | None, ndigits: int | None = None) -> float | None:
    """``x`` (rounded to ``ndigits`` when given) if it is a finite number, else None:
    JSON has no NaN or infinity, and "no figure yet" reads better as null."""
    if x is None or not math.isfinite(x):
        return None
    return float(x) if ndigits is None else round(float(x), ndigits)
