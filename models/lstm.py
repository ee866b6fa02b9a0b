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
top of the online part: a Hedge mixture of five online learners
(:mod:`models.mixture`; each the per-event biased MF of :mod:`models.online`
with AdaGrad rates, a session bias and side features, learning on both
sides, one per session time constant)::

    pred = clamp(mix + w * (clamp(network) - mix)),   w = net_w, learned

``w`` is a shared global learned on the stream (starting at 0), so a
network that does not help keeps no weight; ``online_weight=a`` fixes it
instead (``(1 - a) * network + a * mix``; ``online`` uses a = 1).  A
fine-tune's judge compares networks at the old fixed share 0.2
(:meth:`LSTMModel.judging`).

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

State bytes per user (defaults hidden=32, k=4, W=32): 1060 (1038 payload + 22
header) without the online part, 1540 with it (five members' user sides, their
losses, the side features).
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
from models.base import RatingModel, State, StateSpec
from models.common import lookup, user_item_dot
from models.mf import MFModel, UserVectorHead

#: the fixed blend weight of the online part before the learned share (kept
#: for the simulator's ``lstm-hedge``; ``online_weight=None`` learns it)
ONLINE_WEIGHT = 0.8
#: the network's share when a fine-tune's judge compares networks (:meth:`LSTMModel.judging`)
JUDGE_SHARE = 1.0 - ONLINE_WEIGHT


def online_gap(gap_s: Tensor) -> Tensor:
    """Log time gap that resolves seconds and minutes: log1p(seconds) / log1p(1 year)."""
    return torch.log1p(gap_s.clamp(min=0).to(torch.float32)) / 17.3


class LSTMModel(UserVectorHead, MFModel):
    name = "lstm"
    movie_tables = ("movie_bias", "movie_features", "item_factors")

    def __init__(self, hidden: int = 32, item_dim: int = 16, k: int = 4, online: bool = True,
                 online_weight: float | None = None, online_cfg: dict | None = None,
                 n_user_features: int = 0, online_members: list | None = None,
                 hedge: dict | None = None, user_genre: dict | bool | None = None,
                 shared_movie_side: bool = True, neighbours: dict | bool = False, **kw) -> None:
        super().__init__(k=k, **kw)
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
        #: True: every member reads member 0's movie tables (one learns them)
        self.shared_movie_side = bool(shared_movie_side)
        #: per-user x genre biases on the mixture's errors (None: off)
        self.ug_cfg = None if user_genre is False else mx.UserGenreConfig.from_dict(
            user_genre if isinstance(user_genre, dict) else None)
        #: the item neighbourhood on the online part's errors (opt-in: None, off)
        self.nb_cfg = None if neighbours is False or neighbours is None else nbr.NeighbourConfig.from_dict(
            neighbours if isinstance(neighbours, dict) else None)
        self.n_user_features = int(n_user_features)
        self._hp.update(hidden=int(hidden), item_dim=int(item_dim), online=self.online,
                        online_weight=self.online_weight, online_cfg=self.online_cfg.to_dict(),
                        n_user_features=self.n_user_features,
                        online_members=[list(m) for m in self.online_members], hedge=self.hedge_cfg.to_dict(),
                        user_genre=False if self.ug_cfg is None else self.ug_cfg.to_dict(),
                        shared_movie_side=self.shared_movie_side,
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
        #: the neighbourhood's tables (keys, A, B, N): host arrays, learned
        #: where the model is served and never saved (models.neighbours)
        self.nb_tables: tuple[np.ndarray, ...] | None = None
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

    @property
    def _owners(self) -> int:
        """How many members own movie tables (1 when the movie side is shared)."""
        return 1 if self.shared_movie_side else len(self.online_members)

    def _member_cfgs(self) -> list[onl.OnlineConfig]:
        return mx.member_configs(self.online_cfg, self.online_members)

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

    # -- the online part ------------------------------------------------------
    @classmethod
    def hparams_from_users(cls, users) -> dict:
        """The width of the online side's user features."""
        if users is None or not len(users):
            return {}
        return {"n_user_features": int(onl.user_feature_matrix(users, 0)[0].shape[1])}

    def movie_side(self) -> mx.MixtureSide | None:
        """The online movie side (every member's, and the mixture's shared
        globals) as a view over this model's buffers, so that ``apply``
        updates the model in place; None without the online part."""
        if not self.online:
            return None
        ms = self._ms_cache
        names = [mx.member_name(j, n) for j in range(self._owners)
                 for n in onl.MovieSide.ROW + onl.MovieSide.GLOBAL] + list(mx.MIX_GLOBAL)
        if ms is None or any(ms.t[n] is not self._buffers[f"online_{n}"] for n in names):
            own = self._owners
            members = [onl.MovieSide(cfg, 0, 0, 0, tensors={
                n: self._buffers[f"online_{mx.member_name(j if j < own else 0, n)}"]
                for n in onl.MovieSide.ROW + onl.MovieSide.GLOBAL}) for j, cfg in enumerate(self._member_cfgs())]
            ms = self._ms_cache = mx.MixtureSide(members, {n: self._buffers[f"online_{n}"] for n in mx.MIX_GLOBAL},
                                                 owners=own)
        return ms

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

    def online_part(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, readers: list | None = None,
                    learn_tables: bool = False
                    ) -> tuple[dict[str, Tensor], Tensor, dict[str, tuple[Tensor | None, Tensor]]]:
        """The online half of :meth:`online_step`, one event per user: (new
        ``on_*`` state, the mixture's clamped prediction, movie-side
        increments: every member's and the shared losses').  Reads ``on_*``,
        ``last_ts`` and ``count`` of ``state``; the torch reference of the
        compiled path (:meth:`online_batch_kernel`).  ``readers``: the sides
        the members that own no tables read (default: the live ones);
        ``learn_tables``: the neighbourhood's tables learn the events too."""
        movie, rating, ts = movie.to(torch.int64), rating.to(torch.float32), ts.to(torch.int64)
        ms, hc = self.movie_side(), self.hedge_cfg
        gap, has, f, g = ts - state["last_ts"], state["count"] > 0, self._feats(movie), state["on_g"]
        preds, user, inc = [], {"on_g": state["on_g"]}, {}
        for j, side in enumerate(ms.members):
            if j >= ms.owners and readers is not None:
                side = readers[j - ms.owners]
            p, new, i = onl.online_round(side, mx.member_user(state, j), movie, rating, gap, has, f, g)
            preds.append(self._clamp(p))
            user.update({mx.member_user_key(j, k): v for k, v in new.items()})
            if j < ms.owners:
                inc.update(mx.prefixed(j, i))
        P = torch.stack(preds, 1)
        on = (mx.hedge_weights(ms.t["hedge_L"], state["on_L"], hc) * P).sum(1)
        d2 = (P - rating[:, None]) ** 2
        user["on_L"] = hc.gamma_u * state["on_L"] + d2
        if self.ug_cfg is not None:
            corr, user["on_gb"], user["on_gG"] = mx.user_genre_round(self.movie_genres(movie), on, rating,
                                                                    state["on_gb"], state["on_gG"], self.ug_cfg)
            on = on + corr
        on = self._clamp(on)
        if self.nb_cfg is not None:
            user.update(self._neighbours(state, torch.arange(len(movie)), movie, rating, on, learn_tables))
            on = on + user.pop("corr").to(on.device)
        decay = hc.gamma_g ** torch.arange(len(rating) - 1, -1, -1, device=d2.device, dtype=torch.float64)
        Lg = ms.t["hedge_L"]
        new_Lg = hc.gamma_g ** len(rating) * Lg.double() + (decay[:, None] * d2.double()).sum(0)
        inc["hedge_L"] = (None, (new_Lg - Lg.double()).to(Lg.dtype))
        return user, self._clamp(on), inc

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

    @torch.no_grad()
    def online_batch(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                     apply: bool = True) -> tuple[Tensor, dict[str, Tensor], dict[str, tuple[Tensor | None, Tensor]]]:
        """The online half of :meth:`learn_batch`: (the mixture's clamped
        predictions [U, T], new ``on_*`` state, the batch's increments summed
        per row; none when ``apply`` is off).  Round j runs the users that
        have a j-th event and merges its increments into the movie side
        before round j+1.  On CPU the compiled kernels
        (:mod:`models.online_kernel`, :func:`models.mixture.hedge`) run all
        the rounds; elsewhere :meth:`online_batch_rounds`, the torch reference."""
        if self._kernel_ok(state, movie):
            return self.online_batch_kernel(state, movie, rating, ts, mask, apply=apply)
        return self.online_batch_rounds(state, movie, rating, ts, mask, apply=apply)

    def _neighbours(self, user: State, row: Tensor, movie: Tensor, rating: Tensor, base: Tensor, learn: bool,
                    in_place: bool = False) -> dict[str, Tensor]:
        """The neighbourhood over events of users ``row`` (rows of ``user``'s
        ``on_n*``; each user's events in order) on top of ``base``: the
        corrections (``corr``) and the new ``on_n*`` rows (updated in place
        with ``in_place``, on CPU).  ``learn``: the tables learn the events."""
        hist = {k: user[k] if in_place else user[k].detach().cpu().clone() for k in ("on_nm", "on_ne", "on_nn")}
        tables = self.nb_tables
        assert tables is not None
        corr = nbr.neighbour_events(base.detach().cpu().numpy(), rating.detach().cpu().numpy(),
                                    row.cpu().numpy(), movie.detach().cpu().numpy(),
                                    *(hist[k].numpy() for k in ("on_nm", "on_ne", "on_nn")), tables, self.nb_cfg,
                                    learn)
        dev = user["on_nm"].device
        out = {k: v.to(dev) for k, v in hist.items()}
        out["corr"] = torch.from_numpy(corr.astype(np.float32))
        return out

    def _nb_grown(self, old: tuple[np.ndarray, ...] | None, capacity: int) -> tuple[np.ndarray, ...]:
        S = self.nb_cfg.slots
        new = (np.zeros((capacity, S), np.int32), *(np.zeros((capacity, S), np.float32) for _ in range(3)))
        for a, b in zip(old or (), new):
            b[: len(a)] = a[:capacity]
        return new

    def ensure_capacity(self, max_movie_id: int) -> bool:
        grown = super().ensure_capacity(max_movie_id)
        if grown and getattr(self, "nb_tables", None) is not None:
            self.nb_tables = self._nb_grown(self.nb_tables, self.capacity)
        return grown

    def adopt_local(self, old: RatingModel) -> None:
        """Keep the neighbourhood's tables a served model had learned (a swap
        brings new weights, not new neighbours)."""
        got = getattr(old, "nb_tables", None)
        if self.nb_tables is not None and got is not None and got[0].shape[1] == self.nb_tables[0].shape[1]:
            self.nb_tables = self._nb_grown(got, max(self.capacity, len(got[0])))
            if len(got[0]) > self.capacity:
                self.ensure_capacity(len(got[0]) - 1)

    def _kernel_ok(self, state: State, movie: Tensor) -> bool:
        """The kernels need CPU float32 tensors, the movie side contiguous (they
        update the buffers in place as numpy views)."""
        ms = self.movie_side()
        return movie.device.type == "cpu" and all(
            v.device.type == "cpu" and v.dtype == torch.float32 and v.is_contiguous() for v in ms.t.values()
        ) and all(state[k].device.type == "cpu" and (state[k].dtype == torch.float32 or not state[k].is_floating_point())
                  for k in state if k.startswith("on_"))

    @torch.no_grad()
    def online_batch_kernel(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                            apply: bool = True) -> tuple[Tensor, dict[str, Tensor], dict]:
        """:meth:`online_batch` through the compiled CPU kernels: each
        member's rounds in one call (its buffers updated in place), then the
        mixture over the same rounds."""
        from models.online_kernel import online_events, round_order

        u, j, starts = round_order(mask.numpy())
        user = {k: state[k].clone().contiguous() for k in state if k.startswith("on_")}
        mv, rt, tt = movie.numpy()[u, j], rating.numpy()[u, j].astype(np.float32), ts.numpy()[u, j]
        feats = self._feats(torch.from_numpy(mv)).numpy()
        uf = user["on_g"].numpy()[u] if "on_g" in user else np.zeros((len(u), 0), np.float32)
        ms = self.movie_side()
        P = np.empty((len(u), len(ms.members)), np.float32)
        inc: dict = {}
        # readers first: they read the movie side as the batch found it
        for jm in [*range(ms.owners, len(ms.members)), *range(ms.owners)]:
            last_ts = state["last_ts"].numpy().astype(np.int64)  # copies: the kernel advances them
            count = state["count"].numpy().astype(np.int64)
            P[:, jm], got = online_events(ms.members[jm], mx.member_user(user, jm), last_ts, count, u, mv, rt, tt,
                                          feats, uf, starts, apply and jm < ms.owners, self.rating_min,
                                          self.rating_max)
            inc.update(mx.prefixed(jm, got))
        Lg = ms.t["hedge_L"]
        before = Lg.clone()
        p = mx.hedge(P, rt, u, starts, user["on_L"].numpy(), Lg.numpy(), self.hedge_cfg, learn_global=apply)
        if self.ug_cfg is not None:
            g = self.movie_genres(torch.from_numpy(mv)).numpy()
            corr = mx.user_genre_events(p, rt, u, g, user["on_gb"].numpy(), user["on_gG"].numpy(), self.ug_cfg)
            p = np.clip(p + corr, self.rating_min, self.rating_max).astype(np.float32)
        if self.nb_cfg is not None:
            got = self._neighbours(user, torch.from_numpy(u), torch.from_numpy(mv), torch.from_numpy(rt),
                                   torch.from_numpy(p), apply, in_place=True)
            p = np.clip(p + got["corr"].numpy(), self.rating_min, self.rating_max).astype(np.float32)
        if apply and len(u):
            inc["hedge_L"] = (None, Lg - before)
        pred = torch.zeros(movie.shape, dtype=torch.float32)
        pred[torch.from_numpy(u), torch.from_numpy(j)] = torch.from_numpy(p)
        return pred, user, inc

    @torch.no_grad()
    def online_batch_rounds(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                            apply: bool = True) -> tuple[Tensor, dict[str, Tensor], dict]:
        """:meth:`online_batch` as a torch loop of :meth:`online_part` rounds:
        the reference the kernels are tested against, and the path on a GPU."""
        from models.batch import sum_increments

        ms = self.movie_side()
        # the members that own no tables read the movie side as the batch found it
        readers = [onl.MovieSide(m.cfg, 0, 0, 0, tensors={n: v.clone() for n, v in m.t.items()})
                   for m in ms.members[ms.owners:]]
        work = {k: state[k].clone() for k in state if k.startswith("on_") or k in ("last_ts", "count")}
        pred = torch.zeros(movie.shape, dtype=torch.float32, device=movie.device)
        parts = []
        for j in range(movie.shape[1]):
            u = torch.nonzero(mask[:, j]).flatten()
            if not len(u):
                continue
            sub = {k: v[u] for k, v in work.items()}
            user, p, inc = self.online_part(sub, movie[u, j], rating[u, j], ts[u, j], readers, learn_tables=apply)
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
        ids = movie_ids.to(torch.int64)
        ms = self.movie_side()
        each = torch.stack([self._member_score(side, mx.member_user(state, j), state, ids)
                            for j, side in enumerate(ms.members)], -1)  # [B, N, K]
        w = mx.hedge_weights(ms.t["hedge_L"], state["on_L"], self.hedge_cfg)
        on = (each * w[:, None, :]).sum(-1)
        if self.ug_cfg is not None:
            on = on + mx.genre_scores(self.movie_genres(ids), state["on_gb"])
        return self._blend(net, self._clamp(on))

    def _member_score(self, ms: onl.MovieSide, user: dict[str, Tensor], state: State, ids: Tensor) -> Tensor:
        """One member's online prediction of ``ids`` [B, N] for each user."""
        cfg, t = ms.cfg, ms.t
        mu = (t["mu"][0] + cfg.mu_prior * cfg.mu_prior_n) / (t["mu"][1] + cfg.mu_prior_n)
        qe = ms.q0(ids) + ms.row(t["q"], ids)
        pe = user["on_p"]
        bias = mu + ms.row(t["b"], ids)
        if cfg.use_features:
            f = self._feats(ids)
            qe = qe + f @ t["V"]
            pe = pe + state["on_g"] @ t["U"]
            bias = bias + f @ t["wm"]
        bu = user["on_ub"] + (state["on_g"] @ t["wu"] if cfg.use_features else 0.0)
        if cfg.use_session:  # as if rated now, in the same session (a per-user constant: no effect on ranking)
            bu = bu + user["on_s"] * (state["count"] > 0)
        return self._clamp(bias + user_item_dot(pe, qe) + (bu[:, None] if torch.is_tensor(bu) else bu))

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

    @torch.no_grad()
    def _online_sequence(self, state, movie, rating, ts, mask) -> tuple[Tensor, dict[str, Tensor]]:
        """The online part event by event with the movie side fixed, exactly as
        ``step`` computes it (a loop over T: its SGD updates are sequential)."""
        movie = torch.where(mask, movie.to(torch.int64), torch.zeros_like(movie, dtype=torch.int64))
        rating, ts = rating.to(torch.float32), ts.to(torch.int64)
        work = {k: v for k, v in state.items() if k.startswith("on_") or k in ("last_ts", "count")}
        preds = []
        for j in range(movie.shape[1]):
            m = mask[:, j]
            new, p, _ = self.online_part(work, movie[:, j], rating[:, j], ts[:, j])
            preds.append(p)
            work = {k: torch.where(m.view(-1, *([1] * (v.dim() - 1))), new[k], v) if k in new else v
                    for k, v in work.items()}
            work["last_ts"] = torch.where(m, ts[:, j], work["last_ts"])
            work["count"] = work["count"] + m.to(work["count"].dtype)
        pred = torch.stack(preds, 1) if preds else torch.zeros_like(rating)
        return pred, {k: v for k, v in work.items() if k.startswith("on_")}

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
