"""``fbp demo``: the whole pipeline on this machine, end to end, with a summary.

1. start the local stack (Kafka, Redis, Prometheus) and empty the topics;
2. train a bootstrap LSTM on the first part of ML-100K and publish it;
3. start a worker (and the fine-tuning service) as real processes;
4. replay the rest of ML-100K into Kafka;
5. read every prediction back and print what happened, beside River's
   ``BiasedMF`` on the same events under the same protocol (learn the
   bootstrap part once, then predict-then-learn each streamed event), computed
   in the same run so the comparison is honest.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orjson
import typer

from core.settings import get_settings


def _say(msg: str) -> None:
    typer.secho(f"==> {msg}", fg=typer.colors.CYAN)


def cli(
    bootstrap_frac: float = typer.Option(0.2, help="share of ML-100K (by time) the bootstrap model trains on"),
    epochs: int = typer.Option(8, help="bootstrap training epochs (early stopping applies)"),
    rate: float = typer.Option(800.0, help="replay rate in events/s (0 = flat out; latency then measures the backlog)"),
    finetune: bool = typer.Option(True, help="run the fine-tuning service during the replay"),
    finetune_every: int = typer.Option(10_000, help="fine-tune every N events"),
    online_movie_side: bool = typer.Option(
        True, help="the worker learns the movie side from every event, shared through Redis "
                   "(worker.online_movie_side)"),
    limit: int = typer.Option(None, help="replay at most this many events"),
    out: Path = typer.Option(Path("runs/demo"), help="checkpoint, logs and summary go here"),
    json_path: Path = typer.Option(None, "--json", help="write the summary as JSON"),
) -> None:
    """Run the main job end to end and print a summary."""
    from stack import procs
    from stack import stack_up
    from models.checkpoint import save_checkpoint
    from core.repos.keys import drop_namespace
    from core.repos.models import ModelStore
    from core.redis_conn import sync_redis
    from stream.catalog import load_into_redis
    from stream.replay import replay
    from core.topics import reset_topics
    from core.datasets import load_dataset
    from trainer.train import fit, make_model

    s = get_settings()
    out.mkdir(parents=True, exist_ok=True)
    _say("starting the local stack (Kafka, Redis, Prometheus)")
    stack_up(s)
    reset_topics(s)
    r = sync_redis(s.redis)
    drop_namespace(r, s.redis.key_prefix)  # states, models and trainer keys of the last demo

    ds = load_dataset("ml-100k")
    df = ds.ratings
    _say(f"movie catalog: {load_into_redis(s, ds.movies)} ML-100K titles stored (for the live page, API, fbp tail)")
    cut = int(len(df) * bootstrap_frac)
    _say(f"training the bootstrap LSTM on the first {cut} of {len(df)} ML-100K ratings")
    model = make_model("lstm", ds.movies, ds.genre_vocab, int(df["movie_id"].max()))
    rep = fit(model, df.iloc[:cut], epochs=epochs, device=s.trainer.device, seed=s.trainer.seed)
    ckpt = out / "bootstrap" / "model"
    save_checkpoint(model, ckpt, {"data": f"ml-100k[:{cut}]", "fit": rep.to_dict()})
    pub = ModelStore(r, s.redis.key_prefix).publish(model, {"model": model.name, "metrics": rep.to_dict()},
                                                    reason="bootstrap")
    _say(f"published bootstrap model as version {pub.version}")

    logdir = out / "logs"
    env = {"FBP_WORKER__CHECKPOINT": str(ckpt),
           "FBP_TRAINER__FINETUNE_EVERY_EVENTS": str(finetune_every),
           "FBP_WORKER__ONLINE_MOVIE_SIDE": str(online_movie_side).lower()}
    worker = procs.start_worker(s.worker.web_port, logdir, env)
    trainer_proc = procs.start_trainer(s.trainer.web_port, logdir, env) if finetune else None
    _say(f"worker up: API http://127.0.0.1:{s.worker.web_port}/health, live page /live, metrics /metrics")
    rest = df.iloc[cut: None if limit is None else cut + limit]
    try:
        _say(f"replaying {len(rest)} events into '{s.kafka.ratings_topic}'")
        rsum = replay(s, rest, rate=rate, name="ml-100k")
        _say("reading the predictions back")
        recs = _read_all(s, len(rest), timeout=900)
    finally:
        worker.stop()
        if trainer_proc is not None:
            trainer_proc.stop()
    summary = _summary(recs, len(rest), rsum.events_per_s, ModelStore(r, s.redis.key_prefix))
    _say("scoring River BiasedMF on the same events (bootstrap once, then predict-then-learn)")
    summary.update(river_peer(df.iloc[:cut], rest, {rec["event_id"] for rec in recs}))
    if summary["online_rmse"] is not None and summary["river_biasedmf_rmse"] is not None:
        summary["online_rmse_minus_river"] = round(summary["online_rmse"] - summary["river_biasedmf_rmse"], 4)
    _print(summary)
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if json_path:
        json_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    _say(f"logs in {logdir}; Prometheus at http://127.0.0.1:{s.stack.prometheus_port}; "
         "stop the stack with `fbp stack down`")


def _read_all(s, n: int, timeout: float) -> list[dict]:
    from kafka import KafkaConsumer
    from tqdm import tqdm

    c = KafkaConsumer(s.kafka.predictions_topic, **s.kafka.kafka_python_kwargs(), group_id=None,
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=1000)
    recs: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with tqdm(total=n, unit="pred", desc="predictions") as bar:
        while len(recs) < n and time.monotonic() < deadline:
            for msg in c:
                rec = orjson.loads(msg.value)
                rec["_kafka_ts"] = msg.timestamp / 1000.0
                if rec["event_id"] not in recs:
                    bar.update(1)
                recs[rec["event_id"]] = rec
                if len(recs) >= n:
                    break
    c.close()
    return list(recs.values())


def _summary(recs: list[dict], expected: int, replay_eps: float, models) -> dict:
    pred = np.array([r["predicted"] for r in recs])
    act = np.array([r["actual"] for r in recs])
    lat = np.array([r["timings"]["event_to_prediction_ms"] for r in recs])
    kts = np.array([r["_kafka_ts"] for r in recs])
    versions = sorted({r["model_version"] for r in recs})
    span = float(kts.max() - kts.min()) if len(kts) > 1 else 0.0
    hist = models.history(100)
    return {
        "events_expected": expected,
        "predictions": len(recs),
        "missing": expected - len(recs),
        "replay_events_per_s": replay_eps,
        "stream_events_per_s": round(len(recs) / span, 1) if span else None,
        "latency_ms": {p: round(float(np.percentile(lat, q)), 1) for p, q in
                       (("p50", 50), ("p95", 95), ("p99", 99))} if len(lat) else {},
        "online_rmse": round(float(np.sqrt(np.mean((pred - act) ** 2))), 4) if len(recs) else None,
        "online_mae": round(float(np.mean(np.abs(pred - act))), 4) if len(recs) else None,
        "model_versions_seen": versions,
        "promotions": sum(1 for h in hist if h.get("reason", "").startswith("promot")),
    }


def river_peer(bootstrap, streamed, predicted_ids: set[str]) -> dict:
    """River's ``BiasedMF`` under the demo's protocol: one pass over the
    bootstrap events, then predict-then-learn every streamed event in stream
    order; scored on the events the stream predicted.  Both frames come from
    ``load_dataset``, already in stream order; replay names each event
    ``ml-100k-<row index>``.  Predictions are clamped to [1, 5] as ours are."""
    from trainer.prequential import river_biasedmf

    cols = ("user_id", "movie_id", "rating")
    model = river_biasedmf()
    for u, m, y in zip(*(bootstrap[c].to_numpy() for c in cols)):
        model.learn_one(str(u), str(m), float(y))
    err = []
    for idx, u, m, y in zip(streamed.index, *(streamed[c].to_numpy() for c in cols)):
        p = model.predict_one(str(u), str(m))
        model.learn_one(str(u), str(m), float(y))
        if f"ml-100k-{idx}" in predicted_ids:
            err.append(min(max(p, 1.0), 5.0) - float(y))
    e = np.asarray(err, dtype=np.float64)
    return {
        "river_biasedmf_events": len(e),
        "river_biasedmf_rmse": round(float(np.sqrt(np.mean(e ** 2))), 4) if len(e) else None,
        "river_biasedmf_mae": round(float(np.mean(np.abs(e))), 4) if len(e) else None,
    }


def _print(s: dict) -> None:
    typer.echo("")
    typer.secho("Summary", bold=True)
    for k, v in s.items():
        typer.echo(f"  {k:22s} {v}")
