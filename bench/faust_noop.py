"""A Faust worker that does nothing but take micro-batches from the ratings
topic: the floor Faust's own per-event machinery sets, measured beside the
full path by ``fbp bench stream`` (run as ``python -m faust -A bench.faust_noop worker``).

It writes one marker record per batch to the predictions topic of its
namespace (a count, not one record per event), so the benchmark can time it
the same way, from the Kafka timestamps of its output."""

from __future__ import annotations

import faust
import orjson

from core.settings import get_settings
from stream.app import QuietWorker, _credentials

s = get_settings()
app = faust.App(
    f"{s.worker.app_id}-noop",
    broker=[f"kafka://{b}" for b in s.kafka.servers],
    broker_credentials=_credentials(s.kafka),
    store="memory://", key_serializer="raw", value_serializer="raw",
    consumer_auto_offset_reset="earliest", topic_partitions=s.kafka.partitions,
    # the worker's own fetch and buffer settings, so this is its floor
    broker_max_poll_records=s.worker.max_poll_records, stream_buffer_maxsize=s.worker.stream_buffer,
    web_port=s.worker.web_port, web_host=s.worker.web_host,
    datadir=str(s.stack.data_dir / "faust" / f"noop-{s.worker.app_id}-{s.worker.web_port}"),
    Worker=QuietWorker,
)
ratings = app.topic(s.kafka.ratings_topic, key_type=bytes, value_type=bytes)


@app.agent(ratings, concurrency=1)
async def count(stream: faust.StreamT) -> None:
    async for events in stream.take_events(s.worker.batch_size, within=s.worker.batch_timeout_s):
        await app.producer.send(s.kafka.predictions_topic, None,
                                orjson.dumps({"n": len(events)}), None, None, None)
