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

The served prediction (``online=True``, the default) puts this network on
top of the online part: a Hedge mixture of seven online learners
(:mod:`models.mixture`; each the per-event biased MF of :mod:`models.online`
with AdaGrad rates, a session bias and side features, learning on both
sides, one per session time constant and rate), per-user x genre biases
and an item neighbourhood (:mod:`models.neighbours`) on its errors::

    pred = clamp(mix + w * (clamp(network) - mix)),   w = net_w, learned

``w`` is a shared global learned on the stream (0 before any training,
:data:`JUDGE_SHARE` for a network trained from scratch), so a
network that does not help keeps no weight; ``online_weight=a`` fixes it
instead (``(1 - a) * network + a * mix``; ``online`` uses a = 1).  A
fine-tune's judge compares networks at the old fixed share 0.2
(:meth:`LSTMModel.judging`).

What the online half computes is in :mod:`models.online_part` (a mixin of
this class); this module is the network and the blend.

The online user side lives in the state (``on_*`` keys, weight-independent:
kept across fine-tunes by :meth:`rederive`); the movie side -- every
member's tables, the mixture's shared losses and ``w`` -- lives in buffers
(``online_*``) that fine-tunes never touch, so a promotion keeps what the
online updates learned.  :meth:`online_step` is ``step`` plus the movie-side
*increments* of the batch (sums, mergeable by any number of workers);
``step`` alone leaves the movie side as it is.  ``forward_sequence`` equals
``step`` event by event (the movie side is fixed during a call); in training
mode it returns the network alone, which is what ``fit`` trains.  The online
part alone is the evaluable family ``online`` (:mod:`models.online_model`,
``network_weight`` 0), so ``fbp evaluate --models lstm,online`` measures the
network's share.

State bytes per user (defaults hidden=32, k=12, W=32): 1668 without the
online part (1060 at k=4), 2860 with it (seven members' user sides, their
losses and the neighbourhood's history; no genres).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models import lstm_kernel
from models import mixture as mx
from models import neighbours as nbr
from models import online as onl
from models.base import State, StateSpec
from models.common import lookup
from models.mf import MFModel, UserVectorHead
from models.online_part import OnlinePart

#: the fixed blend weight of the online part before the learned share (kept
#: for the simulator's ``lstm-hedge``; ``online_weight=None`` learns it)
ONLINE_WEIGHT = 0.8
#: the network's MF: its number of factors and the ridges on the user's
#: factors and bias (the MF family's are 10, 5 and 5).  Chosen with the
#: network's learning rate (``trainer.train.TRAIN_DEFAULTS``) on ML-100K's
#: first half by time and on a synthetic stream (``synthetic:50000:7``), by
#: the mean change of the two RMSEs (``docs/results/issue22/network_half_tune.py``,
#: ``network-half-tune.json``, rounds 5 to 7)
K = 12
LAMBDA_F = 2.0
LAMBDA_U = 50.0
#: the network's share when a fine-tune's judge compares networks (:meth:`LSTMModel.judging`)
JUDGE_SHARE = 1.0 - ONLINE_WEIGHT


class LSTMModel(OnlinePart, UserVectorHead, MFModel):
    name = "lstm"
    movie_tables = ("movie_bias", "movie_features", "item_factors")

    def __init__(self, hidden: int = 32, item_dim: int = 16, k: int = K, online: bool = True,
                 online_weight: float | None = None, online_cfg: dict | None = None,
                 n_user_features: int = 0, online_members: list | None = None,
                 hedge: dict | None = None, user_genre: dict | bool | None = None,
                 movie_side_owners: int | None = None, neighbours: dict | bool = True,
                 shared_movie_side: bool | None = None, lambda_u: float = LAMBDA_U,
                 lambda_f: float = LAMBDA_F, **kw) -> None:
        super().__init__(k=k, lambda_u=lambda_u, lambda_f=lambda_f, **kw)
        self.online = bool(online)
        #: None: the network's share is learned on the stream (``net_w``); a
        #: number: the online part's fixed weight (1: the online part alone)
        self.online_weight = None if online_weight is None else float(online_weight)
        self.online_cfg = onl.OnlineConfig.from_dict(online_cfg or {})
        members = mx.MEMBERS if online_members is None else online_members
        self.online_members = tuple((float(t), float(sc)) for t, sc in members)
        if not self.online_members:
            raise ValueError("online_members needs at least one (session tau, rate scale) pair")
        self.hedge_cfg = mx.HedgeConfig.from_dict(hedge)
        if shared_movie_side is not None:  # checkpoints before movie_side_owners
            movie_side_owners = 1 if shared_movie_side else len(self.online_members)
        if movie_side_owners is None:
            movie_side_owners = min(mx.MOVIE_SIDE_OWNERS, len(self.online_members))
        if not 1 <= int(movie_side_owners) <= len(self.online_members):
            raise ValueError(f"movie_side_owners must be between 1 and the {len(self.online_members)} members "
                             f"(it is {movie_side_owners})")
        #: the first members learn movie tables of their own; the others read member 0's
        self.movie_side_owners = int(movie_side_owners)
        #: per-user x genre biases on the mixture's errors (None: off)
        self.ug_cfg = None if user_genre is False else mx.UserGenreConfig.from_dict(
            user_genre if isinstance(user_genre, dict) else None)
        #: the item neighbourhood on the online part's errors (None: off)
        self.nb_cfg = None if neighbours is False or neighbours is None else nbr.NeighbourConfig.from_dict(
            neighbours if isinstance(neighbours, dict) else None)
        self.n_user_features = int(n_user_features)
        self._hp.update(hidden=int(hidden), item_dim=int(item_dim), online=self.online,
                        online_weight=self.online_weight, online_cfg=self.online_cfg.to_dict(),
                        n_user_features=self.n_user_features,
                        online_members=[list(m) for m in self.online_members], hedge=self.hedge_cfg.to_dict(),
                        user_genre=False if self.ug_cfg is None else self.ug_cfg.to_dict(),
                        movie_side_owners=self.movie_side_owners,
                        neighbours=False if self.nb_cfg is None else self.nb_cfg.to_dict())
        self.hidden = int(hidden)
        if self.online:
            for j, cfg in enumerate(self._member_cfgs()[: self._owners]):
                ms = onl.MovieSide(cfg, self.capacity, self.n_features, self.n_user_features)
                for name, t in ms.t.items():
                    self.register_buffer(f"online_{mx.member_name(j, name)}", t)
            K = len(self.online_members)
            self.register_buffer("online_hedge_L", torch.zeros(K))
            self.register_buffer("online_net_w", torch.zeros(1))
            self.movie_tables = self.movie_tables + tuple(
                f"online_{mx.member_name(j, n)}" for j in range(self._owners) for n in onl.MovieSide.ROW)
        #: the neighbourhood's tables (models.neighbours.new_tables): a host
        #: array, learned where the model is served and never saved
        self.nb_tables: np.ndarray | None = None
        if self.online and self.nb_cfg is not None:
            self.nb_tables = self._nb_grown(None, self.capacity)
        self._ms_cache: mx.MixtureSide | None = None
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

    def init_from_data(self, mean_rating: float) -> None:
        """The data's mean also becomes the prior of the online running mean
        (once, before any training and any online learning; the network
        starts with no share)."""
        if self.online and int(self.trained) == 0 and not float(self._buffers["online_mu"][1]):
            self.online_cfg = dataclasses.replace(self.online_cfg, mu_prior=float(mean_rating))
            self._hp["online_cfg"] = self.online_cfg.to_dict()
            self._ms_cache = None
        super().init_from_data(mean_rating)

    def _spec_extra(self) -> StateSpec:
        spec = super()._spec_extra()
        spec.update({"h": ((self.hidden,), torch.float32), "c": ((self.hidden,), torch.float32)})
        if self.online:
            spec.update(onl.user_spec_with_features(self.online_cfg, self.n_user_features))
            for j in range(1, len(self.online_members)):
                spec.update({mx.member_user_key(j, k): v for k, v in onl.user_spec(self.online_cfg).items()})
            spec["on_L"] = ((len(self.online_members),), torch.float32)
            if self.ug_cfg is not None:
                G = len(self.genre_vocab)
                spec.update({"on_gb": ((G,), torch.float32), "on_gG": ((G,), torch.float32)})
            if self.nb_cfg is not None:
                H = self.nb_cfg.history
                spec.update({"on_nm": ((H,), torch.int32), "on_ne": ((H,), torch.float32),
                             "on_nn": ((), torch.int64)})
        return spec

    # -- the online part (what it computes: models.online_part) ----------------
    @classmethod
    def hparams_from_users(cls, users) -> dict:
        """The width of the online side's user features."""
        if users is None or not len(users):
            return {}
        return {"n_user_features": int(onl.user_feature_matrix(users, 0)[0].shape[1])}

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

    @torch.no_grad()
    def learn_batch(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                    learn_movies: bool = True) -> tuple[Tensor, State, dict[str, tuple[Tensor | None, Tensor]]]:
        """Predict-then-learn a padded [U, T] batch the way every worker does
        (:func:`models.batch.learn_batch`): the network from the stored state
        (one ``step`` when T == 1, else ``forward_sequence``), the online part in
        rounds (round j = each user's j-th event), each round's movie-side
        increments applied here before the next round, then the network's
        share learned on the batch (:meth:`learn_blend`).  Returns
        (predictions [U, T], new states, the batch's increments summed per
        movie row); ``learn_movies=False``: the movie side and the share stay
        fixed (the frozen path)."""
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
        pred, share = self.learn_blend(net, on, rating, mask, apply=learn_movies)
        inc.update(share)
        return pred, new, inc

    @torch.no_grad()
    def learn_blend(self, net: Tensor, on: Tensor, rating: Tensor, mask: Tensor | None = None, apply: bool = True
                    ) -> tuple[Tensor, dict[str, tuple[Tensor | None, Tensor]]]:
        """The served prediction of a batch (network ``net`` and online part
        ``on``, any shape, ``mask`` marking its events) and, with a learned
        share, the share's step on the batch's errors: (predictions, the
        ``net_w`` increment, applied to the model when ``apply``)."""
        if self.online_weight is not None:
            return self._blend(net, on), {}
        w = self._buffers["online_net_w"]
        pred = self._blend(net, on)
        if not apply:
            return pred, {}
        m = torch.ones_like(rating, dtype=torch.bool) if mask is None else mask
        _, w2 = mx.blend_step(net[m].float().cpu().numpy(), on[m].float().cpu().numpy(),
                              rating[m].float().cpu().numpy(), float(w[0]), self.rating_min, self.rating_max)
        delta = torch.tensor([w2], dtype=w.dtype, device=w.device) - w
        w += delta
        return pred, {"net_w": (None, delta)}

    def ensure_capacity(self, max_movie_id: int) -> bool:
        grown = super().ensure_capacity(max_movie_id)
        if grown and getattr(self, "nb_tables", None) is not None:
            self.nb_tables = self._nb_grown(self.nb_tables, self.capacity)
        return grown

    @contextmanager
    def network_only(self):
        """Within: ``step``/``forward_sequence`` give the network alone and
        leave the ``on_*`` state unchanged (the simulator's fast path)."""
        old, self._net_only = self._net_only, True
        try:
            yield self
        finally:
            self._net_only = old

    @torch.no_grad()
    def start_network_share(self) -> None:
        """A network trained from scratch starts at the share it is judged at
        (:data:`JUDGE_SHARE`): whatever the share learned before training
        judged an untrained network.  The stream moves it from there."""
        if self.online and self.online_weight is None:
            self._buffers["online_net_w"].fill_(JUDGE_SHARE)

    @contextmanager
    def judging(self):
        """Within: a learned share is fixed at :data:`JUDGE_SHARE` (the old
        fixed blend), so challenger and champion are compared on what their
        networks add, whatever share the stream has learned so far."""
        old = self.online_weight
        if self.online and old is None:
            self.online_weight = 1.0 - JUDGE_SHARE
        try:
            yield self
        finally:
            self.online_weight = old

    @property
    def network_weight(self) -> float:
        """The network's share of the served prediction at most (0: nothing to
        train or run; a learned share may grow to 1)."""
        if not self.online:
            return 1.0
        return 1.0 if self.online_weight is None else 1.0 - self.online_weight

    @property
    def network_share(self) -> float:
        """The network's share now: the learned ``net_w``, or the fixed one."""
        if self.online and self.online_weight is None:
            return float(self._buffers["online_net_w"][0])
        return self.network_weight

    def _blend(self, net: Tensor, on: Tensor) -> Tensor:
        if self.online_weight is None:
            return mx.blend(net, on, self._buffers["online_net_w"][0], self.rating_min, self.rating_max)
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
        return self._blend(net, self.online_score(state, movie_ids.to(torch.int64)))

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
        return pred, fin

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
