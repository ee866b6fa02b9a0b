"""Prometheus metrics of the stream worker.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
durations, base units); ``promtool check metrics`` runs over them in the tests.
Online error is exported two ways: gauges over a rolling window of recent
predictions (what a person reads), and cumulative sums (what PromQL turns
into RMSE over any range: ``sqrt(rate(sq_sum) / rate(count))``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.rolling import RollingError

REGISTRY = CollectorRegistry(auto_describe=True)

STAGES = ("decode", "redis_load", "model_step", "topk", "outputs", "produce", "redis_store")

EVENTS = Counter(
    "fbp_events_processed_total", "Valid rating events turned into predictions", registry=REGISTRY
)
REJECTED = Counter(
    "fbp_events_rejected_total", "Malformed events sent to the dead-letter topic", ["reason"],
    registry=REGISTRY,
)
SKIPPED = Counter(
    "fbp_events_skipped_total",
    "Redelivered events already folded into the user's state (watermark)",
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "fbp_batch_size_events", "Events per micro-batch",
    buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "fbp_stage_duration_seconds", "Time per micro-batch spent in each stage", ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
LATENCY = Histogram(
    "fbp_event_to_prediction_seconds",
    "From the rating's Kafka timestamp to its prediction being acknowledged by Kafka",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ONLINE_RMSE = Gauge(
    "fbp_online_rmse", "RMSE of the latest predictions (rolling window)", registry=REGISTRY
)
ONLINE_MAE = Gauge(
    "fbp_online_mae", "MAE of the latest predictions (rolling window)", registry=REGISTRY
)
SQ_ERR = Counter(
    "fbp_prediction_squared_error_total", "Sum of squared prediction errors", registry=REGISTRY
)
ABS_ERR = Counter(
    "fbp_prediction_absolute_error_total", "Sum of absolute prediction errors", registry=REGISTRY
)
USERS = Gauge("fbp_users_in_state", "Users with a state in Redis", registry=REGISTRY)
STATE_BYTES = Gauge(
    "fbp_state_bytes_per_user", "Size of one user's packed state", registry=REGISTRY
)
REDIS_FULL = Gauge(
    "fbp_redis_full", "1 while this worker is paused because Redis refuses writes as full (maxmemory)",
    registry=REGISTRY,
)
REDIS_FULL_PAUSES = Counter(
    "fbp_redis_full_pauses_total", "Times this worker paused because Redis was full", registry=REGISTRY,
)
REDIS_USED_MEMORY = Gauge(
    "fbp_redis_used_memory_bytes", "used_memory of each Redis master (INFO memory)", ["node"],
    registry=REGISTRY,
)
REDIS_MAXMEMORY = Gauge(
    "fbp_redis_maxmemory_bytes", "maxmemory of each Redis master (INFO memory; 0: no limit)", ["node"],
    registry=REGISTRY,
)
USERS_FORGOTTEN = Gauge(
    "fbp_users_forgotten", "Users erased with `fbp user forget` since the deployment began (kept in Redis)",
    registry=REGISTRY,
)
MODEL_VERSION = Gauge("fbp_model_version", "Version of the serving model", registry=REGISTRY)
MODEL_INFO = Gauge(
    "fbp_model_info", "The serving model (value 1)", ["model", "device"], registry=REGISTRY
)
REDERIVED = Counter(
    "fbp_states_rederived_total",
    "User states re-derived from their window after a model swap",
    registry=REGISTRY,
)
STATES_RESET = Counter(
    "fbp_states_reset_total",
    "User states reset to the initial state because the serving model cannot read them "
    "(another model family, another state layout, a malformed blob)",
    ["reason"], registry=REGISTRY,
)
REKEYED = Counter(
    "fbp_events_rekeyed_total",
    "Valid events not keyed by their user id, re-published to the repartition topic",
    registry=REGISTRY,
)
DLQ_STRIPPED = Counter(
    "fbp_dlq_stripped_total",
    "Dead letters re-sent without payload, key and headers after a record-size error",
    registry=REGISTRY,
)
CATALOG_FEATURES = Counter(
    "fbp_catalog_features_total",
    "Movies the serving model had no genres or year for: filled from the movie catalog, "
    "or asked for and not in it (asked again after worker.catalog_retry_s)",
    ["outcome"], registry=REGISTRY,
)
SWAPS = Counter("fbp_model_swaps_total", "Models hot-swapped into this worker", registry=REGISTRY)
SWAP_REFUSED = Counter(
    "fbp_model_swaps_refused_total", "Published models this worker refused", ["reason"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "fbp_consumer_lag_messages", "Messages in the partition not yet processed by this worker",
    ["topic", "partition"], registry=REGISTRY,
)
LAST_BATCH = Gauge(
    "fbp_last_batch_timestamp_seconds", "Unix time the last batch finished", registry=REGISTRY
)


def observe_many(hist: Histogram, values: Sequence[float]) -> None:
    """``hist.observe(v)`` for every v, as one increment per bucket.

    Why: a batch of 512 events took 512 ``observe`` calls (~5 us of worker CPU
    per event in ``bench.predictor_cpu``).  prometheus_client has no batch
    observe, so this bins the values itself and bumps the histogram's bucket
    and sum values -- its internal ``_upper_bounds``/``_buckets``/``_sum``,
    which ``tests/test_metrics_batch.py`` checks against ``observe`` so that a
    change in the library fails loudly."""
    if not len(values):
        return
    v = np.asarray(values, dtype=np.float64)
    bounds = np.asarray(hist._upper_bounds, dtype=np.float64)  # last is +Inf
    idx = np.searchsorted(bounds, v, side="left")  # first bound >= v, as observe's "amount <= bound"
    counts = np.bincount(idx, minlength=len(bounds))
    for i in np.nonzero(counts)[0]:
        hist._buckets[int(i)].inc(int(counts[i]))
    hist._sum.inc(float(v.sum()))


def publish_errors(rolling: RollingError, errors: list[float]) -> None:
    """Fold a batch's (predicted - actual) errors into ``rolling``: the
    cumulative counters are bumped once per batch, the gauges set from the
    window (the window's arithmetic lives in ``core.rolling``)."""
    if errors:
        rolling.extend(errors)
        SQ_ERR.inc(math.fsum(e * e for e in errors))
        ABS_ERR.inc(math.fsum(abs(e) for e in errors))
    if len(rolling):
        ONLINE_RMSE.set(rolling.rmse())
        ONLINE_MAE.set(rolling.mae())
