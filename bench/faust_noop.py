"""A Faust worker whose batch handler does only what the bare aiokafka loop of
``fbp bench stream`` does per event (decode it, produce one small record, wait
for Kafka's acks): the worker's Faust path (``stream.consumer``: whole fetches
into one handler call, Faust's group membership, rebalances and commits)
without our batch code, so its ratio to the bare loop is the price of hosting
in Faust.  Run as ``python -m faust -A bench.faust_noop worker``."""

from __future__ import annotations

import asyncio

import faust
import orjson

from core.settings import get_settings
from stream.app import QuietWorker, _credentials
from stream.consumer import broker_urls, route_batches

s = get_settings()
app = faust.App(
    f"{s.worker.app_id}-noop",
    broker=broker_urls(s.kafka.servers),
    broker_credentials=_credentials(s.kafka),
    store="memory://", key_serializer="raw", value_serializer="raw",
    consumer_auto_offset_reset="earliest", topic_partitions=s.kafka.partitions,
    # the worker's own fetch settings, so this is its floor
    broker_max_poll_records=s.worker.max_poll_records,
    topic_disable_leader=s.worker.topic_disable_leader,
    web_port=s.worker.web_port, web_host=s.worker.web_host,
    datadir=str(s.stack.data_dir / "faust" / f"noop-{s.worker.app_id}-{s.worker.web_port}"),
    Worker=QuietWorker,
)
ratings = app.topic(s.kafka.ratings_topic, key_type=bytes, value_type=bytes)


async def echo(records: list) -> None:
    send, topic = app.producer.send, s.kafka.predictions_topic
    futs = []
    for rec in records:
        ev = orjson.loads(rec.value)
        out = orjson.dumps({"event_id": ev["event_id"], "user_id": ev["user_id"]})
        futs.append(await send(topic, rec.key, out, None, None, None))
    await asyncio.gather(*futs)


route_batches(app, ratings, echo, to_record=lambda rec: rec, max_batch=s.worker.max_poll_records,
              fetch_max_wait_ms=s.worker.fetch_max_wait_ms)
