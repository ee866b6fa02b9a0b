"""``toy``: the smallest family -- a movie's trained bias plus the user's
shrunk rating offset::

    prediction = clamp(mu + b_i + n (m_u - mu) / (n + lambda_u))

``b_i`` (movie bias plus side-feature bias) is a weight trained like any
other; ``n`` and ``m_u`` are the generic state's ``count`` and running
``mean`` of the user's ratings, so the family has no state of its own and a
swap has nothing to re-derive.

It is here to show what adding a family takes -- this file and one line in
``models/registry.py`` -- and the tests stream it end to end through a real
worker (``tests/test_toy_family_e2e.py``).  It is not in the default model
lists of ``fbp evaluate`` or ``fbp bench``.

State bytes per user (W=32): 662 payload + 21 header.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.base import State
from models.common import StatefulModel, excl_cumsum


class ToyModel(StatefulModel):
    name = "toy"
    uses_resid_bias = False

    def _offset(self, count: Tensor, mean: Tensor) -> Tensor:
        """The user's mean rating minus mu, shrunk towards 0 by ``lambda_u``."""
        n = count.to(torch.float32)
        return n * (mean - self.global_mean) / (n + self.lambda_u)

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        off = self._offset(state["count"], state["mean"])
        return self.global_mean + self._bias(ids) + off[:, None]

    def _sequence(
        self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor, want_state: bool
    ) -> tuple[Tensor, State]:
        # count and mean *before* each event; the sums in float64 so they
        # match step's running float32 mean to rounding
        mf = mask.to(torch.float64)
        n0 = state["count"].to(torch.float64)
        n = excl_cumsum(n0, mf)
        total = excl_cumsum(state["mean"].double() * n0, rating.double() * mf)
        mean = torch.where(n > 0, total / n.clamp(min=1.0), torch.zeros_like(total)).to(torch.float32)
        pred = self.global_mean + self._bias(movie) + self._offset(n, mean)
        return pred, {}
