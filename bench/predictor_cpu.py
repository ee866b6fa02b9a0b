"""CPU cost per event of ``Predictor.process`` alone (no Kafka, no Faust), on
real Redis: ``python -m bench.predictor_cpu [BATCH ...] [HPARAMS]``, where
``HPARAMS`` is the served lstm's hyper-parameters as JSON (``'{"k": 4}'``;
default: the lstm's defaults), to compare two settings side by side.

Measured in process CPU time (torch on one thread), so other load on a shared
machine barely moves it; the Redis server's own CPU is not included.  Each
stage's wall time per event (its ``fbp_stage_duration_seconds`` label) is
printed beside it.  Used to
compare changes to the batch path side by side.

The Redis settings apply as everywhere: ``FBP_REDIS__CLUSTER=true
FBP_REDIS__URL=redis://127.0.0.1:17000/0`` measures a local Redis Cluster,
``FBP_REDIS__WAIT_REPLICAS=1`` the cost of waiting for a replica per batch.
The worker settings apply too (the predictor is built by the worker's own
``stream.runtime.make_predictor``): ``FBP_WORKER__ONLINE_MOVIE_SIDE=false``
measures the frozen movie side, without its Redis reads and increments.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import torch


async def _run(batch: int, hparams: dict, n: int = 20_000) -> tuple[float, dict[str, float]]:
    from core.settings import get_settings
    from models.registry import build
    from core.events import KafkaRecord, RatingEvent, encode_rating, rating_key
    from stream.runtime import make_predictor
    from core.redis_conn import async_redis
    from core.repos.states import StateStore
    from core.datasets import load_dataset

    df = load_dataset("ml-100k").ratings.iloc[20_000:20_000 + n]
    s = get_settings()
    prefix = f"cpu-{uuid.uuid4().hex[:8]}"
    client = async_redis(s.redis)

    async def send(topic: str, key: bytes | None, value: bytes):  # no Kafka: an already-done future
        f = asyncio.get_running_loop().create_future()
        f.set_result(None)
        return f

    torch.manual_seed(0)
    store = StateStore.from_settings(client, s.redis.model_copy(update={"key_prefix": prefix}))
    p = make_predictor(s, build("lstm", **hparams), store, send)
    torch.set_num_threads(1)
    # keyed by user id as a correct producer keys them (an unkeyed record would
    # take the re-key path and measure something else)
    msgs = [KafkaRecord(encode_rating(RatingEvent(f"e{i}", int(u), int(m), float(r), int(t))), rating_key(int(u)),
                        (), "ratings", 0, i, time.time())
            for i, (u, m, r, t) in enumerate(zip(df.user_id, df.movie_id, df.rating, df.ts))]
    try:
        stages: dict[str, float] = {}
        c0 = time.process_time()
        for i in range(0, len(msgs), batch):
            res = await p.process(msgs[i:i + batch])
            for k, v in res.stage_s.items():
                stages[k] = stages.get(k, 0.0) + v
        cpu_us = 1e6 * (time.process_time() - c0) / len(msgs)
        return cpu_us, {k: 1e6 * v / len(msgs) for k, v in stages.items()}
    finally:
        await store.drop()
        if p.movies is not None:
            await p.movies.drop()
        await client.aclose()


def main() -> None:
    args = sys.argv[1:]
    hparams = json.loads(args.pop()) if args and args[-1].lstrip().startswith("{") else {}
    for b in [int(x) for x in args] or [128, 512, 2048]:
        cpu_us, stages = asyncio.run(_run(b, hparams))
        per_stage = "  ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
        print(f"batch {b:5d}: {cpu_us:6.1f} us CPU per event; stages (wall us per event): {per_stage}")


if __name__ == "__main__":
    main()
