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
    cands = model.candidate_ids()
    recent, _, _, real = model.recent_events(state)
    scores = model.score(state, cands).masked_fill(seen_mask(recent, real, cands), float("-inf"))
    sc, ix = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return cands[ix].cpu().tolist(), np.round(sc.float().cpu().numpy().astype(np.float64), 4).tolist()


def seen_mask(recent: torch.Tensor, real: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """[B, M] True where the candidate is among the user's recent movies
    (``recent`` [B, W] where ``real``: ``RatingModel.recent_events``).

    Each window id is located among the sorted candidates (binary search) and
    marked in a [B, M + 1] table: O(B·W·log M + B·M), no [B, W, M] comparison
    and no device-to-host sync."""
    win = recent
    B, W = win.shape
    M = cands.numel()
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
