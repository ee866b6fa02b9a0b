"""The trainer's persistent event buffer in Redis: recent events plus a
reservoir sample of everything seen, so fine-tunes can replay older data and
the model does not forget.

Keys (``<prefix>`` = settings.redis.key_prefix; built by
:func:`core.repos.keys.trainer_key`, hash tag ``{<prefix>:trainer}``, so they
share one slot and the MULTI/EXEC below is legal on a Redis Cluster too):

* ``{<prefix>:trainer}:recent``     list of packed events, oldest first, capped at
                                    ``buffer_events`` (RPUSH + LTRIM)
* ``{<prefix>:trainer}:reservoir``  hash slot -> packed event: a uniform sample
                                    (Algorithm R) of every event ever appended,
                                    ``reservoir_events`` slots
* ``{<prefix>:trainer}:seq``        events appended so far (the next event's seq)
* ``{<prefix>:trainer}:offsets``    hash ``topic:partition`` -> next Kafka offset
                                    to read (what is already in the buffer)

One append is one MULTI/EXEC transaction over all of these, so the buffer and
the offsets it covers never disagree: after a crash the consumer skips records
below the stored offsets and no event enters the buffer twice; the Kafka
commit that follows is only for lag monitoring and a fast restart.  The
reservoir's slot choice is a hash of (seed, seq), so it is deterministic and
survives a restart unchanged.  One trainer process writes a buffer (the
consumer group's partitions all go to it).

A packed event is 44 bytes: seq i8, user i8, movie i8, rating f4, ts i8,
kts f8 (Kafka timestamp, seconds).

Lifecycle: none needed -- the buffer is bounded by construction
(``buffer_events`` + ``reservoir_events`` events, ~44 bytes each plus Redis
overhead) and must outlive idle periods to replay older data.  Erasure:
:meth:`EventBuffer.forget` removes a user's events from both, atomically with
the trainer's appends (one script on the buffer's slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from typing import Any

import numpy as np
import pandas as pd

from core.repos import keys

REC = np.dtype([("seq", "<i8"), ("user", "<i8"), ("movie", "<i8"), ("rating", "<f4"),
                ("ts", "<i8"), ("kts", "<f8")])


@dataclass(frozen=True, slots=True)
class BufferedEvent:
    user_id: int
    movie_id: int
    rating: float
    ts: int
    kafka_ts: float = 0.0


def _mix(seed: int, seq: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, seq): a deterministic pseudo-random u64 per event."""
    with np.errstate(over="ignore"):
        z = (seq.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def reservoir_slots(seed: int, seq: np.ndarray, size: int) -> np.ndarray:
    """Algorithm R: event ``seq`` (0-based) goes to slot ``seq`` while the
    reservoir fills, later to slot ``j = h(seq) mod (seq + 1)`` if ``j < size``
    (so each of the seq+1 events seen is in the sample with probability
    size/(seq+1)); -1 means not kept."""
    seq = np.asarray(seq, dtype=np.int64)
    if size <= 0:
        return np.full(len(seq), -1, dtype=np.int64)
    j = (_mix(seed, seq) % (seq.astype(np.uint64) + np.uint64(1))).astype(np.int64)
    return np.where(seq < size, seq, np.where(j < size, j, -1))


def to_frame(recs: np.ndarray) -> pd.DataFrame:
    """Packed records -> the ratings frame the trainer uses (plus seq and kts)."""
    return pd.DataFrame({
        "user_id": recs["user"].astype(np.int64),
        "movie_id": recs["movie"].astype(np.int64),
        "rating": recs["rating"].astype(np.float32),
        "ts": recs["ts"].astype(np.int64),
        "seq": recs["seq"].astype(np.int64),
        "kts": recs["kts"].astype(np.float64),
    })


# Remove the events of some users from the buffer.  KEYS: recent list,
# reservoir hash.  ARGV: the users as 8-byte little-endian ids (bytes 9..16 of
# a packed event).  The recent list is rewritten without them (RPUSH in
# chunks: Lua's unpack has a C-stack bound); their reservoir slots are
# emptied (Algorithm R refills a slot when a later event draws it).
# Returns {recent events removed, reservoir events removed}.
_FORGET_LUA = """
local gone = {}
for i = 1, #ARGV do gone[ARGV[i]] = true end
local kept, n = {}, 0
for _, rec in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if gone[string.sub(rec, 9, 16)] then n = n + 1 else kept[#kept + 1] = rec end
end
if n > 0 then
  redis.call('DEL', KEYS[1])
  for i = 1, #kept, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(kept, i, math.min(i + 999, #kept)))
  end
end
local res, drop = redis.call('HGETALL', KEYS[2]), {}
for i = 1, #res, 2 do
  if gone[string.sub(res[i + 1], 9, 16)] then drop[#drop + 1] = res[i] end
end
for i = 1, #drop, 1000 do
  redis.call('HDEL', KEYS[2], unpack(drop, i, math.min(i + 999, #drop)))
end
return {n, #drop}
"""


class EventBuffer:
    """Bounded, persistent buffer of recent events + reservoir (see module doc)."""

    def __init__(self, client: Any, prefix: str, *, capacity: int,
                 reservoir: int = 0, seed: int = 0) -> None:
        self._r = client  # sync Redis or RedisCluster
        self.capacity = int(capacity)
        self.reservoir = int(reservoir)
        self.seed = int(seed)
        self.k_recent = self.recent_key(keys.check_prefix(prefix))
        self.k_res = keys.trainer_key(prefix, "reservoir")
        self.k_seq = keys.trainer_key(prefix, "seq")
        self.k_off = keys.trainer_key(prefix, "offsets")
        self.seq = int(self._r.get(self.k_seq) or 0)
        self.offsets: dict[str, int] = {
            k.decode(): int(v) for k, v in self._r.hgetall(self.k_off).items()
        }

    @staticmethod
    def recent_key(prefix: str) -> str:
        """Name of the recent-events list: it also identifies the buffer in a
        checkpoint's metadata (what ``trained_through_seq`` counts in)."""
        return keys.trainer_key(prefix, "recent")

    # -- writing -----------------------------------------------------------
    def fresh(self, topic: str, partition: int, offset: int) -> bool:
        """False when the record at this offset is already in the buffer."""
        return offset >= self.offsets.get(f"{topic}:{partition}", 0)

    def append(self, events: Sequence[BufferedEvent],
               offsets: dict[tuple[str, int], int] | None = None) -> int:
        """Add ``events`` (in arrival order) and record ``offsets`` ((topic,
        partition) -> next offset) in one transaction; returns the new seq."""
        n = len(events)
        off = {f"{t}:{p}": int(o) for (t, p), o in (offsets or {}).items()}
        if n == 0 and not off:
            return self.seq
        recs = np.zeros(n, dtype=REC)
        if n:
            recs["seq"] = np.arange(self.seq, self.seq + n, dtype=np.int64)
            recs["user"] = [e.user_id for e in events]
            recs["movie"] = [e.movie_id for e in events]
            recs["rating"] = [e.rating for e in events]
            recs["ts"] = [e.ts for e in events]
            recs["kts"] = [e.kafka_ts for e in events]
        raw = recs.tobytes()
        items = [raw[i * REC.itemsize:(i + 1) * REC.itemsize] for i in range(n)]
        slots = reservoir_slots(self.seed, recs["seq"], self.reservoir)
        res = {int(s): items[i] for i, s in enumerate(slots.tolist()) if s >= 0}  # last write wins
        pipe = self._r.pipeline(transaction=True)
        if items:
            pipe.rpush(self.k_recent, *items)
            pipe.ltrim(self.k_recent, -self.capacity, -1)
            pipe.set(self.k_seq, self.seq + n)
        if res:
            pipe.hset(self.k_res, mapping=res)
        if off:
            pipe.hset(self.k_off, mapping=off)
        pipe.execute()
        self.seq += n
        self.offsets.update(off)
        return self.seq

    # -- reading -----------------------------------------------------------
    def __len__(self) -> int:
        return int(self._r.llen(self.k_recent))

    def recent(self) -> np.ndarray:
        """Packed records of the recent window, oldest first."""
        return _unpack(self._r.lrange(self.k_recent, 0, -1))

    def sample(self) -> np.ndarray:
        """Packed records of the reservoir, in seq order."""
        recs = _unpack(list(self._r.hvals(self.k_res)))
        return recs[np.argsort(recs["seq"], kind="stable")]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """(recent, reservoir) read in one transaction (a consistent view)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.lrange(self.k_recent, 0, -1)
        pipe.hvals(self.k_res)
        recent, res = pipe.execute()
        res = _unpack(list(res))
        return _unpack(recent), res[np.argsort(res["seq"], kind="stable")]

    def forget(self, user_ids: Sequence[int]) -> tuple[int, int]:
        """Remove every event of ``user_ids`` from the recent window and the
        reservoir (one atomic script); returns (recent, reservoir) events removed."""
        if not user_ids:
            return 0, 0
        ids = [np.int64(u).astype("<i8").tobytes() for u in set(user_ids)]
        n, m = self._r.eval(_FORGET_LUA, 2, self.k_recent, self.k_res, *ids)
        return int(n), int(m)

    @classmethod
    def forget_in(cls, client: Any, prefix: str, user_ids: Sequence[int]) -> tuple[int, int]:
        """:meth:`forget` without opening the buffer (no capacity needed)."""
        return cls(client, prefix, capacity=1).forget(user_ids)

    def clear(self) -> None:
        self._r.delete(self.k_recent, self.k_res, self.k_seq, self.k_off)
        self.seq = 0
        self.offsets = {}


def _unpack(items: list[bytes]) -> np.ndarray:
    if not items:
        return np.zeros(0, dtype=REC)
    return np.frombuffer(b"".join(items), dtype=REC).copy()
