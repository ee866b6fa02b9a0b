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

Writes are one Lua script call per key (so one slot per call: legal on a
Redis Cluster), all pipelined: the script adds the increment vector to the
stored one element by element, atomically.  A missing key -- a movie no
worker has written yet -- starts from the *base* vector the caller passes
(its current row, i.e. the checkpoint's), so the first writer's base counts
once and later writers' bases are ignored.  A stored vector of another length
(written by a model of another shape) is replaced by base + increment: the
old one cannot be added to.  Reads are one pipelined GET per key; a vector
of an unexpected length reads as missing.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from redis.exceptions import NoScriptError

from core.repos import keys

# KEYS: one movie-side key.  ARGV: the float32 increment, the float32 base.
# Returns 1 when the key started from the base, else 0.
_ADD_LUA = """
local inc, base = ARGV[1], ARGV[2]
local cur = redis.call('GET', KEYS[1])
local fresh = 0
if (not cur) or #cur ~= #inc then cur = base; fresh = 1 end
local out = {}
for i = 1, #inc, 4 do
  out[#out + 1] = struct.pack('<f', struct.unpack('<f', cur, i) + struct.unpack('<f', inc, i))
end
redis.call('SET', KEYS[1], table.concat(out))
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
        pipe = self.client.pipeline(transaction=False)
        for i in movie_ids:
            pipe.get(self.key(i))
        pipe.get(self.key(None))
        got = await pipe.execute()
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
        replies = await self._send(adds)
        if any(isinstance(x, NoScriptError) for x in replies):
            # a restarted or promoted node has no script cache.  Only the calls
            # refused for that are sent again: the others were applied, and an
            # increment must count once.
            await self.client.script_load(_ADD_LUA)
            again = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
            for i, x in zip(again, await self._send([adds[i] for i in again])):
                replies[i] = x
        for x in replies:
            if isinstance(x, Exception):
                raise x
        return sum(int(x) for x in replies)

    async def _send(self, adds: Sequence[Add]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        sha = self._add.sha
        for movie_id, inc, base in adds:
            # execute_command: the cluster pipeline routes EVALSHA by its declared key
            pipe.execute_command("EVALSHA", sha, 1, self.key(movie_id), _f32(inc), _f32(base))
        return await pipe.execute(raise_on_error=False)

    async def drop(self) -> int:
        """Delete every movie-side key of this prefix; returns keys removed."""
        names = [k for pat in keys.movie_side_patterns(self.prefix)
                 async for k in self.client.scan_iter(match=pat, count=5000)]
        n = 0
        for i in range(0, len(names), 1000):
            n += int(await self.client.unlink(*names[i:i + 1000]))
        return n
