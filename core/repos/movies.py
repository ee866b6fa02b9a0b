"""The online movie side of one deployment, authoritative in Redis and shared
by every worker.

Why Redis and why increments: every worker learns the movie side from its own
events (``models.online``), and a movie's rating events reach many workers
(events are keyed by user).  Each worker therefore *adds* what its batch
learned -- a sum per movie row and per global tensor -- and reads the rows it
needs back before its next batch.  Addition commutes, so concurrent workers
lose no update and the order they write in does not matter.

Layout (names from :mod:`core.repos.keys`): one string per movie row,
``{<prefix>:ms:<b>}:m:<movie_id>``, holding packed little-endian float32
``[b, bG, q(k), qG(k)]``; one string ``{<prefix>:ms}:g`` holding the global
tensors packed in a fixed order (``models.online_pack``).  This module only
sees float32 vectors.

Writes are one Lua script call per hash slot (all the batch's keys on a
single Redis; on a Redis Cluster the keys of one slot, since a script may
only touch one), pipelined: the script adds each increment vector to the
stored one element by element, atomically.  A missing key -- a movie no
worker has written yet -- starts from the *base* vector the caller passes
(its current row, i.e. the checkpoint's), so the first writer's base counts
once and later writers' bases are ignored.  A stored vector of another length
(written by a model of another shape) is replaced by base + increment: the
old one cannot be added to.  Reads are one pipelined GET per key; a vector
of an unexpected length reads as missing.

Why whole-batch commands: a batch touches a few hundred movies, and redis-py
costs ~20-30 us of worker CPU per command it builds and parses; one MGET and
one script call (per slot) instead of one command per movie took the
movie side's share of the worker's CPU from about 21 to about 5 us per event
(``python -m bench.predictor_cpu``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from redis.exceptions import NoScriptError

from core.redis_conn import by_slot, is_cluster
from core.repos import keys

# KEYS: movie-side keys of one slot.  ARGV: per key, its float32 increment
# and its float32 base.  Returns how many keys started from their base.
_ADD_LUA = """
local fresh = 0
for k = 1, #KEYS do
  local inc, base = ARGV[2 * k - 1], ARGV[2 * k]
  local cur = redis.call('GET', KEYS[k])
  if (not cur) or #cur ~= #inc then cur = base; fresh = fresh + 1 end
  -- up to 1,024 floats per struct call each way (one call per float costs
  -- ~2x the Redis time; the bound keeps within Lua's C stack); sums are
  -- rounded to float32 by pack
  local parts = {}
  for at = 1, #inc, 4096 do
    local n = math.min(1024, (#inc - at + 1) / 4)
    local f = '<' .. string.rep('f', n)
    local a = {struct.unpack(f, cur, at)}
    local b = {struct.unpack(f, inc, at)}
    for i = 1, n do a[i] = a[i] + b[i] end
    parts[#parts + 1] = struct.pack(f, unpack(a, 1, n))
  end
  redis.call('SET', KEYS[k], table.concat(parts))
end
return fresh
"""

#: (movie id or None for the globals, increment, base): one write
Add = tuple[int | None, np.ndarray, np.ndarray]


def _f32(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


class MovieSideStore:
    """Async access to one deployment's movie side (``client``: asyncio Redis
    or RedisCluster)."""

    def __init__(self, client: Any, prefix: str = "fbp") -> None:
        self.client = client
        self.prefix = keys.check_prefix(prefix)
        self._add = client.register_script(_ADD_LUA)

    def key(self, movie_id: int | None) -> str:
        return keys.movie_side_key(self.prefix, movie_id)

    async def load(self, movie_ids: Sequence[int], row_len: int, global_len: int
                   ) -> tuple[list[np.ndarray | None], np.ndarray | None]:
        """The stored rows of ``movie_ids`` and the globals, one pipelined
        round trip; None where missing or of another length."""
        names = [self.key(i) for i in movie_ids] + [self.key(None)]
        # one MGET on a single Redis; the cluster client splits it by slot
        mget = self.client.mget_nonatomic if is_cluster(self.client) else self.client.mget
        got = await mget(names)
        rows = [self._vec(b, row_len) for b in got[:-1]]
        return rows, self._vec(got[-1], global_len)

    @staticmethod
    def _vec(raw: bytes | None, n: int) -> np.ndarray | None:
        if raw is None or len(raw) != 4 * n:
            return None
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    async def add(self, adds: Sequence[Add]) -> int:
        """Add each increment to its key (missing keys start from their base),
        pipelined; returns how many keys started from their base."""
        if not adds:
            return 0
        groups = self._by_slot(adds)
        replies = await self._send(groups)
        if any(isinstance(x, NoScriptError) for x in replies):
            # a restarted or promoted node has no script cache.  Only the calls
            # refused for that are sent again: the others were applied, and an
            # increment must count once.
            await self.client.script_load(_ADD_LUA)
            again = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
            for i, x in zip(again, await self._send([groups[i] for i in again])):
                replies[i] = x
        for x in replies:
            if isinstance(x, Exception):
                raise x
        return sum(int(x) for x in replies)

    def _by_slot(self, adds: Sequence[Add]) -> list[list[tuple[str, Add]]]:
        return by_slot(self.client, [(self.key(a[0]), a) for a in adds])

    async def _send(self, groups: Sequence[Sequence[tuple[str, Add]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        sha = self._add.sha
        for group in groups:
            args: list[bytes] = []
            for _, (_, inc, base) in group:
                args += (_f32(inc), _f32(base))
            # execute_command: the cluster pipeline routes EVALSHA by its declared keys
            pipe.execute_command("EVALSHA", sha, len(group), *(name for name, _ in group), *args)
        return await pipe.execute(raise_on_error=False)

    async def drop(self) -> int:
        """Delete every movie-side key of this prefix; returns keys removed."""
        names = [k for pat in keys.movie_side_patterns(self.prefix)
                 async for k in self.client.scan_iter(match=pat, count=5000)]
        n = 0
        for i in range(0, len(names), 1000):
            n += int(await self.client.unlink(*names[i:i + 1000]))
        return n
