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
#: the served lstm leads River's BiasedMF by 0.031 on this slice (0.9427 vs
#: 0.9737); without the session bias (every mixture member) it leads by 0.021
#: only, and misses this margin
MARGIN = 0.025


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


def test_permuted_ratings_score_no_better_than_their_spread(ml100k, ml100k_slice):
    """Ratings shuffled across events carry no signal: a model that scores
    well on them reads the answers (0.9427 on the real slice, 1.119 shuffled,
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
