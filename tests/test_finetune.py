"""Champion/challenger without Kafka: the promotion rule, the holdout split
(never on data the champion trained on), and one real fine-tune."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.repos.buffer import REC, EventBuffer
from trainer.finetune import ChampionData, decide, finetune, split_for_finetune


def _recs(n: int, start: int = 0, users: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = np.zeros(n, dtype=REC)
    r["seq"] = np.arange(start, start + n)
    r["user"] = rng.integers(1, users + 1, n)
    r["movie"] = rng.integers(1, 200, n)
    r["rating"] = rng.integers(1, 6, n).astype(np.float32)
    r["ts"] = 880_000_000 + r["seq"] * 10
    r["kts"] = 1_700_000_000.0 + r["seq"]
    return r


# -- decide -----------------------------------------------------------------
def test_decide_promotes_only_a_clearly_better_challenger():
    assert decide(1.00, 0.95, margin=0.01, n_holdout=500, min_holdout=100).promote
    assert not decide(1.00, 0.995, margin=0.01, n_holdout=500, min_holdout=100).promote
    assert not decide(1.00, 1.00, margin=0.0, n_holdout=500, min_holdout=100).promote  # a tie stays
    assert not decide(1.00, 1.05, margin=0.0, n_holdout=500, min_holdout=100).promote
    d = decide(1.00, 0.90, margin=0.0, n_holdout=500, min_holdout=100)
    assert d.promote and math.isclose(d.improvement, 0.10)


def test_decide_refuses_small_holdout_and_non_finite():
    small = decide(1.0, 0.5, margin=0.0, n_holdout=99, min_holdout=100)
    assert not small.promote and "holdout" in small.reason
    assert not decide(1.0, math.nan, margin=0.0, n_holdout=500, min_holdout=100).promote
    assert not decide(1.0, math.inf, margin=0.0, n_holdout=500, min_holdout=100).promote
    assert decide(math.nan, 1.0, margin=0.0, n_holdout=500, min_holdout=100).promote


# -- split ------------------------------------------------------------------
def test_split_holds_out_newest_slice_and_replays_older_events():
    reservoir = _recs(3000, 0, seed=1)[::3]  # a sample of seq 0..2999
    recent = _recs(1000, 3000, seed=2)
    sp = split_for_finetune(recent, reservoir, holdout_fraction=0.1, replay_fraction=0.5)
    assert len(sp.holdout) == 100 and sp.holdout_seq == (3900, 3999)
    assert len(sp.recent_train) == 900 and sp.context.equals(sp.recent_train)
    assert len(sp.replay) == 900  # replay_fraction 0.5: as many replayed as recent
    assert sp.replay["seq"].max() < 3000  # replay only from before the recent window
    assert sp.trained_through_seq == 3899
    assert sp.train["seq"].max() < sp.holdout["seq"].min()  # the challenger never saw the holdout
    none = split_for_finetune(recent, reservoir, holdout_fraction=0.1, replay_fraction=0.0)
    assert len(none.replay) == 0
    allr = split_for_finetune(recent, reservoir, holdout_fraction=0.1, replay_fraction=1.0)
    assert len(allr.replay) == 1000


@pytest.mark.parametrize("champ", [
    ChampionData(2, trained_through_seq=3950),
    ChampionData(2, train_ts_max=880_000_000 + 3950 * 10),
    ChampionData(2, published_at=1_700_000_000.0 + 3950),
])
def test_split_never_holds_out_what_the_champion_may_have_trained_on(champ):
    recent = _recs(1000, 3000)
    sp = split_for_finetune(recent, recent[:0], holdout_fraction=0.1, replay_fraction=0.5, champion=champ)
    assert sp.holdout_seq == (3951, 3999) and sp.moved_seen == 51
    assert not champ.seen(recent[recent["seq"] >= 3951]).any()
    assert sp.recent_train["seq"].max() == 3950  # moved into the training part


def test_champion_data_from_checkpoint_meta():
    key = EventBuffer.recent_key("fbp")
    c = ChampionData.from_meta(3, {"trainer": {"buffer": key, "trained_through_seq": 77}}, key, 5.0)
    assert c.trained_through_seq == 77
    other = ChampionData.from_meta(3, {"trainer": {"buffer": EventBuffer.recent_key("x"), "trained_through_seq": 77}},
                                   key, 5.0)
    assert other.trained_through_seq is None and other.published_at == 5.0  # another buffer's seq means nothing
    off = ChampionData.from_meta(1, {"data": {"train_ts": [1, 99]}}, key, 5.0)
    assert off.train_ts_max == 99


# -- a real fine-tune ---------------------------------------------------------
def test_finetune_improves_an_untrained_model_and_keeps_the_champion():
    from models.registry import build

    torch.manual_seed(0)
    champion = build("baseline")
    champion.version = 4
    before = {k: v.clone() for k, v in champion.state_dict().items()}
    rng = np.random.default_rng(0)
    recent = _recs(3000, 0, users=60)
    # learnable structure: each movie has a quality
    quality = rng.integers(1, 6, 200)
    recent["rating"] = np.clip(quality[recent["movie"]] + rng.normal(0, 0.3, len(recent)), 1, 5).round()
    sp = split_for_finetune(recent, recent[:0], holdout_fraction=0.1, replay_fraction=0.5)
    res = finetune(champion, sp, epochs=3, margin=0.0, min_holdout=50)
    d = res.decision
    print(f"champion {d.champion_rmse:.4f} challenger {d.challenger_rmse:.4f} loss {res.train_loss:.4f} "
          f"in {res.seconds:.1f}s")
    assert d.promote and d.challenger_rmse < d.champion_rmse
    assert res.champion_version == 4 and math.isfinite(res.train_loss)
    for k, v in champion.state_dict().items():  # the champion is untouched
        assert torch.equal(v, before[k]), k
    m = res.metrics()
    assert {"champion_rmse", "challenger_rmse", "train_loss", "duration_s", "holdout"} <= set(m)
