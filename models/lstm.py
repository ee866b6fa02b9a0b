"""``lstm`` (the default): a recurrent user state over the rating history.

Input per event: movie embedding ⊕ (r - mu) ⊕ (r - mu - b_i) ⊕ log time gap ⊕
movie side features (genre multi-hot, normalised year, year-known flag) ->
LSTM (``nn.LSTM`` for sequences, the same weights through the cell equations
in ``step``).  The prediction for a candidate movie uses the hidden state
*before* the event::

    mu + b_i + b_u + w . h + (P h) . (e_i + G f_i)

with ``b_u = resid_sum / (resid_n + lambda_u)`` kept in the state.  All
user-side projections are bias-free, so a new user (h = 0) gets ``mu + b_i``
and an unknown movie (zero rows) ``mu + b_u + w . h``.

State bytes per user (hidden=64, W=32): 1231 payload + header ≈ 1.25 KB.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.base import State, StateSpec
from models.common import StatefulModel, lookup


class LSTMModel(StatefulModel):
    name = "lstm"
    movie_tables = ("movie_bias", "movie_features", "movie_emb", "item_out")

    def __init__(self, emb_dim: int = 32, hidden: int = 64, item_dim: int = 32, **kw) -> None:
        super().__init__(**kw)
        self._hp.update(emb_dim=int(emb_dim), hidden=int(hidden), item_dim=int(item_dim))
        self.hidden = int(hidden)
        self.movie_emb = self._emb(self.capacity, emb_dim)
        self.item_out = self._emb(self.capacity, item_dim)
        self.lstm = nn.LSTM(emb_dim + 4 + self.n_features, hidden, batch_first=True)
        self.user_proj = nn.Linear(hidden, item_dim, bias=False)
        self.user_bias_head = nn.Linear(hidden, 1, bias=False)
        self.feat_proj = nn.Linear(self.n_features, item_dim, bias=False)
        with torch.no_grad():
            self.user_bias_head.weight.zero_()

    def _spec_extra(self) -> StateSpec:
        return {"h": ((self.hidden,), torch.float32), "c": ((self.hidden,), torch.float32)}

    def _inputs(self, movie: Tensor, rating: Tensor, gap: Tensor) -> Tensor:
        r0 = rating - self.global_mean
        return torch.cat(
            [
                lookup(self.movie_emb, movie),
                r0.unsqueeze(-1),
                (r0 - self._bias(movie)).unsqueeze(-1),
                gap.unsqueeze(-1),
                torch.ones_like(r0).unsqueeze(-1),
                self._feats(movie),
            ],
            -1,
        )

    def _item_vec(self, ids: Tensor) -> Tensor:
        return lookup(self.item_out, ids) + self.feat_proj(self._feats(ids))

    def _head(self, h: Tensor, bu: Tensor, ids: Tensor) -> Tensor:
        """h [..., H], bu [...], ids [..., M] -> [..., M]"""
        u = self.user_proj(h)
        v = self._item_vec(ids)
        inter = (v * u.unsqueeze(-2)).sum(-1)
        return self.global_mean + self._bias(ids) + (bu + self.user_bias_head(h)[..., 0]).unsqueeze(-1) + inter

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        bu = self._user_bias(state["resid_sum"], state["resid_n"])
        return self._head(state["h"], bu, ids)

    def _cell(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        lstm = self.lstm
        gates = x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, -1)
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c2), c2

    def _step_extra(self, state, movie, rating, ts):
        x = self._inputs(movie, rating, self._gap_step(state, ts))
        h, c = self._cell(x, state["h"], state["c"])
        return {"h": h, "c": c}

    def _sequence(self, state, movie, rating, ts, mask, want_state):
        B, T = movie.shape
        x = self._inputs(movie, rating, self._gap_seq(state, ts))
        L = mask.sum(1)
        h0, c0 = state["h"], state["c"]
        packed = pack_padded_sequence(x, L.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (hn, cn) = self.lstm(packed, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        h_before = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)
        s, n = self._resid_before(state, movie, rating, mask)
        bu = self._user_bias(s, n)
        u = self.user_proj(h_before)
        v = self._item_vec(movie)
        pred = self.global_mean + self._bias(movie) + bu + self.user_bias_head(h_before)[..., 0] + (u * v).sum(-1)
        extra = {}
        if want_state:
            has = (L > 0)[:, None]
            extra = {"h": torch.where(has, hn[0], h0), "c": torch.where(has, cn[0], c0)}
        return pred, extra
