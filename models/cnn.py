"""``cnn``: a temporal convolution over the last ``W`` events of the window.

Per-event features (movie embedding ⊕ (r - mu) ⊕ (r - mu - b_i) ⊕ log gap to
the previous event ⊕ valid flag ⊕ movie side features, all zero for empty
slots) go through one ``Conv1d`` whose kernel spans the whole window (so the
user vector at any time is an exact function of the stored window; the gap
channel's oldest tap is masked because that gap is not recoverable from the
window), then ReLU and a linear map to a user vector ``u``::

    pred = mu + b_i + b_u + w . z + u . (e_i + G f_i)

The training path runs the same convolution along whole histories
(``[old window | events]``), so it equals step exactly.  Bias-free layers: a
new user (empty window) gets ``mu + b_i``.

State bytes per user (W=32): 691 = 670 payload + 21 header (only the generic window
and user bias: the CNN re-reads the window each step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import State
from models.common import StatefulModel, gap_feature, lookup


class CNNModel(StatefulModel):
    name = "cnn"
    movie_tables = ("movie_bias", "movie_features", "movie_emb", "item_out")

    def __init__(self, emb_dim: int = 16, channels: int = 32, item_dim: int = 16, **kw) -> None:
        super().__init__(**kw)
        self._hp.update(emb_dim=int(emb_dim), channels=int(channels), item_dim=int(item_dim))
        self.movie_emb = self._emb(self.capacity, emb_dim)
        self.item_out = self._emb(self.capacity, item_dim)
        in_dim = emb_dim + 4 + self.n_features
        self.gap_channel = emb_dim + 2
        self.conv = nn.Conv1d(in_dim, channels, kernel_size=self.W, bias=False)
        tap = torch.ones(1, in_dim, self.W)
        tap[0, self.gap_channel, 0] = 0.0
        self.register_buffer("tap_mask", tap, persistent=False)
        self.user_proj = nn.Linear(channels, item_dim, bias=False)
        self.user_bias_head = nn.Linear(channels, 1, bias=False)
        self.feat_proj = nn.Linear(self.n_features, item_dim, bias=False)
        with torch.no_grad():
            self.user_bias_head.weight.zero_()

    def _event_feats(self, movie: Tensor, rating: Tensor, ts: Tensor, valid: Tensor) -> Tensor:
        """[B, N] events (valid: bool) -> [B, N, in_dim]; gap to the previous valid slot."""
        v = valid.to(torch.float32)
        prev_valid = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], 1)
        prev_ts = torch.cat([ts[:, :1], ts[:, :-1]], 1)
        gap = gap_feature((ts - prev_ts) * (prev_valid & valid))
        r0 = rating - self.global_mean
        x = torch.cat(
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
        return x * v.unsqueeze(-1)

    def _users(self, x: Tensor) -> Tensor:
        """[B, N, in] -> conv outputs [B, N-W+1, C] (ReLU)."""
        z = F.conv1d(x.transpose(1, 2), self.conv.weight * self.tap_mask)
        return torch.relu(z).transpose(1, 2)

    def _head(self, z: Tensor, bu: Tensor, ids: Tensor) -> Tensor:
        u = self.user_proj(z)
        v = lookup(self.item_out, ids) + self.feat_proj(self._feats(ids))
        inter = (v * u.unsqueeze(-2)).sum(-1)
        return self.global_mean + self._bias(ids) + (bu + self.user_bias_head(z)[..., 0]).unsqueeze(-1) + inter

    def _window_valid(self, state: State) -> Tensor:
        pos = torch.arange(self.W, device=state["win_len"].device)
        return pos[None, :] >= (self.W - state["win_len"].to(torch.int64))[:, None]

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        x = self._event_feats(state["win_movie"], state["win_rating"], state["win_ts"], self._window_valid(state))
        z = self._users(x)[:, 0]
        bu = self._user_bias(state["resid_sum"], state["resid_n"])
        return self._head(z, bu, ids)

    def _sequence(self, state, movie, rating, ts, mask, want_state):
        cm = torch.cat([state["win_movie"], movie], 1)
        cr = torch.cat([state["win_rating"], rating], 1)
        ct = torch.cat([state["win_ts"], ts], 1)
        cv = torch.cat([self._window_valid(state), mask], 1)
        z = self._users(self._event_feats(cm, cr, ct, cv))[:, :-1]  # [B, T, C]
        s, n = self._resid_before(state, movie, rating, mask)
        bu = self._user_bias(s, n)
        u = self.user_proj(z)
        v = lookup(self.item_out, movie) + self.feat_proj(self._feats(movie))
        pred = self.global_mean + self._bias(movie) + bu + self.user_bias_head(z)[..., 0] + (u * v).sum(-1)
        return pred, {}
