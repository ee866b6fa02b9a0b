"""The pieces of the worker's top-K: the seen-movie mask and candidate scoring."""

from __future__ import annotations

import torch

from models.registry import build
from stream.predictor import candidate_movies, seen_mask


def _reference(state, cands):
    win, n = state["win_movie"], state["win_len"].to(torch.int64)
    W = win.shape[1]
    return torch.tensor([[int(c) in set(win[b, W - int(n[b]):].tolist()) for c in cands.tolist()]
                         for b in range(win.shape[0])], dtype=torch.bool).reshape(win.shape[0], len(cands))


def test_seen_mask_matches_a_brute_force_reference():
    m = build("lstm", n_movies=50)
    st = m.init_state(4)
    g = torch.Generator().manual_seed(0)
    # user 0: no events; 1: three; 2: more than the window holds (old ones leave it); 3: an id beyond the candidates
    for t in range(m.W + 5):
        movie = torch.randint(1, 50, (4,), generator=g)
        movie[3] = 49 if t == 0 else movie[3]
        active = torch.tensor([False, t < 3, True, t < 2])
        new, _ = m.step(st, movie, torch.full((4,), 4.0), torch.full((4,), 10 * t))
        st = {k: torch.where(active.view(-1, *[1] * (v.dim() - 1)), new[k], v) for k, v in st.items()}
    cands = torch.tensor([7, 3, 30, 1, 12, 45, 2, 20])  # unsorted, all < 49
    got = seen_mask(st, cands)
    want = _reference(st, cands)
    assert torch.equal(got, want)
    assert not got[0].any() and got[2].any()  # the check above is not vacuous
    full = torch.arange(50)
    assert torch.equal(seen_mask(st, full), _reference(st, full))
    assert seen_mask(st, torch.tensor([], dtype=torch.int64)).shape == (4, 0)


def test_candidates_are_the_known_movies():
    m = build("lstm", n_movies=20)
    with torch.no_grad():
        m.movie_bias[[2, 5, 11]] = 0.3
    assert candidate_movies(m).tolist() == [2, 5, 11]


def test_candidates_follow_the_model_to_its_device():
    """The cached candidate list must not outlive a move of the model (a model
    queued for a swap can be scored by the API before the worker moves it)."""
    m = build("lstm", n_movies=20)
    with torch.no_grad():
        m.movie_bias[[2, 5]] = 0.3
    first = candidate_movies(m)
    assert first.tolist() == [2, 5] and candidate_movies(m) is first  # cached
    # as if cached while the model sat on another device (meta stands in for CUDA here)
    m._fbp_candidates = (m.capacity, first.to("meta"))
    again = candidate_movies(m)
    assert again.device.type == "cpu" and again.tolist() == [2, 5]
