"""The diverse learners of :mod:`trainer.learners` and the mixture of
:mod:`trainer.diverse`: each learner predicts an event before it learns it
(a rating moves no earlier prediction; cutting the stream changes none of
the earlier ones), and on a real ML-100K slice the learners the mixture
keeps earn their place."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trainer import diverse as D
from trainer.hedge import _rmse, batch_starts, member_predictions
from models.neighbours import VAR_FLOOR
from trainer.learners import neighbourhood as nb
from trainer.learners import user_genre as ug
from trainer.learners.wide_mf import wide_members
from trainer.prequential import stream_order, stretch_cuts

torch.set_num_threads(1)


def _toy(seed: int, n: int = 600, users: int = 12, items: int = 30, genres: int = 5):
    rng = np.random.default_rng(seed)
    y = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], n)
    base = np.clip(y + rng.normal(0, 0.8, n), 1, 5)
    movie = rng.integers(0, items, n)
    g = (rng.random((items, genres)) < 0.4).astype(np.float64)[movie]
    return base, y, rng.integers(0, users, n), movie, g


def _learners():
    small = nb.NeighbourhoodConfig(k=5, shrink=2.0, lam=0.5, history=20)
    bounded = dataclasses.replace(small, slots=8, probes=3)
    return {"neighbourhood": lambda b, y, u, m, g: nb.corrections(b, y, u, m, small),
            "neighbourhood, bounded": lambda b, y, u, m, g: nb.corrections(b, y, u, m, bounded),
            "user-genre": lambda b, y, u, m, g: ug.corrections(b, y, u, g, ug.UserGenreConfig(lr=0.1))}


@pytest.mark.parametrize("name", ["neighbourhood", "neighbourhood, bounded", "user-genre"])
@pytest.mark.parametrize("seed", range(3))
def test_residual_learners_predict_before_they_learn(name, seed):
    """Changing rating j moves no prediction up to j and does move a later
    one; a stream cut after j gives the first j predictions bit for bit."""
    run = _learners()[name]
    b, y, u, m, g = _toy(seed)
    full = run(b, y, u, m, g)
    j = int(np.random.default_rng(seed).integers(100, 500))
    y2 = y.copy()
    y2[j] = 6.0 - y[j] if y[j] != 3.0 else 5.0
    moved = run(b, y2, u, m, g)
    assert np.array_equal(full[: j + 1], moved[: j + 1])
    assert not np.array_equal(full, moved)
    assert np.array_equal(run(b[:j], y[:j], u[:j], m[:j], g[:j]), full[:j])
    assert np.abs(full).max() > 0.01  # they do correct something


@pytest.mark.parametrize("seed", range(3))
def test_bounded_neighbour_tables_equal_the_dense_ones_when_nothing_is_evicted(seed):
    """With a slot for every movie and every slot probed the bounded tables
    hold every pair; with 8 slots of 30 movies they must forget some."""
    b, y, u, m, g = _toy(seed)
    cfg = nb.NeighbourhoodConfig(k=5, shrink=2.0, lam=0.5, history=20)
    dense = nb.corrections(b, y, u, m, dataclasses.replace(cfg, var_floor=VAR_FLOOR))
    full = nb.corrections(b, y, u, m, dataclasses.replace(cfg, slots=32, probes=32))
    assert np.allclose(full, dense, atol=1e-5)
    small = nb.corrections(b, y, u, m, dataclasses.replace(cfg, slots=8, probes=3))
    assert not np.allclose(small, dense, atol=1e-3)


def test_wide_members_predict_before_they_learn(ml100k):
    """The k=30 and k=50 learners, one event per batch (strict time order):
    cutting the first 1,200 ML-100K events at 777 changes no earlier prediction."""
    df = stream_order(ml100k.ratings).iloc[:1200].reset_index(drop=True)
    cfgs = wide_members()
    assert [c.k for c in cfgs] == [30, 50]
    full = member_predictions(ml100k, df, cfgs, batch_starts(len(df), 1))
    part = member_predictions(ml100k, df.iloc[:777], cfgs, batch_starts(777, 1))
    assert np.array_equal(part, full[:777])


@pytest.fixture(scope="module")
def slice20k(ml100k):
    """The pool over the first 20,000 ML-100K ratings by time (batches cut at
    the served model's fine-tune points), every candidate learner in it."""
    df = stream_order(ml100k.ratings).iloc[:20_000].reset_index(drop=True)
    return D.run_diverse_prequential(ml100k, df, cuts=stretch_cuts(len(df), 5000), added=D.CANDIDATES)


def test_the_whole_mixture_changes_no_earlier_prediction_when_cut(ml100k, slice20k):
    """Cut at a batch boundary (the fine-tune point 5,000), the pool, the
    mixture and the neighbourhood on its errors give the first 5,000
    predictions bit for bit."""
    df = stream_order(ml100k.ratings).iloc[:5000].reset_index(drop=True)
    r, k = D.run_diverse_prequential(ml100k, df, cuts=stretch_cuts(20_000, 5000), added=D.CANDIDATES)
    assert np.array_equal(r.extra["pool"], slice20k[0].extra["pool"][:5000])
    assert np.array_equal(r.predictions, slice20k[0].predictions[:5000])
    assert np.array_equal(k.predictions, slice20k[1].predictions[:5000])


def test_the_neighbourhood_on_the_mixtures_errors_earns_its_place(slice20k):
    """First 20,000 ratings: the mixture of the 15 members and the kept
    learners 0.9394, with the neighbourhood on its errors 0.9387."""
    r, k = slice20k
    assert k.rmse < r.rmse - 0.0005, (k.rmse, r.rmse)


def test_the_mixture_uses_the_user_genre_learner(slice20k):
    """Same slice, the neighbourhood on top: 0.9387 with the user x genre
    learner in the pool, 0.9391 without; each kept learner is in the pool."""
    abl = D.ablation(slice20k[0])
    assert abl["15 + kept - user-genre + knn on mix"] > abl["15 + kept + knn on mix"] + 0.0003, abl
    assert abl["15 + kept + knn on mix"] < abl["15 members + knn on mix"] - 0.0007, abl
    assert set(D.ADDED) == {"user-genre", "k30", "k50"}


def test_configs_are_frozen_dataclasses():
    with pytest.raises(dataclasses.FrozenInstanceError):
        D.KNN_ON_MIX.k = 3  # type: ignore[misc]


def test_evaluate_cli_prints_and_writes_the_diverse_models(tmp_path):
    """``fbp evaluate --models online-hedge,online-diverse,online-diverse-knn,
    lstm-diverse-knn-learned --json``: every one in the JSON, River beside
    them, the learned share recorded per seed."""
    import json

    import typer
    from typer.testing import CliRunner

    from trainer.evaluate import cli

    app = typer.Typer()
    app.command()(cli)
    out = tmp_path / "d.json"
    names = ["online-hedge", "online-diverse", "online-diverse-knn", "lstm-diverse-knn-learned"]
    res = CliRunner().invoke(app, ["--data", "synthetic:1200", "--models", ",".join(names), "--seeds", "1",
                                   "--finetune-every", "600", "--epochs", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())["models"]
    assert set(names) | {"river-biasedmf"} <= set(doc)
    assert all(doc[n]["n"] == 1200 for n in names) and "online-diverse-knn" in res.output
    assert doc["online-diverse-knn"]["rmse"] != doc["online-diverse"]["rmse"]
    assert 0.0 <= doc["lstm-diverse-knn-learned"]["per_seed"][0]["final_network_weight"] <= 1.0
