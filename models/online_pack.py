"""The online movie side (:class:`models.online.MovieSide`) as flat float32
vectors, the form :mod:`core.repos.movies` stores and adds: one vector per
movie row ``[b, bG, q(k), qG(k)]`` and one for the globals
(``MovieSide.GLOBAL`` in that order, each flattened).  Increments pack the
same way, so a stored vector is always base + sum of increments."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.online import MovieSide

Increments = dict[str, tuple[Tensor | None, Tensor]]


def row_len(ms: MovieSide) -> int:
    return 2 + 2 * ms.cfg.k


def global_len(ms: MovieSide) -> int:
    return sum(ms.t[n].numel() for n in MovieSide.GLOBAL)


def rows(ms: MovieSide, ids: Tensor) -> np.ndarray:
    """[len(ids), row_len] float32: the rows of ``ids`` (ids < capacity)."""
    t = ms.t
    parts = [t["b"][ids, None], t["bG"][ids, None], t["q"][ids], t["qG"][ids]]
    return torch.cat(parts, 1).float().cpu().numpy()


def set_rows(ms: MovieSide, ids: Tensor, vecs: np.ndarray) -> None:
    """Overwrite the rows of ``ids`` with ``vecs`` ([len(ids), row_len])."""
    k, t = ms.cfg.k, ms.t
    v = torch.from_numpy(np.ascontiguousarray(vecs, np.float32)).to(t["b"].device)
    t["b"][ids] = v[:, 0]
    t["bG"][ids] = v[:, 1]
    t["q"][ids] = v[:, 2:2 + k]
    t["qG"][ids] = v[:, 2 + k:]


def globals_vec(ms: MovieSide) -> np.ndarray:
    return torch.cat([ms.t[n].reshape(-1).float().cpu() for n in MovieSide.GLOBAL]).numpy()


def set_globals(ms: MovieSide, vec: np.ndarray) -> None:
    off = 0
    for n in MovieSide.GLOBAL:
        t = ms.t[n]
        t.copy_(torch.from_numpy(vec[off:off + t.numel()].copy()).view_as(t).to(t.device))
        off += t.numel()


def row_increments(ms: MovieSide, inc: Increments) -> tuple[np.ndarray, np.ndarray]:
    """(movie ids, [n, row_len] increments) of a batch's summed increments
    (:func:`models.batch.sum_increments`: every row name has the same unique rows)."""
    if "b" not in inc:
        return np.zeros(0, np.int64), np.zeros((0, row_len(ms)), np.float32)
    ids = inc["b"][0]
    for n in MovieSide.ROW:
        if not torch.equal(inc[n][0], ids):
            raise ValueError(f"increments of {n!r} cover other rows than those of 'b'")
    d = [inc["b"][1][:, None], inc["bG"][1][:, None], inc["q"][1], inc["qG"][1]]
    return ids.cpu().numpy().astype(np.int64), torch.cat(d, 1).float().cpu().numpy()


def global_increment(ms: MovieSide, inc: Increments) -> np.ndarray:
    """The globals' increment as one vector (zeros for tensors not incremented)."""
    parts = [inc[n][1].reshape(-1).float().cpu() if n in inc else torch.zeros(ms.t[n].numel())
             for n in MovieSide.GLOBAL]
    return torch.cat(parts).numpy()
