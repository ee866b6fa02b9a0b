"""Machinery shared by every rating model: movie tables that grow, movie side
features, the generic per-user state (count, running mean, last timestamp and a
window of the last ``W`` events) and the running user bias.

Conventions
-----------
* Movie ids index the movie tables directly.  Ids outside ``[0, capacity)``
  read as all-zero rows ("unknown movie"), so nothing ever raises or goes NaN;
  :meth:`StatefulModel.ensure_capacity` grows every table by powers of two with
  zero rows.
* The window is a shift register, right-aligned: slot ``W-1`` is the newest
  event, the ``win_len`` newest slots are real and the rest are zero.
* ``forward_sequence`` takes *left-aligned* padded histories: ``mask[b]`` is
  ``True`` on a prefix ``[0, L_b)``.  It may start from an existing state
  (``state=``) and return the final state (``return_state=True``); from the
  same start it gives the same predictions and the same final state as feeding
  the events one at a time through ``step``.
* Predictions are clamped to ``[rating_min, rating_max]`` in every path.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor, nn

from models import state as mstate
from models.base import RatingModel, State, StateSpec

HOUR = 3600.0


def next_pow2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def lookup(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]`` with out-of-range ids reading as zero rows."""
    cap = table.shape[0]
    valid = (ids >= 0) & (ids < cap)
    out = table[ids.clamp(0, cap - 1)]
    v = valid.to(out.dtype)
    if out.dim() > ids.dim():
        v = v.unsqueeze(-1)
    return out * v


def user_item_dot(user: Tensor, item: Tensor) -> Tensor:
    """Dot products [B, M] of user vectors [B, D] with item vectors: [B, M, D]
    (per-user candidates) or [M, D] (candidates shared by all users: one matmul
    instead of materialising the [B, M, D] copy)."""
    if item.dim() == 2:
        return user @ item.T
    return (item * user.unsqueeze(-2)).sum(-1)


def excl_cumsum(start: Tensor, x: Tensor) -> Tensor:
    """Running sums *before* each position along dim 1, starting from ``start``
    (summed in the same order as repeated ``+=`` in ``step``)."""
    c = torch.cumsum(torch.cat([start.unsqueeze(1), x], 1), 1)
    return c[:, :-1]


def incl_total(start: Tensor, x: Tensor) -> Tensor:
    """``start + x[:, 0] + x[:, 1] + ...`` in step order (padding must be zero)."""
    return torch.cumsum(torch.cat([start.unsqueeze(1), x], 1), 1)[:, -1]


def ragged_sums(start: Tensor, x: Tensor, row: Tensor) -> tuple[Tensor, Tensor]:
    """Running sums over the real events of a padded batch, flattened: ``x``
    [N, ...] holds them row by row in order (``mask.nonzero()`` order) and
    ``row`` [N] says whose each is.  Returns (each event's sums *before* it,
    starting from ``start[row]``, in float64 [N, ...]; each row's total after
    its events [B, ...], ``start``'s dtype).  One cumsum over the N events,
    not over the [B, T] block, which is mostly padding when a few users have
    many events.  Float64, so taking each row's offset out of the running
    total loses nothing, and ``step``'s float32 ``+=`` agrees to rounding."""
    xd = x.double()
    excl = torch.cumsum(xd, 0) - xd
    first = torch.ones_like(row, dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]
    seg = torch.cumsum(first.to(torch.int64), 0) - 1
    before = start.double()[row] + excl - excl[first][seg]
    total = start.double().index_add(0, row, xd)
    return before, total.to(start.dtype)


def gap_feature(gap_s: Tensor) -> Tensor:
    """Log time gap, scaled to roughly [0, 1.5] for gaps up to years."""
    return torch.log1p(gap_s.clamp(min=0).to(torch.float32) / HOUR) / 6.0


def movie_feature_rows(movies: Any, genre_vocab: list[str], year_min: float, year_max: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(movie ids int64[n], their rows float32[n, n_f]): [genre multi-hot |
    normalised year | year known] of each movie of a movies DataFrame."""
    n_f = len(genre_vocab) + 2
    if movies is None or len(movies) == 0:
        return np.zeros(0, np.int64), np.zeros((0, n_f), np.float32)
    ids = np.asarray(movies["movie_id"], np.int64)
    rows = np.zeros((len(ids), n_f), dtype=np.float32)
    gidx = {g: i for i, g in enumerate(genre_vocab)}
    span = max(float(year_max) - float(year_min), 1.0)
    for r, (year, genres) in enumerate(zip(movies["year"], movies["genres"])):
        for g in genres if genres is not None else ():
            j = gidx.get(g)
            if j is not None:
                rows[r, j] = 1.0
        if year is not None and not (isinstance(year, float) and math.isnan(year)):
            rows[r, -2] = float(np.clip((float(year) - year_min) / span, -1.0, 2.0))
            rows[r, -1] = 1.0
    return ids, rows


def movie_feature_matrix(
    movies: Any, genre_vocab: list[str], year_min: float, year_max: float, capacity: int
) -> Tensor:
    """Rows ``movie_id`` -> [genre multi-hot | normalised year | year known]."""
    feats = np.zeros((capacity, len(genre_vocab) + 2), dtype=np.float32)
    ids, rows = movie_feature_rows(movies, genre_vocab, year_min, year_max)
    inside = (ids >= 0) & (ids < capacity)
    feats[ids[inside]] = rows[inside]
    return torch.from_numpy(feats)


class StatefulModel(RatingModel):
    """The protocol implemented once for every family that keeps the generic
    per-user state (count, running mean, last timestamp, a window of the last
    ``W`` events and, optionally, the residual-sum user bias).  It provides
    ``step``, ``forward_sequence``, ``score``, growing movie tables,
    ``known_movies`` and ``rederive`` (a fresh pass over the stored window).

    Subclassing contract -- a family (one file in ``models/``) sets ``name``
    and implements two hooks; the others are optional:

    ``_predict_state(state, ids) -> Tensor``  (required)
        Unclamped predictions [B, M] from ``state`` for ids [B, M] or shared
        ids [M].  Used by ``step`` (the event's movie) and ``score``.
    ``_sequence(state, movie, rating, ts, mask, want_state) -> (Tensor, State)``  (required)
        Unclamped predictions [B, T] for zero-padded histories starting from
        ``state``, each from the events before it; with ``want_state`` also
        the family's own state keys after each row's last real event
        (``{}`` if it has none).  Must equal repeated ``_predict_state`` +
        ``_step_extra``: the property test checks it.
    ``_spec_extra() -> StateSpec``  (optional, default none)
        The family's own per-user state tensors, beside the generic ones.
    ``_step_extra(state, movie, rating, ts) -> State``  (optional)
        The family's own state keys after one event (from the state before it).

    Class attributes: ``movie_tables`` (parameters/buffers whose first
    dimension is the movie capacity: grown together by ``ensure_capacity``)
    and ``uses_resid_bias`` (keep ``resid_sum``/``resid_n`` in the state for
    :meth:`_user_bias`).  Helpers for hooks: ``_bias`` (movie bias + side
    feature bias), ``_feats``, ``_user_bias``, ``_resid_before``, ``_gap_step``,
    ``_gap_seq``, ``_clamp``.
    """

    #: names of parameters/buffers whose first dimension is the movie capacity
    movie_tables: tuple[str, ...] = ("movie_bias", "movie_features")
    #: does the model keep the residual-sum user bias in its state?
    uses_resid_bias: bool = True

    def __init__(
        self,
        n_movies: int = 2048,
        window: int = 32,
        lambda_u: float = 5.0,
        genre_vocab: list[str] | None = None,
        year_min: float = 1920.0,
        year_max: float = 2000.0,
        rating_min: float = 1.0,
        rating_max: float = 5.0,
        global_mean: float = 3.5,
    ) -> None:
        super().__init__()
        self._hp: dict[str, Any] = dict(
            n_movies=int(n_movies), window=int(window), lambda_u=float(lambda_u),
            genre_vocab=list(genre_vocab or []), year_min=float(year_min), year_max=float(year_max),
            rating_min=float(rating_min), rating_max=float(rating_max), global_mean=float(global_mean),
        )
        self.W = int(window)
        self.lambda_u = float(lambda_u)
        self.genre_vocab = list(genre_vocab or [])
        self.n_features = len(self.genre_vocab) + 2
        self.rating_min, self.rating_max = float(rating_min), float(rating_max)
        cap = next_pow2(n_movies)
        self.movie_bias = nn.Parameter(torch.zeros(cap))
        #: bias from side features: a movie nobody rated yet still gets a genre/year prior
        self.feat_bias = nn.Parameter(torch.zeros(self.n_features))
        self.register_buffer("movie_features", torch.zeros(cap, self.n_features))
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        #: 1 once ``fit`` has set the global mean from data
        self.register_buffer("trained", torch.tensor(0, dtype=torch.int64))

    # -- construction ---------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        hp = dict(self._hp)
        hp["n_movies"] = self.capacity
        return hp

    @property
    def capacity(self) -> int:
        return int(self.movie_bias.shape[0])

    def _emb(self, n: int, dim: int, std: float = 0.05) -> nn.Parameter:
        return nn.Parameter(torch.randn(n, dim) * std)

    def set_movies(self, movies: Any) -> None:
        """Fill ``movie_features`` from a movies DataFrame (movie_id, year, genres)."""
        if movies is not None and len(movies):
            self.ensure_capacity(int(movies["movie_id"].max()))
        hp = self._hp
        feats = movie_feature_matrix(movies, self.genre_vocab, hp["year_min"], hp["year_max"], self.capacity)
        with torch.no_grad():
            self.movie_features.copy_(feats.to(self.movie_features.device))

    def add_movies(self, movies: Any) -> int:
        ids, rows = movie_feature_rows(movies, self.genre_vocab, self._hp["year_min"], self._hp["year_max"])
        keep = (ids >= 0) & rows.any(1)
        if not keep.any():
            return 0
        return self._fill_feature_rows(ids[keep], rows[keep])

    def movies_without_features(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        blank = ids >= 0
        inside = blank & (ids < self.capacity)
        if inside.any():
            rows = self.movie_features[torch.from_numpy(ids[inside]).to(self.movie_features.device)]
            blank[inside] = ~(rows != 0).any(1).cpu().numpy()
        return ids[blank]

    def adopt_local(self, old: RatingModel) -> None:
        """Keep the side features ``old`` was given while serving
        (:meth:`add_movies`) where this model has none and both read the same
        features (genre vocabulary, year span)."""
        super().adopt_local(old)
        got = getattr(old, "movie_features", None)
        if (got is None or getattr(old, "genre_vocab", None) != self.genre_vocab
                or any(old.hparams().get(k) != self._hp[k] for k in ("year_min", "year_max"))):
            return
        ids = np.nonzero((got != 0).any(1).cpu().numpy())[0]
        if len(ids):
            self._fill_feature_rows(ids, got[torch.from_numpy(ids).to(got.device)].cpu().numpy())

    def _fill_feature_rows(self, ids: np.ndarray, rows: np.ndarray) -> int:
        """:meth:`add_movies` from feature rows already built."""
        self.ensure_capacity(int(ids.max()))
        blank = np.isin(ids, self.movies_without_features(ids))
        if not blank.any():
            return 0
        dev = self.movie_features.device
        with torch.no_grad():
            self.movie_features[torch.from_numpy(ids[blank]).to(dev)] = torch.from_numpy(rows[blank]).to(dev)
        self._candidates = None  # a movie with features is a top-K candidate now
        return int(blank.sum())

    def genre_names(self) -> list[str]:
        return list(self.genre_vocab)

    def movie_genres(self, ids: Tensor) -> Tensor:
        return self._feats(ids)[..., : len(self.genre_vocab)]

    def init_from_data(self, mean_rating: float) -> None:
        if int(self.trained) == 0:
            with torch.no_grad():
                self.global_mean.fill_(float(mean_rating))
                self.trained.fill_(1)

    def movie_l2(self, movie: Tensor) -> Tensor:
        total = torch.zeros((), device=movie.device)
        for name in self.movie_tables:
            t = getattr(self, name)
            if isinstance(t, nn.Parameter):
                total = total + t[movie.clamp(0, t.shape[0] - 1)].pow(2).sum()
        return total

    def known_movies(self) -> Tensor:
        """Rows with a trained bias or side features."""
        cap = self.capacity
        known = (self.movie_bias.detach() != 0) | (self.movie_features.detach().reshape(cap, -1) != 0).any(1)
        return known

    def ensure_capacity(self, max_movie_id: int) -> bool:
        need = int(max_movie_id) + 1
        if need <= self.capacity:
            return False
        new_cap = next_pow2(need)
        for name in self.movie_tables:
            old = getattr(self, name)
            grown = torch.zeros((new_cap, *old.shape[1:]), dtype=old.dtype, device=old.device)
            grown[: old.shape[0]] = old.detach()
            if isinstance(old, nn.Parameter):
                setattr(self, name, nn.Parameter(grown, requires_grad=old.requires_grad))
            else:
                self._buffers[name] = grown
        return True

    # -- state ----------------------------------------------------------
    def state_spec(self) -> StateSpec:
        W = self.W
        spec: StateSpec = {
            "count": ((), torch.int64),
            "mean": ((), torch.float32),
            "last_ts": ((), torch.int64),
            "win_movie": ((W,), torch.int64),
            "win_rating": ((W,), torch.float32),
            "win_ts": ((W,), torch.int64),
            "win_len": ((), torch.int16),
        }
        if self.uses_resid_bias:
            spec["resid_sum"] = ((), torch.float32)
            spec["resid_n"] = ((), torch.float32)
        spec.update(self._spec_extra())
        return spec

    def _spec_extra(self) -> StateSpec:
        return {}

    # -- helpers ----------------------------------------------------------
    def _clamp(self, x: Tensor) -> Tensor:
        return x.clamp(self.rating_min, self.rating_max)

    def _bias(self, ids: Tensor) -> Tensor:
        return lookup(self.movie_bias, ids) + self._feats(ids) @ self.feat_bias

    def _feats(self, ids: Tensor) -> Tensor:
        return lookup(self.movie_features, ids)

    def _user_bias(self, resid_sum: Tensor, resid_n: Tensor) -> Tensor:
        return resid_sum / (resid_n + self.lambda_u)

    def _generic_step(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor) -> State:
        cnt = state["count"] + 1
        out = {
            "count": cnt,
            "mean": state["mean"] + (rating - state["mean"]) / cnt.to(torch.float32),
            "last_ts": ts.to(torch.int64),
            "win_movie": torch.cat([state["win_movie"][:, 1:], movie[:, None]], 1),
            "win_rating": torch.cat([state["win_rating"][:, 1:], rating[:, None]], 1),
            "win_ts": torch.cat([state["win_ts"][:, 1:], ts[:, None].to(torch.int64)], 1),
            "win_len": (state["win_len"] + 1).clamp(max=self.W),
        }
        if self.uses_resid_bias:
            resid = rating - self.global_mean - self._bias(movie)
            out["resid_sum"] = state["resid_sum"] + resid
            out["resid_n"] = state["resid_n"] + 1.0
        return out

    def _gap_step(self, state: State, ts: Tensor) -> Tensor:
        has = state["count"] > 0
        return gap_feature((ts - state["last_ts"]) * has)

    def _gap_seq(self, state: State, ts: Tensor) -> Tensor:
        prev = torch.cat([state["last_ts"][:, None], ts[:, :-1]], 1)
        has = torch.ones_like(ts, dtype=torch.bool)
        has[:, 0] = state["count"] > 0
        return gap_feature((ts - prev) * has)

    def _generic_final(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor) -> State:
        W = self.W
        L = mask.sum(1)
        mf = mask.to(torch.float32)
        cnt = state["count"] + L
        # the running mean after the sequence, in closed form (float64): equals
        # step's sequential float32 updates to rounding, without a loop over T
        total = state["mean"].double() * state["count"].double() + (rating.double() * mf.double()).sum(1)
        mean = torch.where(L > 0, total / cnt.clamp(min=1).double(), state["mean"].double()).to(torch.float32)
        last_idx = (L - 1).clamp(min=0)
        last_ts = torch.where(L > 0, ts.gather(1, last_idx[:, None])[:, 0], state["last_ts"])
        idx = L[:, None] + torch.arange(W, device=movie.device)[None, :]
        mz = lambda x, fill: torch.where(mask, x, torch.full_like(x, fill))  # noqa: E731
        out = {
            "count": cnt,
            "mean": mean,
            "last_ts": last_ts,
            "win_movie": torch.cat([state["win_movie"], mz(movie, 0)], 1).gather(1, idx),
            "win_rating": torch.cat([state["win_rating"], mz(rating, 0.0)], 1).gather(1, idx),
            "win_ts": torch.cat([state["win_ts"], mz(ts.to(torch.int64), 0)], 1).gather(1, idx),
            "win_len": (state["win_len"].to(torch.int64) + L).clamp(max=W).to(torch.int16),
        }
        if self.uses_resid_bias:
            resid = (rating - self.global_mean - self._bias(movie)) * mf
            out["resid_sum"] = incl_total(state["resid_sum"], resid)
            out["resid_n"] = incl_total(state["resid_n"], mf)
        return out

    def _resid_before(self, state: State, movie: Tensor, rating: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """User-bias running sums *before* each event of a sequence."""
        mf = mask.to(torch.float32)
        resid = (rating - self.global_mean - self._bias(movie)) * mf
        return excl_cumsum(state["resid_sum"], resid), excl_cumsum(state["resid_n"], mf)

    # -- public protocol ----------------------------------------------------
    def step(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor) -> tuple[State, Tensor]:
        movie = movie.to(torch.int64)
        rating = rating.to(torch.float32)
        ts = ts.to(torch.int64)
        pred = self._clamp(self._predict_state(state, movie[:, None])[:, 0])
        new = self._generic_step(state, movie, rating, ts)
        new.update(self._step_extra(state, movie, rating, ts))
        return new, pred

    def score(self, state: State, movie_ids: Tensor) -> Tensor:
        """Predictions [B, M] for candidate ids: [M] shared by every user (the
        top-K case: movie-side terms are computed once and combined with a
        matmul) or [B, M] per user."""
        return self._clamp(self._predict_state(state, movie_ids.to(torch.int64)))

    @overload
    def forward_sequence(
        self, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor, *,
        state: State | None = None, return_state: Literal[False] = False,
    ) -> Tensor: ...

    @overload
    def forward_sequence(
        self, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor, *,
        state: State | None = None, return_state: Literal[True],
    ) -> tuple[Tensor, State]: ...

    def forward_sequence(
        self,
        movie: Tensor,
        rating: Tensor,
        ts: Tensor,
        mask: Tensor,
        *,
        state: State | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, State]:
        movie = movie.to(torch.int64)
        rating = rating.to(torch.float32)
        ts = ts.to(torch.int64)
        mask = mask.to(torch.bool)
        if state is None:
            state = self.init_state(movie.shape[0], movie.device)
        # zero padded positions so garbage never enters a computation
        movie = torch.where(mask, movie, torch.zeros_like(movie))
        rating = torch.where(mask, rating, torch.zeros_like(rating))
        ts = torch.where(mask, ts, torch.zeros_like(ts))
        pred, extra = self._sequence(state, movie, rating, ts, mask, return_state)
        pred = self._clamp(pred)
        if not return_state:
            return pred
        final = self._generic_final(state, movie, rating, ts, mask)
        final.update(extra)
        return pred, final

    def recent_events(self, state: State) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return mstate.window_sequence(self, state)

    def rating_stats(self, state: State) -> tuple[Tensor, Tensor]:
        return state["count"], state["mean"]

    def rederive(self, state: State, stale: Tensor) -> State:
        """Stale rows: a fresh pass over each stored window with the current
        weights (``count``, ``mean`` and ``last_ts`` are kept: they describe
        the whole history and do not depend on weights)."""
        return mstate.after_swap(self, state, stale)

    # -- hooks (the subclassing contract in the class docstring) -------------
    @abc.abstractmethod
    def _predict_state(self, state: State, ids: Tensor) -> Tensor:
        """Unclamped predictions [B, M] from ``state`` for candidate ids [B, M],
        or [M] shared by all users (see :func:`user_item_dot`)."""

    def _step_extra(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor) -> State:
        return {}

    @abc.abstractmethod
    def _sequence(
        self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor, want_state: bool
    ) -> tuple[Tensor, State]:
        """Unclamped predictions [B, T] and (if ``want_state``) final model-specific state."""
