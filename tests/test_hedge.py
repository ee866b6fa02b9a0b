"""trainer.hedge: the mixture of online learners looks at no rating before it
is revealed, reduces to its members where it should, and on a real ML-100K
slice beats the member that is today's default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from trainer import hedge as H

torch.set_num_threads(1)


def _toy(seed: int, n: int = 300, K: int = 4, users: int = 7):
    rng = np.random.default_rng(seed)
    y = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], n)
    P = np.clip(y[:, None] + rng.normal(0, 1, (n, K)) * rng.uniform(0.2, 2, K), 1, 5).astype(np.float32)
    return P, y, rng.integers(0, users, n)


@pytest.mark.parametrize("seed", range(5))
def test_a_rating_moves_no_earlier_prediction_nor_its_batch_for_other_users(seed):
    P, y, u = _toy(seed)
    starts = H.batch_starts(len(y), 32, [50])
    hc = H.HedgeConfig(eta_g=0.05, gamma_g=0.99, eta_u=0.2, gamma_u=0.9)
    base = H.mix(P, y, u, hc, starts)
    j = int(np.random.default_rng(seed).integers(60, 250))
    y2 = y.copy()
    y2[j] = y[j] + 0.5
    moved = H.mix(P, y2, u, hc, starts)
    assert np.array_equal(base[: j + 1], moved[: j + 1])
    end = int(starts[np.searchsorted(starts, j, side="right")])  # the end of j's batch
    later_same_batch = np.arange(j + 1, end)
    others = later_same_batch[u[later_same_batch] != u[j]]
    assert np.array_equal(base[others], moved[others])
    assert not np.array_equal(base, moved)  # the revealed rating does count, later


def test_mixture_reduces_to_its_members():
    P, y, u = _toy(0)
    one = H.mix(P[:, :1], y, u, H.HedgeConfig())
    assert np.allclose(one, P[:, 0], atol=1e-6)
    flat = H.mix(P, y, u, H.HedgeConfig(eta_g=0.0, eta_u=0.0))
    assert np.allclose(flat, P.mean(1), atol=1e-5)


def test_batch_starts_restart_at_cuts():
    assert H.batch_starts(10, 4).tolist() == [0, 4, 8, 10]
    assert H.batch_starts(10, 4, [5, 0, 12]).tolist() == [0, 4, 5, 9, 10]


def test_members_cross_taus_and_rate_scales():
    cfgs = H.members()
    assert len(cfgs) == len(H.TAUS) * len(H.RATE_SCALES) == 15
    assert {(c.tau_s, round(c.lr_factor / 0.1, 6)) for c in cfgs} == {(t, s) for t in H.TAUS for s in H.RATE_SCALES}


def test_mixture_beats_todays_default_on_an_ml100k_slice(ml100k):
    """First 20,000 ratings by time: the default member (tau 10 s, rates x1,
    what the served online part runs) 0.9454, the best member in hindsight
    (tau 30 s) 0.9445, the mixture 0.9423."""
    from trainer.prequential import stream_order

    df = stream_order(ml100k.ratings).iloc[:20_000]
    r = H.run_hedge_prequential(ml100k, df)
    default = 4
    assert (H.members()[default].tau_s, H.members()[default].lr_bias) == (10.0, 0.2)
    assert r.rmse < r.extra["member_rmse"][default] - 0.002, (r.rmse, r.extra["member_rmse"][default])
    assert r.rmse < r.extra["best_member"]["rmse"] - 0.001


def test_evaluate_cli_runs_online_hedge_in_stream_protocols_only(tmp_path):
    from trainer.evaluate import cli

    app = typer.Typer()
    app.command()(cli)
    out = tmp_path / "h.json"
    res = CliRunner().invoke(app, ["--data", "synthetic:1500", "--models", "online-hedge", "--seeds", "2",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    h = doc["models"]["online-hedge"]
    assert h["n"] == 1500 and h["rmse_std"] == 0.0 and len(h["per_seed"]) == 2 and "river-biasedmf" in doc["models"]
    res = CliRunner().invoke(app, ["--data", "synthetic:1500", "--models", "online-hedge", "--protocol", "time-split"])
    assert res.exit_code != 0 and "prequential and demo" in res.output


def test_lstm_hedge_is_the_network_blended_with_the_mixture(tmp_path):
    """``lstm-hedge`` = 0.2 x the lstm's network + 0.8 x ``online-hedge``, on
    the same events, the lstm run once per seed whether listed or not."""
    from core.datasets import load_dataset
    from trainer.evaluate import run_stream_protocol
    from trainer.prequential import run_prequential

    ds = load_dataset("synthetic:1200")
    doc, first = run_stream_protocol(ds, ["lstm-hedge", "online-hedge", "lstm-hedge-learned"], finetune_every=500,
                                     epochs=1, river=False)
    assert set(doc["models"]) == {"lstm-hedge", "online-hedge", "lstm-hedge-learned"}
    assert 0.0 <= doc["models"]["lstm-hedge-learned"]["per_seed"][0]["final_network_weight"] <= 1.0
    y = first["online-hedge"].extra["ratings"].astype(np.float64)
    lh = first["lstm-hedge"].predictions.astype(np.float64)
    net = (lh - 0.8 * first["online-hedge"].predictions) / 0.2
    assert np.allclose(doc["models"]["lstm-hedge"]["rmse"], np.sqrt(np.mean((lh - y) ** 2)), atol=1e-6)
    lstm = run_prequential("lstm", ds.ratings, ds.movies, genre_vocab=ds.genre_vocab, finetune_every=500, epochs=1,
                           seed=0)
    assert np.allclose(net, lstm.extra["network"], atol=1e-4)


def test_learned_blend_weights_a_network_only_where_it_helps():
    """A network that knows the answers earns a share (its error falls
    below the base's); one that is noise keeps its share near 0 and costs
    almost nothing, where a fixed 0.2 would cost a lot."""
    rng = np.random.default_rng(0)
    y = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], 20_000)
    base = np.clip(y + rng.normal(0, 0.9, len(y)), 1, 5).astype(np.float32)
    starts = H.batch_starts(len(y), 1024)
    good = np.clip(y + rng.normal(0, 0.5, len(y)), 1, 5).astype(np.float32)
    p, w = H.learned_blend(good, base, y, starts)
    assert w[-1] > 0.3 and H._rmse(p, y) < H._rmse(base, y) - 0.05
    noise = rng.uniform(1, 5, len(y)).astype(np.float32)
    p, w = H.learned_blend(noise, base, y, starts)
    fixed = 0.8 * base + 0.2 * noise
    assert w[-1] < 0.1 and H._rmse(p, y) < H._rmse(base, y) + 0.005 < H._rmse(fixed, y)
    assert w[0] == 0.0 and np.all((w >= 0) & (w <= 1))
