"""Per-user state in Redis, written together with its Kafka watermarks.

One hash per user, ``<prefix>:u:<user_id>``, with fields

* ``s``: the model state bytes (``models.state`` format; carries the model version),
* ``o:<topic>:<partition>``: the offset of the last event from that source
  (topic, partition) folded into ``s`` -- one field per source.

Why one watermark per *source*: a user's events can reach the worker from
more than one (topic, partition) -- the ratings topic and its repartition
topic (re-keyed events), or a new partition after the topic grew.  Offsets
of different sources are unrelated numbers, so a single (partition, offset)
pair would either skip new events or apply redelivered ones twice.  (Kafka
topic names cannot contain ``:``, so the field name parses unambiguously.)

Loads are one pipelined round trip; stores are one Lua script call, so a
state and its watermarks are always written together (atomically), and a
write that brings nothing newer than the stored watermarks is dropped.  The
worker skips any event at or below its source's watermark, so redelivery
after a crash never applies an event twice.

Hashes written before per-source watermarks (fields ``p``/``o``) are read as
a watermark for partition ``p`` of any topic (what they meant then) and lose
those fields on their next write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import redis.asyncio as aioredis

#: (topic, partition, offset) of the last event of one source in a stored state
Mark = tuple[str, int, int]

# KEYS: user keys.  ARGV: users-counter key, then per key: blob, n, and n
# (field, offset) pairs.  A write lands when the key is new or some source's
# offset moved forward; each watermark only ever grows, so a zombie worker
# replaying old offsets cannot overwrite newer state or move a mark back.
_STORE_LUA = """
local counter = ARGV[1]
local a = 2
local created, written = 0, 0
for _, key in ipairs(KEYS) do
  local blob, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local new = redis.call('HEXISTS', key, 's') == 0
  local newer = new
  local sets = {}
  for j = 1, n do
    local f, o = ARGV[a], tonumber(ARGV[a + 1])
    a = a + 2
    local cur = tonumber(redis.call('HGET', key, f))
    if (not cur) or cur < o then
      newer = true
      sets[#sets + 1] = f
      sets[#sets + 1] = o
    end
  end
  if new then created = created + 1 end
  if newer then
    redis.call('HSET', key, 's', blob, unpack(sets))
    redis.call('HDEL', key, 'p', 'o')
    written = written + 1
  end
end
if created > 0 then redis.call('INCRBY', counter, created) end
return {written, created}
"""


def mark_field(topic: str, partition: int) -> str:
    """The hash field holding the watermark of one source."""
    return f"o:{topic}:{partition}"


@dataclass(frozen=True, slots=True)
class Stored:
    """What Redis holds for one user (``blob`` None for a user never seen).

    ``marks`` maps (topic, partition) to the last folded-in offset; a legacy
    single watermark is stored under topic ``None`` (any topic)."""

    blob: bytes | None
    marks: dict[tuple[str | None, int], int] = field(default_factory=dict)

    def covers(self, topic: str, partition: int, offset: int) -> bool:
        """True when the event at (topic, partition, offset) is already folded in."""
        if self.blob is None:
            return False
        done = self.marks.get((topic, partition))
        if done is None:
            done = self.marks.get((None, partition))
        return done is not None and offset <= done


_EMPTY = Stored(None)


def _parse(h: dict[bytes, bytes]) -> Stored:
    blob = h.get(b"s")
    if blob is None:
        return _EMPTY
    marks: dict[tuple[str | None, int], int] = {}
    for f, v in h.items():
        if f.startswith(b"o:"):
            topic, _, part = f[2:].decode().rpartition(":")
            marks[(topic, int(part))] = int(v)
    if b"p" in h and b"o" in h:  # written before per-source watermarks
        marks.setdefault((None, int(h[b"p"])), int(h[b"o"]))
    return Stored(blob, marks)


class StateStore:
    """Async access to the user states of one deployment (one key prefix)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "fbp") -> None:
        self.client = client
        self.prefix = prefix
        self.users_key = f"{prefix}:meta:users"
        self._store = client.register_script(_STORE_LUA)

    def key(self, user_id: int) -> str:
        return f"{self.prefix}:u:{user_id}"

    async def load(self, user_ids: Sequence[int]) -> list[Stored]:
        """States and watermarks of ``user_ids`` in one round trip."""
        if not user_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for u in user_ids:
            pipe.hgetall(self.key(u))
        return [_parse(h) for h in await pipe.execute()]

    async def store(self, rows: Sequence[tuple[int, bytes, Sequence[Mark]]]) -> tuple[int, int]:
        """Write (user_id, blob, [(topic, partition, offset), ...]) rows atomically:
        the state with the last offset of each source it folded in.

        Returns (rows written, users created)."""
        if not rows:
            return 0, 0
        keys = [self.key(u) for u, _, _ in rows]
        args: list[bytes | str | int] = [self.users_key]
        for _, blob, marks in rows:
            args.extend((blob, len(marks)))
            for t, p, o in marks:
                args.extend((mark_field(t, p), o))
        written, created = await self._store(keys=keys, args=args)
        return int(written), int(created)

    async def users(self) -> int:
        """Number of users with a stored state."""
        v = await self.client.get(self.users_key)
        return int(v or 0)

    async def get(self, user_id: int) -> Stored:
        return (await self.load([user_id]))[0]
