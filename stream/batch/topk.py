"""Stage ``topk``: each user's top-K, scored once after all of its events in
the batch (the ranking itself is :func:`stream.topk.top_k`, shared with the
query API)."""

from __future__ import annotations

import torch

from models import state as mstate
from models.base import RatingModel
from stream.topk import top_k

STAGE = "topk"

#: per user: [[movie id, score], ...]
TopLists = list[list[list[float]]]


def user_top_k(model: RatingModel, state: mstate.State, n_users: int, k: int) -> TopLists:
    """One top-K list per row of ``state`` (empty lists when ``k`` is 0)."""
    if not k:
        return [[] for _ in range(n_users)]
    with torch.inference_mode():
        ids, scores = top_k(model, state, k)
    return [[[a, b] for a, b in zip(i, s)] for i, s in zip(ids, scores)]
