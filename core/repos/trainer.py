"""The trainer's control keys in Redis: on-demand fine-tune requests, its
schedule state and its decision log.

Keys (built by :func:`core.repos.keys.trainer_key`; same hash tag as the
event buffer, ``{<prefix>:trainer}``, so the trainer's keys live in one slot):

* ``{<prefix>:trainer}:requests``   list; one entry = one on-demand fine-tune
  (pushed by ``POST /api/v1/admin/finetune``, popped by the trainer)
* ``{<prefix>:trainer}:state``      hash ``last_run_seq``, ``last_run_at``,
  ``runs``, ``promotions`` (so a restarted trainer keeps its schedule)
* ``{<prefix>:trainer}:decisions``  list of the last ``DECISIONS_KEPT``
  decisions (JSON), newest first
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from core.repos import keys

DECISIONS_KEPT = 200


class TrainerStore:
    """Blocking access; ``client`` is a sync Redis or RedisCluster client."""

    def __init__(self, client: Any, prefix: str = "fbp") -> None:
        self._r = client
        self._prefix = keys.check_prefix(prefix)
        self._requests = keys.trainer_key(prefix, "requests")
        self._state = keys.trainer_key(prefix, "state")
        self._decisions = keys.trainer_key(prefix, "decisions")

    # -- requests ----------------------------------------------------------
    def request_finetune(self, **info: Any) -> None:
        """Ask the trainer for a fine-tune at its next check."""
        self._r.rpush(self._requests, orjson.dumps({"at": time.time(), **info}))

    def pop_request(self) -> dict[str, Any] | None:
        raw = self._r.lpop(self._requests)
        return None if raw is None else orjson.loads(raw)

    def pending_requests(self) -> int:
        return int(self._r.llen(self._requests))

    # -- schedule state ----------------------------------------------------
    def state(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self._r.hgetall(self._state).items()}

    def save_state(self, **fields: Any) -> None:
        self._r.hset(self._state, mapping=fields)

    # -- decisions ---------------------------------------------------------
    def log_decision(self, rec: dict[str, Any]) -> None:
        """Keep ``rec`` as the newest decision (one MULTI: push and trim together)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.lpush(self._decisions, orjson.dumps(rec))
        pipe.ltrim(self._decisions, 0, DECISIONS_KEPT - 1)
        pipe.execute()

    def decisions(self, limit: int = DECISIONS_KEPT) -> list[dict[str, Any]]:
        """Newest first."""
        return [orjson.loads(x) for x in self._r.lrange(self._decisions, 0, limit - 1)]
