"""step (batched, users of different lengths) == forward_sequence, for every model."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import state as S
from models.registry import available, build

torch.set_num_threads(1)

SMALL = {
    "baseline": {},
    "mf": {"k": 4},
    "cnn": {"channels": 6, "item_dim": 4, "k": 3},
    "lstm": {"hidden": 8, "item_dim": 4, "k": 3},
}
MODELS = {}


def _model(name: str):
    if name not in MODELS:
        torch.manual_seed(1)
        m = build(name, n_movies=16, window=5, genre_vocab=["a", "b", "c"], **SMALL[name])
        with torch.no_grad():
            m.movie_bias.normal_(0, 0.3)
            m.global_mean.fill_(3.4)
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for k, buf in m.named_buffers():  # a movie side that has learned something
                if k.startswith("online_") and buf.is_floating_point():
                    buf.add_(torch.rand_like(buf) * 0.2)
        m.eval()  # serving mode: in training mode the lstm's forward_sequence is the network alone
        MODELS[name] = m
    return MODELS[name]


history = st.lists(
    st.tuples(st.integers(0, 40), st.sampled_from([1.0, 2.0, 3.0, 3.5, 4.0, 5.0]), st.integers(0, 10**6)),
    min_size=0,
    max_size=12,
)


def _pad(hists):
    B, T = len(hists), max(1, max(len(h) for h in hists))
    movie = torch.zeros(B, T, dtype=torch.int64)
    rating = torch.zeros(B, T)
    ts = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, h in enumerate(hists):
        t0 = 10**9
        for t, (m, r, g) in enumerate(h):
            t0 += g
            movie[b, t], rating[b, t], ts[b, t], mask[b, t] = m, r, t0, True
    return movie, rating, ts, mask


def _stepwise(m, state, movie, rating, ts, mask):
    preds = torch.zeros(movie.shape)
    for t in range(movie.shape[1]):
        idx = torch.nonzero(mask[:, t]).flatten()
        if idx.numel() == 0:
            continue
        sub = S.select(state, idx)
        score = m.score(sub, movie[idx, t][:, None])[:, 0]
        if getattr(m, "online", False):
            # the online session term decays with the gap; score is "rated now" (gap 0)
            _, p0 = m.step(sub, movie[idx, t], rating[idx, t], sub["last_ts"].clone())
            assert torch.allclose(score, p0, atol=1e-5)
        sub, p = m.step(sub, movie[idx, t], rating[idx, t], ts[idx, t])
        if not getattr(m, "online", False):
            assert torch.allclose(score, p, atol=1e-5)
        preds[idx, t] = p
        S.scatter(state, idx, sub)
    return preds, state


def _close(a, b):
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5, rtol=1e-5), (k, (a[k].double() - b[k].double()).abs().max())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SMALL)), hists=st.lists(history, min_size=1, max_size=4),
       hists2=st.lists(history, min_size=1, max_size=4))
def test_step_equals_sequence(name, hists, hists2):
    m = _model(name)
    movie, rating, ts, mask = _pad(hists)
    m.ensure_capacity(int(movie.max()))  # ids beyond capacity grow the tables (zero rows)
    with torch.no_grad():
        pred_seq, fin = m.forward_sequence(movie, rating, ts, mask, return_state=True)
        pred_step, st_step = _stepwise(m, m.init_state(len(hists)), movie, rating, ts, mask)
        assert torch.allclose(pred_seq[mask], pred_step[mask], atol=1e-5)
        assert torch.isfinite(pred_seq).all()
        _close(fin, st_step)
        # continue from a non-empty state: forward_sequence(state=...) == more steps
        B = len(hists)
        hists2 = (hists2 * B)[:B]
        m2, r2, t2, k2 = _pad(hists2)
        t2 = t2 + 10**7
        pred2, fin2 = m.forward_sequence(m2, r2, t2, k2, state={k: v.clone() for k, v in fin.items()}, return_state=True)
        pred2s, st2 = _stepwise(m, st_step, m2, r2, t2, k2)
        assert torch.allclose(pred2[k2], pred2s[k2], atol=1e-5)
        _close(fin2, st2)
        # pack -> unpack round trip is exact
        blobs = S.pack_batch(m, st2)
        back, stale, _ = S.unpack_batch(m, blobs, "cpu")
        assert not stale.any()
        for k in st2:
            assert torch.equal(back[k], st2[k]), k
        # rederive == a fresh pass over the window (generic counters kept)
        red = S.rederive(m, st2)
        wm, wr, wt, wk = S.window_sequence(m, st2)
        fresh = m.final_state(wm, wr, wt, wk)
        for k in red:
            if k in ("count", "mean", "last_ts"):
                assert torch.equal(red[k], st2[k])
            else:
                assert torch.allclose(red[k].double(), fresh[k].double(), atol=1e-6)


def test_registry_lists_all_four():
    assert {"lstm", "cnn", "mf", "baseline"} <= set(available())  # and the toy family (test_model_protocol)
