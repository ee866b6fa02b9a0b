"""Per-user state in Redis, written together with its Kafka watermark.

One hash per user, ``<prefix>:u:<user_id>``, with fields

* ``s``: the model state bytes (``models.state`` format; carries the model version),
* ``p``/``o``: Kafka partition and offset of the last event folded into ``s``.

Loads are one pipelined round trip; stores are one Lua script call, so a
state and its watermark are always written together (atomically), and a
write whose offset is not newer than the stored one is dropped.  The worker
skips any event at or below the stored watermark, so redelivery after a
crash never applies an event twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import redis.asyncio as aioredis

# KEYS: user keys.  ARGV: users-counter key, then (blob, partition, offset) per key.
# A write lands when the key is new, the partition changed (repartitioning),
# or the offset moved forward; a zombie worker replaying old offsets cannot
# overwrite newer state.
_STORE_LUA = """
local counter = ARGV[1]
local created, written = 0, 0
for i, key in ipairs(KEYS) do
  local b = 1 + (i - 1) * 3
  local blob, p, o = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
  local cur = redis.call('HMGET', key, 'p', 'o')
  if not cur[2] then created = created + 1 end
  if (not cur[2]) or cur[1] ~= p or tonumber(cur[2]) < o then
    redis.call('HSET', key, 's', blob, 'p', p, 'o', o)
    written = written + 1
  end
end
if created > 0 then redis.call('INCRBY', counter, created) end
return {written, created}
"""


@dataclass(frozen=True, slots=True)
class Stored:
    """What Redis holds for one user (``blob`` None for a user never seen)."""

    blob: bytes | None
    partition: int
    offset: int

    def covers(self, partition: int, offset: int) -> bool:
        """True when the event at (partition, offset) is already folded in."""
        return self.blob is not None and self.partition == partition and offset <= self.offset


_EMPTY = Stored(None, -1, -1)


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
            pipe.hmget(self.key(u), "s", "p", "o")
        out = []
        for s, p, o in await pipe.execute():
            out.append(_EMPTY if s is None else Stored(s, int(p), int(o)))
        return out

    async def store(self, rows: Sequence[tuple[int, bytes, int, int]]) -> tuple[int, int]:
        """Write (user_id, blob, partition, offset) rows atomically.

        Returns (rows written, users created)."""
        if not rows:
            return 0, 0
        keys = [self.key(u) for u, _, _, _ in rows]
        args: list[bytes | str | int] = [self.users_key]
        for _, blob, p, o in rows:
            args.extend((blob, p, o))
        written, created = await self._store(keys=keys, args=args)
        return int(written), int(created)

    async def users(self) -> int:
        """Number of users with a stored state."""
        v = await self.client.get(self.users_key)
        return int(v or 0)

    async def get(self, user_id: int) -> Stored:
        return (await self.load([user_id]))[0]
