"""The served online part as a Hedge mixture (:mod:`models.mixture`), and the
network's learned share: what each piece promises, checked so that it can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import mixture as mx
from models.registry import build
from trainer.prequential import run_prequential, stream_order

torch.set_num_threads(1)


def _model(**kw):
    return build("lstm", n_movies=20, genre_vocab=["a", "b"], **kw)


def test_the_mixture_is_one_mergeable_side_with_every_member():
    """The first ``owners`` members learn movie tables of their own, the
    others read member 0's; the side packs the owners' rows plus the
    mixture's globals (one owner: one member's rows; K: every member's)."""
    K = len(mx.MEMBERS)
    for owners in (1, mx.MOVIE_SIDE_OWNERS, K):
        m = _model(movie_side_owners=owners)
        ms = m.movie_side()
        assert len(ms.members) == K and [s.cfg.tau_s for s in ms.members] == [t for t, _ in mx.MEMBERS]
        assert [s.cfg.lr_bias / ms.cfg.lr_bias for s in ms.members] == [r for _, r in mx.MEMBERS]
        assert ms.owners == owners and len(ms.ROW) == 4 * owners and ms.GLOBAL[-2:] == mx.MIX_GLOBAL
        assert all((s.t["q"] is ms.members[0].t["q"]) == (j == 0 or j >= owners) for j, s in enumerate(ms.members))
    # every name is a view of the model's buffers: applying an increment updates the model
    ms.apply({"m2_b": (torch.tensor([3]), torch.tensor([0.5])), "hedge_L": (None, torch.ones(K))})
    assert float(m.online_m2_b[3]) == 0.5 and float(m.online_b[3]) == 0.0
    assert torch.equal(m.online_hedge_L, torch.ones(K))


def test_weights_follow_the_losses_and_a_new_user_falls_back_to_the_global_ones():
    hc = mx.HedgeConfig()
    Lg = torch.tensor([0.0, 50.0, 100.0])
    Lu = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    w = mx.hedge_weights(Lg, Lu, hc)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert w[0, 0] > w[0, 1] > w[0, 2]  # no history of its own: the shared ranking
    assert w[1, 1] > w[0, 1]  # the user's own errors move weight away from member 0


def test_mixing_reads_no_rating_before_predicting_it():
    """Changing the last event's rating changes no prediction of the mixture
    (it is mixed before its rating updates any weight), and every earlier
    weight update is the one the reference gives."""
    rng = np.random.default_rng(0)
    n, K = 400, 3
    P = rng.uniform(1, 5, (n, K)).astype(np.float32)
    y = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], n).astype(np.float32)
    row = rng.integers(0, 20, n)
    starts = np.arange(0, n + 1, 50)
    a = mx.hedge(P, y, row, starts, np.zeros((20, K), np.float32), np.zeros(K, np.float32), mx.HedgeConfig())
    y2 = y.copy()
    y2[-1] = 6.0 - y2[-1]
    b = mx.hedge(P, y2, row, starts, np.zeros((20, K), np.float32), np.zeros(K, np.float32), mx.HedgeConfig())
    assert np.array_equal(a, b)
    # a member that is always right takes (almost) all the weight
    P[:, 1] = y
    c = mx.hedge(P, y, row, starts, np.zeros((20, K), np.float32), np.zeros(K, np.float32), mx.HedgeConfig())
    assert np.abs(c[-50:] - y[-50:]).max() < 0.05


def test_a_frozen_movie_side_keeps_the_shared_losses():
    m = _model()
    U, T = 3, 4
    movie = torch.randint(1, 20, (U, T))
    rating = torch.randint(1, 6, (U, T)).float()
    ts = torch.arange(U * T).view(U, T) * 7
    mask = torch.ones(U, T, dtype=torch.bool)
    state = m.init_state(U)
    m.learn_batch(state, movie, rating, ts, mask, learn_movies=False)
    assert not m.online_hedge_L.any() and not m.online_net_w.any()
    _, new, inc = m.learn_batch(state, movie, rating, ts, mask)
    assert m.online_hedge_L.all() and "hedge_L" in inc and "net_w" in inc
    assert new["on_L"].all()


def test_the_share_learns_where_the_network_helps_and_stays_near_zero_where_it_does_not():
    """``learn_blend``: a network that knows the answers earns a share; one
    that is noise keeps it near 0, where the old fixed 0.2 would cost."""
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], 20_480).astype(np.float32))
    base = (y + torch.from_numpy(rng.normal(0, 0.9, len(y)).astype(np.float32))).clamp(1, 5)
    for net, check in ((y + torch.from_numpy(rng.normal(0, 0.5, len(y)).astype(np.float32)),
                        lambda w, p: w > 0.3 and _rmse(p, y) < _rmse(base, y) - 0.05),
                       (torch.from_numpy(rng.uniform(1, 5, len(y)).astype(np.float32)),
                        lambda w, p: w < 0.1 and _rmse(p, y) < _rmse(base, y) + 0.005)):
        m = _model()
        p = torch.cat([m.learn_blend(net[s:s + 1024], base[s:s + 1024], y[s:s + 1024])[0]
                       for s in range(0, len(y), 1024)])
        assert check(m.network_share, p), (m.network_share, _rmse(p, y), _rmse(base, y))


def _rmse(p: torch.Tensor, y: torch.Tensor) -> float:
    return float(((p - y) ** 2).mean().sqrt())


def test_judging_fixes_the_share_at_the_reference_blend():
    from models.lstm import JUDGE_SHARE

    m = _model()
    net, on = torch.tensor([4.0]), torch.tensor([2.0])
    assert float(m._blend(net, on)) == 2.0  # no share learned yet
    with m.judging():
        assert float(m._blend(net, on)) == pytest.approx(2.0 + JUDGE_SHARE * 2.0)
    assert float(m._blend(net, on)) == 2.0 and m.online_weight is None


def test_the_mixture_and_the_genre_biases_beat_the_default_member_on_real_ratings(ml100k):
    """On the first 20,000 ML-100K ratings by time, each piece of the online
    part earns its place: the default member alone (tau 10 s) 0.9431, the
    mixture of seven on one shared movie side 0.9418, with per-user x genre
    biases on its errors 0.9394.  Five copies of the default, each learning
    its own movie side, mix to exactly the default."""
    df = stream_order(ml100k.ratings).iloc[:20_000].reset_index(drop=True)
    kw = dict(genre_vocab=ml100k.genre_vocab, users=ml100k.users, seed=0)

    def rmse(**hp) -> float:
        return run_prequential("online", df, ml100k.movies, hparams=hp, **kw).rmse

    single = rmse(online_members=[[10.0, 1.0]], user_genre=False)
    copies = rmse(online_members=[[10.0, 1.0]] * 5, user_genre=False, movie_side_owners=5)
    mixed = rmse(user_genre=False)
    served = rmse()
    print(f"single {single:.4f} mixture {mixed:.4f} + genre biases {served:.4f}")
    assert copies == pytest.approx(single, abs=1e-6)
    assert mixed < single - 0.001 and served < mixed - 0.001, (single, mixed, served)


# -- the neighbourhood (models/neighbours.py) ----------------------------------
def _batch(seed: int, U: int = 4, T: int = 6, n_movies: int = 20):
    g = torch.Generator().manual_seed(seed)
    movie = torch.randint(0, n_movies, (U, T), generator=g)
    rating = torch.randint(1, 6, (U, T), generator=g).float()
    ts = torch.cumsum(torch.randint(0, 50, (U, T), generator=g), 1)
    mask = torch.ones(U, T, dtype=torch.bool)
    mask[1, 4:] = False
    return movie, rating, ts, mask


def test_neighbourhood_kernel_equals_the_round_loop_and_step_equals_the_sequence():
    """With the neighbourhood on, the compiled batch path and the torch
    round loop give the same predictions, states and tables; ``step`` event
    by event equals ``forward_sequence`` (tables fixed during both)."""
    import copy

    m = _model(neighbours=True).eval()
    for seed in range(3):  # the tables fill up over several batches
        ref = copy.deepcopy(m)
        state = m.init_state(4)
        batch = _batch(seed)
        p1, u1, _ = m.online_batch_kernel(state, *batch)
        p2, u2, _ = ref.online_batch_rounds(state, *batch)
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
        for k in ("on_nm", "on_ne", "on_nn"):
            torch.testing.assert_close(u1[k], u2[k], atol=1e-5, rtol=1e-5)
        for f in m.nb_tables.dtype.names:
            np.testing.assert_allclose(m.nb_tables[f], ref.nb_tables[f], atol=1e-5)
    assert m.nb_tables["n"].sum() > 0, "the tables must have learned pairs"
    movie, rating, ts, mask = _batch(7)
    full = torch.ones_like(mask)
    state = m.init_state(4)
    seq, _ = m.forward_sequence(movie, rating, ts, full, state=state, return_state=True)
    steps = []
    for j in range(movie.shape[1]):
        state, p = m.step(state, movie[:, j], rating[:, j], ts[:, j])
        steps.append(p)
    torch.testing.assert_close(seq, torch.stack(steps, 1), atol=1e-5, rtol=1e-5)


def test_a_swap_keeps_the_neighbourhood_tables():
    from stream.batch.serving import Serving

    old, new = _model(neighbours=True), _model(neighbours=True)
    old.ensure_capacity(40)
    old.nb_tables["n"][5, 0] = 2.0
    serving = Serving(old)
    serving.offer(new)
    assert serving.swap() and serving.model is new
    assert new.capacity >= 41 and new.nb_tables["n"][5, 0] == 2.0
    plain = _model(neighbours=False)
    plain.adopt_local(old)  # a model without a neighbourhood takes nothing
    assert plain.nb_tables is None


def test_the_neighbourhood_helps_on_real_ratings(ml100k):
    """ML-100K's first half by time (where its settings were chosen): the
    online part with the neighbourhood on its errors beats it without
    (0.9218 -> 0.9203 today, python -m trainer.served_tune)."""
    df = stream_order(ml100k.ratings).iloc[:50_000].reset_index(drop=True)
    kw = dict(genre_vocab=ml100k.genre_vocab, users=ml100k.users, seed=0)
    off = run_prequential("online", df, ml100k.movies, hparams={"neighbours": False}, **kw).rmse
    on = run_prequential("online", df, ml100k.movies, **kw).rmse
    print(f"neighbourhood off {off:.4f} on {on:.4f}")
    assert on < off - 0.0004, (off, on)


def test_the_served_ablation_runs_each_variant_on_the_same_events(monkeypatch):
    """Each row is the served family with one setting changed; the served row
    is exactly what run_prequential gives, the network row its network half."""
    from core.datasets import load_dataset
    from trainer import served_ablation as A

    monkeypatch.setattr(A, "VARIANTS", {k: A.VARIANTS[k] for k in ("served lstm", "no genre biases")})
    doc = A.run("synthetic:800")
    ds = load_dataset("synthetic:800")
    ref = run_prequential("lstm", ds.ratings, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users, seed=0)
    assert doc["rows"]["served lstm"]["rmse"] == ref.rmse
    y = stream_order(ds.ratings)["rating"].to_numpy(np.float64)
    assert doc["rows"]["network alone"]["rmse"] == pytest.approx(float(np.sqrt(np.mean((ref.extra["network"] - y) ** 2))))
    assert set(doc["rows"]) == {"served lstm", "network alone", "no genre biases", "river-biasedmf"}
    assert "| no genre biases |" in A.table(doc)


def test_the_sequence_pass_takes_the_kernel_and_equals_the_torch_loop(monkeypatch):
    """``forward_sequence``'s online half (the judge's and validation's path)
    runs the compiled kernels on CPU, with nothing shared learned, and gives
    what the torch loop gives."""
    m = _model(neighbours=True).eval()
    m.ensure_capacity(20)
    movie, rating, ts, mask = _batch(3, U=5, T=9)
    state = m.init_state(5)
    side = {k: v.clone() for k, v in m.movie_side().t.items()}
    fast, fu = m._online_sequence(state, movie, rating, ts, mask)
    monkeypatch.setattr(type(m), "_kernel_ok", lambda self, state, movie: False)
    slow, su = m._online_sequence(state, movie, rating, ts, mask)
    torch.testing.assert_close(fast[mask], slow[mask], atol=1e-5, rtol=1e-5)
    for k in su:
        torch.testing.assert_close(fu[k].to(su[k].dtype), su[k], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(side[k], v) for k, v in m.movie_side().t.items()), "the movie side must stay fixed"


def test_a_network_trained_from_scratch_starts_at_the_judged_share(ml100k):
    """``fit`` on a fresh model: the share learned before training (against
    an untrained network) is replaced by the reference share, which the
    validation events then move; fine-tunes of a live model keep theirs."""
    from models.lstm import JUDGE_SHARE
    from trainer.train import fit, make_model

    df = stream_order(ml100k.ratings).iloc[:3000]
    m = make_model("lstm", ml100k.movies, ml100k.genre_vocab, int(df["movie_id"].max()))
    fit(m, df, epochs=1, valid_frac=0.1, seed=0)
    w = m.network_share
    assert 0.0 < w <= 1.0 and abs(w - JUDGE_SHARE) < 0.1, w
    m.online_net_w.fill_(0.5)
    fit(m, df, epochs=1, valid_frac=0.0, seed=0)  # the movie side is live: no fresh start
    assert m.network_share == 0.5


def test_served_tune_scores_each_choice_on_the_tuning_slice_only():
    """The settings' record: every candidate scored on the first share of
    ML-100K by time (the slice's own size), grids best first."""
    from trainer.served_tune import SETS, tune

    doc = tune(frac=0.05)
    assert doc["n"] == 5000 and set(doc["members"]) == set(SETS)
    for grid in (doc["user_genre"]["grid (rmse, lr, l2)"], doc["neighbours"]["grid (rmse, k, shrink, lam, cpu us per event)"]):
        scores = [row[0] for row in grid]
        assert scores == sorted(scores) and all(np.isfinite(scores))
    budget = doc["neighbours"]["budget (history, slots, probes, rmse, cpu us per event)"]
    assert [row[0] for row in budget] == [16, 32, 64, 64, 64] and all(np.isfinite(row[3]) for row in budget)
    sides = doc["movie_side"]
    assert sides[f"{mx.MOVIE_SIDE_OWNERS} owners (served)"] == doc["neighbours"]["served online part without it"]
    assert len(set(sides.values())) == 3
    owners = doc["owners"]
    assert len(owners["chosen"]) == mx.MOVIE_SIDE_OWNERS and owners["chosen"][0] == list(mx.MEMBERS[0])
    assert len(owners["2 owners: each candidate"]) == len(mx.MEMBERS) - 1
    share = doc["share"]
    # hindsight bounds: finer buckets can only fit better; the learned share
    # can do no better than the best single share chosen after the fact
    # (up to the clamp to the rating range, which only helps the served one)
    single = share["hindsight: best single share"]
    assert share["hindsight: best share per log2 rating count"] <= single + 1e-12
    assert share["hindsight: best share per disagreement step"] <= single + 1e-12
    assert single <= share["online part alone"] + 1e-12
    assert 0.0 <= share["final learned share"] <= 1.0
