"""The item neighbourhood's kernel (models/neighbours.py) against plain
references: the vote, the pair tables, the settings it refuses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import neighbours as nbr


def _vote_reference(s: np.ndarray, ev: np.ndarray, k: int, lam: float) -> float:
    """The k largest |s| (earlier first among equals: a stable sort); no
    similar movie at all and no shrinkage: no correction."""
    top = np.argsort(-np.abs(s), kind="stable")[:k]
    den = np.abs(s[top]).sum() + lam
    return float((s[top] * ev[top]).sum() / den) if den > 0 else 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([-0.5, -0.25, 0.0, 0.25, 0.5, 0.75]), max_size=40),  # ties on purpose
       st.integers(1, 45), st.floats(0.0, 2.0), st.randoms(use_true_random=False))
def test_the_vote_keeps_the_k_most_similar(s, k, lam, rnd):
    s = np.asarray(s, np.float64)
    ev = np.asarray([rnd.uniform(-2, 2) for _ in s], np.float64)
    top = np.empty(max(len(s), 1), np.int64)
    got = nbr.vote(s, ev, len(s), k, lam, top)
    assert got == pytest.approx(_vote_reference(s, ev, k, lam), abs=1e-12)


def _one_user(movies: list[int], errors: list[float], cfg: nbr.NeighbourConfig, capacity: int = 64):
    """One user rating ``movies`` in order with the online part off by
    ``errors``; the tables and the corrections."""
    T = nbr.new_tables(capacity, cfg.slots)
    y = np.asarray(errors, np.float64)
    hm = np.zeros((1, cfg.history), np.int32)
    he = np.zeros((1, cfg.history), np.float32)
    hn = np.zeros(1, np.int32)
    out = nbr.neighbour_events(np.zeros(len(y)), y, np.zeros(len(y), np.int64), np.asarray(movies, np.int64),
                               hm, he, hn, T, cfg, learn=True)
    return T, out


def test_each_pair_is_kept_once_and_read_the_same_from_either_movie():
    cfg = nbr.NeighbourConfig(history=8, slots=16, probes=16)
    movies = [3, 17, 40, 9, 17]  # 17 again: no pair with itself
    T, _ = _one_user(movies, [1.0, -0.5, 0.25, 2.0, 1.0], cfg)
    distinct = {frozenset(p) for p in itertools.combinations(movies, 2) if p[0] != p[1]}
    assert int((T["key"] != 0).sum()) == len(distinct)
    for pair in distinct:
        h, j = sorted(pair)
        x = nbr.owner(h, j)
        assert x == nbr.owner(j, h) and x in (h, j)
        other = j if x == h else h
        assert nbr.find(T, x, other, cfg.probes) >= 0
        assert nbr.find(T, other, x, cfg.probes) == -1  # not kept twice
    # (3, 17) was co-rated once, then 17 came again (paired with 3 a second time)
    x = nbr.owner(3, 17)
    row = T[x, nbr.find(T, x, 3 + 17 - x, cfg.probes)]
    assert row["n"] == 2.0 and row["a"] == pytest.approx(1.0 * -0.5 + 1.0 * 1.0)
    b3, b17 = 1.0 ** 2 * 2, (-0.5) ** 2 + 1.0 ** 2
    assert (row["b0"], row["b1"]) == pytest.approx((b3, b17) if x == 3 else (b17, b3))


def test_a_later_rating_of_a_correlated_movie_is_corrected_towards_it():
    """Two users who were off the same way on movies 1 and 2: a third user off
    by +1 on movie 1 gets a positive correction on movie 2."""
    cfg = nbr.NeighbourConfig(history=4, slots=16, probes=16, shrink=0.0, lam=0.0)
    T = nbr.new_tables(8, cfg.slots)
    hm = np.zeros((3, 4), np.int32)
    he = np.zeros((3, 4), np.float32)
    hn = np.zeros(3, np.int32)
    row, movie = np.asarray([0, 0, 1, 1, 2, 2]), np.asarray([1, 2, 1, 2, 1, 2])
    y = np.asarray([1.0, 0.8, -1.0, -0.9, 1.0, 0.0])
    out = nbr.neighbour_events(np.zeros(6), y, row, movie, hm, he, hn, T, cfg, learn=True)
    assert out[5] == pytest.approx(1.0, abs=1e-6)  # similarity ~1, the user's error on movie 1 is +1
    assert out[1] == 0.0  # nobody had rated both before


@pytest.mark.parametrize("bad", [{"slots": 100}, {"slots": 0}, {"history": 0}, {"k": 0}, {"probes": 0},
                                 {"lam": -1.0}, {"shrink": -1.0}])
def test_settings_it_cannot_run_are_refused(bad):
    with pytest.raises(ValueError, match="neighbours"):
        nbr.NeighbourConfig(**bad)


@pytest.mark.parametrize("seed", range(12))
def test_how_a_batch_orders_its_users_changes_no_correction(seed):
    """Rounds of one event per user, the users in two different orders
    within each round (as two workers' batches, or a worker and the
    simulator, may lay them out): the same correction for every event.
    Whole-number errors, so that many events of a round tie on (movie,
    error), as exact predictions do (ties broken by rows gave up to 0.02)."""
    rng = np.random.default_rng(seed)
    cfg = nbr.NeighbourConfig(history=8, slots=8, probes=4)  # small: rows fill up and evict
    U, R = 30, 12
    movie = rng.integers(0, 25, (R, U))
    y = rng.integers(-2, 3, (R, U)).astype(np.float64)

    def run(order: np.ndarray) -> np.ndarray:
        T = nbr.new_tables(25, cfg.slots)
        hm, he, hn = np.zeros((U, cfg.history), np.int32), np.zeros((U, cfg.history), np.float32), np.zeros(U, np.int32)
        rows = np.concatenate([order] * R)
        mv = np.concatenate([movie[r, order] for r in range(R)])
        ys = np.concatenate([y[r, order] for r in range(R)])
        out = nbr.neighbour_events(np.zeros(len(ys)), ys, rows, mv, hm, he, hn, T, cfg, learn=True,
                                   starts=np.arange(0, R * U + 1, U))
        back = np.empty((R, U))
        back[:, order] = out.reshape(R, U)
        return back

    a, b = run(np.arange(U)), run(rng.permutation(U))
    assert np.abs(a).max() > 0.01  # it corrects something
    np.testing.assert_allclose(a, b, atol=1e-6)
