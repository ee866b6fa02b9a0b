"""``baseline``: global mean + movie bias (a weight) + user bias from the state.

prediction = clamp(mu + b_i + resid_sum / (resid_n + lambda_u)), where
``resid_sum`` sums ``r - mu - b_i`` over the user's past events.  No per-user
weights: an unknown user gets ``mu + b_i``, an unknown movie ``mu + b_u``.

State bytes per user (W=32): 696 (670 payload + 26 header, see ``models.state``).
"""

from __future__ import annotations

from torch import Tensor

from models.base import State
from models.common import StatefulModel


class BaselineModel(StatefulModel):
    name = "baseline"

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        bu = self._user_bias(state["resid_sum"], state["resid_n"])
        return self.global_mean + self._bias(ids) + bu[:, None]

    def _sequence(self, state, movie, rating, ts, mask, want_state):
        s, n = self._resid_before(state, movie, rating, mask)
        pred = self.global_mean + self._bias(movie) + self._user_bias(s, n)
        return pred, {}
