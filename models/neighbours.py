"""An item neighbourhood on the online part's errors, learned per event, in
bounded per-movie tables.

Why: the mixture's learners all see a movie through a few factors; a
neighbourhood sees it through the user's own recent errors on *similar*
movies, a different view of the same events (issue #22: the strongest single
addition to the pool).  For user ``u`` and movie ``j``, with ``e_h`` the
online part's error on the user's recent rating of movie ``h`` (the last
``history`` ones, kept in the user's state)::

    corr(u, j) = sum_{h in top-k by |s_hj|} s_hj * e_h / (sum |s_hj| + lam)
    s_hj = A_hj / sqrt(B_hj * B_jh) * n / (n + shrink),   n = min(N_hj, N_jh)

``A`` sums ``e_h * e_j`` over users who rated both, ``B_hj`` sums ``e_h^2``
over them and ``N`` counts them: a shrunk correlation of the errors.  Each
movie keeps ``slots`` rows (neighbour id + 1, A, B, N; 16 bytes), found by
probing from a hash of the id; when the probed rows are full the one with
the fewest co-raters starts over (0 marks an empty row).

The tables are learned by the process that serves the model (a worker, the
simulator) from the events it sees, and are not shared or saved: a worker
carries them across a model swap (``RatingModel.adopt_local``) and starts
them empty when it starts.  Sharing them would cost a Redis increment per
pair: ``2 x history`` per event (README "The network's share and settings
that adapt").
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from models.config import DictConfig


@dataclass(frozen=True)
class NeighbourConfig(DictConfig):
    """k, shrink and lam chosen on ML-100K's first half by time, on the
    served online part's errors (``python -m trainer.served_tune``:
    0.9216 against 0.9224 without); history 64 and 256 slots x 16 probes are
    the state and memory budget."""

    k: int = 20
    shrink: float = 500.0
    lam: float = 0.5
    history: int = 64
    slots: int = 256
    probes: int = 16


@numba.njit(cache=True)
def find(keys, x, y, probes):
    """Slot of neighbour ``y`` in movie ``x``'s rows (stored as ``y + 1``), or -1."""
    M = keys.shape[1]
    s0 = (y * 2654435761) % M
    for p in range(probes):
        s = (s0 + p) % M
        if keys[x, s] == y + 1:
            return s
        if keys[x, s] == 0:
            return -1
    return -1


@numba.njit(cache=True)
def claim(keys, A, B, N, x, y, probes):
    """Slot of ``y`` in ``x``'s rows, taking an empty one or, when the probed
    slots are full, the one with the fewest co-raters (its sums start over)."""
    M = keys.shape[1]
    s0 = (y * 2654435761) % M
    low, low_n = -1, np.inf
    for p in range(probes):
        s = (s0 + p) % M
        if keys[x, s] == y + 1:
            return s
        if keys[x, s] == 0:
            keys[x, s] = y + 1
            return s
        if N[x, s] < low_n:
            low, low_n = s, N[x, s]
    keys[x, low] = y + 1
    A[x, low] = 0.0
    B[x, low] = 0.0
    N[x, low] = 0.0
    return low


@numba.njit(cache=True)
def vote(s, ev, m, k, lam):
    """The k most similar kept ratings' errors, weighted by similarity and
    shrunk by ``lam``."""
    if m == 0:
        return 0.0
    order = np.argsort(-np.abs(s[:m]))
    num, tot = 0.0, 0.0
    for r in range(min(k, m)):
        t = order[r]
        num += s[t] * ev[t]
        tot += abs(s[t])
    return num / (tot + lam)


@numba.njit(cache=True)
def similarity(keys, A, B, N, h, j, shrink, probes):
    a, b = find(keys, h, j, probes), find(keys, j, h, probes)
    if a < 0 or b < 0:
        return 0.0
    c = min(N[h, a], N[j, b])
    return A[h, a] / (np.sqrt(float(B[h, a]) * float(B[j, b])) + 1e-9) * c / (c + shrink)


@numba.njit(cache=True)
def learn_pair(keys, A, B, N, h, eh, j, e, probes):
    """The pair (h, j) rated by one user with errors ``eh``, ``e``: both rows' sums."""
    a = claim(keys, A, B, N, h, j, probes)
    A[h, a] += eh * e
    B[h, a] += eh * eh
    N[h, a] += 1.0
    b = claim(keys, A, B, N, j, h, probes)
    A[j, b] += eh * e
    B[j, b] += e * e
    N[j, b] += 1.0


@numba.njit(cache=True)
def _events(base, y, row, movie, hm, he, hn, keys, A, B, N, k, shrink, lam, probes, learn, out):
    H = hm.shape[1]
    cap = keys.shape[0]
    s = np.empty(H, np.float64)
    ev = np.empty(H, np.float64)
    for i in range(len(y)):
        u, j = row[i], movie[i]
        m = min(hn[u], H)
        inside = 0 <= j < cap
        for t in range(m):
            h = hm[u, t]
            s[t] = similarity(keys, A, B, N, h, j, shrink, probes) if inside and 0 <= h < cap else 0.0
            ev[t] = he[u, t]
        out[i] = vote(s, ev, m, k, lam)
        e = y[i] - base[i]  # the error of the online part without this correction
        if learn and inside:
            for t in range(m):
                h = hm[u, t]
                if 0 <= h < cap:
                    learn_pair(keys, A, B, N, h, he[u, t], j, e, probes)
        slot = hn[u] % H
        hm[u, slot] = j
        he[u, slot] = e
        hn[u] += 1


def neighbour_events(base: np.ndarray, y: np.ndarray, row: np.ndarray, movie: np.ndarray, hm: np.ndarray,
                     he: np.ndarray, hn: np.ndarray, tables: tuple[np.ndarray, ...], cfg: NeighbourConfig,
                     learn: bool) -> np.ndarray:
    """The correction of each event (each user's events in order), computed
    before its rating is revealed; then the user's history (rows ``row`` of
    ``hm``/``he``/``hn``: movie ids, errors, how many kept) takes the event,
    and with ``learn`` the tables ``(keys, A, B, N)`` pair it with the
    user's kept ratings.  Everything is updated in place."""
    out = np.empty(len(y), np.float64)
    keys, A, B, N = tables
    _events(np.ascontiguousarray(base, np.float64), np.ascontiguousarray(y, np.float64),
            np.ascontiguousarray(row, np.int64), np.ascontiguousarray(movie, np.int64), hm, he, hn,
            keys, A, B, N, int(cfg.k), float(cfg.shrink), float(cfg.lam), int(cfg.probes), bool(learn), out)
    return out
