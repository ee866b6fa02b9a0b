"""The model the stages serve, and its hot swap.

A new model is offered at any time and takes over at the start of a batch,
never in the middle of one; the stages share this one object, so they all
see the swap at once."""

from __future__ import annotations

import logging

import torch

from models.base import RatingModel
from stream import metrics as m

log = logging.getLogger(__name__)


class Serving:
    def __init__(self, model: RatingModel, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        #: offered, not yet serving
        self.pending: RatingModel | None = None
        #: the once-per-swap warning about unreadable states was given
        self.reset_logged = False
        m.MODEL_VERSION.set(model.version)
        m.MODEL_INFO.labels(model=model.name, device=self.device.type).set(1)

    @property
    def latest(self) -> RatingModel:
        """The offered model if there is one, else the serving one."""
        return self.pending or self.model

    def offer(self, model: RatingModel) -> None:
        """Queue a new model; it takes over at the start of the next batch."""
        self.pending = model

    def swap(self) -> bool:
        """Serve the offered model, if any; True if it swapped."""
        if self.pending is None:
            return False
        new, self.pending = self.pending, None
        old = self.model
        new.adopt_local(old)  # e.g. the neighbourhood's tables, learned here and never saved
        self.model = new.to(self.device).eval()
        self.reset_logged = False
        m.MODEL_INFO.remove(old.name, self.device.type)
        m.MODEL_INFO.labels(model=new.name, device=self.device.type).set(1)
        m.MODEL_VERSION.set(new.version)
        m.SWAPS.inc()
        log.info("model swapped: %s v%d -> %s v%d", old.name, old.version, new.name, new.version)
        return True
