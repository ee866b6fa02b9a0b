"""Top-K recommendations: the one implementation the worker's batch and the
query API share (best known movies per user, excluding those in the user's
stored window)."""

from __future__ import annotations

import numpy as np
import torch

from models import state as mstate
from models.base import RatingModel


def top_k(model: RatingModel, state: mstate.State, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Best ``k`` known movies per row of ``state`` and their scores (4 decimals),
    excluding the movies in each user's window."""
    cands = candidate_movies(model)
    scores = model.score(state, cands).masked_fill(seen_mask(state, cands), float("-inf"))
    sc, ix = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return cands[ix].cpu().tolist(), np.round(sc.float().cpu().numpy().astype(np.float64), 4).tolist()


def candidate_movies(model: RatingModel) -> torch.Tensor:
    """Movies worth recommending: rows the model knows (trained bias or side
    features).  Cached on the model object (a swapped-in model brings its own)
    and recomputed when its tables grow."""
    cap = int(getattr(model, "capacity", 0))
    hit = getattr(model, "_fbp_candidates", None)
    # keyed by device too: a model queued for a swap may be asked (by the API)
    # before ``.to(device)`` moves its weights -- and not this cached tensor
    if hit is not None and hit[0] == cap and hit[1].device == model.device:
        return hit[1]
    known = None
    for name in ("movie_bias", "movie_features"):
        t = getattr(model, name, None)
        if isinstance(t, torch.Tensor) and t.shape[0] == cap:
            rows = (t.detach().reshape(cap, -1) != 0).any(1)
            known = rows if known is None else known | rows
    if known is None or not bool(known.any()):
        cands = torch.arange(cap, device=model.device)
    else:
        cands = torch.nonzero(known).flatten().to(model.device)
    model._fbp_candidates = (cap, cands)
    return cands


def seen_mask(state: mstate.State, cands: torch.Tensor) -> torch.Tensor:
    """[B, M] True where the candidate is among the user's stored window events
    (the window is right-aligned: the last ``win_len`` slots are real).

    Each window id is located among the sorted candidates (binary search) and
    marked in a [B, M + 1] table: O(B·W·log M + B·M), no [B, W, M] comparison
    and no device-to-host sync."""
    win = state["win_movie"]
    B, W = win.shape
    M = cands.numel()
    real = torch.arange(W, device=win.device)[None, :] >= (W - state["win_len"].to(torch.int64))[:, None]
    sorted_c, order = torch.sort(cands)
    pos = torch.searchsorted(sorted_c, win).clamp(max=max(M - 1, 0))
    found = real & (sorted_c[pos] == win) if M else torch.zeros_like(real)
    # found -> its candidate's column in sorted order; else the spare column M
    col = torch.where(found, pos, torch.full_like(pos, M))
    table = torch.zeros((B, M + 1), dtype=torch.bool, device=win.device)
    table.scatter_(1, col, True)
    out = torch.empty((B, M), dtype=torch.bool, device=win.device)
    out[:, order] = table[:, :M]
    return out
