"""The serving-model protocol: what the worker, the API, the trainer and the
simulator may call on a rating model -- and nothing else.

The stream runs :meth:`RatingModel.step`: for a batch of users, each with
exactly one new event, it predicts the event's rating from the state *before*
the event, then folds the event into the state.  That is O(1) work per event;
a user's history is never re-read.  Training (and a worker batch holding
several events of one user) runs :meth:`RatingModel.forward_sequence` over
padded histories.  The two must agree: feeding events one at a time through
``step`` gives the same predictions and final state as the sequence forward
(``tests/test_model_protocol.py`` checks it for every registered family).

A state is a ``dict[str, Tensor]`` whose tensors share a leading batch
dimension.  Its layout is fixed by :meth:`RatingModel.state_spec`, so a
user's slice packs into about a kilobyte for Redis (:meth:`pack_states`,
format in ``models.state``).

Serving code never reaches past these methods (no ``getattr`` on tables, no
private attributes): a new family is one file in ``models/`` that implements
the abstract methods (most families subclass ``models.common.StatefulModel``,
which implements all but two of them) plus one line in ``models.registry``.

Example -- a user's life in the worker, with the toy family::

    >>> import torch
    >>> from models.registry import build
    >>> model = build("toy", n_movies=8)
    >>> state = model.init_state(2)                      # two users, no history
    >>> movie, rating, ts = torch.tensor([3, 5]), torch.tensor([4.0, 2.0]), torch.tensor([100, 100])
    >>> state, pred = model.step(state, movie, rating, ts)   # predict, then learn
    >>> pred.tolist()                                    # before any rating: the global mean
    [3.5, 3.5]
    >>> state["count"].tolist()
    [1, 1]

The same events as a padded sequence give the same predictions and state::

    >>> mask = torch.ones(2, 1, dtype=torch.bool)
    >>> seq_pred, seq_state = model.forward_sequence(
    ...     movie[:, None], rating[:, None], ts[:, None], mask, return_state=True)
    >>> torch.allclose(seq_pred[:, 0], pred)
    True

Scoring candidates (the top-K path) and the movies worth recommending::

    >>> model.score(state, torch.tensor([3, 5])).shape    # [users, candidates]
    torch.Size([2, 2])
    >>> model.candidate_ids().tolist()                   # untrained: every movie
    [0, 1, 2, 3, 4, 5, 6, 7]

Redis round trip, and what a new model version does to stored states::

    >>> blobs = model.pack_states(state)                 # one bytes per user
    >>> model.version = 2                                # a swap: new weights
    >>> back = model.unpack_states(blobs + [None])       # None: a user never seen
    >>> back.stale.tolist(), back.foreign.tolist()
    ([True, True, False], [False, False, False])
    >>> fresh = model.rederive(back.state, back.stale)   # recompute stale rows
    >>> fresh["count"].tolist()
    [1, 1, 0]

This module knows nothing of Kafka, Redis or Faust.
"""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, overload

import numpy as np
import torch
from torch import Tensor, nn

from models import state as mstate
from models.state import State, StateSpec

__all__ = ["Increments", "MovieSide", "RatingModel", "State", "StateSpec", "Unpacked"]

#: movie-side increments: ``name -> (row ids or None for a global tensor, delta)``
Increments = dict[str, tuple[Tensor | None, Tensor]]


class MovieSide(Protocol):
    """A model's online movie side: named tensors, every one a sum of
    increments so that concurrent workers merge by addition.

    ``ROW`` tensors have one row per movie id (first dimension: capacity);
    ``GLOBAL`` tensors are shared by all movies.  ``models.online_pack``
    packs any such side into the flat float32 vectors the stream stores in
    Redis (one per movie row, one for the globals), in this order.  The
    tensors are views over the model's buffers: writing them updates the
    model."""

    ROW: tuple[str, ...]
    GLOBAL: tuple[str, ...]
    t: dict[str, Tensor]

    def apply(self, inc: Increments) -> None:
        """Add increments to the tensors in place."""


class Unpacked(NamedTuple):
    """Stored states read back for a batch of users (rows in blob order)."""

    #: the states; new users (blob ``None``) and ``foreign`` rows hold ``init_state``
    state: State
    #: bool[B]: written under another version of this model -> :meth:`RatingModel.rederive`
    stale: Tensor
    #: bool[B]: written by another family or state layout -> reset to the initial state
    foreign: Tensor


class RatingModel(nn.Module, abc.ABC):
    """Shared weights plus a fixed-size per-user state.

    A family implements every ``@abstractmethod`` (Python refuses to build
    one that misses any).  ``set_movies``, ``genre_names``, ``movie_genres``,
    ``init_from_data`` and ``movie_l2`` have do-nothing defaults to override
    when the family has side information or trainable movie tables.  The rest
    (``init_state``, ``final_state``, ``candidate_ids``, ``pack_states``,
    ``unpack_states``, ``state_bytes``, ``device``) is built on those and is
    not overridden.
    """

    #: registry name ("lstm", "cnn", "mf", "baseline", "toy"); stored in state
    #: blobs and checkpoints, so it must stay stable once published
    name: ClassVar[str] = "base"

    def __init__(self) -> None:
        super().__init__()
        #: monotonically increasing serving version, set by checkpoints/promotion
        self.version: int = 0
        #: (capacity, device, version, ids) behind :meth:`candidate_ids`
        self._candidates: tuple[int, torch.device, int, Tensor] | None = None

    # -- construction ---------------------------------------------------
    @abc.abstractmethod
    def hparams(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (saved in checkpoints):
        ``build(name, **model.hparams())`` rebuilds the same architecture."""

    def set_movies(self, movies: Any) -> None:
        """Take movie side information (a DataFrame: movie_id, year, genres)
        before training.  Families without side features ignore it."""

    def add_movies(self, movies: Any) -> int:
        """Side information for movies met while serving (a DataFrame like
        :meth:`set_movies`'): only rows that have none are filled, every
        other row stays as it is; returns how many rows were filled.  Why:
        a movie the training data never had gets its genres and year from a
        catalogue as soon as it is rated.  Families without side features
        ignore it (0)."""
        return 0

    def movies_without_features(self, ids: np.ndarray) -> np.ndarray:
        """Those of ``ids`` (int64, distinct) whose side-feature rows are
        empty: what :meth:`add_movies` could fill (none for a family without
        side features)."""
        return np.zeros(0, np.int64)

    def genre_names(self) -> list[str]:
        """The genre vocabulary behind :meth:`movie_genres` (empty: none)."""
        return []

    def movie_genres(self, ids: Tensor) -> Tensor:
        """float32[..., len(genre_names())] genre multi-hot of movies ``ids``."""
        return torch.zeros((*ids.shape, 0), device=ids.device)

    # -- training -------------------------------------------------------
    def init_from_data(self, mean_rating: float) -> None:
        """Constants taken from the data before the first training (the
        global mean); a model that has been trained keeps its own."""

    def movie_l2(self, movie: Tensor) -> Tensor:
        """Sum of squares of the trainable movie-table rows that events with
        movies ``movie`` use (the trainer's L2 term; 0 if none)."""
        return torch.zeros((), device=movie.device)

    # -- vocabulary -----------------------------------------------------
    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """Movie ids ``[0, capacity)`` have rows; others score as unknown movies."""

    @abc.abstractmethod
    def ensure_capacity(self, max_movie_id: int) -> bool:
        """Grow movie tables so ``max_movie_id`` is addressable; True if grown."""

    @abc.abstractmethod
    def known_movies(self) -> Tensor:
        """bool[capacity]: rows the weights know something about (trained or
        given side features).  Feeds :meth:`candidate_ids`."""

    def candidate_ids(self) -> Tensor:
        """int64[M], sorted: the movies worth recommending -- the known ones,
        or every id when the model knows none.  On the model's device.

        Cached: computing it reads whole tables (and syncs with a GPU), while
        top-K runs every batch.  The cache is keyed by capacity, device and
        version, so growing tables, ``.to(device)`` and a new version (a
        fine-tuned copy) each recompute it."""
        key = (self.capacity, self.device, int(self.version))
        hit = self._candidates
        if hit is not None and hit[:3] == key:
            return hit[3]
        known = self.known_movies().detach()
        if bool(known.any()):
            ids = torch.nonzero(known).flatten().to(self.device)
        else:
            ids = torch.arange(self.capacity, device=self.device)
        self._candidates = (*key, ids)
        return ids

    # -- per-user state -------------------------------------------------
    @abc.abstractmethod
    def state_spec(self) -> StateSpec:
        """Name -> (per-user shape, dtype) of every state tensor, in packing order."""

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """States of ``batch_size`` users who have rated nothing yet (all zeros)."""
        device = device or self.device
        return {
            k: torch.zeros((batch_size, *shape), dtype=dt, device=device)
            for k, (shape, dt) in self.state_spec().items()
        }

    def pack_states(self, state: State) -> list[bytes]:
        """One Redis blob per row of ``state`` (layout in ``models.state``)."""
        return mstate.pack_batch(self, state)

    def unpack_states(
        self, blobs: list[bytes | None], device: torch.device | str | None = None
    ) -> Unpacked:
        """Blobs (``None``: a new user) -> states on ``device`` (default: the
        model's), with the rows to re-derive (``stale``) and the rows of
        another family or layout (``foreign``, reset to the initial state).
        A malformed blob raises :class:`fbp_errors.StateMismatch`."""
        return Unpacked(*mstate.unpack_batch(self, blobs, device))

    @abc.abstractmethod
    def recent_events(self, state: State) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What each state keeps of the user's latest events, oldest first and
        left-aligned: (movie int64, rating float32, ts int64, mask bool), each
        [B, W].  Top-K leaves these movies out; the API's profile shows them."""

    @abc.abstractmethod
    def rating_stats(self, state: State) -> tuple[Tensor, Tensor]:
        """(ratings seen int64[B], their mean float32[B]) over each user's
        whole history (the API's profile)."""

    def state_bytes(self) -> int:
        """Size of one packed user state (header + payload)."""
        return mstate.state_bytes(self)

    @abc.abstractmethod
    def rederive(self, state: State, stale: Tensor) -> State:
        """State after a weight change: rows where ``stale`` is True are
        recomputed with the current weights (from what the state keeps of the
        user's history), the others returned unchanged."""

    # -- streaming ------------------------------------------------------
    @abc.abstractmethod
    def step(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor) -> tuple[State, Tensor]:
        """One event per user: ``movie`` int64[B], ``rating`` float32[B], ``ts``
        int64[B] (unix seconds).  Returns (new state, float32[B] prediction made
        from the state *before* the event).  ``state`` is not modified."""

    @abc.abstractmethod
    def score(self, state: State, movie_ids: Tensor) -> Tensor:
        """Predicted ratings float32[B, M] of each user for candidate ids:
        int64[M] shared by every user (the top-K case) or int64[B, M] per user,
        "rated now": what :meth:`step` would predict for that movie at the
        time of the user's latest event (time-aware terms see no gap).
        Unknown ids score as a movie nobody rated."""

    # -- sequences ------------------------------------------------------
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

    @abc.abstractmethod
    def forward_sequence(
        self, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor, *,
        state: State | None = None, return_state: bool = False,
    ) -> Tensor | tuple[Tensor, State]:
        """Left-aligned padded histories [B, T] (``mask`` True on a prefix of
        real events) -> predictions float32[B, T], each made from the events
        before it, starting from ``state`` (default: new users).  With
        ``return_state`` also the state after each row's last real event.
        Equal to feeding the events through :meth:`step` one at a time."""

    def final_state(
        self, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor, *, state: State | None = None
    ) -> State:
        """The state after the padded histories (see :meth:`forward_sequence`)."""
        return self.forward_sequence(movie, rating, ts, mask, state=state, return_state=True)[1]

    # -- online learning -------------------------------------------------
    def movie_side(self) -> MovieSide | None:
        """The online movie side the stream learns from every event and shares
        between workers, or None (the default): the movie side stays as the
        checkpoint has it."""
        return None

    def learn_batch(self, state: State, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor,
                    learn_movies: bool = True) -> tuple[Tensor, State, Increments]:
        """Predict-then-learn a padded [U, T] batch (``models.batch.learn_batch``):
        (predictions [U, T], new states, the batch's movie-side increments,
        already applied to :meth:`movie_side`).  The default, for a model
        without an online side, runs :meth:`step` (T == 1) or
        :meth:`forward_sequence` and learns nothing shared.  A family with
        an online side learns it round by round (round j = each user's j-th
        event); ``learn_movies=False`` keeps it fixed and returns no increments."""
        if movie.shape[1] == 1:
            new, p = self.step(state, movie[:, 0], rating[:, 0], ts[:, 0])
            return p[:, None], new, {}
        p, new = self.forward_sequence(movie, rating, ts, mask, state=state, return_state=True)
        return p, new, {}

    def adopt_local(self, old: "RatingModel") -> None:
        """Take over what ``old``, the model this one replaces in a worker,
        learned locally and no checkpoint carries (side features added while
        serving, the neighbourhood's tables); nothing by default."""

    def start_network_share(self) -> None:
        """Give a network just trained from scratch its starting share of the
        served prediction (a family that learns the share on the stream);
        nothing by default."""

    def judging(self) -> AbstractContextManager[Any]:
        """Within: predictions as a fine-tune's judge compares a challenger
        with its champion.  The default changes nothing; a family whose
        network's share is learned on the stream fixes the share here, so a
        better network can win before it has earned any share."""
        return nullcontext()

    @property
    def network_weight(self) -> float:
        """The trained network's share of the served prediction: 1 by default;
        0 for a model whose predictions are all online learning (``online``),
        which the simulator then neither fine-tunes nor runs."""
        return 1.0

    @classmethod
    def hparams_from_users(cls, users: Any) -> dict[str, Any]:
        """Constructor arguments this family derives from the users' side
        information (a DataFrame: user_id, age, gender, occupation), e.g. the
        width of an online side's user features; none by default."""
        return {}

    # -- placement ------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")
