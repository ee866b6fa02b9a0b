"""PNG plots for benchmark and evaluation reports (matplotlib, Agg backend: no display).

Each helper writes one PNG to ``path`` (parent folders created) and returns the
path.  NaN/None values are drawn as gaps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

DPI = 110


def _plt() -> Any:
    """pyplot on the Agg backend, imported at the first plot: importing
    matplotlib builds its font cache (files under ~/.cache), which importing
    this module must not."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: headless machines and worker threads
    import matplotlib.pyplot as plt

    return plt


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    _plt().close(fig)
    return path


def plot_rolling_rmse(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Rolling RMSE",
    xlabel: str = "events",
    ylabel: str = "RMSE",
    marks: Mapping[str, float] | None = None,
) -> Path:
    """One line per model/config: ``series[name] = (x, y)`` (e.g. events seen, rolling RMSE).

    ``marks`` draws labelled vertical lines (e.g. ``{"drift": 50_000, "promotion v2": 61_000}``).
    """
    if not series:
        raise ValueError("plot_rolling_rmse: no series")
    fig, ax = _plt().subplots(figsize=(9, 4.5))
    for name, (x, y) in series.items():
        x, y = _floats(x), _floats(y)
        if len(x) != len(y):
            raise ValueError(f"series {name!r}: {len(x)} x values but {len(y)} y values")
        ax.plot(x, y, label=name, linewidth=1.4)
    for label, at in (marks or {}).items():
        ax.axvline(at, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (at, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="dimgrey")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def plot_latency_over_time(
    t: Sequence[float],
    p50: Sequence[float | None],
    p99: Sequence[float | None],
    path: str | Path,
    *,
    title: str = "Event-to-prediction latency",
    unit: str = "ms",
    slo: float | None = None,
    xlabel: str = "time (s)",
) -> Path:
    """p50 and p99 latency against time; ``slo`` draws a horizontal limit (same unit)."""
    t, a, b = _floats(t), _floats(p50), _floats(p99)
    if not (len(t) == len(a) == len(b)):
        raise ValueError(f"lengths differ: t={len(t)} p50={len(a)} p99={len(b)}")
    fig, ax = _plt().subplots(figsize=(9, 4.5))
    ax.plot(t, a, label="p50", color="tab:green", linewidth=1.4)
    ax.plot(t, b, label="p99", color="tab:red", linewidth=1.4)
    ax.fill_between(t, a, b, where=~(np.isnan(a) | np.isnan(b)), color="tab:red", alpha=0.08)
    if slo is not None:
        ax.axhline(slo, color="black", linestyle=":", linewidth=1, label=f"SLO {slo:g} {unit}")
    ax.set(title=title, xlabel=xlabel, ylabel=f"latency ({unit})")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def plot_throughput_vs_batch(
    batch_sizes: Sequence[int],
    events_per_s: Mapping[str, Sequence[float | None]],
    path: str | Path,
    *,
    title: str = "Throughput vs micro-batch size",
    logx: bool = True,
    logy: bool = False,
) -> Path:
    """Events/s against batch size, one line per configuration (e.g. device or model)."""
    if not events_per_s:
        raise ValueError("plot_throughput_vs_batch: no series")
    x = _floats(batch_sizes)
    fig, ax = _plt().subplots(figsize=(8, 4.5))
    for name, ys in events_per_s.items():
        y = _floats(ys)
        if len(y) != len(x):
            raise ValueError(f"series {name!r}: {len(y)} values for {len(x)} batch sizes")
        ax.plot(x, y, marker="o", label=name, linewidth=1.4)
    if logx and len(x) and np.nanmin(x) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{int(v)}" for v in x])
    ax.set(title=title, xlabel="events per micro-batch", ylabel="events / s")
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)
