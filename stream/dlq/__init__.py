"""``fbp dlq``: count and replay dead letters.

Why a tool: the worker dead-letters any record it cannot use (see
``core.events.dlq_record`` for the record's shape) and goes on, so the DLQ is
where an operator looks after an alert, and where a fixed problem (a limit
raised, a producer that keyed wrongly) is repaired by publishing the original
events again.  Both commands read the DLQ topic from its beginning up to the
end offsets taken when they start, then stop: no consumer group, nothing
committed, so they can be run any number of times.

Modules: ``records`` (a dead letter, parsed), ``reader`` (a topic read once
to its end), ``stats``, ``replay``, ``cli`` (the Typer group ``app``).
"""

from stream.dlq.cli import app
from stream.dlq.records import DeadLetter, Source, parse_dead_letter
from stream.dlq.replay import REPLAY_HEADER, ReplayReport, parse_since, replay, replay_key
from stream.dlq.stats import Stats, dlq_stats

__all__ = [
    "app", "DeadLetter", "Source", "parse_dead_letter", "REPLAY_HEADER", "ReplayReport", "parse_since",
    "replay", "replay_key", "Stats", "dlq_stats",
]
