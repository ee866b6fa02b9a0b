"""An online movie side (:class:`models.base.MovieSide`) as flat float32
vectors, the form :mod:`core.repos.movies` stores and adds: one vector per
movie row (the ``ROW`` tensors' rows, each flattened, in ``ROW`` order --
``[b, bG, q(k), qG(k)]`` for :class:`models.online.MovieSide`) and one for
the globals (the ``GLOBAL`` tensors in that order, each flattened).
Increments pack the same way, so a stored vector is always base + sum of
increments.  Any family's side packs here: nothing is specific to one."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from models.base import Increments, MovieSide


def _width(t: Tensor) -> int:
    return math.prod(t.shape[1:])


def row_len(ms: MovieSide) -> int:
    return sum(_width(ms.t[n]) for n in ms.ROW)


def global_len(ms: MovieSide) -> int:
    return sum(ms.t[n].numel() for n in ms.GLOBAL)


def rows(ms: MovieSide, ids: Tensor) -> np.ndarray:
    """[len(ids), row_len] float32: the rows of ``ids`` (ids < capacity)."""
    parts = [ms.t[n][ids].reshape(len(ids), -1) for n in ms.ROW]
    return torch.cat(parts, 1).float().cpu().numpy()


def set_rows(ms: MovieSide, ids: Tensor, vecs: np.ndarray) -> None:
    """Overwrite the rows of ``ids`` with ``vecs`` ([len(ids), row_len])."""
    device = ms.t[ms.ROW[0]].device
    v = torch.from_numpy(np.ascontiguousarray(vecs, np.float32)).to(device)
    off = 0
    for n in ms.ROW:
        t = ms.t[n]
        w = _width(t)
        t[ids] = v[:, off:off + w].reshape(len(ids), *t.shape[1:]).to(t.dtype)
        off += w


def globals_vec(ms: MovieSide) -> np.ndarray:
    if not ms.GLOBAL:
        return np.zeros(0, np.float32)
    return torch.cat([ms.t[n].reshape(-1).float().cpu() for n in ms.GLOBAL]).numpy()


def set_globals(ms: MovieSide, vec: np.ndarray) -> None:
    off = 0
    for n in ms.GLOBAL:
        t = ms.t[n]
        t.copy_(torch.from_numpy(vec[off:off + t.numel()].copy()).view_as(t).to(t.device))
        off += t.numel()


def row_increments(ms: MovieSide, inc: Increments) -> tuple[np.ndarray, np.ndarray]:
    """(movie ids, [n, row_len] increments) of a batch's summed increments
    (:func:`models.batch.sum_increments`: every row name has the same unique rows)."""
    first = ms.ROW[0]
    if first not in inc:
        return np.zeros(0, np.int64), np.zeros((0, row_len(ms)), np.float32)
    ids = inc[first][0]
    for n in ms.ROW:
        if not torch.equal(inc[n][0], ids):
            raise ValueError(f"increments of {n!r} cover other rows than those of {first!r}")
    d = [inc[n][1].reshape(len(ids), -1) for n in ms.ROW]
    return ids.cpu().numpy().astype(np.int64), torch.cat(d, 1).float().cpu().numpy()


def global_increment(ms: MovieSide, inc: Increments) -> np.ndarray:
    """The globals' increment as one vector (zeros for tensors not incremented)."""
    parts = [inc[n][1].reshape(-1).float().cpu() if n in inc else torch.zeros(ms.t[n].numel())
             for n in ms.GLOBAL]
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)


def is_blank(ms: MovieSide) -> bool:
    """Nothing learned yet: every tensor all zeros (a model trained offline from scratch)."""
    return all(not bool(t.any()) for t in ms.t.values())
