"""Prequential simulator and `fbp evaluate` on a small synthetic stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from core.datasets import load_dataset, synthetic_stream
from trainer.prequential import occurrence_rank, rolling_rmse, run_prequential, run_river_prequential

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return synthetic_stream(5000, n_users=80, n_movies=200, seed=4)


def _running_mean_rmse(y):
    c = np.cumsum(np.r_[0.0, y])[:-1]
    p = np.where(np.arange(len(y)) > 0, c / np.maximum(np.arange(len(y)), 1), 3.0)
    return float(np.sqrt(np.mean((p - y) ** 2)))


@pytest.mark.parametrize("policy", ["window", "replay"])
def test_prequential_beats_global_mean(data, policy):
    r = run_prequential("mf", data.ratings, data.movies, genre_vocab=data.genre_vocab,
                        finetune_every=1000, epochs=2, batch_events=256, policy=policy, lr=1e-2)
    y = data.ratings.sort_values("ts", kind="stable")["rating"].to_numpy(np.float64)
    assert r.n == len(y) and r.finetunes == 7 and len(r.rolling) == r.n
    assert np.isfinite(r.predictions).all()
    assert r.rmse < _running_mean_rmse(y) - 0.05, (r.rmse, _running_mean_rmse(y))


def test_chunking_does_not_change_predictions(data):
    df = data.ratings.iloc[:1500]
    kw = dict(genre_vocab=data.genre_vocab, finetune_every=600, epochs=1, warmup=0)
    net = dict(kw, hparams={"online": False})  # the network alone: chunking is invisible
    a = run_prequential("lstm", df, data.movies, batch_events=1, mode="step", **net)
    b = run_prequential("lstm", df, data.movies, batch_events=700, mode="step", **net)
    c = run_prequential("lstm", df, data.movies, mode="sequence", **net)
    assert np.allclose(a.predictions, b.predictions, atol=1e-5)
    assert np.allclose(a.predictions, c.predictions, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 64])
def test_online_fast_path_equals_worker_path(data, batch):
    """The served lstm (online part on): the simulator's fast path (online
    rounds + network sequence pass) gives the worker's per-round
    ``online_step`` predictions, increments merged after every round."""
    df = data.ratings.iloc[:1200]
    kw = dict(genre_vocab=data.genre_vocab, finetune_every=500, epochs=1, warmup=0, batch_events=batch)
    a = run_prequential("lstm", df, data.movies, mode="step", **kw)
    c = run_prequential("lstm", df, data.movies, mode="sequence", **kw)
    assert np.allclose(a.predictions, c.predictions, atol=1e-4)
    assert not np.allclose(a.predictions, c.extra["network"], atol=1e-3)  # the online half contributes


def test_helpers():
    from trainer.prequential import finetune_points

    assert finetune_points(5000, 1000) == [125, 250, 500, 1000, 2000, 3000, 4000]
    assert finetune_points(5000, 0) == [] and finetune_points(5000, 1000, warmup=0) == [1000, 2000, 3000, 4000]
    assert occurrence_rank(np.array([5, 5, 2, 5, 2])).tolist() == [0, 1, 0, 2, 1]
    assert np.allclose(rolling_rmse(np.array([1.0, 3.0, 3.0]), 2), [1.0, np.sqrt(5), 3.0])


def test_river_runs(data):
    """River's BiasedMF learns: 1.149 against 1.167 for the running mean."""
    r = run_river_prequential(data.ratings.iloc[:500])
    y = data.ratings.iloc[:500].sort_values("ts", kind="stable")["rating"].to_numpy(np.float64)
    assert r.n == 500 and r.rmse < _running_mean_rmse(y) - 0.01, (r.rmse, _running_mean_rmse(y))


def test_evaluate_cli_json_shape(tmp_path):
    from trainer.evaluate import cli

    app = typer.Typer()
    app.command()(cli)
    args = ["--data", "synthetic:2000", "--models", "baseline,mf", "--finetune-every", "1000", "--epochs", "1",
            "--train-epochs", "2", "--seed", "0", "--seeds", "2", "--device", "cpu"]
    one = tmp_path / "one.json"
    res = CliRunner().invoke(app, args + ["--protocol", "prequential", "--json", str(one),
                                          "--markdown", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    doc = json.loads(one.read_text())
    assert doc["protocol"] == "prequential" and doc["dataset"].startswith("synthetic")
    assert doc["seeds"] == [0, 1]
    assert set(doc["models"]) == {"baseline", "mf", "river-biasedmf", "river-baseline"}
    for v in doc["models"].values():
        assert {"rmse", "mae", "rmse_std"} <= set(v) and v["rmse"] > 0 and len(v["per_seed"]) == 2
        assert np.isclose(v["rmse"], np.mean([r["rmse"] for r in v["per_seed"]]))
    # the River latent initialiser differs per seed, so BiasedMF shows a spread
    assert doc["models"]["river-biasedmf"]["rmse_std"] > 0
    assert (tmp_path / "p.png").stat().st_size > 1000 and "| mf |" in (tmp_path / "t.md").read_text()
    both = tmp_path / "both.json"
    res = CliRunner().invoke(app, args + ["--protocol", "both", "--json", str(both), "--no-river"])
    assert res.exit_code == 0, res.output
    doc = json.loads(both.read_text())
    assert doc["protocol"] == "both" and set(doc["protocols"]) == {"time-split", "prequential"}
    ts = doc["protocols"]["time-split"]
    assert ts["protocol"] == "time-split" and set(ts["models"]) == {"baseline", "mf"}
    assert "surprise-svd" in ts["references"]


def test_demo_protocol_scores_only_the_streamed_part(tmp_path):
    """demo: the first 20% by time is a bootstrap (learned, not scored)."""
    from trainer.evaluate import cli

    app = typer.Typer()
    app.command()(cli)
    out = tmp_path / "demo.json"
    res = CliRunner().invoke(app, ["--data", "synthetic:2000", "--models", "baseline", "--protocol", "demo",
                                   "--seeds", "1", "--finetune-every", "500", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "demo" and doc["bootstrap_frac"] == 0.2
    assert {m["n"] for m in doc["models"].values()} == {1600}


def test_river_baseline_and_bootstrap(data):
    r = run_river_prequential(data.ratings.iloc[:600], kind="river-baseline", bootstrap=100)
    y = data.ratings.iloc[:600].sort_values("ts", kind="stable")["rating"].to_numpy(np.float64)[100:]
    assert r.n == 500 and r.predictions.min() >= 1.0 and r.predictions.max() <= 5.0
    assert r.rmse < _running_mean_rmse(y) - 0.01, (r.rmse, _running_mean_rmse(y))  # 1.136 vs 1.155


def test_ablations_table(tmp_path):
    """--ablations: River's two peers and every online variant, on the first half only."""
    from trainer.ablations import VARIANTS
    from trainer.evaluate import cli

    app = typer.Typer()
    app.command()(cli)
    out = tmp_path / "abl.json"
    res = CliRunner().invoke(app, ["--data", "synthetic:2000", "--ablations", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["n"] == 1000 and doc["protocol"] == "ablations"
    assert set(doc["models"]) == {"river-biasedmf", "river-baseline"} | {v[0].strip() for v in VARIANTS}
    y = load_dataset("synthetic:2000").ratings.sort_values("ts", kind="stable")["rating"].to_numpy(np.float64)[:1000]
    assert doc["models"]["river-biasedmf"]["rmse"] < _running_mean_rmse(y) - 0.005  # 1.2002 vs 1.2106
    assert len({round(r["rmse"], 6) for r in doc["models"].values()}) >= 4  # the variants differ


def test_online_is_the_served_models_online_half(data, tmp_path):
    """``online`` predicts exactly what the served lstm's online half predicts
    on the same events (so ``--models lstm,online`` measures the network's
    share), without fine-tunes; the CLI writes it as ``models.online``."""
    from trainer.evaluate import cli

    df = data.ratings.iloc[:1500]
    kw = dict(genre_vocab=data.genre_vocab, finetune_every=500, epochs=1, warmup=0, batch_events=256)
    served = run_prequential("lstm", df, data.movies, **kw)
    alone = run_prequential("online", df, data.movies, **kw)
    assert served.finetunes == 2 and alone.finetunes == 0
    assert np.array_equal(alone.predictions, served.extra["online"])
    assert not np.allclose(alone.predictions, served.predictions, atol=1e-3)
    app = typer.Typer()
    app.command()(cli)
    out = tmp_path / "o.json"
    res = CliRunner().invoke(app, ["--data", "synthetic:1500", "--models", "online", "--seeds", "1", "--no-river",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())["models"]) == {"online"}
