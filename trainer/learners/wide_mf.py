"""The online learner of :mod:`models.online` with more factors.

Why: the 15 members of ``online-hedge`` all use k=10; a wider factorisation
fits users with long histories better and new ones worse, a different bias
/ variance trade-off for the mixture to weigh per user.  Rates and session
as the default member (tau 10 s, rates x1)."""

from __future__ import annotations

import dataclasses

from models.online import OnlineConfig

#: the widths added to the pool
WIDTHS = (30, 50)


def wide_members(base: OnlineConfig | None = None, widths: tuple[int, ...] = WIDTHS) -> list[OnlineConfig]:
    base = base or OnlineConfig()
    return [dataclasses.replace(base, k=k) for k in widths]
