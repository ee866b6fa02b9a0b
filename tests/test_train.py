"""fit / evaluate_rmse / replay_states / `fbp train` on small synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from models import state as S
from models.checkpoint import load_checkpoint
from core.datasets import synthetic_stream, time_split
from trainer.train import evaluate_rmse, fit, make_model, replay_states

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return synthetic_stream(4000, n_users=60, n_movies=150, seed=3)


@pytest.mark.parametrize("name", ["mf", "lstm"])
def test_fit_reduces_validation_rmse(data, name):
    train, test = time_split(data.ratings, 0.8)
    m = make_model(name, data.movies, data.genre_vocab)
    before = evaluate_rmse(m, test, context_df=train).rmse
    rep = fit(m, train, epochs=6, lr=1e-2, batch_users=32, device="cpu", valid_frac=0.1, seed=0, progress=False)
    after = evaluate_rmse(m, test, context_df=train).rmse
    assert rep.best_valid_rmse is not None and rep.best_valid_rmse < rep.valid_rmse[0] + 1e-9
    assert after < before - 0.05, (before, after)


def test_fit_is_reproducible(data):
    def run():
        torch.manual_seed(0)
        m = make_model("mf", data.movies, data.genre_vocab)
        fit(m, data.ratings, epochs=2, device="cpu", valid_frac=0.0, seed=5, progress=False)
        return m.state_dict()

    a, b = run(), run()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_evaluate_aligns_and_replay_matches_step(data):
    df = data.ratings.iloc[:600]
    m = make_model("lstm", data.movies, data.genre_vocab)
    ev = evaluate_rmse(m, df)
    users, st = replay_states(m, df)
    # step through the same events one at a time
    uidx = {int(u): i for i, u in enumerate(users)}
    state = m.init_state(len(users))
    preds = np.zeros(len(df), np.float32)
    with torch.no_grad():
        for k, row in enumerate(df.itertuples()):
            i = torch.tensor([uidx[row.user_id]])
            sub, p = m.step(S.select(state, i), torch.tensor([row.movie_id]), torch.tensor([row.rating]), torch.tensor([row.ts]))
            S.scatter(state, i, sub)
            preds[k] = float(p)
    assert np.allclose(preds, ev.predictions, atol=1e-5)
    for key in st:
        assert torch.allclose(st[key].double(), state[key].double(), atol=1e-5), key


def test_train_cli_writes_checkpoint(tmp_path):
    from trainer.train import cli

    app = typer.Typer()
    app.command()(cli)
    out = tmp_path / "m" / "model"
    res = CliRunner().invoke(app, ["--data", "synthetic:3000", "--model", "mf", "--out", str(out), "--epochs", "2",
                                   "--device", "cpu", "--seed", "1", "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    model, meta = load_checkpoint(out)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert model.name == "mf" and doc["sha256"] == meta["sha256"]
    assert 0 < meta["metrics"]["test_rmse"] < 2


def test_fit_validates_on_ratings_the_online_side_has_not_learned(data, monkeypatch):
    """Early stopping scores the last 10% by time: when it does, the fresh
    online movie side has learned the training events only (one count per
    event in its running mean), and the validation ratings reach no movie row;
    the checkpoint then ships all the events."""
    import trainer.train as T

    df = data.ratings.iloc[:2000]
    n_valid = int(round(len(df) * 0.1))
    valid = df.iloc[T._time_order(df)[len(df) - n_valid:]]
    seen = []
    score = T._score

    def spy(model, seqs, device, *a, **kw):
        seen.append((float(model.online_mu[1]), model.online_b.clone()))
        return score(model, seqs, device, *a, **kw)

    monkeypatch.setattr(T, "_score", spy)
    m = make_model("lstm", data.movies, data.genre_vocab)
    fit(m, df, epochs=2, batch_users=32, device="cpu", valid_frac=0.1, seed=0, progress=False)
    assert [c for c, _ in seen] == [len(df) - n_valid] * 2
    # a movie rated only in the validation slice has no learned bias yet
    only_valid = np.setdiff1d(valid["movie_id"].unique(), df.drop(valid.index)["movie_id"].unique())
    assert len(only_valid) and all(float(b[only_valid].abs().max()) == 0.0 for _, b in seen)
    assert float(m.online_mu[1]) == len(df) and float(m.online_b[only_valid].abs().max()) > 0
