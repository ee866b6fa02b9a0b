"""``cnn``: a temporal convolution over the last ``W`` events of the window.

Per-event features (movie MF factor ⊕ (r - mu) ⊕ (r - mu - b_i) ⊕ log gap to
the previous event ⊕ valid flag ⊕ movie side features, all zero for empty
slots) go through one ``Conv1d`` whose kernel spans the whole window (so the
user vector at any time is an exact function of the stored window; the gap
channel's oldest tap is masked because that gap is not recoverable from the
window), then ReLU and a linear map to a user vector ``u``::

    pred = mu + b_i + q~_i . p~_u + w . z + u . G [q_i, f_i]

on top of :class:`models.mf.MFModel` (its ridge user factor and user bias in
the state); movies enter the convolution through their MF factors ``q_i``.

The training path runs the same convolution along whole histories
(``[old window | events]``), so it equals step exactly.  Bias-free layers: a
new user (empty window) gets ``mu + b_i``.

State bytes per user (W=32, k=8): the generic window plus the MF statistics
(the CNN re-reads the window each step) -- see ``models.state``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import State
from models.common import gap_feature, lookup
from models.mf import MFModel, UserVectorHead


class CNNModel(UserVectorHead, MFModel):
    name = "cnn"
    movie_tables = ("movie_bias", "movie_features", "item_factors")

    def __init__(self, channels: int = 32, item_dim: int = 16, k: int = 8, **kw) -> None:
        super().__init__(k=k, **kw)
        self._hp.update(channels=int(channels), item_dim=int(item_dim))
        emb_dim = self.k
        in_dim = emb_dim + 4 + self.n_features
        self.gap_channel = emb_dim + 2
        self.conv = nn.Conv1d(in_dim, channels, kernel_size=self.W, bias=False)
        tap = torch.ones(1, in_dim, self.W)
        tap[0, self.gap_channel, 0] = 0.0
        self.register_buffer("tap_mask", tap, persistent=False)
        self.user_proj = nn.Linear(channels, item_dim, bias=False)
        self.user_bias_head = nn.Linear(channels, 1, bias=False)
        self.feat_proj = nn.Linear(self.k + self.n_features, item_dim, bias=False)
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
                lookup(self.item_factors, movie),
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

    def _window_valid(self, state: State) -> Tensor:
        pos = torch.arange(self.W, device=state["win_len"].device)
        return pos[None, :] >= (self.W - state["win_len"].to(torch.int64))[:, None]

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        x = self._event_feats(state["win_movie"], state["win_rating"], state["win_ts"], self._window_valid(state))
        z = self._users(x)[:, 0]
        return self._mf_predict_state(state, ids) + self._user_term(z, ids)

    def _sequence(self, state, movie, rating, ts, mask, want_state):
        cm = torch.cat([state["win_movie"], movie], 1)
        cr = torch.cat([state["win_rating"], rating], 1)
        ct = torch.cat([state["win_ts"], ts], 1)
        cv = torch.cat([self._window_valid(state), mask], 1)
        z = self._users(self._event_feats(cm, cr, ct, cv))[:, :-1]  # [B, T, C]
        mf_pred, extra = self._mf_sequence(state, movie, rating, mask, want_state)
        pred = mf_pred + self.user_bias_head(z)[..., 0] + (self.user_proj(z) * self._item_vec(movie)).sum(-1)
        return pred, extra
