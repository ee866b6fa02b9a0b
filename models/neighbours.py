"""An item neighbourhood on the online part's errors, learned per event, in
bounded per-movie tables.

Why: the mixture's learners all see a movie through a few factors; a
neighbourhood sees it through the user's own recent errors on *similar*
movies, a different view of the same events (issue #22: the strongest single
addition to the pool).  For user ``u`` and movie ``j``, with ``e_h`` the
online part's error on the user's recent rating of movie ``h`` (the last
``history`` ones, kept in the user's state)::

    corr(u, j) = sum_{h in top-k by |s_hj|} s_hj * e_h / (sum |s_hj| + lam)
    s_hj = A_hj / sqrt(B_h * B_j) * N_hj / (N_hj + shrink)

over the users who rated both ``h`` and ``j``: ``A`` sums ``e_h * e_j``,
``B_h`` and ``B_j`` sum ``e_h^2`` and ``e_j^2``, ``N`` counts them -- a shrunk
correlation of the errors.

Each pair is kept once, in the rows of one of its two movies chosen by a
hash of the pair (:func:`owner`), so one probe walk finds it from either
side and the same memory holds twice the pairs.  Each movie keeps ``slots``
rows (:data:`ROW`: the other movie's id + 1, A, N, the owner's B and the
other's B, side by side so that a probe reads one cache line), found by
probing from a hash of the id; when the probed rows are full the one with
the fewest co-raters starts over (key 0 marks an empty row).  Against a
first version that kept each pair twice, in four separate arrays, on the
default online learner's errors over ML-100K (same settings): 0.92130
against 0.92227 (no correction 0.92453) at 2.9-4.2 against 5.4-10.5 µs of
CPU per event.

The tables are learned by the process that serves the model (a worker, the
simulator) from the events it sees, and are not shared or saved: a worker
carries them across a model swap (``RatingModel.adopt_local``) and starts
them empty when it starts.  Sharing them would cost a Redis increment per
pair: ``history`` per event (README "The network's share and settings that
adapt").
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from models.config import DictConfig


@dataclass(frozen=True)
class NeighbourConfig(DictConfig):
    """shrink and lam chosen on ML-100K's first half by time, on the served
    online part's errors (``python -m trainer.served_tune``: 0.9203 against
    0.9218 without); history 64 and 256 slots x 16 probes are the state and
    memory budget (history 32: 0.9207 at about half the CPU).

    Every kept rating votes (``k`` = ``history``): the grid's best, the 20
    most similar, scored 0.9202, but a top-k is not continuous in the
    similarities -- every pair with one co-rater has |correlation| 1, so
    many similarities tie, and float noise (a worker's movie side goes
    through Redis as float32) picks other ratings among the tied ones.  With
    k 20 a worker's predictions differed from the simulator's by up to 0.03
    on ML-100K events; with every rating voting, by what the movie side
    differs."""

    k: int = 64
    shrink: float = 500.0
    lam: float = 0.5
    history: int = 64
    slots: int = 256
    probes: int = 16

    def __post_init__(self) -> None:
        if self.slots < 1 or self.slots & (self.slots - 1):
            raise ValueError(f"neighbours.slots must be a power of two (it is {self.slots}): probes wrap by a mask")
        if self.shrink < 0 or self.lam < 0:
            raise ValueError(f"neighbours.shrink and lam must not be negative (they are {self.shrink}, {self.lam})")
        if min(self.k, self.history, self.probes) < 1:
            raise ValueError(f"neighbours.k, history and probes must be at least 1 (they are {self.k}, "
                             f"{self.history}, {self.probes})")


#: one row of a movie's table: the other movie's id + 1 (0: empty), the
#: pair's sums, and the two movies' sums of squared errors (``b0``: the
#: owner's, ``b1``: the other's)
ROW = np.dtype([("key", np.int32), ("a", np.float32), ("n", np.float32), ("b0", np.float32),
                ("b1", np.float32)])


#: added to each movie's sum of squared errors in a similarity (rating units
#: squared: errors under 0.1 weigh little)
VAR_FLOOR = 0.01


def new_tables(capacity: int, slots: int) -> np.ndarray:
    """Empty tables: [capacity movies, slots] rows of :data:`ROW`."""
    return np.zeros((capacity, slots), ROW)


@numba.njit(cache=True)
def owner(h, j):
    """The movie whose rows keep the pair (h, j): either, by a hash of the
    pair, so that every movie's rows take about half its pairs."""
    lo, hi = min(h, j), max(h, j)
    return lo if ((lo * 2654435761 + hi * 40503) >> 7) & 1 else hi


@numba.njit(cache=True)
def find(T, x, y, probes):
    """Slot of neighbour ``y`` in movie ``x``'s rows (stored as ``y + 1``), or -1."""
    M = T.shape[1] - 1  # slots are a power of two: a mask, not a division
    s0 = (y * 2654435761) & M
    for p in range(probes):
        s = (s0 + p) & M
        if T[x, s].key == y + 1:
            return s
        if T[x, s].key == 0:
            return -1
    return -1


@numba.njit(cache=True)
def claim(T, x, y, probes):
    """Slot of ``y`` in ``x``'s rows, taking an empty one or, when the probed
    slots are full, the one with the fewest co-raters (its sums start over)."""
    M = T.shape[1] - 1
    s0 = (y * 2654435761) & M
    low, low_n = -1, np.inf
    for p in range(probes):
        s = (s0 + p) & M
        if T[x, s].key == y + 1:
            return s
        if T[x, s].key == 0:
            T[x, s].key = y + 1
            return s
        if T[x, s].n < low_n:
            low, low_n = s, T[x, s].n
    T[x, low].key = y + 1
    T[x, low].a = 0.0
    T[x, low].n = 0.0
    T[x, low].b0 = 0.0
    T[x, low].b1 = 0.0
    return low


@numba.njit(cache=True)
def vote(s, ev, m, k, lam, top):
    """The k most similar kept ratings' errors, weighted by similarity and
    shrunk by ``lam``.  ``top`` (at least ``min(k, m)`` long) is scratch
    space: the k largest ``|s|`` are kept in it by insertion, earlier ones
    first among equals, with nothing allocated per event."""
    if m == 0:
        return 0.0
    if k >= m:  # every kept rating votes (the served default): nothing to select
        num, tot = 0.0, 0.0
        for t in range(m):
            num += s[t] * ev[t]
            tot += abs(s[t])
        return num / (tot + lam) if tot + lam > 0.0 else 0.0
    kk = min(k, m)
    n = 0
    for t in range(m):
        v = abs(s[t])
        if n < kk:
            q = n
            n += 1
        elif v > abs(s[top[kk - 1]]):
            q = kk - 1
        else:
            continue
        while q > 0 and abs(s[top[q - 1]]) < v:
            top[q] = top[q - 1]
            q -= 1
        top[q] = t
    num, tot = 0.0, 0.0
    for r in range(kk):
        t = top[r]
        num += s[t] * ev[t]
        tot += abs(s[t])
    return num / (tot + lam) if tot + lam > 0.0 else 0.0


@numba.njit(cache=True)
def similarity(T, x, a, shrink):
    """s_hj of the pair kept in row ``a`` of movie ``x`` (-1: not kept)."""
    if a < 0:
        return 0.0
    c = T[x, a].n
    # each sum of squares floored by VAR_FLOOR: a correlation of errors near
    # 0 is noise, and without the floor one rating predicted exactly (error 0)
    # or off by float noise (1e-7) would give a similarity of 0 or of 1
    return T[x, a].a / np.sqrt((T[x, a].b0 + VAR_FLOOR) * (T[x, a].b1 + VAR_FLOOR)) * c / (c + shrink)


@numba.njit(cache=True)
def history_key(hm, he, hn, u):
    """A hash of user row ``u``'s kept history (count, movies, errors to
    2^-20): equal for equal histories, whatever row the user has in a batch."""
    h = np.int64(1469598103934665603)
    h = (h ^ np.int64(hn[u])) * np.int64(1099511628211)
    for t in range(min(hn[u], hm.shape[1])):
        h = (h ^ np.int64(hm[u, t])) * np.int64(1099511628211)
        h = (h ^ np.int64(round(he[u, t] * 1048576.0))) * np.int64(1099511628211)
    return h


@numba.njit(cache=True)
def _events(base, y, row, movie, hm, he, hn, T, starts, k, shrink, lam, probes, learn, out):
    H = hm.shape[1]
    cap = T.shape[0]
    s = np.empty(H, np.float64)
    ev = np.empty(H, np.float64)
    top = np.empty(H, np.int64)
    width = 0
    for r in range(len(starts) - 1):
        width = max(width, starts[r + 1] - starts[r])
    at = np.empty((width, H), np.int32)  # each pair's slot, found once for the vote and the learning
    key = np.empty(width, np.int64)
    key2 = np.empty(width)
    one = np.zeros(1, np.int64)
    for r in range(len(starts) - 1):
        r0, r1 = starts[r], starts[r + 1]
        for i in range(r0, r1):  # the round's corrections, from the tables as the round found them
            u, j = row[i], movie[i]
            m = min(hn[u], H)
            inside = 0 <= j < cap
            for t in range(m):
                h = hm[u, t]
                at[i - r0, t], s[t], ev[t] = -1, 0.0, he[u, t]
                if inside and 0 <= h < cap and h != j:
                    x = owner(h, j)
                    at[i - r0, t] = find(T, x, j + h - x, probes)  # j + h - x: the pair's other movie
                    s[t] = similarity(T, x, at[i - r0, t], shrink)
            out[i] = vote(s, ev, m, k, lam, top)
        # then its ratings: the tables and each user's history learn them, in
        # an order of the events' own (movie, error), not of the batch's rows,
        # so that evictions too are the same however the users are laid out
        if r1 - r0 > 1:
            # ties (same movie, same error: e.g. two exact predictions) broken
            # by the users' whole histories, never by rows: events still tied
            # then learn the same sums, so their order changes nothing
            for i in range(r0, r1):
                key[i - r0] = history_key(hm, he, hn, row[i])
            order = np.argsort(key[: r1 - r0], kind="mergesort")
            for q in range(r1 - r0):
                i = r0 + order[q]
                key2[q] = movie[i] * 16.0 + (y[i] - base[i] + 8.0)
            order = order[np.argsort(key2[: r1 - r0], kind="mergesort")]
        else:  # one event (strict time order): nothing to order
            order = one
        for q in order:
            i = r0 + q
            u, j = row[i], movie[i]
            m = min(hn[u], H)
            e = y[i] - base[i]  # the error of the online part without this correction
            if learn and 0 <= j < cap:
                for t in range(m):
                    h = hm[u, t]
                    if 0 <= h < cap and h != j:
                        x = owner(h, j)
                        o = j + h - x
                        a = at[i - r0, t]
                        if a < 0 or T[x, a].key != o + 1:  # an earlier pair of the round may have taken it
                            a = claim(T, x, o, probes)
                        eh = he[u, t]
                        T[x, a].a += eh * e
                        T[x, a].n += 1.0
                        T[x, a].b0 += eh * eh if x == h else e * e
                        T[x, a].b1 += e * e if x == h else eh * eh
            slot = hn[u] % H
            hm[u, slot] = j
            he[u, slot] = e
            hn[u] += 1


def neighbour_events(base: np.ndarray, y: np.ndarray, row: np.ndarray, movie: np.ndarray, hm: np.ndarray,
                     he: np.ndarray, hn: np.ndarray, tables: np.ndarray, cfg: NeighbourConfig,
                     learn: bool, starts: np.ndarray | None = None) -> np.ndarray:
    """The correction of each event (each user's events in order), computed
    before its rating is revealed; then the user's history (rows ``row`` of
    ``hm``/``he``/``hn``: movie ids, errors, how many kept) takes the event,
    and with ``learn`` the tables (:func:`new_tables`) pair it with the
    user's kept ratings.  Everything is updated in place.

    ``starts``: where each round of events begins (``len(y)`` last), a
    user at most once per round, as a batch's rounds are
    (:func:`models.online_kernel.round_order`).  A round's events are all
    corrected before any of them is learned, and learned in the order of
    their (movie, error), so how a batch happens to order its users changes
    no correction (a worker and the simulator agree); by default each event
    is a round of its own (strict time order)."""
    out = np.empty(len(y), np.float64)
    starts = np.arange(len(y) + 1, dtype=np.int64) if starts is None else np.ascontiguousarray(starts, np.int64)
    _events(np.ascontiguousarray(base, np.float64), np.ascontiguousarray(y, np.float64),
            np.ascontiguousarray(row, np.int64), np.ascontiguousarray(movie, np.int64), hm, he, hn,
            tables, starts, int(cfg.k), float(cfg.shrink), float(cfg.lam), int(cfg.probes), bool(learn), out)
    return out
