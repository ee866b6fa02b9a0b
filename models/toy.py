"""``toy``: the smallest family -- a movie's trained bias plus the user's
shrunk rating offset::

    prediction = clamp(mu + b_i + n (m_u - mu) / (n + lambda_u))

``b_i`` (movie bias plus side-feature bias) is a weight trained like any
other; ``n`` and ``m_u`` are the generic state's ``count`` and running
``mean`` of the user's ratings, so the family has no state of its own and a
swap has nothing to re-derive.

With ``online=True`` it also has an online movie side (:class:`ToySide`):
a per-movie bias ``o_i`` added to the prediction and learned from every
event's error (``o_i += online_lr * (rating - prediction)``), plus a global
count of the events learned from.  Nothing outside this file knows it: the
worker loads, learns and shares it through ``RatingModel.movie_side`` and
``RatingModel.learn_batch``, as it does the lstm's.

It is here to show what adding a family takes -- this file and one line in
``models/registry.py`` -- and the tests stream it end to end through a real
worker (``tests/test_toy_family_e2e.py``), with and without its online
side.  It is not in the default model lists of ``fbp evaluate`` or ``fbp bench``.

State bytes per user (W=32): 662 payload + 21 header.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.base import Increments, State
from models.batch import sum_increments
from models.common import StatefulModel, excl_cumsum, lookup


class ToySide:
    """The toy's online movie side: a view over the model's buffers."""

    ROW = ("o",)  #: per movie: the online bias
    GLOBAL = ("n",)  #: events learned from

    def __init__(self, t: dict[str, Tensor]) -> None:
        self.t = t

    def apply(self, inc: Increments) -> None:
        for name, (rows, delta) in inc.items():
            if rows is None:
                self.t[name] += delta
            else:
                self.t[name].index_add_(0, rows, delta)


class ToyModel(StatefulModel):
    name = "toy"
    uses_resid_bias = False

    def __init__(self, online: bool = False, online_lr: float = 0.05, **kw) -> None:
        super().__init__(**kw)
        self.online, self.online_lr = bool(online), float(online_lr)
        self._hp.update(online=self.online, online_lr=self.online_lr)
        if self.online:
            self.register_buffer("online_o", torch.zeros(self.capacity))
            self.register_buffer("online_n", torch.zeros(1))
            self.movie_tables = self.movie_tables + ("online_o",)

    def movie_side(self) -> ToySide | None:
        if not self.online:
            return None
        return ToySide({"o": self.online_o, "n": self.online_n})

    def _online_bias(self, ids: Tensor) -> Tensor:
        return lookup(self.online_o, ids) if self.online else torch.zeros((), device=ids.device)

    @torch.no_grad()
    def learn_batch(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                    learn_movies: bool = True) -> tuple[Tensor, State, Increments]:
        """Round j (each user's j-th event) predicts from the side as the
        rounds before it left it, then adds its errors to it."""
        if not self.online or not learn_movies:
            return super().learn_batch(state, movie, rating, ts, mask, learn_movies)
        base, _ = self._sequence_base(state, movie, rating, ts, mask)
        pred, parts, side = torch.zeros_like(base), [], self.movie_side()
        for j in range(movie.shape[1]):
            u = torch.nonzero(mask[:, j]).flatten()
            if not len(u):
                continue
            mv = movie[u, j]
            p = self._clamp(base[u, j] + lookup(self.online_o, mv))
            inc = {"o": (mv, self.online_lr * (rating[u, j].float() - p)),
                   "n": (None, torch.full((1,), float(len(u)), device=movie.device))}
            side.apply(inc)
            parts.append(inc)
            pred[u, j] = p
        return pred, self.final_state(movie, rating, ts, mask, state=state), sum_increments(parts)

    def _offset(self, count: Tensor, mean: Tensor) -> Tensor:
        """The user's mean rating minus mu, shrunk towards 0 by ``lambda_u``."""
        n = count.to(torch.float32)
        return n * (mean - self.global_mean) / (n + self.lambda_u)

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        off = self._offset(state["count"], state["mean"])
        return self.global_mean + self._bias(ids) + self._online_bias(ids) + off[:, None]

    def _sequence(
        self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor, want_state: bool
    ) -> tuple[Tensor, State]:
        pred, own = self._sequence_base(state, movie, rating, ts, mask)
        return pred + self._online_bias(movie), own

    def _sequence_base(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor
                       ) -> tuple[Tensor, State]:
        """Unclamped predictions without the online bias."""
        # count and mean *before* each event; the sums in float64 so they
        # match step's running float32 mean to rounding
        mf = mask.to(torch.float64)
        n0 = state["count"].to(torch.float64)
        n = excl_cumsum(n0, mf)
        total = excl_cumsum(state["mean"].double() * n0, rating.double() * mf)
        mean = torch.where(n > 0, total / n.clamp(min=1.0), torch.zeros_like(total)).to(torch.float32)
        pred = self.global_mean + self._bias(movie) + self._offset(n, mean)
        return pred, {}
