"""``mf``: biased matrix factorisation with the user side folded into the state.

Each movie has a factor ``q_i`` (k) and a bias ``b_i``.  With the augmented
factor ``q~_i = [q_i, 1]`` the state keeps the ridge-regression statistics of
the user's residuals ``y = r - mu - b_i``::

    A = sum q~ q~^T          ((k+1) x (k+1))
    b = sum q~ * y           (k+1)
    p~_u = (A + diag(lambda_f,...,lambda_f, lambda_u))^-1 b

and predicts ``mu + b_i + q~_i . p~_u``.  The last component of ``p~_u`` is the
user bias: with no factors it reduces exactly to the baseline's
``resid_sum / (n + lambda_u)``.  A new user has ``p~ = 0`` (-> ``mu + b_i``);
an unknown movie has ``q~ = [0, 1]`` (-> ``mu + b_u``).  Gradients flow through
the solve, so Adam on MSE through ``forward_sequence`` learns item factors
that make this online least-squares user estimate predictive.  Solves run in
float64 so step and sequence agree to ~1e-6.

State bytes per user (k=10, W=32): 1210 (1190 payload + 20 header).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.base import State, StateSpec
from models.common import StatefulModel, lookup, ragged_sums, user_item_dot


class MFModel(StatefulModel):
    name = "mf"
    movie_tables = ("movie_bias", "movie_features", "item_factors")
    uses_resid_bias = False

    def __init__(self, k: int = 10, lambda_f: float = 5.0, init_std: float = 0.1, **kw) -> None:
        super().__init__(**kw)
        self._hp.update(k=int(k), lambda_f=float(lambda_f), init_std=float(init_std))
        self.k = int(k)
        self.lambda_f = float(lambda_f)
        self.item_factors = self._emb(self.capacity, self.k, init_std)

    def _spec_extra(self) -> StateSpec:
        K = self.k + 1
        return {"A": ((K, K), torch.float32), "b": ((K,), torch.float32)}

    def _qt(self, ids: Tensor) -> Tensor:
        q = lookup(self.item_factors, ids)
        return torch.cat([q, torch.ones_like(q[..., :1])], -1)

    def _ridge(self) -> Tensor:
        d = torch.full((self.k + 1,), self.lambda_f, dtype=torch.float64, device=self.movie_bias.device)
        d[-1] = self.lambda_u
        return torch.diag(d)

    def _solve(self, A: Tensor, b: Tensor) -> Tensor:
        p = torch.linalg.solve(A.double() + self._ridge(), b.double().unsqueeze(-1)).squeeze(-1)
        return p.to(torch.float32)

    # -- ridge user factor, reusable by subclasses ---------------------------
    def _mf_predict_state(self, state: State, ids: Tensor) -> Tensor:
        p = self._solve(state["A"], state["b"])  # [B, K]
        qt = self._qt(ids)  # [B, M, K] or shared [M, K]
        return self.global_mean + self._bias(ids) + user_item_dot(p, qt)

    def _mf_step(self, state: State, movie: Tensor, rating: Tensor) -> State:
        qt = self._qt(movie)
        y = rating - self.global_mean - self._bias(movie)
        return {"A": state["A"] + qt[:, :, None] * qt[:, None, :], "b": state["b"] + qt * y[:, None]}

    def _mf_sequence(self, state: State, movie: Tensor, rating: Tensor, mask: Tensor, want_state: bool):
        # over the real events only, flattened row by row (a batch's [B, T]
        # block is mostly padding when a few users have many events), and A
        # by its upper triangle (it is symmetric): the same systems, the same
        # numbers, at a fraction of the memory traffic
        row, col = mask.nonzero(as_tuple=True)
        ids = movie[row, col]
        qt = self._qt(ids)  # [N, K]
        qd = qt.double()
        y = (rating[row, col] - self.global_mean - self._bias(ids)).double()
        i, j = self._upper(qt.device)
        A_before, A_after = ragged_sums(state["A"][:, i, j], qd[:, i] * qd[:, j], row)
        b_before, b_after = ragged_sums(state["b"], qd * y[:, None], row)
        dot = (qt * self._solve(self._symmetric(A_before), b_before)).sum(-1)
        pred = self.global_mean + self._bias(movie) + torch.zeros_like(rating).index_put((row, col), dot)
        extra = {"A": self._symmetric(A_after), "b": b_after} if want_state else {}
        return pred, extra

    def _upper(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Row and column indices of the (k+1) x (k+1) upper triangle."""
        K = self.k + 1
        ij = torch.triu_indices(K, K, device=device)
        return ij[0], ij[1]

    def _symmetric(self, upper: Tensor) -> Tensor:
        """[..., K (K + 1) / 2] upper triangles -> [..., K, K] symmetric matrices."""
        K = self.k + 1
        i, j = self._upper(upper.device)
        out = upper.new_zeros(*upper.shape[:-1], K, K)
        out[..., i, j] = upper
        out[..., j, i] = upper
        return out

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        return self._mf_predict_state(state, ids)

    def _step_extra(self, state, movie, rating, ts):
        return self._mf_step(state, movie, rating)

    def _sequence(self, state, movie, rating, ts, mask, want_state):
        return self._mf_sequence(state, movie, rating, mask, want_state)


class UserVectorHead:
    """The read-out the cnn and lstm families share: a user vector (conv
    output, LSTM hidden state) scored against movies as a bias head plus the
    dot product of its projection with a projection of each movie's factors
    and side features.  Mixed into an :class:`MFModel` subclass that has
    ``feat_proj``, ``user_proj`` and ``user_bias_head``."""

    def _item_vec(self, ids: Tensor) -> Tensor:
        return self.feat_proj(torch.cat([lookup(self.item_factors, ids), self._feats(ids)], -1))

    def _user_term(self, u: Tensor, ids: Tensor) -> Tensor:
        """u [B, D], ids [B, M] or shared [M] -> [B, M]"""
        return self.user_bias_head(u) + user_item_dot(self.user_proj(u), self._item_vec(ids))

