"""The served ``lstm``'s online part: the Hedge mixture of online learners
(:mod:`models.mixture`), the per-user x genre biases on its errors and the
item neighbourhood on those (:mod:`models.neighbours`), over the model's online
movie side and the users' ``on_*`` state.

Why a module of its own: :mod:`models.lstm` is the network and how the two
halves are blended; this is everything the online half computes, in its
three forms -- one event per user (:meth:`OnlinePart.online_part`, the
torch reference, also ``step``'s), a padded batch through the compiled
kernels (:meth:`OnlinePart.online_batch_kernel`, the worker's CPU path) and
the same batch as a loop of rounds (:meth:`OnlinePart.online_batch_rounds`,
the GPU path and the kernels' test oracle).  A mixin: it reads the
configuration and buffers :class:`models.lstm.LSTMModel` sets up.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models import mixture as mx
from models import neighbours as nbr
from models import online as onl
from models.base import RatingModel, State
from models.common import user_item_dot


class OnlinePart:
    """The online half of :class:`models.lstm.LSTMModel` (a mixin over its
    ``online_*`` buffers, ``online_members``, ``hedge_cfg``, ``ug_cfg``,
    ``nb_cfg``/``nb_tables`` and the feature lookups)."""

    @property
    def _owners(self) -> int:
        """How many members own movie tables (the first ones; 1: all share member 0's)."""
        return self.movie_side_owners

    def _member_cfgs(self) -> list[onl.OnlineConfig]:
        return mx.member_configs(self.online_cfg, self.online_members)

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
                    in_place: bool = False, starts: np.ndarray | None = None) -> dict[str, Tensor]:
        """The neighbourhood over the rounds ``starts`` (default: one round,
        one event per user) of events of users ``row`` (rows of ``user``'s
        ``on_n*``) on top of ``base``: the corrections (``corr``) and the new
        ``on_n*`` rows (updated in place with ``in_place``, on CPU).
        ``learn``: the tables learn the events."""
        hist = {k: user[k] if in_place else user[k].detach().cpu().clone() for k in ("on_nm", "on_ne", "on_nn")}
        tables = self.nb_tables
        assert tables is not None
        corr = nbr.neighbour_events(base.detach().cpu().numpy(), rating.detach().cpu().numpy(),
                                    row.cpu().numpy(), movie.detach().cpu().numpy(),
                                    *(hist[k].numpy() for k in ("on_nm", "on_ne", "on_nn")), tables, self.nb_cfg,
                                    learn, np.asarray([0, len(row)]) if starts is None else starts)
        dev = user["on_nm"].device
        out = {k: v.to(dev) for k, v in hist.items()}
        out["corr"] = torch.from_numpy(corr.astype(np.float32))
        return out

    def _nb_grown(self, old: np.ndarray | None, capacity: int) -> np.ndarray:
        new = nbr.new_tables(capacity, self.nb_cfg.slots)
        if old is not None:
            new[: len(old)] = old[:capacity]
        return new

    def adopt_local(self, old: RatingModel) -> None:
        """Keep the neighbourhood's tables a served model had learned (a swap
        brings new weights, not new neighbours)."""
        super().adopt_local(old)  # type: ignore[misc]
        got = getattr(old, "nb_tables", None)
        if self.nb_tables is not None and got is not None and got.shape[1] == self.nb_tables.shape[1]:
            self.nb_tables = self._nb_grown(got, max(self.capacity, len(got)))
            if len(got) > self.capacity:
                self.ensure_capacity(len(got) - 1)

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
                                   torch.from_numpy(p), apply, in_place=True, starts=starts)
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

    def _member_score(self, ms: onl.MovieSide, user: dict[str, Tensor], state: State, ids: Tensor,
                      movie_part: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """One member's online prediction of ``ids`` [B, N] for each user;
        ``movie_part``: its side's :meth:`_movie_part` (shared by members that
        read the same movie side)."""
        cfg, t = ms.cfg, ms.t
        qe, bias = movie_part or self._movie_part(ms, ids)
        pe = user["on_p"]
        if cfg.use_features:
            pe = pe + state["on_g"] @ t["U"]
        bu = user["on_ub"] + (state["on_g"] @ t["wu"] if cfg.use_features else 0.0)
        if cfg.use_session:  # as if rated now, in the same session (a per-user constant: no effect on ranking)
            bu = bu + user["on_s"] * (state["count"] > 0)
        return self._clamp(bias + user_item_dot(pe, qe) + (bu[:, None] if torch.is_tensor(bu) else bu))

    def _movie_part(self, ms: onl.MovieSide, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The movie side's share of a score: (factor with features, bias with mean)."""
        cfg, t = ms.cfg, ms.t
        mu = (t["mu"][0] + cfg.mu_prior * cfg.mu_prior_n) / (t["mu"][1] + cfg.mu_prior_n)
        qe = ms.q0(ids) + ms.row(t["q"], ids)
        bias = mu + ms.row(t["b"], ids)
        if cfg.use_features:
            f = self._feats(ids)
            qe = qe + f @ t["V"]
            bias = bias + f @ t["wm"]
        return qe, bias

    @torch.no_grad()
    def _online_sequence(self, state, movie, rating, ts, mask) -> tuple[Tensor, dict[str, Tensor]]:
        """The online part event by event with the movie side fixed, exactly as
        ``step`` computes it: on CPU the compiled kernels with nothing shared
        learned (``apply=False``), else a torch loop over T (its SGD updates
        are sequential)."""
        if self._kernel_ok(state, movie):
            pred, user, _ = self.online_batch_kernel(state, movie, rating.to(torch.float32), ts, mask, apply=False)
            return pred, user
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

    def online_score(self, state: State, ids: Tensor) -> Tensor:
        """The online part's prediction of movies ``ids`` for each user [B, N]:
        the mixture of the members' scores at the user's weights, plus the
        genre biases (top-K ranks by it; the neighbourhood is left out)."""
        ms = self.movie_side()
        parts: dict[int, tuple[Tensor, Tensor]] = {}  # members on one movie side share its part
        for side in ms.members:
            if id(side.t["q"]) not in parts:
                parts[id(side.t["q"])] = self._movie_part(side, ids)
        w = mx.hedge_weights(ms.t["hedge_L"], state["on_L"], self.hedge_cfg)
        on = None
        for j, side in enumerate(ms.members):  # accumulated member by member: no [B, N, K] block
            sc = self._member_score(side, mx.member_user(state, j), state, ids, parts[id(side.t["q"])])
            on = sc.mul_(w[:, j:j + 1]) if on is None else on.add_(sc.mul_(w[:, j:j + 1]))
        if self.ug_cfg is not None:
            on = on + mx.genre_scores(self.movie_genres(ids), state["on_gb"])
        return self._clamp(on)

