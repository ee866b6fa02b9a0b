"""``lstm`` (the default): a recurrent user state on top of the state-based MF.

The prediction for a candidate movie ``i`` uses the state *before* the event::

    mu + b_i + q~_i . p~_u  +  w . h + (P h) . G [q_i, f_i]

* ``mu + b_i + q~_i . p~_u`` is exactly :class:`models.mf.MFModel` (ridge user
  factor and user bias from the running statistics A, b kept in the state);
* ``h`` is the hidden state of an LSTM over the user's events.  Input per
  event: the movie's MF factor q_i ⊕ (r - mu) ⊕ (r - mu - b_i) ⊕ (r - MF prediction) ⊕
  log time gap ⊕ 1 ⊕ movie side features (genre multi-hot, normalised year,
  year-known flag).  ``nn.LSTM`` runs it over sequences; ``step`` uses the same
  weights through the cell equations.

All user-side projections are bias-free, so a new user (h = 0, p~ = 0) gets
``mu + b_i`` and an unknown movie (zero rows) ``mu + b_u + w . h``.

State bytes per user (defaults hidden=32, k=4, W=32): 1060 (1038 payload + 22 header).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.base import State, StateSpec
from models.common import lookup, user_item_dot
from models.mf import MFModel


class LSTMModel(MFModel):
    name = "lstm"
    movie_tables = ("movie_bias", "movie_features", "item_factors")

    def __init__(self, hidden: int = 32, item_dim: int = 16, k: int = 4, **kw) -> None:
        super().__init__(k=k, **kw)
        self._hp.update(hidden=int(hidden), item_dim=int(item_dim))
        self.hidden = int(hidden)
        # no per-movie tables of its own: movies enter through the MF factors
        # q_i and the side features f_i (far fewer parameters to overfit)
        self.lstm = nn.LSTM(self.k + 5 + self.n_features, hidden, batch_first=True)
        self.user_proj = nn.Linear(hidden, item_dim, bias=False)
        self.user_bias_head = nn.Linear(hidden, 1, bias=False)
        self.feat_proj = nn.Linear(self.k + self.n_features, item_dim, bias=False)
        with torch.no_grad():
            self.user_bias_head.weight.zero_()
            self.user_proj.weight.mul_(0.1)

    def _spec_extra(self) -> StateSpec:
        spec = super()._spec_extra()
        spec.update({"h": ((self.hidden,), torch.float32), "c": ((self.hidden,), torch.float32)})
        return spec

    def _inputs(self, movie: Tensor, rating: Tensor, mf_pred: Tensor, gap: Tensor) -> Tensor:
        r0 = rating - self.global_mean
        return torch.cat(
            [
                lookup(self.item_factors, movie),
                r0.unsqueeze(-1),
                (r0 - self._bias(movie)).unsqueeze(-1),
                (rating - mf_pred).unsqueeze(-1),
                gap.unsqueeze(-1),
                torch.ones_like(r0).unsqueeze(-1),
                self._feats(movie),
            ],
            -1,
        )

    def _item_vec(self, ids: Tensor) -> Tensor:
        return self.feat_proj(torch.cat([lookup(self.item_factors, ids), self._feats(ids)], -1))

    def _rnn_term(self, h: Tensor, ids: Tensor) -> Tensor:
        """h [B, H], ids [B, M] or shared [M] -> [B, M]"""
        return self.user_bias_head(h) + user_item_dot(self.user_proj(h), self._item_vec(ids))

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        return self._mf_predict_state(state, ids) + self._rnn_term(state["h"], ids)

    def _cell(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        lstm = self.lstm
        gates = x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, -1)
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c2), c2

    def _step_extra(self, state, movie, rating, ts):
        out = self._mf_step(state, movie, rating)
        mf_pred = self._mf_predict_state(state, movie[:, None])[:, 0]
        x = self._inputs(movie, rating, mf_pred, self._gap_step(state, ts))
        out["h"], out["c"] = self._cell(x, state["h"], state["c"])
        return out

    def _sequence(self, state, movie, rating, ts, mask, want_state):
        B, T = movie.shape
        mf_pred, extra = self._mf_sequence(state, movie, rating, mask, want_state)
        x = self._inputs(movie, rating, mf_pred, self._gap_seq(state, ts))
        L = mask.sum(1)
        h0, c0 = state["h"], state["c"]
        packed = pack_padded_sequence(x, L.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (hn, cn) = self.lstm(packed, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        h_before = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1)
        u = self.user_proj(h_before)
        v = self._item_vec(movie)
        pred = mf_pred + self.user_bias_head(h_before)[..., 0] + (u * v).sum(-1)
        if want_state:
            has = (L > 0)[:, None]
            extra["h"] = torch.where(has, hn[0], h0)
            extra["c"] = torch.where(has, cn[0], c0)
        return pred, extra
