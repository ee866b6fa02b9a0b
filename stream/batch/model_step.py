"""Stage ``model_step``: the model once for the whole batch.

The users' new events form a padded [users, T] block fed to the network
*from the stored state* through :func:`models.batch.learn_batch` (the
simulators run the same function), so one user's events apply in order and
no history is re-read; a model with an online part also learns the movie
side round by round (round j = each user's j-th event of the batch).
Stored states the serving model cannot read as they are are re-derived
(an older version) or reset (another family or layout) -- counted, never a
crash: a family switch must not stop the stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.repos.movies import Adds
from core.repos.states import Stored
from models import state as mstate
from models.batch import learn_batch, occurrence_rank, pad_events
from stream import metrics as m
from stream.batch.movie_rows import Bases, MovieRows
from stream.batch.redis_load import Fresh
from stream.batch.serving import Serving
from stream.batch.types import Predicted

log = logging.getLogger(__name__)

STAGE = "model_step"


@dataclass
class Stepped:
    """The users' states after their events (rows in ``Fresh.users`` order),
    one prediction per fresh event made before it, each event's user row,
    and the movie-side writes the batch learned (None: nothing to add)."""

    state: mstate.State
    preds: np.ndarray
    uidx: np.ndarray
    adds: Adds | None


class ModelStep:
    def __init__(self, serving: Serving, movies: MovieRows) -> None:
        self.serving = serving
        self.movies = movies

    def run(self, fresh: Fresh, stored: list[Stored], bases: Bases | None, out: Predicted) -> Stepped:
        model, device = self.serving.model, self.serving.device
        model.ensure_capacity(max(ev.movie_id for ev, _ in fresh.work))
        users = fresh.users
        state = self.user_states(stored, out)
        row = {u: i for i, u in enumerate(users)}
        uidx = np.fromiter((row[ev.user_id] for ev, _ in fresh.work), dtype=np.int64, count=len(fresh.work))
        rank = occurrence_rank(uidx)
        # Built on the host; pinned when the model is on a GPU so the copies
        # below are asynchronous DMA transfers, one per tensor per batch.
        block = pad_events(uidx, rank, len(users), [ev.movie_id for ev, _ in fresh.work],
                           [ev.rating for ev, _ in fresh.work], [ev.ts for ev, _ in fresh.work],
                           pin=device.type == "cuda")
        with torch.inference_mode():
            block = tuple(x.to(device, non_blocking=True) for x in block)
            p, state, inc = learn_batch(model, state, *block, learn_movies=self.movies.store is not None)
            preds = p.float().cpu().numpy()[uidx, rank]
        return Stepped(state, preds, uidx, self.movies.adds(inc, bases))

    def user_states(self, stored: list[Stored], out: Predicted) -> mstate.State:
        """Stored states as the serving model reads them: re-derived from their
        window when of an older version, reset when unreadable."""
        blobs = [s.blob for s in stored]
        hashes = sum(s.foreign is not None for s in stored)  # Redis hashes of another key layout
        if hashes:  # read as new users (blob None); the store's next write replaces them
            m.STATES_RESET.labels("redis_layout").inc(hashes)
            out.reset += hashes
        state, stale, foreign = self.serving.model.unpack_states(blobs, self.serving.device)
        out.rederived = int(stale.sum())
        if out.rederived:
            state = self.serving.model.rederive(state, stale)
        if bool(foreign.any()):
            self._count_resets([b for b, f in zip(blobs, foreign.tolist()) if f], out)
        return state

    def _count_resets(self, blobs: list[bytes | None], out: Predicted) -> None:
        model = self.serving.model
        reasons: dict[str, int] = {}
        for blob in blobs:
            try:
                name = mstate.parse_header(bytes(blob or b""))[0]
                why = "model_family" if name != model.name else "state_layout"
            except mstate.StateMismatch:
                why = "malformed"
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in reasons.items():
            m.STATES_RESET.labels(why).inc(n)
        out.reset += len(blobs)
        if not self.serving.reset_logged:  # once per swap: every user of the old family will follow
            self.serving.reset_logged = True
            log.warning("resetting user states %s cannot read (%s): they start afresh "
                        "(counted in fbp_states_reset_total)", f"{model.name} v{model.version}", reasons)
