"""CPU per record of aiokafka's per-record ``send`` vs ``stream.outbox``
(whole record batches), side by side on the real broker:
``python -m bench.produce [RECORDS]``.

Both send the same prediction-sized records keyed by 900 users to a fresh
4-partition topic and wait for every acknowledgement; process CPU time, so
other load on a shared machine barely moves the figures.  Alternating order,
three rounds each.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from aiokafka import AIOKafkaProducer

from core.settings import get_settings
from stack.procs import Namespace
from stream.outbox import send_records

VALUE = (b'{"event_id":"b12345","user_id":123,"movie_id":456,"predicted":3.6123,"actual":4.0,'
         b'"model_version":3,"top_k":[[50,4.61],[100,4.52],[181,4.5],[258,4.48],[1,4.4],[7,4.39],'
         b'[98,4.37],[127,4.33],[174,4.3],[286,4.29]],"timings":{"event_to_prediction_ms":12.5,'
         b'"batch_ms":40.1},"ts":881250949,"produced_at":1764868000.1}')


async def _round(prod: AIOKafkaProducer, topic: str, n: int, batched: bool) -> float:
    records = [(str(i % 900).encode(), VALUE) for i in range(n)]
    c0 = time.process_time()
    if batched:
        futs = await send_records(prod, topic, records)
    else:
        futs = [await prod.send(topic, v, key=k) for k, v in records]
    await asyncio.gather(*futs)
    return 1e6 * (time.process_time() - c0) / n


async def main(n: int) -> dict[str, float]:
    s = get_settings()
    ns = Namespace.fresh(4, s)
    ns.create()
    prod = AIOKafkaProducer(acks="all", linger_ms=5, **s.kafka.aiokafka_kwargs())
    await prod.start()
    got: dict[str, list[float]] = {"send": [], "outbox": []}
    try:
        await _round(prod, ns.ratings, 1000, False)  # metadata, connections
        for _ in range(3):
            got["send"].append(await _round(prod, ns.ratings, n, False))
            got["outbox"].append(await _round(prod, ns.ratings, n, True))
    finally:
        await prod.stop()
        ns.drop()
    return {k: statistics.median(v) for k, v in got.items()}


if __name__ == "__main__":
    res = asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
    print(f"per-record send: {res['send']:.2f} us CPU/record   stream.outbox: {res['outbox']:.2f} us CPU/record   "
          f"({res['send'] / res['outbox']:.1f}x less)")
