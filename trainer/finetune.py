"""One fine-tune: champion (the serving model) vs challenger (a warm-started copy
trained on recent events plus a replay of older ones), compared on a recent
holdout slice that neither trained on.  Only a better challenger is promoted.

The pieces are separate so each can be tested without Kafka:

* :func:`split_for_finetune` -- buffer snapshot -> train / holdout / context
  frames (pure);
* :func:`decide` -- the promotion rule (pure);
* :func:`finetune` -- fit + holdout comparison, returns a :class:`FinetuneResult`;
* :func:`promote` -- publish the challenger in Redis (:class:`ModelStore`) and
  announce it on the ``model-updates`` topic.

The holdout is the most recent ``holdout_fraction`` of the recent buffer, minus
any event the champion may have trained on: the trainer records in each
checkpoint it publishes the last buffer seq its training data reached
(``meta["trainer"]["trained_through_seq"]``); an offline checkpoint's
``meta["data"]["train_ts"]`` bounds its data by timestamp; a model published
by hand counts every event that reached Kafka before its publication as
possibly seen.  Such events are moved out of the holdout (into the context
and the challenger's training data), so the comparison is always on data
both models see for the first time.

A promotion publishes the challenger with :meth:`ModelStore.publish` (next
version; checkpoint bytes + sha256 in Redis, where every worker fetches and
verifies it) and then writes one JSON record, key ``model``, on the
``model-updates`` topic::

    {"type": "promotion", "version": 7, "sha256": "<of the checkpoint bytes>",
     "model": "lstm", "previous_version": 6, "trigger": "events",
     "metrics": {"champion_rmse": .., "challenger_rmse": .., "train_loss": ..,
                 "duration_s": .., "fit_s": .., "train": .., "replay": ..,
                 "holdout": .., ...},
     "published_at": <unix seconds>}

Workers do not need the announcement (they poll the current version in Redis
every second); it is the durable, ordered log of promotions for everything
else.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
import pandas as pd

from models.base import RatingModel
from core.repos.buffer import to_frame
from core.rolling import finite_or_none
from trainer.train import evaluate_rmse, fit

log = logging.getLogger(__name__)

COLS = ["user_id", "movie_id", "rating", "ts"]


# -- what the champion may have seen ---------------------------------------
@dataclass(frozen=True)
class ChampionData:
    """Bounds on the champion's training data (None: unknown)."""

    version: int = 0
    trained_through_seq: int | None = None  # buffer seq (same buffer only)
    train_ts_max: int | None = None  # event timestamps (offline training)
    published_at: float | None = None  # Kafka arrival time (hand-published)

    @classmethod
    def from_meta(cls, version: int, meta: dict[str, Any] | None, buffer_key: str,
                  published_at: float | None = None) -> "ChampionData":
        meta = meta or {}
        tr = meta.get("trainer") or {}
        if tr.get("buffer") == buffer_key and tr.get("trained_through_seq") is not None:
            return cls(version, trained_through_seq=int(tr["trained_through_seq"]))
        data = meta.get("data") or {}
        span = data.get("train_ts") if isinstance(data, dict) else None
        if isinstance(span, (list, tuple)) and len(span) == 2 and span[1] is not None:
            return cls(version, train_ts_max=int(span[1]))
        return cls(version, published_at=published_at)

    def seen(self, recs: np.ndarray) -> np.ndarray:
        """Bool per packed record: might the champion have trained on it?"""
        if self.trained_through_seq is not None:
            return recs["seq"] <= self.trained_through_seq
        if self.train_ts_max is not None:
            return recs["ts"] <= self.train_ts_max
        if self.published_at is not None:
            return recs["kts"] <= self.published_at
        return np.zeros(len(recs), dtype=bool)


# -- the split --------------------------------------------------------------
@dataclass
class Split:
    train: pd.DataFrame  # recent_train + replay (what the challenger fits on)
    recent_train: pd.DataFrame
    replay: pd.DataFrame
    holdout: pd.DataFrame  # unseen by both models
    context: pd.DataFrame  # recent events before the holdout (warm user states)
    trained_through_seq: int  # the newest event the challenger trained on
    holdout_seq: tuple[int, int] | None  # first/last seq of the holdout
    moved_seen: int  # holdout-slice events moved out because the champion may know them

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "recent_train": len(self.recent_train),
                "replay": len(self.replay), "holdout": len(self.holdout),
                "context": len(self.context), "moved_seen": self.moved_seen}


def split_for_finetune(recent: np.ndarray, reservoir: np.ndarray, *, holdout_fraction: float,
                       replay_fraction: float, champion: ChampionData | None = None,
                       seed: int = 0) -> Split:
    """Buffer snapshot (packed records, oldest first) -> train/holdout/context.

    * holdout: the newest ``holdout_fraction`` of ``recent`` that the champion
      cannot have trained on (see :class:`ChampionData`);
    * recent_train / context: every recent event before the holdout;
    * replay: reservoir events older than the recent window, as many as make
      ``replay_fraction`` of the training set (all of them when it is 1).
    """
    recent = recent[np.argsort(recent["seq"], kind="stable")]
    n = len(recent)
    cut = n - int(math.ceil(n * holdout_fraction)) if n else 0
    seen = (champion or ChampionData()).seen(recent)
    moved = 0
    if n and seen[cut:].any():
        last_seen = cut + int(np.nonzero(seen[cut:])[0].max())
        moved = last_seen + 1 - cut
        cut = last_seen + 1
    train_r, hold = recent[:cut], recent[cut:]
    first_recent = int(recent["seq"][0]) if n else np.iinfo(np.int64).max
    older = reservoir[reservoir["seq"] < first_recent] if len(reservoir) else reservoir
    if replay_fraction >= 1.0:
        k = len(older)
    else:
        k = min(len(older), int(round(len(train_r) * replay_fraction / (1.0 - replay_fraction))))
    if 0 < k < len(older):
        pick = np.random.default_rng(seed).choice(len(older), size=k, replace=False)
        older = older[np.sort(pick)]
    replay = older[:k]
    recent_train = to_frame(train_r)
    replay_df = to_frame(replay)
    train = pd.concat([replay_df, recent_train], ignore_index=True)
    through = int(max(train_r["seq"].max() if len(train_r) else -1,
                      replay["seq"].max() if len(replay) else -1))
    return Split(
        train=train, recent_train=recent_train, replay=replay_df, holdout=to_frame(hold),
        context=recent_train, trained_through_seq=through,
        holdout_seq=(int(hold["seq"][0]), int(hold["seq"][-1])) if len(hold) else None,
        moved_seen=moved,
    )


# -- the rule ----------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_rmse: float
    challenger_rmse: float

    @property
    def improvement(self) -> float:
        return self.champion_rmse - self.challenger_rmse


def decide(champion_rmse: float, challenger_rmse: float, *, margin: float, n_holdout: int,
           min_holdout: int) -> Decision:
    """Promote only when the challenger's holdout RMSE is lower than the
    champion's by more than ``margin`` (RMSE units), on at least
    ``min_holdout`` events; anything not finite is rejected."""
    def d(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, float(champion_rmse), float(challenger_rmse))

    if n_holdout < min_holdout:
        return d(False, f"holdout has {n_holdout} unseen events < {min_holdout}")
    if not math.isfinite(challenger_rmse):
        return d(False, "challenger RMSE is not finite")
    if not math.isfinite(champion_rmse):
        return d(True, "champion RMSE is not finite")
    gain = champion_rmse - challenger_rmse
    if gain > margin:
        return d(True, f"challenger better by {gain:.4f} > margin {margin:.4f}")
    return d(False, f"challenger better by {gain:.4f} <= margin {margin:.4f}")


# -- the run -----------------------------------------------------------------
@dataclass
class FinetuneResult:
    decision: Decision
    challenger: RatingModel
    champion_version: int
    train_loss: float
    split: Split
    seconds: float
    fit_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        d = self.decision
        return {"champion_rmse": _r(d.champion_rmse), "challenger_rmse": _r(d.challenger_rmse),
                "train_loss": _r(self.train_loss), "duration_s": round(self.seconds, 3),
                "fit_s": round(self.fit_seconds, 3), **self.split.sizes()}


def _r(x: float) -> float | None:
    return finite_or_none(x, 6)


def finetune(champion: RatingModel, split: Split, *, epochs: int, lr: float | None = None,
             device: str = "cpu", seed: int = 0, margin: float = 0.0,
             min_holdout: int = 1) -> FinetuneResult:
    """Warm-start a copy of ``champion`` on ``split.train`` and compare both on
    ``split.holdout`` (states warmed up on ``split.context``)."""
    t0 = time.perf_counter()
    champion = champion.to("cpu").eval()
    challenger = copy.deepcopy(champion)
    loss = math.nan
    fit_s = 0.0
    if len(split.train):
        rep = fit(challenger, split.train[COLS], epochs=epochs, lr=lr, device=device,
                  valid_frac=0.0, seed=seed, progress=False)
        fit_s = rep.seconds
        if rep.train_rmse:
            loss = rep.train_rmse[-1] ** 2
    challenger.to("cpu").eval()
    if len(split.holdout):
        ctx = split.context[COLS] if len(split.context) else None
        with champion.judging(), challenger.judging():
            champ = evaluate_rmse(champion, split.holdout[COLS], ctx, device="cpu").rmse
            chall = evaluate_rmse(challenger, split.holdout[COLS], ctx, device="cpu").rmse
    else:
        champ = chall = math.nan
    decision = decide(champ, chall, margin=margin, n_holdout=len(split.holdout), min_holdout=min_holdout)
    return FinetuneResult(decision, challenger, int(champion.version), loss, split,
                          time.perf_counter() - t0, fit_s)


# -- publication -------------------------------------------------------------
def announcement(pub: Any, model: RatingModel, metrics: dict[str, Any], *, trigger: str,
                 previous: int | None) -> bytes:
    """The JSON record on ``model-updates`` for a promotion."""
    return orjson.dumps({
        "type": "promotion", "version": int(pub.version), "sha256": pub.sha256, "model": model.name,
        "previous_version": previous, "trigger": trigger, "metrics": metrics,
        "published_at": pub.meta.get("published_at", time.time()),
    })


def promote(store: Any, producer: Any, topic: str, result: FinetuneResult, *, trigger: str,
            buffer_key: str, timeout: float = 30.0) -> Any:
    """Publish the challenger (next version, sha256-checked checkpoint in Redis)
    and announce it on ``topic``; returns the :class:`Published`."""
    ensure_version_above(store, result.champion_version)
    metrics = result.metrics()
    meta = {
        "model": result.challenger.name,
        "metrics": metrics,
        "trainer": {"buffer": buffer_key, "trained_through_seq": result.split.trained_through_seq,
                    "parent_version": result.champion_version, "trigger": trigger},
    }
    d = result.decision
    pub = store.publish(
        result.challenger, meta,
        reason=(f"promoted by trainer ({trigger}): holdout RMSE {d.challenger_rmse:.4f} "
                f"vs champion v{result.champion_version} {d.champion_rmse:.4f}"),
    )
    if producer is not None:
        try:
            fut = producer.send(topic, key=b"model", value=announcement(
                pub, result.challenger, metrics, trigger=trigger, previous=result.champion_version))
            fut.get(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - workers poll Redis; the announcement is a courtesy
            log.error("model v%d published but not announced on %s: %s", pub.version, topic, exc)
    return pub


def ensure_version_above(store: Any, version: int) -> None:
    """A model first published by the trainer must get a version above the
    serving one even when that one came from a local checkpoint (not from
    Redis): start the store's counter there if it has none yet."""
    store.ensure_seq_at_least(version)


class Outcome(StrEnum):
    """How a fine-tune run ended (the ``outcome`` label of ``fbp_finetune_runs_total``
    and of its logged decision; a str, so labels and JSON read as before)."""

    PROMOTED = "promoted"  #: the challenger won and serves now
    REJECTED = "rejected"  #: the champion stays (the challenger lost, or serving changed meanwhile)
    SKIPPED = "skipped"  #: not enough data to train and judge
    FAILED = "failed"  #: an error; logged, the service goes on


def log_decision(result: FinetuneResult | None, *, trigger: str, outcome: Outcome,
                 new_version: int | None = None, error: str | None = None,
                 champion_version: int | None = None) -> dict[str, Any]:
    """One structured log line per decision; returns the logged dict."""
    rec: dict[str, Any] = {"event": "finetune", "trigger": trigger, "outcome": outcome}
    if result is not None:
        rec.update(champion_version=result.champion_version, reason=result.decision.reason,
                   **result.metrics())
        rec["holdout_seq"] = result.split.holdout_seq
        rec["trained_through_seq"] = result.split.trained_through_seq
    elif champion_version is not None:
        rec["champion_version"] = champion_version
    if new_version is not None:
        rec["new_version"] = new_version
    if error is not None:
        rec["error"] = error
    log.info("finetune decision %s", orjson.dumps(rec).decode())
    return rec
