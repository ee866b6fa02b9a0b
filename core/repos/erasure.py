"""The record of user erasures (``fbp user forget``): how many users were forgotten.

Why in Redis: ``fbp user forget`` is a short-lived command that no Prometheus
scrapes, so it adds to a counter here and every worker exports the count as
``fbp_users_forgotten`` (what was erased, never who: the ids are in the
command's log only).

Key (:func:`core.repos.keys.erasure_key`): ``{<prefix>:erasure}:forgotten``, an
integer.
"""

from __future__ import annotations

from typing import Any

from core.repos import keys


class ErasureLog:
    """Blocking access; ``client`` is a sync Redis or RedisCluster client."""

    def __init__(self, client: Any, prefix: str = "fbp") -> None:
        self._r = client
        self._key = keys.erasure_key(keys.check_prefix(prefix), "forgotten")

    def record(self, users: int) -> int:
        """Count ``users`` more forgotten users; returns the total."""
        return int(self._r.incrby(self._key, int(users)))

    def count(self) -> int:
        return int(self._r.get(self._key) or 0)
