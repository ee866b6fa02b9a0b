"""The one small protocol every rating model speaks.

The stream runs :meth:`RatingModel.step`: for a batch of users, each with
exactly one new event, it predicts the event's rating from the state *before*
the event, then folds the event into the state.  That is O(1) work per event;
a user's history is never re-read.  Training runs
:meth:`RatingModel.forward_sequence` over padded histories.  The two must
agree: feeding events one at a time through ``step`` gives the same
predictions as the sequence forward (a property test checks it).

A state is a ``dict[str, Tensor]`` whose tensors share a leading batch
dimension.  Its layout is fixed by :meth:`RatingModel.state_spec`, so a
user's slice packs into a few hundred bytes for Redis (see ``models.state``).

This module knows nothing of Kafka, Redis or Faust.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

State = dict[str, Tensor]
StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


class RatingModel(nn.Module):
    """Base class: shared weights plus a per-user fixed-size state."""

    #: registry name: "lstm", "cnn", "mf", "baseline"
    name: ClassVar[str] = "base"

    def __init__(self) -> None:
        super().__init__()
        #: monotonically increasing serving version, set by checkpoints/promotion
        self.version: int = 0

    # -- construction ---------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (saved in checkpoints)."""
        raise NotImplementedError

    # -- per-user state -------------------------------------------------
    def state_spec(self) -> StateSpec:
        """Name -> (per-user shape, dtype) of every state tensor."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """States of ``batch_size`` users who have rated nothing yet."""
        device = device or self.device
        return {
            k: torch.zeros((batch_size, *shape), dtype=dt, device=device)
            for k, (shape, dt) in self.state_spec().items()
        }

    # -- streaming ------------------------------------------------------
    def step(
        self, state: State, movie: Tensor, rating: Tensor, ts: Tensor
    ) -> tuple[State, Tensor]:
        """One event per user: ``movie`` int64[B], ``rating`` float32[B], ``ts`` int64[B]
        (unix seconds).  Returns (new state, prediction made before the event)."""
        raise NotImplementedError

    def score(self, state: State, movie_ids: Tensor) -> Tensor:
        """Predicted ratings float32[B, M] of each user for each candidate movie."""
        raise NotImplementedError

    # -- training -------------------------------------------------------
    def forward_sequence(
        self, movie: Tensor, rating: Tensor, ts: Tensor, mask: Tensor
    ) -> Tensor:
        """Padded histories [B, T] (mask True on real events) -> predictions [B, T],
        each made from the events before it, exactly as ``step`` would."""
        raise NotImplementedError

    # -- vocabulary -----------------------------------------------------
    def ensure_capacity(self, max_movie_id: int) -> bool:
        """Grow movie tables so ``max_movie_id`` is addressable; True if grown."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")
