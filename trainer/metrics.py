"""Prometheus metrics of the fine-tuning service (``fbp trainer``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Counter(
    "fbp_finetune_runs_total", "Fine-tune runs by outcome (promoted, rejected, failed)",
    ["outcome", "trigger"], registry=REGISTRY,
)
DURATION = Histogram(
    "fbp_finetune_duration_seconds", "Wall time of one fine-tune including the holdout check",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=REGISTRY,
)
LOSS = Gauge("fbp_finetune_train_loss", "Training MSE of the last fine-tune", registry=REGISTRY)
HOLDOUT_RMSE = Gauge(
    "fbp_finetune_holdout_rmse", "Holdout RMSE of the last comparison", ["role"],
    registry=REGISTRY,
)
PROMOTIONS = Counter("fbp_model_promotions_total", "Models promoted to serving", registry=REGISTRY)
LAST_PROMOTION = Gauge(
    "fbp_last_promotion_timestamp_seconds", "Unix time of the last promotion", registry=REGISTRY
)
LAST_RUN = Gauge(
    "fbp_last_finetune_timestamp_seconds", "Unix time the last fine-tune finished", registry=REGISTRY
)
BUFFER = Gauge("fbp_trainer_buffer_events", "Events in the trainer's replay buffer", registry=REGISTRY)
SERVING_VERSION = Gauge(
    "fbp_trainer_serving_version", "Model version the trainer sees as current", registry=REGISTRY
)
