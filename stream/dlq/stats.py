"""``fbp dlq stats``: how many dead letters, why, from where, since when."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from core.settings import Settings
from stream.dlq.reader import read_dead_letters


@dataclass
class Stats:
    topic: str
    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_source_topic: dict[str, int] = field(default_factory=dict)
    unreadable: int = 0  # records on the topic that are not dead letters
    oldest: float | None = None  # rejected_at, unix seconds
    newest: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dlq_stats(settings: Settings, topic: str | None = None) -> Stats:
    """Counts by reason and by source topic, and the oldest/newest rejection."""
    stats = Stats(topic=topic or settings.kafka.dlq_topic)
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for dl in read_dead_letters(settings, stats.topic):
        if dl is None:
            stats.unreadable += 1
            continue
        stats.total += 1
        reasons[dl.reason] += 1
        sources[dl.source.topic or "(not recorded)"] += 1
        if dl.rejected_at is not None:
            stats.oldest = dl.rejected_at if stats.oldest is None else min(stats.oldest, dl.rejected_at)
            stats.newest = dl.rejected_at if stats.newest is None else max(stats.newest, dl.rejected_at)
    stats.by_reason = dict(reasons.most_common())
    stats.by_source_topic = dict(sources.most_common())
    return stats
