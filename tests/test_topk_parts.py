"""The pieces of the worker's top-K: the seen-movie mask (the candidates are
``RatingModel.candidate_ids``, tested with the protocol in test_model_protocol.py)."""

from __future__ import annotations

import torch

from models.registry import build
from stream.topk import seen_mask


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
    recent, _, _, real = m.recent_events(st)
    got = seen_mask(recent, real, cands)
    want = _reference(st, cands)
    assert torch.equal(got, want)
    assert not got[0].any() and got[2].any()  # the check above is not vacuous
    full = torch.arange(50)
    assert torch.equal(seen_mask(recent, real, full), _reference(st, full))
    assert seen_mask(recent, real, torch.tensor([], dtype=torch.int64)).shape == (4, 0)
