"""Which dead letters have been replayed, so ``fbp dlq replay`` is idempotent.

Why: the worker de-duplicates by Kafka position, and a replayed record is a
new record at a new position, so running the same replay twice would fold
the same events into the users' states twice.  The ledger remembers each
replayed dead letter by its own position in the DLQ
(``<dlq topic>/<partition>/<offset>``): a later run skips it unless asked to
replay it again.

Key: ``{<prefix>:dlq}:replayed``, a set (``SADD`` after Kafka acknowledged
the replayed record; ``SMISMEMBER`` to filter).  One key, so one slot on a
cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from core.repos.keys import check_prefix, dlq_key


class ReplayLedger:
    """Blocking access to the set of replayed dead letters of one deployment."""

    def __init__(self, client: Any, prefix: str = "fbp") -> None:
        self._r = client
        self._key = dlq_key(check_prefix(prefix), "replayed")

    @staticmethod
    def position(topic: str, partition: int, offset: int) -> str:
        return f"{topic}/{int(partition)}/{int(offset)}"

    def replayed(self, positions: Sequence[str]) -> list[bool]:
        """For each DLQ position, whether it was replayed before."""
        if not positions:
            return []
        return [bool(x) for x in self._r.smismember(self._key, list(positions))]

    def mark(self, positions: Iterable[str]) -> int:
        """Record positions as replayed; returns how many were new."""
        batch = list(positions)
        return int(self._r.sadd(self._key, *batch)) if batch else 0

    def count(self) -> int:
        return int(self._r.scard(self._key))
