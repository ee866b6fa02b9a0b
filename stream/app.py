"""The Faust application: topics, the prediction agent and the model watcher.

Run it with ``fbp worker`` (or ``faust -A stream.app worker``).  Whole Kafka
fetches reach :func:`predict` through ``stream.consumer`` (no per-event Faust
stream); the work of a batch lives in ``stream.predictor`` so it can be read
and tested without Faust.

Importing this module has no side effects: the app is built (settings read,
its data directory made, topics, agent, timers and web routes registered) on
first use of ``stream.app.app`` (:func:`get_app`), which is what ``fbp
worker`` and ``faust -A stream.app`` do.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any, Awaitable, TypeVar

import faust

from core.events import KafkaRecord
from core.settings import KafkaSettings, Settings, get_settings
from core.topics import repartition_topic
from stream import api, live
from stream.consumer import broker_urls, route_batches
from stream.faults import INFRASTRUCTURE, is_infrastructure
from stream.predictor import BatchResult
from stream.runtime import runtime

log = logging.getLogger(__name__)
T = TypeVar("T")


def _credentials(k: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """TLS / SASL from settings (None for PLAINTEXT)."""
    ctx = k.ssl_context()
    if k.sasl_mechanism:
        return faust.SASLCredentials(
            username=k.sasl_username,
            password=k.sasl_password.get_secret_value() if k.sasl_password else None,
            mechanism=k.sasl_mechanism,
            ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


class QuietWorker(faust.Worker):
    """Faust's worker without its terminal progress spinner.

    With the spinner on and a log level of WARN or above, Faust sets the root
    logger to DEBUG so that every record spins it; every ``log.debug`` in
    aiokafka and Faust (several per event) then builds a LogRecord that the
    handler drops.  Profiled at about a tenth of a busy worker's CPU."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None
        super().on_setup_root_logger(logger, level)


async def fail_stop(work: Awaitable[T], n: int) -> T:
    """``work`` (a batch, or half of one) or stop the worker.

    Bad records never get here as exceptions: the predictor dead-letters them
    (``stream.faults`` says which failures are infrastructure).  Whatever
    does escape -- Redis away longer than the client's retries, Kafka refusing
    the predictions -- stops the worker *before* the batch is acknowledged
    (``stream.consumer`` marks a fetch done only when its handling returned),
    so a failed batch never has its offsets committed without its states
    stored.  Exiting leaves it uncommitted; the restarted worker (or the
    group's next owner) gets it again."""
    try:
        return await work
    except Exception as exc:  # fail stop: see above
        kind = "infrastructure fault" if is_infrastructure(exc) else "unexpected batch-level error"
        log.critical("batch of %d records failed (%s); exiting (75) without committing it, "
                     "it will be redelivered", n, kind, exc_info=True)
        logging.shutdown()
        os._exit(75)


async def handle_batch(records: list[KafkaRecord]) -> BatchResult:
    """One micro-batch of records -> predictions, or fail stop."""
    predictor = await fail_stop(runtime.predictor(get_app()), len(records))
    if runtime.transactions is not None:  # exactly once: the batch and its offsets in one transaction
        return await fail_stop(runtime.transactions.run(records, predictor.process), len(records))
    return await fail_stop(predictor.process(records), len(records))


def as_record(r: Any) -> KafkaRecord:
    """What aiokafka's ConsumerRecord says (timestamp in seconds)."""
    return KafkaRecord(r.value, r.key, tuple(r.headers or ()), r.topic, r.partition, r.offset, r.timestamp / 1000.0)


async def predict(records: list[KafkaRecord]) -> None:
    """A fetch of rating records (at most worker.batch_size) -> predictions.

    Called by ``stream.consumer`` with whole fetches, no per-event Faust
    stream; the batch counts as done (committable) only once this returns."""
    live.stats.observe(await handle_batch(records))


async def predict_pipelined(records: list[KafkaRecord]) -> Awaitable[None]:
    """As :func:`predict`, in two halves (``worker.pipeline``): returns once
    the batch's predictions are sent, with the awaitable of the rest (acks,
    state store), during which ``stream.consumer`` begins the next batch."""
    predictor = await fail_stop(runtime.predictor(get_app()), len(records))
    begun = await fail_stop(predictor.begin(records), len(records))

    async def rest() -> None:
        live.stats.observe(await fail_stop(predictor.finish(begun), len(records)))

    return rest()


async def load_model_on_start() -> None:
    """Load the model before the first batch so /health turns ok early."""
    await runtime.predictor(get_app())


async def watch_model() -> None:
    """Pick up a newly published (or rolled back) model version from Redis."""
    try:
        await runtime.check_model(get_app())
    except INFRASTRUCTURE as exc:  # an outage must not crash the app; next tick retries
        log.warning("model watch skipped: Redis unavailable (%s)", exc)


async def refresh_gauges() -> None:
    """Users in state and consumer lag per partition."""
    try:
        await runtime.refresh_gauges(get_app())
    except INFRASTRUCTURE as exc:
        log.warning("gauges not refreshed: Redis unavailable (%s)", exc)


def build_app(settings: Settings) -> faust.App:
    """The worker's Faust app: the ratings topics into :func:`predict`, the
    model watcher and gauges, the query API and the live page."""
    datadir = settings.stack.data_dir / "faust" / f"{settings.worker.app_id}-{settings.worker.web_port}"
    datadir.parent.mkdir(parents=True, exist_ok=True)
    w = settings.worker
    app = faust.App(
        w.app_id,
        broker=broker_urls(settings.kafka.servers),  # stream.consumer's transport: whole fetches to handle_batch
        topic_disable_leader=w.topic_disable_leader, broker_credentials=_credentials(settings.kafka),
        store="memory://", key_serializer="raw", value_serializer="raw",
        topic_partitions=settings.kafka.partitions, topic_replication_factor=settings.kafka.replication_factor,
        consumer_auto_offset_reset="earliest", broker_max_poll_records=w.max_poll_records,
        stream_buffer_maxsize=w.stream_buffer, producer_acks=-1, producer_linger=0.005,
        broker_commit_interval=w.commit_interval_s, broker_session_timeout=w.session_timeout_s,
        broker_heartbeat_interval=min(3.0, w.session_timeout_s / 5),
        web_host=w.web_host, web_port=w.web_port, web_bind=w.web_host, datadir=str(datadir), Worker=QuietWorker,
    )
    # The ratings topic and its repartition topic (events re-keyed by user id,
    # see worker.key_policy): one agent, so a user's events from both are
    # handled by the batch code that holds the per-source watermarks.
    ratings_topic = app.topic(settings.kafka.ratings_topic, repartition_topic(settings), key_type=bytes,
                              value_type=bytes, key_serializer="raw", value_serializer="raw")
    txns = runtime.transactions
    pipelined = w.pipeline and txns is None
    route_batches(app, ratings_topic, predict_pipelined if pipelined else predict, to_record=as_record,
                  max_batch=w.batch_size, fetch_max_wait_ms=w.fetch_max_wait_ms,
                  transactional=txns is not None, on_assigned=txns and txns.assigned,
                  on_revoked=txns and txns.revoked, pipelined=pipelined)
    app.task(load_model_on_start)
    app.timer(interval=1.0)(watch_model)
    app.timer(interval=2.0)(refresh_gauges)
    api.routes.register(app)  # the query API, health, /metrics
    live.routes.register(app)  # /live, /api/v1/live and its 1 s sampler
    return app


@lru_cache(maxsize=1)
def get_app() -> faust.App:
    """The process's app, built on first use."""
    return build_app(get_settings())


def __getattr__(name: str) -> Any:
    """``stream.app.app``: built on first access (``faust -A stream.app`` reads it)."""
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
