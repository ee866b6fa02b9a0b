"""The accuracy and leak claims, on a fixed real slice: the first 10,000
ML-100K ratings by time, predicted then learned by the served ``lstm``
(fine-tunes at the default points, seed 0) with River's ``BiasedMF`` in the
same run.  Deterministic: the figures in the comments are what today's code
gives, so a change that moves them far enough fails here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.prequential import run_prequential, run_river_prequential, stream_order

torch.set_num_threads(1)

N = 10_000
#: the served lstm leads River's BiasedMF by 0.032 on this slice (0.9416 vs
#: 0.9737); without the session bias (every mixture member) it led by 0.021
#: only, and missed this margin
MARGIN = 0.025
#: the network's share on this slice: the served lstm 0.9416 against its own
#: online part alone 0.9426 (0.0010; 0.0008 at the network's earlier k 4 and
#: ridges 20 / 5, 0.0006 at the old lr 1e-2, 0.0004 with the old lr and
#: ridges); a network left untrained (lr 1e-9) gets 0.0001, and fails here
SHARE = 0.0004


@pytest.fixture(scope="module")
def ml100k_slice(ml100k):
    return stream_order(ml100k.ratings).iloc[:N].reset_index(drop=True)


def _run(ds, df, name="lstm", **kw):
    return run_prequential(name, df, ds.movies, genre_vocab=ds.genre_vocab, users=ds.users, seed=0, **kw)


@pytest.fixture(scope="module")
def served(ml100k, ml100k_slice):
    return _run(ml100k, ml100k_slice)


def test_served_model_beats_river_biasedmf_by_a_margin(ml100k_slice, served):
    river = run_river_prequential(ml100k_slice)
    assert served.n == river.n == N
    assert served.rmse < river.rmse - MARGIN, (served.rmse, river.rmse)


def test_the_network_earns_a_share_over_the_online_part(ml100k_slice, served):
    """The served prediction beats its own online part alone on the same
    events: the network (and the share learned for it) adds something.  The
    online part's predictions are the served run's own (``extra["online"]``,
    what ``--models online`` gives on the same batches)."""
    y = ml100k_slice["rating"].to_numpy(np.float64)
    online = float(np.sqrt(np.mean((served.extra["online"].astype(np.float64) - y) ** 2)))
    assert served.rmse < online - SHARE, (served.rmse, online)


def test_permuted_ratings_score_no_better_than_their_spread(ml100k, ml100k_slice):
    """Ratings shuffled across events carry no signal: a model that scores
    well on them reads the answers (0.9418 on the real slice, 1.116 shuffled,
    spread 1.092)."""
    df = ml100k_slice.copy()
    df["rating"] = np.random.default_rng(0).permutation(df["rating"].to_numpy())
    r = _run(ml100k, df)
    assert r.rmse > float(df["rating"].std(ddof=0)) - 0.02, r.rmse


def test_cutting_the_stream_changes_no_earlier_prediction(ml100k, ml100k_slice, served):
    """Cutting after event 5,000 (a fine-tune point: the batches restart
    there, as a worker's batch ends) leaves the first 5,000 predictions
    bit-identical; the online part alone, one event per batch (strict time
    order), at an arbitrary cut."""
    cut = _run(ml100k, ml100k_slice.iloc[:5000])
    assert np.array_equal(cut.predictions, served.predictions[:5000])
    full = _run(ml100k, ml100k_slice.iloc[:4000], name="online", batch_events=1)
    part = _run(ml100k, ml100k_slice.iloc[:3333], name="online", batch_events=1)
    assert np.array_equal(part.predictions, full.predictions[:3333])
