"""The one configuration object the batch path reads.

Why a frozen dataclass and not ``WorkerSettings`` itself: the stages need a
few fields of three settings sections (Kafka topics, worker limits, the
repartition topic derived from both), and tests build a predictor without a
whole ``Settings``.  :meth:`BatchConfig.from_settings` is the one place that
maps settings onto it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.settings import Settings
from core.topics import repartition_topic


@dataclass(frozen=True)
class BatchConfig:
    predictions_topic: str
    dlq_topic: str
    #: where re-keyed events go; None: nowhere, so misrouted events are refused
    repartition_topic: str | None = None
    key_policy: Literal["rekey", "refuse"] = "rekey"
    top_k: int = 10
    max_payload_bytes: int = 4096
    min_ts: int = 0
    max_future_s: int = 7 * 24 * 3600
    dlq_payload_prefix_bytes: int = 1024
    #: exactly-once mode: store each user's outputs with its state, re-emit them on redelivery
    keep_outputs: bool = False

    @property
    def rekeys(self) -> bool:
        """Whether misrouted events are re-keyed (a policy and somewhere to send them)."""
        return self.key_policy == "rekey" and self.repartition_topic is not None

    @classmethod
    def from_settings(cls, s: Settings) -> BatchConfig:
        w = s.worker
        return cls(
            predictions_topic=s.kafka.predictions_topic, dlq_topic=s.kafka.dlq_topic,
            repartition_topic=repartition_topic(s), key_policy=w.key_policy, top_k=w.top_k,
            max_payload_bytes=w.max_payload_bytes, min_ts=w.min_ts, max_future_s=w.max_future_s,
            dlq_payload_prefix_bytes=w.dlq_payload_prefix_bytes, keep_outputs=w.exactly_once,
        )
