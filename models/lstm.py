"""``lstm`` (the default): a recurrent user state on top of the state-based MF.

The prediction for a candidate movie ``i`` uses the state *before* the event::

    mu + b_i + q~_i . p~_u  +  w . h + (P h) . G [q_i, f_i]

* ``mu + b_i + q~_i . p~_u`` is exactly :class:`models.mf.MFModel` (ridge user
  factor and user bias from the running statistics A, b kept in the state);
* ``h`` is the hidden state of an LSTM over the user's events.  Input per
  event: the movie's MF factor q_i ⊕ (r - mu) ⊕ (r - mu - b_i) ⊕ (r - MF prediction) ⊕
  log time gap ⊕ 1 ⊕ movie side features (genre multi-hot, normalised year,
  year-known flag).  ``nn.LSTM`` runs it over sequences in training (and on
  a GPU), a compiled kernel of the same equations at inference on the CPU
  (:mod:`models.lstm_kernel`); ``step`` uses the same weights through the
  cell equations.

All user-side projections are bias-free, so a new user (h = 0, p~ = 0) gets
``mu + b_i`` and an unknown movie (zero rows) ``mu + b_u + w . h``.

The served prediction (``online=True``, the default) blends this network
with the online model of :mod:`models.online` (a per-event biased MF with
AdaGrad rates, a session bias and side features, learning on both sides)::

    pred = (1 - a) * clamp(network) + a * clamp(online),   a = online_weight

The online user side lives in the state (``on_*`` keys, weight-independent:
kept across fine-tunes by :meth:`rederive`); the movie side lives in buffers
(``online_*``) that fine-tunes never touch, so a promotion keeps what the
online updates learned.  :meth:`online_step` is ``step`` plus the movie-side
*increments* of the batch (sums, mergeable by any number of workers);
``step`` alone leaves the movie side as it is.  ``forward_sequence`` equals
``step`` event by event (the movie side is fixed during a call); in training
mode it returns the network alone, which is what ``fit`` trains.  The online
part alone is the evaluable family ``online`` (:mod:`models.online_model`,
``network_weight`` 0), so ``fbp evaluate --models lstm,online`` measures the
network's share.

State bytes per user (defaults hidden=32, k=4, W=32): 1060 (1038 payload + 22 header)
without the online part.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models import lstm_kernel
from models import online as onl
from models.base import State, StateSpec
from models.common import lookup, user_item_dot
from models.mf import MFModel, UserVectorHead

#: blend weight of the online model, chosen on the first half of ML-100K by time
ONLINE_WEIGHT = 0.8


def online_gap(gap_s: Tensor) -> Tensor:
    """Log time gap that resolves seconds and minutes: log1p(seconds) / log1p(1 year)."""
    return torch.log1p(gap_s.clamp(min=0).to(torch.float32)) / 17.3


class LSTMModel(UserVectorHead, MFModel):
    name = "lstm"
    movie_tables = ("movie_bias", "movie_features", "item_factors")

    def __init__(self, hidden: int = 32, item_dim: int = 16, k: int = 4, online: bool = True,
                 online_weight: float = ONLINE_WEIGHT, online_cfg: dict | None = None,
                 n_user_features: int = 0, **kw) -> None:
        super().__init__(k=k, **kw)
        self.online = bool(online)
        self.online_weight = float(online_weight)
        self.online_cfg = onl.OnlineConfig.from_dict(online_cfg or {})
        self.n_user_features = int(n_user_features)
        self._hp.update(hidden=int(hidden), item_dim=int(item_dim), online=self.online,
                        online_weight=self.online_weight, online_cfg=self.online_cfg.to_dict(),
                        n_user_features=self.n_user_features)
        self.hidden = int(hidden)
        if self.online:
            ms = onl.MovieSide(self.online_cfg, self.capacity, self.n_features, self.n_user_features)
            for name, t in ms.t.items():
                self.register_buffer(f"online_{name}", t)
            self.movie_tables = self.movie_tables + tuple(f"online_{n}" for n in onl.MovieSide.ROW)
        self._ms_cache: onl.MovieSide | None = None
        self._net_only = False
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
        if self.online:
            spec.update(onl.user_spec_with_features(self.online_cfg, self.n_user_features))
        return spec

    # -- the online part ------------------------------------------------------
    @classmethod
    def hparams_from_users(cls, users) -> dict:
        """The width of the online side's user features."""
        if users is None or not len(users):
            return {}
        return {"n_user_features": int(onl.user_feature_matrix(users, 0)[0].shape[1])}

    def movie_side(self) -> onl.MovieSide | None:
        """The online movie side as a view over this model's buffers (so
        :meth:`models.online.MovieSide.apply` updates the model in place);
        None without the online part."""
        if not self.online:
            return None
        t = {n: self._buffers[f"online_{n}"] for n in onl.MovieSide.ROW + onl.MovieSide.GLOBAL}
        ms = self._ms_cache
        if ms is None or any(ms.t[n] is not t[n] for n in t):
            ms = self._ms_cache = onl.MovieSide(self.online_cfg, 0, 0, 0, tensors=t)
        return ms

    def _online_user(self, state: State) -> dict[str, Tensor]:
        return {k: state[k] for k in onl.USER_KEYS}

    def online_step(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor
                    ) -> tuple[State, Tensor, dict[str, tuple[Tensor | None, Tensor]]]:
        """``step`` plus the movie-side increments of this batch (one event per
        user).  The caller merges them (``movie_side().apply`` here, Redis
        ``HINCRBYFLOAT`` in a stream) before the next batch."""
        new, net = self._network_step(state, movie, rating, ts)
        if not self.online or self._net_only:
            return new, net, {}
        user, on, inc = self.online_part(state, movie, rating, ts)
        new.update(user)
        return new, self._blend(net, on), inc

    def online_part(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor
                    ) -> tuple[dict[str, Tensor], Tensor, dict[str, tuple[Tensor | None, Tensor]]]:
        """The online half of :meth:`online_step`: (new ``on_*`` state, clamped
        online prediction, movie-side increments).  Reads ``on_*``,
        ``last_ts`` and ``count`` of ``state``; the simulator runs it per round
        beside the network's sequence pass (the two halves are independent)."""
        movie, rating, ts = movie.to(torch.int64), rating.to(torch.float32), ts.to(torch.int64)
        on, user, inc = onl.online_round(self.movie_side(), self._online_user(state), movie, rating,
                                         ts - state["last_ts"], state["count"] > 0, self._feats(movie), state["on_g"])
        user["on_g"] = state["on_g"]
        return user, self._clamp(on), inc

    @torch.no_grad()
    def learn_batch(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                    learn_movies: bool = True) -> tuple[Tensor, State, dict[str, tuple[Tensor | None, Tensor]]]:
        """Predict-then-learn a padded [U, T] batch the way every worker does
        (:func:`models.batch.learn_batch`): the network from the stored state
        (one ``step`` when T == 1, else ``forward_sequence``), the online part in
        rounds (round j = each user's j-th event), each round's movie-side
        increments applied here before the next round.  Returns (predictions
        [U, T], new states, the batch's increments summed per movie row);
        ``learn_movies=False``: the movie side stays fixed (the frozen path)."""
        with self.network_only():
            if movie.shape[1] == 1:
                new, p = self.step(state, movie[:, 0], rating[:, 0], ts[:, 0])
                net = p[:, None]
            else:
                net, new = self.forward_sequence(movie, rating, ts, mask, state=state, return_state=True)
        if not self.online:
            return net, new, {}
        on, user, inc = self.online_batch(state, movie, rating, ts, mask, apply=learn_movies)
        new.update(user)
        return self._blend(net, on), new, inc

    @torch.no_grad()
    def online_batch(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                     apply: bool = True) -> tuple[Tensor, dict[str, Tensor], dict[str, tuple[Tensor | None, Tensor]]]:
        """The online half of :meth:`learn_batch`: (clamped online predictions
        [U, T], new ``on_*`` state, the batch's increments summed per row;
        none when ``apply`` is off).  Round j runs the users that have a j-th
        event and merges its increments into the movie side before round j+1.
        On CPU the compiled kernel (:mod:`models.online_kernel`) runs all the
        rounds; elsewhere :meth:`online_batch_rounds`, the torch reference."""
        if self._kernel_ok(state, movie):
            return self.online_batch_kernel(state, movie, rating, ts, mask, apply=apply)
        return self.online_batch_rounds(state, movie, rating, ts, mask, apply=apply)

    def _kernel_ok(self, state: State, movie: Tensor) -> bool:
        """The kernel needs CPU float32 tensors, the movie side contiguous (it
        updates the buffers in place as numpy views)."""
        ms = self.movie_side()
        return movie.device.type == "cpu" and all(
            v.device.type == "cpu" and v.dtype == torch.float32 and v.is_contiguous() for v in ms.t.values()
        ) and all(state[k].device.type == "cpu" and state[k].dtype == torch.float32 for k in onl.USER_KEYS)

    @torch.no_grad()
    def online_batch_kernel(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                            apply: bool = True) -> tuple[Tensor, dict[str, Tensor], dict]:
        """:meth:`online_batch` through the compiled CPU kernel: the same
        rounds in one call, the model's buffers updated in place."""
        from models.online_kernel import online_events, round_order

        u, j, starts = round_order(mask.numpy())
        user = {k: state[k].clone().contiguous() for k in state if k.startswith("on_")}
        last_ts = state["last_ts"].numpy().astype(np.int64)  # a copy: the kernel advances it
        count = state["count"].numpy().astype(np.int64)
        mv = movie.numpy()[u, j]
        uf = user["on_g"].numpy()[u] if "on_g" in user else np.zeros((len(u), 0), np.float32)
        p, inc = online_events(self.movie_side(), user, last_ts, count, u, mv, rating.numpy()[u, j],
                               ts.numpy()[u, j], self._feats(torch.from_numpy(mv)).numpy(), uf, starts,
                               apply, self.rating_min, self.rating_max)
        pred = torch.zeros(movie.shape, dtype=torch.float32)
        pred[torch.from_numpy(u), torch.from_numpy(j)] = torch.from_numpy(p)
        return pred, user, inc

    @torch.no_grad()
    def online_batch_rounds(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                            apply: bool = True) -> tuple[Tensor, dict[str, Tensor], dict]:
        """:meth:`online_batch` as a torch loop of :meth:`online_part` rounds:
        the reference the kernel is tested against, and the path on a GPU."""
        from models.batch import sum_increments

        ms = self.movie_side()
        work = {k: state[k].clone() for k in state if k.startswith("on_") or k in ("last_ts", "count")}
        pred = torch.zeros(movie.shape, dtype=torch.float32, device=movie.device)
        parts = []
        for j in range(movie.shape[1]):
            u = torch.nonzero(mask[:, j]).flatten()
            if not len(u):
                continue
            sub = {k: v[u] for k, v in work.items()}
            user, p, inc = self.online_part(sub, movie[u, j], rating[u, j], ts[u, j])
            if apply:  # frozen: nothing to merge or hand back
                ms.apply(inc)
                parts.append(inc)
            for k, v in user.items():
                work[k][u] = v
            work["last_ts"][u] = ts[u, j].to(work["last_ts"].dtype)
            work["count"][u] += 1
            pred[u, j] = p.float()
        user = {k: v for k, v in work.items() if k.startswith("on_")}
        return pred, user, sum_increments(parts) if parts else {}

    @contextmanager
    def network_only(self):
        """Within: ``step``/``forward_sequence`` give the network alone and
        leave the ``on_*`` state unchanged (the simulator's fast path)."""
        old, self._net_only = self._net_only, True
        try:
            yield self
        finally:
            self._net_only = old

    @property
    def network_weight(self) -> float:
        """The network's share of the served prediction (0: nothing to train or run)."""
        return 1.0 - self.online_weight if self.online else 1.0

    def _blend(self, net: Tensor, on: Tensor) -> Tensor:
        a = self.online_weight
        return (1.0 - a) * net + a * on

    def _network_step(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor) -> tuple[State, Tensor]:
        return super().step(state, movie, rating, ts)

    def step(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor) -> tuple[State, Tensor]:
        new, pred, _ = self.online_step(state, movie, rating, ts)
        return new, pred

    def score(self, state: State, movie_ids: Tensor) -> Tensor:
        net = super().score(state, movie_ids)
        if not self.online or self._net_only:
            return net
        ids = movie_ids.to(torch.int64)
        ms, cfg, t = self.movie_side(), self.online_cfg, self.movie_side().t
        mu = (t["mu"][0] + cfg.mu_prior * cfg.mu_prior_n) / (t["mu"][1] + cfg.mu_prior_n)
        qe = ms.q0(ids) + ms.row(t["q"], ids)
        pe = state["on_p"]
        bias = mu + ms.row(t["b"], ids)
        if cfg.use_features:
            f = self._feats(ids)
            qe = qe + f @ t["V"]
            pe = pe + state["on_g"] @ t["U"]
            bias = bias + f @ t["wm"]
        user = state["on_ub"] + (state["on_g"] @ t["wu"] if cfg.use_features else 0.0)
        if cfg.use_session:  # as if rated now, in the same session (a per-user constant: no effect on ranking)
            user = user + state["on_s"] * (state["count"] > 0)
        on = bias + user_item_dot(pe, qe) + (user[:, None] if torch.is_tensor(user) else user)
        return self._blend(net, self._clamp(on))

    def forward_sequence(self, movie, rating, ts, mask, *, state=None, return_state=False):
        if state is None:
            state = self.init_state(movie.shape[0], movie.device)
        out = super().forward_sequence(movie, rating, ts, mask, state=state, return_state=return_state)
        if not self.online:
            return out
        net, fin = out if return_state else (out, None)
        if self.training or self._net_only:  # training fits the network; the online part learns by itself
            if fin is not None:
                fin.update({k: state[k] for k in state if k.startswith("on_")})
            return out
        on, user = self._online_sequence(state, movie, rating, ts, mask)
        pred = self._blend(net, on)
        if not return_state:
            return pred
        fin.update(user)
        fin["on_g"] = state["on_g"]
        return pred, fin

    @torch.no_grad()
    def _online_sequence(self, state, movie, rating, ts, mask) -> tuple[Tensor, dict[str, Tensor]]:
        """The online part event by event with the movie side fixed, exactly as
        ``step`` computes it (a loop over T: its SGD updates are sequential)."""
        movie = torch.where(mask, movie.to(torch.int64), torch.zeros_like(movie, dtype=torch.int64))
        rating, ts = rating.to(torch.float32), ts.to(torch.int64)
        ms = self.movie_side()
        user = self._online_user(state)
        last, cnt = state["last_ts"], state["count"]
        preds = []
        for j in range(movie.shape[1]):
            m = mask[:, j]
            p, new, _ = onl.online_round(ms, user, movie[:, j], rating[:, j], ts[:, j] - last, cnt > 0,
                                         self._feats(movie[:, j]), state["on_g"])
            preds.append(self._clamp(p))
            user = {k: torch.where(m.view(-1, *([1] * (v.dim() - 1))), new[k], v) for k, v in user.items()}
            last = torch.where(m, ts[:, j], last)
            cnt = cnt + m.to(cnt.dtype)
        pred = torch.stack(preds, 1) if preds else torch.zeros_like(rating)
        return pred, user

    def rederive(self, state: State, stale: Tensor) -> State:
        """The network's state is recomputed from the window; the online user
        side (``on_*``) does not depend on the weights and is kept."""
        kept = {k: state[k].clone() for k in state if k.startswith("on_")}
        out = super().rederive(state, stale)
        out.update(kept)
        return out

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

    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        return self._mf_predict_state(state, ids) + self._user_term(state["h"], ids)

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
        h_before, hn, cn = self._recurrence(x, L, h0, c0)
        u = self.user_proj(h_before)
        v = self._item_vec(movie)
        pred = mf_pred + self.user_bias_head(h_before)[..., 0] + (u * v).sum(-1)
        if want_state:
            has = (L > 0)[:, None]
            extra["h"] = torch.where(has, hn, h0)
            extra["c"] = torch.where(has, cn, c0)
        return pred, extra

    def _recurrence(self, x: Tensor, L: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The LSTM over each row's first L steps: (hidden state before each
        step [B, T, H], final h, final c).  No-grad on the CPU: the compiled
        kernel (:mod:`models.lstm_kernel`, the worker's hot loop); otherwise
        ``nn.LSTM`` over the packed sequence (training, GPU)."""
        if lstm_kernel.usable(self.lstm, x):
            return lstm_kernel.run(self.lstm, x, L, h0, c0)
        T = x.shape[1]
        packed = pack_padded_sequence(x, L.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (hn, cn) = self.lstm(packed, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        return torch.cat([h0.unsqueeze(1), out[:, :-1]], 1), hn[0], cn[0]
