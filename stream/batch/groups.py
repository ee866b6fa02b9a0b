"""The record boundary of the model stages.

The stages run for the whole batch at once; if they fail for a reason that
is not infrastructure, again user by user, so that only the events of a
user whose events make them fail are dead-lettered (``internal_error``) and
the rest of the batch goes on."""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from core.events import internal_error
from stream.batch.types import BatchResult, Predicted, Work
from stream.faults import INFRASTRUCTURE

log = logging.getLogger(__name__)

RunGroup = Callable[[Work], Awaitable[Predicted]]


async def by_user_on_failure(work: Work, run: RunGroup, res: BatchResult) -> Predicted:
    if not work:
        return Predicted()
    try:
        return Predicted.collect(res, [await run(work)])
    except INFRASTRUCTURE:
        raise
    except Exception:  # record boundary: find the records it belongs to
        log.exception("batch of %d events failed in the model stages; retrying user by user", len(work))
    groups: dict[int, Work] = {}
    for ev, rec in work:
        groups.setdefault(ev.user_id, []).append((ev, rec))
    parts = []
    for group in groups.values():
        try:
            parts.append(await run(group))
        except INFRASTRUCTURE:
            raise
        except Exception as exc:  # record boundary
            for _, rec in group:
                res.reject(internal_error(exc, rec.value), rec)
    return Predicted.collect(res, parts)
