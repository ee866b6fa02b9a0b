"""An item-neighbourhood model on another learner's errors, learned per event.

Why: the factorisations of the pool all see a movie through a few factors;
a neighbourhood sees it through the user's own earlier ratings of *similar*
movies, a different view of the same events (the issue's prototype: the
strongest single addition to the mixture).

For user ``u`` and movie ``j``, with ``e_h`` the base learner's prequential
error on the user's earlier rating of movie ``h`` (its most recent
``history`` ones)::

    corr(u, j) = sum_{h in top-k by |s_hj|} s_hj * e_h / (sum |s_hj| + lam)
    s_hj = A_hj / sqrt(B_hj * B_jh) * N_hj / (N_hj + shrink)

``A_hj`` sums ``e_h * e_j`` over users who rated both, ``B_hj`` sums
``e_h^2`` over them and ``N_hj`` counts them: a shrunk correlation of the
errors, updated when a user's rating of ``j`` is revealed (with each of the
user's kept earlier ratings).  The prediction is ``base + corr``.

Memory: by default the simulator keeps dense ``[movies, movies]`` tables
(ML-100K: 1,682 movies, 3 x 11 MB), which grow with the square of the
catalogue (10k movies: 1.2 GB).  With ``slots=M`` each movie keeps M rows
(neighbour id, A, B, N: 16 bytes as int32/float32), found by probing from a
hash of the id and, when the probed rows are full, replacing the one with
the fewest co-raters: the served kernel (:mod:`models.neighbours`) over
fresh tables (README "The network's share and settings that adapt" has its
accuracy).  The user side is the last
``history`` (movie, error) pairs, which the served state's event window
already holds but for the error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numba
import numpy as np

from models.neighbours import NeighbourConfig as ServedConfig
from models.neighbours import neighbour_events, new_tables, vote


@dataclass(frozen=True)
class NeighbourhoodConfig:
    """Chosen on ML-100K's first half by time (:mod:`trainer.diverse`), then frozen."""

    k: int = 50  # neighbours used per prediction
    shrink: float = 10.0  # co-rater count at which a similarity keeps half its value
    lam: float = 1.0  # shrinks the correction towards 0 when neighbours are weak
    history: int = 200  # most recent ratings of the user kept (and paired on learning)
    slots: int = 0  # 0: dense tables; N: N neighbour slots per movie (the served design, :mod:`models.neighbours`)
    probes: int = 8  # slots probed per lookup in the bounded tables
    var_floor: float = 0.0  # dense tables: added to each sum of squares (the bounded ones use the served kernel's)

    def to_dict(self) -> dict:
        return asdict(self)


@numba.njit(cache=True)
def _run(base, y, uidx, movie, n_users, n_items, k, shrink, lam, history, floor):
    n = len(y)
    A = np.zeros((n_items, n_items), np.float32)
    B = np.zeros((n_items, n_items), np.float32)
    N = np.zeros((n_items, n_items), np.float32)
    hi = np.zeros((n_users, history), np.int64)  # ring buffers of each user's (movie, error)
    he = np.zeros((n_users, history), np.float32)
    cnt = np.zeros(n_users, np.int64)
    out = np.zeros(n, np.float32)
    s = np.empty(history, np.float64)
    ev = np.empty(history, np.float64)
    top = np.empty(history, np.int64)
    for i in range(n):
        u, j = uidx[i], movie[i]
        m = min(cnt[u], history)
        # predict from the state before event i
        for t in range(m):
            h = hi[u, t]
            if h == j:  # a movie rated again is no neighbour of itself
                s[t], ev[t] = 0.0, he[u, t]
                continue
            den = np.sqrt((float(B[h, j]) + floor) * (float(B[j, h]) + floor)) + 1e-9
            c = N[h, j]
            s[t] = A[h, j] / den * c / (c + shrink)
            ev[t] = he[u, t]
        out[i] = vote(s, ev, m, k, lam, top)
        # learn: the base's error on this rating, paired with the user's kept ones
        e = y[i] - base[i]
        for t in range(m):
            h = hi[u, t]
            if h == j:
                continue
            eh = he[u, t]
            A[h, j] += eh * e
            A[j, h] += eh * e
            B[h, j] += eh * eh
            B[j, h] += e * e
            N[h, j] += 1.0
            N[j, h] += 1.0
        slot = cnt[u] % history
        hi[u, slot] = j
        he[u, slot] = e
        cnt[u] += 1
    return out


def corrections(base: np.ndarray, y: np.ndarray, uidx: np.ndarray, movie: np.ndarray,
                cfg: NeighbourhoodConfig = NeighbourhoodConfig()) -> np.ndarray:
    """``corr`` of every event (stream order), each computed before the
    event's rating is learned; the prediction is ``clip(base + corr)``."""
    n_users = int(uidx.max()) + 1 if len(uidx) else 0
    n_items = int(movie.max()) + 1 if len(movie) else 0
    if cfg.slots:  # the served kernel over fresh tables
        H = int(cfg.history)
        tables = new_tables(n_items, cfg.slots)
        return neighbour_events(base, y, uidx, movie, np.zeros((n_users, H), np.int64),
                                np.zeros((n_users, H), np.float32), np.zeros(n_users, np.int64), tables,
                                ServedConfig(k=cfg.k, shrink=cfg.shrink, lam=cfg.lam, history=H, slots=cfg.slots,
                                             probes=cfg.probes), learn=True).astype(np.float32)
    return _run(np.ascontiguousarray(base, np.float64), np.ascontiguousarray(y, np.float64),
                np.ascontiguousarray(uidx, np.int64), np.ascontiguousarray(movie, np.int64), n_users, n_items,
                int(cfg.k), float(cfg.shrink), float(cfg.lam), int(cfg.history), float(cfg.var_floor))
