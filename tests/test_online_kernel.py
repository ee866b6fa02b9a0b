"""models.online_kernel: the compiled CPU kernel computes what the torch round
loop computes (the reference, ``LSTMModel.online_batch_rounds`` and
``OnlineLearner._process_rounds``): predictions, new user state, the batch's
increments and the movie side left in the model, on random batches."""

from __future__ import annotations

import copy

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import online as onl
from models.registry import build

torch.set_num_threads(1)

N_MOVIES, N_UFEAT = 16, 3
_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(features: bool, session: bool, adaptive: bool):
    """A small lstm with a random, non-zero online movie side and movie features."""
    key = (features, session, adaptive)
    if key not in _MODELS:
        torch.manual_seed(1)
        m = build("lstm", n_movies=N_MOVIES, window=5, genre_vocab=["a", "b", "c"], n_user_features=N_UFEAT,
                  online_cfg={"use_features": features, "use_session": session, "adaptive": adaptive})
        with torch.no_grad():
            m.movie_features.copy_(torch.rand_like(m.movie_features))
            for name, buf in m.named_buffers():
                if name.startswith("online_"):
                    buf.copy_(torch.rand_like(buf) * (20.0 if name == "online_mu" else 0.2))
        _MODELS[key] = m.eval()
    return copy.deepcopy(_MODELS[key])


@st.composite
def batches(draw):
    """A padded [U, T] batch: masks with gaps, movies outside the capacity
    (negative and past it), repeats within a round (few distinct ids)."""
    U, T = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    hi = draw(st.sampled_from([3, N_MOVIES + 4]))  # 3: every round repeats movies
    movie = torch.from_numpy(rng.integers(-2, hi, (U, T)))
    rating = torch.from_numpy(rng.choice([1.0, 2.0, 3.5, 4.0, 5.0], (U, T)).astype(np.float32))
    ts = torch.from_numpy(10**9 + rng.integers(-30, 60, (U, T)).cumsum(1))  # some gaps negative
    mask = torch.from_numpy(rng.random((U, T)) < draw(st.sampled_from([0.5, 0.9, 1.0])))
    return seed, movie, rating, ts, mask


def _state(model, U: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = model.init_state(U)
    k = model.online_cfg.k
    s.update(on_ub=torch.randn(U, generator=g) * 0.3, on_ubG=torch.rand(U, generator=g),
             on_p=torch.randn(U, k, generator=g) * 0.1, on_pG=torch.rand(U, k, generator=g),
             on_s=torch.randn(U, generator=g) * 0.2, on_g=torch.rand(U, N_UFEAT, generator=g),
             count=torch.randint(0, 3, (U,), generator=g), last_ts=torch.full((U,), 10**9 - 7))
    return s


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _same_increments(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, (rows, delta) in want.items():
        g_rows, g_delta = got[name]
        assert (g_rows is None) == (rows is None), name
        if rows is not None:
            assert torch.equal(g_rows, rows), name
        assert g_delta.dtype == delta.dtype, name
        _close(g_delta, delta, f"increment {name}")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), apply=st.booleans(), features=st.booleans(), session=st.booleans(),
       adaptive=st.sampled_from([True, True, False]))
def test_kernel_equals_the_round_loop(batch, apply, features, session, adaptive):
    seed, movie, rating, ts, mask = batch
    kern, ref = _model(features, session, adaptive), _model(features, session, adaptive)
    state = _state(kern, movie.shape[0], seed)
    before = {k: v.clone() for k, v in state.items()}
    p1, u1, i1 = kern.online_batch_kernel(state, movie, rating, ts, mask, apply=apply)
    p2, u2, i2 = ref.online_batch_rounds(before, movie, rating, ts, mask, apply=apply)
    assert all(torch.equal(before[k], v) for k, v in state.items())  # the input state is not mutated
    _close(p1, p2, "predictions")
    assert sorted(u1) == sorted(u2)
    for k in u2:
        _close(u1[k], u2[k], k)
    _same_increments(i1, i2)
    for (name, a), (_, b) in zip(kern.named_buffers(), ref.named_buffers()):
        _close(a, b, f"buffer {name}")


def test_online_batch_takes_the_kernel_on_cpu():
    """The served path (``online_batch``, via ``learn_batch``) is the kernel on
    CPU: it agrees with the reference and moves the movie side."""
    m, ref = _model(True, True, True), _model(True, True, True)
    movie = torch.tensor([[1, 1, 2], [1, 3, 0]])
    rating, ts = torch.tensor([[5.0, 4.0, 1.0], [5.0, 2.0, 0.0]]), torch.full((2, 3), 10**9)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert m._kernel_ok(_state(m, 2, 0), movie)
    b0 = m.online_b.clone()
    p1, _, inc = m.online_batch(_state(m, 2, 0), movie, rating, ts, mask)
    p2, _, _ = ref.online_batch_rounds(_state(ref, 2, 0), movie, rating, ts, mask)
    _close(p1, p2, "predictions")
    assert inc["b"][0].tolist() == [1, 2, 3] and float(inc["mu"][1][1]) == 5.0
    _close(m.online_b - b0, torch.zeros_like(b0).index_add_(0, inc["b"][0], inc["b"][1]), "b moved by its increments")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), features=st.booleans(), session=st.booleans())
def test_learner_kernel_equals_its_round_loop(seed, features, session):
    """``OnlineLearner.process`` (trainer ablations) through the kernel equals
    its torch round loop over several batches."""
    from models.batch import occurrence_rank

    rng = np.random.default_rng(seed)
    cfg = onl.OnlineConfig(k=4, use_features=features, use_session=session)
    mfeat, ufeat = torch.from_numpy(rng.random((10, 3), np.float32)), torch.from_numpy(rng.random((6, 2), np.float32))
    a, b = onl.OnlineLearner(cfg, mfeat, ufeat, 6), onl.OnlineLearner(cfg, mfeat, ufeat, 6)
    for _ in range(3):
        n = int(rng.integers(1, 30))
        uidx = rng.integers(0, 6, n)
        cols = (torch.from_numpy(uidx), torch.from_numpy(uidx), torch.from_numpy(rng.integers(0, 14, n)),
                torch.from_numpy(rng.choice([1.0, 3.0, 5.0], n).astype(np.float32)),
                torch.from_numpy(10**9 + np.sort(rng.integers(0, 100, n))))
        p1 = a.process(*cols, occurrence_rank(uidx))
        b._grow(int(cols[2].max()))
        uf = b.ufeat[cols[1].clamp(max=b.ufeat.shape[0] - 1)]
        p2 = b._process_rounds(cols[0], cols[2], cols[3], cols[4], occurrence_rank(uidx), uf)
        _close(p1, p2, "predictions")
    for k in a.user:
        _close(a.user[k], b.user[k], k)
    for k in a.ms.t:
        _close(a.ms.t[k], b.ms.t[k], k)
    assert torch.equal(a.count, b.count) and torch.equal(a.last_ts, b.last_ts)
