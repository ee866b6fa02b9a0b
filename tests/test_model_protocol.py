"""The serving-model protocol (``models.base.RatingModel``), for every
registered family: step one event at a time equals the sequence forward,
packing round-trips, re-derivation is a fresh pass over the window, the
candidate list, and the abstract base refusing incomplete families.

Nothing here names a family except the toy and the foreign-state check, so a
family added to ``models.registry`` is covered without editing this file."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models.base
from models import state as S
from models.base import RatingModel, Unpacked
from models.common import StatefulModel
from models.registry import MODELS, UnknownModel, available, build, model_class

torch.set_num_threads(1)

_CACHE: dict[str, RatingModel] = {}


def _model(name: str) -> RatingModel:
    """A small ``name`` model with random (not zero) weights, built once."""
    if name not in _CACHE:
        torch.manual_seed(1)
        m = build(name, n_movies=16, window=5, genre_vocab=["a", "b", "c"])
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        m.eval()
        _CACHE[name] = m
    return _CACHE[name]


history = st.lists(
    st.tuples(st.integers(0, 40), st.sampled_from([1.0, 2.0, 3.0, 3.5, 4.0, 5.0]), st.integers(0, 10**6)),
    min_size=0,
    max_size=12,
)


def _pad(hists, t0=10**9):
    B, T = len(hists), max(1, max(len(h) for h in hists))
    movie = torch.zeros(B, T, dtype=torch.int64)
    rating = torch.zeros(B, T)
    ts = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, h in enumerate(hists):
        t = t0
        for j, (mv, r, gap) in enumerate(h):
            t += gap
            movie[b, j], rating[b, j], ts[b, j], mask[b, j] = mv, r, t, True
    return movie, rating, ts, mask


def _stepwise(m: RatingModel, state, movie, rating, ts, mask):
    """The stream's path: one ``step`` per event, only the users that have one."""
    preds = torch.zeros(movie.shape)
    for t in range(movie.shape[1]):
        idx = torch.nonzero(mask[:, t]).flatten()
        if idx.numel() == 0:
            continue
        sub, p = m.step(S.select(state, idx), movie[idx, t], rating[idx, t], ts[idx, t])
        preds[idx, t] = p
        S.scatter(state, idx, sub)
    return preds, state


def _assert_states_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        diff = (a[k].double() - b[k].double()).abs().max() if a[k].numel() else 0.0
        assert torch.allclose(a[k].double(), b[k].double(), atol=atol, rtol=1e-5), (k, float(diff))


@pytest.mark.parametrize("name", available())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hists=st.lists(history, min_size=1, max_size=4), more=st.lists(history, min_size=1, max_size=4))
def test_step_equals_sequence_forward(name, hists, more):
    m = _model(name)
    movie, rating, ts, mask = _pad(hists)
    m.ensure_capacity(int(movie.max()))  # ids beyond capacity grow the tables
    B = len(hists)
    with torch.no_grad():
        seq_pred, seq_state = m.forward_sequence(movie, rating, ts, mask, return_state=True)
        step_pred, step_state = _stepwise(m, m.init_state(B), movie, rating, ts, mask)
        assert torch.isfinite(seq_pred).all()
        assert torch.allclose(seq_pred[mask], step_pred[mask], atol=1e-5)
        _assert_states_close(seq_state, step_state)
        assert torch.equal(m.forward_sequence(movie, rating, ts, mask), seq_pred)
        # continuing from a non-empty state (a worker batch with several events of a user)
        m2, r2, t2, k2 = _pad((more * B)[:B], t0=2 * 10**9)
        start = {k: v.clone() for k, v in seq_state.items()}
        pred2, fin2 = m.forward_sequence(m2, r2, t2, k2, state=start, return_state=True)
        pred2s, st2 = _stepwise(m, step_state, m2, r2, t2, k2)
        assert torch.allclose(pred2[k2], pred2s[k2], atol=1e-5)
        _assert_states_close(fin2, st2)
        _assert_states_close(m.final_state(m2, r2, t2, k2, state=seq_state), fin2)


@pytest.mark.parametrize("name", available())
def test_score_is_what_step_predicts(name):
    """``score`` of the event's movie, from the state before it, is ``step``'s
    prediction for that event "rated now" (at the user's latest event's time:
    a time-aware family's session term decays with the gap).  Top-K ranks
    movies by the number the next event would get."""
    m = _model(name)
    g = torch.Generator().manual_seed(5)
    st = m.init_state(6)
    prev = torch.full((6,), 10**9)
    for t in range(8):
        movie = torch.randint(0, 16, (6,), generator=g)
        rating = torch.randint(1, 6, (6,), generator=g).float()
        ts = prev + 600 * (t > 0)
        with torch.no_grad():
            before = m.score(st, movie[:, None])[:, 0]
            _, now = m.step(st, movie, rating, prev)  # the same event, rated at the latest time
            st, _ = m.step(st, movie, rating, ts)
        assert torch.allclose(before, now, atol=1e-5), (t, before, now)
        prev = ts


@pytest.mark.parametrize("name", available())
def test_packing_and_rederive_through_the_protocol(name):
    m = _model(name)
    g = torch.Generator().manual_seed(3)
    B, T = 4, 9
    movie = torch.randint(0, 16, (B, T), generator=g)
    rating = torch.randint(1, 6, (B, T), generator=g).float()
    ts = 10**9 + torch.arange(T)[None, :].expand(B, T) * 3600
    mask = torch.arange(T)[None, :] < torch.tensor([0, 2, 5, 9])[:, None]
    with torch.no_grad():
        state = m.final_state(movie, rating, ts, mask)
    blobs = m.pack_states(state)
    assert len(blobs) == B and all(len(b) == m.state_bytes() for b in blobs)
    back = m.unpack_states(blobs + [None], "cpu")
    assert isinstance(back, Unpacked)
    assert not back.stale.any() and not back.foreign.any()
    for k in state:
        assert torch.equal(back.state[k][:B], state[k]), k
        assert torch.equal(back.state[k][B:], m.init_state(1)[k]), k
    # a new version: every stored row is stale; rederive recomputes each key by
    # a fresh pass over the window, or keeps it (weight-independent keys)
    old_version = m.version
    m.version = old_version + 1
    try:
        again = m.unpack_states(blobs, "cpu")
        assert again.stale.all()
        stale = torch.tensor([False, True, True, True])
        with torch.no_grad():
            fresh = m.rederive({k: v.clone() for k, v in again.state.items()}, stale)
            wm, wr, wt, wk = S.window_sequence(m, state)
            want = m.final_state(wm, wr, wt, wk)
        rederived = 0
        for k in state:
            assert torch.equal(fresh[k][0], state[k][0]), k  # not stale: unchanged
            if k in ("count", "mean", "last_ts"):  # whole-history counters are kept
                assert torch.equal(fresh[k], state[k]), k
                continue
            for row in (1, 2, 3):
                kept = torch.equal(fresh[k][row], state[k][row])
                again_ = torch.allclose(fresh[k][row].double(), want[k][row].double(), atol=1e-5)
                assert kept or again_, (k, row)
                rederived += again_ and not kept
        has_own_state = set(state) - set(build("toy").state_spec())
        assert rederived > 0 or not has_own_state, "weights changed but nothing was re-derived"
    finally:
        m.version = old_version


def test_foreign_and_malformed_blobs_are_reported_not_raised():
    toy, other = _model("toy"), _model("baseline")
    st = toy.init_state(1)
    st, _ = toy.step(st, torch.tensor([3]), torch.tensor([5.0]), torch.tensor([100]))
    mine = toy.pack_states(st)[0]
    theirs = other.pack_states(other.init_state(1))[0]
    got = toy.unpack_states([theirs, mine, b"garbage", None], "cpu")
    assert got.foreign.tolist() == [True, False, True, False]
    assert got.stale.tolist() == [False, False, False, False]
    assert got.state["count"].tolist() == [0, 1, 0, 0]  # foreign rows: initial state


@pytest.mark.parametrize("name", available())
def test_candidate_ids_are_the_known_movies_cached_per_capacity_device_version(name):
    m = build(name, n_movies=20)  # no genre vocabulary: only the bias marks a known movie
    assert torch.equal(m.candidate_ids(), torch.arange(m.capacity))  # knows none: all
    with torch.no_grad():
        m.movie_bias.zero_()
        m.movie_bias[[2, 5, 11]] = 0.3
    m.version += 1  # new weights come with a new version
    first = m.candidate_ids()
    assert first.tolist() == [2, 5, 11] and first.dtype == torch.int64
    assert m.candidate_ids() is first  # cached
    m.ensure_capacity(100)  # grown tables: recomputed (same known rows)
    assert m.candidate_ids() is not first and m.candidate_ids().tolist() == [2, 5, 11]


def test_candidate_ids_follow_the_model_to_its_device():
    """The cached list must not outlive a move of the model (a model queued
    for a swap can be scored by the API before the worker moves it)."""
    m = build("toy", n_movies=20)
    with torch.no_grad():
        m.movie_bias[[2, 5]] = 0.3
    first = m.candidate_ids()
    # as if cached while the model sat on another device (meta stands in for CUDA here)
    m._candidates = (m.capacity, torch.device("meta"), m.version, first.to("meta"))
    again = m.candidate_ids()
    assert again.device.type == "cpu" and again.tolist() == [2, 5]


def test_docstring_example_runs():
    res = doctest.testmod(models.base, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 10 and res.failed == 0, res


def test_the_base_refuses_an_incomplete_family():
    with pytest.raises(TypeError, match="abstract"):
        RatingModel()  # type: ignore[abstract]

    class NoSequence(StatefulModel):  # forgot _sequence
        name = "nosequence"

        def _predict_state(self, state, ids):
            return self.global_mean + self._bias(ids)

    with pytest.raises(TypeError, match="_sequence"):
        NoSequence()


def test_registry_entries_build_their_named_class():
    for name in available():
        cls = model_class(name)
        assert issubclass(cls, RatingModel) and cls.name == name
        assert build(name, n_movies=4).name == name
    assert "toy" in MODELS
    with pytest.raises(UnknownModel):
        build("transformer")


@pytest.mark.parametrize("name", available())
def test_recent_events_are_the_latest_events_oldest_first(name):
    m = build(name, n_movies=16, window=4)
    st = m.init_state(2)
    events = [(3, 4.0), (5, 2.0), (7, 5.0), (9, 1.0), (11, 3.0)]  # user 0 rates all, user 1 the first two
    for t, (mv, r) in enumerate(events):
        new, _ = m.step(st, torch.tensor([mv, mv]), torch.tensor([r, r]), torch.tensor([100 + t] * 2))
        keep = torch.tensor([True, t < 2])
        st = {k: torch.where(keep.view(-1, *[1] * (v.dim() - 1)), new[k], v) for k, v in st.items()}
    movie, rating, ts, mask = m.recent_events(st)
    assert movie[0].tolist() == [5, 7, 9, 11] and rating[0].tolist() == [2.0, 5.0, 1.0, 3.0]
    assert ts[0].tolist() == [101, 102, 103, 104] and mask[0].all()
    assert mask[1].tolist() == [True, True, False, False] and movie[1, :2].tolist() == [3, 5]
    count, mean = m.rating_stats(st)  # the whole history, not only the window
    assert count.tolist() == [5, 2] and mean.tolist() == pytest.approx([3.0, 3.0])


@pytest.mark.parametrize("name", available())
def test_training_hooks_init_from_data_and_movie_l2(name):
    m = build(name, n_movies=8, genre_vocab=["x", "y"])
    probe = m.init_state(1), torch.tensor([7])
    untrained = m.score(*probe)
    m.init_from_data(1.7)
    first = m.score(*probe)
    m.init_from_data(4.4)  # trained once: keeps its own constants
    assert not torch.equal(first, untrained) and torch.equal(m.score(*probe), first)
    ids = torch.tensor([1, 1, 6])
    loss = m.movie_l2(ids)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and loss.item() >= 0
    with torch.no_grad():
        m.movie_bias[1] = 2.0
    assert m.movie_l2(ids).item() >= 8.0  # row 1 used twice: 2 * 2.0**2


def test_genres_of_movies():
    import pandas as pd

    m = build("toy", n_movies=4, genre_vocab=["Drama", "Comedy"])
    m.set_movies(pd.DataFrame({"movie_id": [1, 2], "year": [1990.0, 1995.0],
                               "genres": [["Comedy"], ["Drama", "Comedy"]]}))
    assert m.genre_names() == ["Drama", "Comedy"]
    assert m.movie_genres(torch.tensor([1, 2, 3, 99])).tolist() == [[0, 1], [1, 1], [0, 0], [0, 0]]


def test_serving_and_training_code_use_only_the_protocol():
    """The worker, the API, the trainer and the tools reach models through
    RatingModel's methods: no model tables or the candidate cache read from
    outside ``models/``, no ``type: ignore`` to call a protocol method, and in
    the serving code (``stream/``) no getattr/hasattr or private attribute on
    a model at all."""
    root = Path(__file__).resolve().parent.parent
    protocol = "|".join(n for n in dir(RatingModel) if not n.startswith("_") and n not in dir(torch.nn.Module))
    everywhere = [
        re.compile(r"\bmodel\.(movie_bias|movie_features|item_factors|movie_tables|global_mean|trained|genre_vocab)\b"),
        re.compile(r"_fbp_candidates|\bmodel\._candidates"),
        re.compile(rf"\bmodel\.({protocol})\(.*# type: ignore"),
    ]
    serving = [re.compile(r"(getattr|hasattr)\(\s*(self\.)?model\b"), re.compile(r"\bmodel\._\w+")]
    found = []
    for pkg in ("stream", "trainer", "bench", "fbp"):
        probes = everywhere + (serving if pkg == "stream" else [])
        for path in sorted((root / pkg).rglob("*.py")):
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if any(p.search(line) for p in probes):
                    found.append(f"{path.relative_to(root)}:{no}: {line.strip()}")
    assert "step" in protocol.split("|") and "candidate_ids" in protocol.split("|")
    assert not found, "\n".join(found)
