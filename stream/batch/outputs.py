"""Stage ``outputs``: what the batch leaves behind, built but not yet sent.

One prediction record per fresh event (encoded for Kafka), and one state
row per user to store (packed state, watermarks).  In exactly-once mode
(``keep_outputs``) the states are stored before the batch's transaction
commits; a crash in between would leave events applied in Redis whose
records were aborted.  So each user's row also carries the records its
events got (per source, :mod:`core.repos.states`), and an event the
watermark filter set aside is answered with its stored record again --
same bytes, inside the new transaction.  Dead letters carry no state: a
redelivered record is simply dead-lettered again."""

from __future__ import annotations

import time

import numpy as np

from core.events import PredictionRecord, encode_prediction, rating_key
from core.repos.states import Stored
from models.base import RatingModel
from stream import metrics as m
from stream.batch.config import BatchConfig
from stream.batch.decode import watermark
from stream.batch.model_step import Stepped
from stream.batch.redis_load import Fresh, Loaded
from stream.batch.topk import TopLists
from stream.batch.types import Predicted, Row

STAGE = "outputs"

#: (Kafka key, encoded record) of each prediction, in event order
Records = list[tuple[bytes, bytes]]


def queue_reemits(fresh: Fresh, out: Predicted) -> None:
    """Queue the stored record of each already-applied event for re-emission.

    Found only for the user's last write from that source, which is all that
    can be uncommitted: a partition's next batch starts after the previous
    one committed."""
    for user, st, pos in fresh.applied:
        value = st.output(*pos)
        if value is not None:
            out.reemit.append((user, *pos, value))


def prediction_records(fresh: Fresh, stepped: Stepped, tops: TopLists, version: int, cfg: BatchConfig,
                       out: Predicted, t0: float) -> Records:
    """One prediction record per fresh event (``t0``: when the batch began)."""
    produced_at = time.time()
    batch_ms = round((time.perf_counter() - t0) * 1000.0, 3)
    kafka_ts = [rec.timestamp for _, rec in fresh.work]
    # every event's latency at once (numpy rounds half to even, as round() does)
    waited = np.round((produced_at - np.asarray(kafka_ts, np.float64)) * 1000.0, 3).tolist()
    records: Records = []
    keys: dict[int, bytes] = {}
    for (ev, _), predicted, u, ms in zip(fresh.work, stepped.preds.tolist(), stepped.uidx.tolist(), waited):
        pr = PredictionRecord(ev.event_id, ev.user_id, ev.movie_id, predicted, float(ev.rating), version, tops[u],
                              {"event_to_prediction_ms": ms, "batch_ms": batch_ms}, ev.ts, produced_at)
        out.predictions.append(pr)
        value = encode_prediction(pr)
        if cfg.keep_outputs:
            out.encoded.append(value)
        key = keys.get(ev.user_id)
        if key is None:
            key = keys[ev.user_id] = rating_key(ev.user_id)
        records.append((key, value))
    out.kafka_ts += kafka_ts
    return records


def state_rows(model: RatingModel, fresh: Fresh, loaded: Loaded, stepped: Stepped, out: Predicted) -> None:
    """Each user's packed state and watermarks as a row to store, and as the
    overlay will hold it until stored."""
    blobs = model.pack_states(stepped.state)
    m.STATE_BYTES.set(len(blobs[0]))
    for i, u in enumerate(fresh.users):
        marks = fresh.marks[u]
        out.rows.append((u, blobs[i], [(t, p, o) for (t, p), o in marks.items()]))
        before = loaded.of(u)
        out.written[u] = Stored(blobs[i], {**before.marks, **marks}, outputs=before.outputs)


def with_outputs(fresh: Fresh, out: Predicted, repartition_topic: str | None) -> list[Row]:
    """Rows with each source's outputs of this write: the records re-emitted
    and produced here for that user and source (all still uncommitted)."""
    per: dict[int, dict[tuple[str, int], list[tuple[int, bytes]]]] = {}
    for user, src, part, off, value in out.reemit:
        per.setdefault(user, {}).setdefault((src, part), []).append((off, value))
    for (ev, rec), value in zip(fresh.work, out.encoded):
        src, part, off = watermark(rec, repartition_topic)
        per.setdefault(ev.user_id, {}).setdefault((src, part), []).append((off, value))
    return [(u, blob, marks, [(t, p, outs) for (t, p), outs in per.get(u, {}).items()])
            for u, blob, marks in out.rows]
