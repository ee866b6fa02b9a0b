"""models.online: the per-event learner's increments are mergeable and it learns."""

from __future__ import annotations

import numpy as np
import torch

from models import online as onl

torch.set_num_threads(1)


def _round(ms, movie, rating):
    B = len(movie)
    user = {k: torch.zeros((B, *shape)) for k, (shape, _) in onl.user_spec(ms.cfg).items()}
    return onl.online_round(ms, user, torch.tensor(movie), torch.tensor(rating), torch.zeros(B, dtype=torch.int64),
                            torch.zeros(B, dtype=torch.bool), torch.zeros(B, 3), torch.zeros(B, 2))


def test_increments_merge_in_any_order():
    """Two workers' increments added in either order give the same movie side
    (what HINCRBYFLOAT relies on); the inputs are not mutated."""
    cfg = onl.OnlineConfig(k=4)
    ms = onl.MovieSide(cfg, 8, 3, 2)
    before = {k: v.clone() for k, v in ms.t.items()}
    _, _, inc_a = _round(ms, [1, 2, 1], [5.0, 1.0, 4.0])
    _, _, inc_b = _round(ms, [2, 3], [2.0, 5.0])
    assert all(torch.equal(before[k], ms.t[k]) for k in before)
    one, two = onl.MovieSide(cfg, 8, 3, 2), onl.MovieSide(cfg, 8, 3, 2)
    one.apply(inc_a), one.apply(inc_b)
    two.apply(inc_b), two.apply(inc_a)
    for k in one.t:
        assert torch.allclose(one.t[k], two.t[k], atol=1e-6), k
    assert one.t["mu"][1] == 5 and one.t["b"][1] > 0 > one.t["b"][2]  # movie 1 rated high, 2 low


def test_new_movie_learns_from_its_first_rating():
    cfg = onl.OnlineConfig(k=4)
    ms = onl.MovieSide(cfg, 8, 3, 2)
    p0, _, inc = _round(ms, [6], [5.0])
    ms.apply(inc)
    p1, _, _ = _round(ms, [6], [5.0])
    assert p1[0] > p0[0]


def test_q_init_is_deterministic_and_scaled():
    a = onl.q_init(torch.arange(5000), 8, 0.1)
    assert torch.equal(a, onl.q_init(torch.arange(5000), 8, 0.1))
    assert abs(float(a.std()) - 0.1) < 0.01 and abs(float(a.mean())) < 0.01


def test_learner_beats_global_mean_on_a_synthetic_stream():
    from core.datasets import synthetic_stream
    from trainer.ablations import run_online

    ds = synthetic_stream(6000, n_users=100, n_movies=300, seed=3)
    y = ds.ratings["rating"].to_numpy(np.float64)
    base = float(np.sqrt(np.mean((y - y.mean()) ** 2)))
    r = run_online(ds, ds.ratings, onl.OnlineConfig())
    assert r["rmse"] < base - 0.05, (r, base)
