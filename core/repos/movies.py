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

Writes are one Lua script call per hash slot and vector length (the batch's
movie rows in one call and the globals in another on a single Redis; on a
Redis Cluster the rows of one slot per call, since a script may only touch
one), pipelined in one round trip: the script adds each increment vector to
the stored one element by element, atomically per call.  A missing key -- a
movie no worker has written yet -- starts from the *base* vector the caller
passes (its current row, i.e. the checkpoint's), so the first writer's base
counts once and later writers' bases are ignored.  A stored vector of
another length (written by a model of another shape) is replaced by base +
increment: the old one cannot be added to.  Reads are one MGET; a vector of
an unexpected length reads as missing.

Why whole-batch commands with packed arguments: a batch touches a few
hundred movies, and redis-py costs ~20-30 us of worker CPU per command it
builds and parses, and ~1 us per argument it encodes.  One MGET and one
script call whose increments and bases travel as two byte strings (one
argument each, not two per movie), with rows as numpy arrays end to end,
keep the movie side's share of the worker's CPU small
(``python -m bench.predictor_cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from redis.exceptions import NoScriptError, OutOfMemoryError

from core.redis_conn import OnFull, by_slot, is_cluster, resend_refused, unlink_matching
from core.repos import keys

# KEYS: movie-side keys of one slot, vectors of one length.  ARGV[1]: their
# float32 increments concatenated in key order; ARGV[2]: their bases, the
# same way.  Returns how many keys started from their base.
_ADD_LUA = """
local fresh = 0
local len = #ARGV[1] / #KEYS
for k = 1, #KEYS do
  local from = (k - 1) * len + 1
  local inc = string.sub(ARGV[1], from, from + len - 1)
  local base = string.sub(ARGV[2], from, from + len - 1)
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

@dataclass
class Adds:
    """One batch's movie-side writes: the increments of movie rows ``ids``
    and of the globals, each with its base (what a missing key starts from)."""

    ids: np.ndarray  #: int64 [n] movie ids, unique
    inc: np.ndarray  #: float32 [n, row_len]
    base: np.ndarray  #: float32 [n, row_len]
    global_inc: np.ndarray | None = None  #: float32 [global_len]; None: the globals are not added to
    global_base: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids) + (self.global_inc is not None)

    def keys(self) -> list[int | None]:
        """The movie ids written, and None for the globals."""
        return self.ids.tolist() + ([None] if self.global_inc is not None else [])


def _f32(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


class MovieSideStore:
    """Async access to one deployment's movie side (``client``: asyncio Redis
    or RedisCluster)."""

    def __init__(self, client: Any, prefix: str = "fbp", *, on_full: OnFull | None = None) -> None:
        self.client = client
        self.prefix = keys.check_prefix(prefix)
        #: what to do when Redis refuses an increment as full (None: raise)
        self.on_full = on_full
        self._add = client.register_script(_ADD_LUA)
        self._names: dict[int | None, str] = {}  # key names by movie id, built once each

    def key(self, movie_id: int | None) -> str:
        name = self._names.get(movie_id)
        if name is None:
            name = self._names[movie_id] = keys.movie_side_key(self.prefix, movie_id)
        return name

    async def load(self, movie_ids: Sequence[int], row_len: int, global_len: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The stored rows of ``movie_ids`` and the globals in one round trip:
        (rows [n, row_len] float32, found [n] bool -- False where missing or
        of another length, its row zeros --, globals or None)."""
        names = [self.key(i) for i in movie_ids] + [self.key(None)]
        # one MGET on a single Redis; the cluster client splits it by slot
        mget = self.client.mget_nonatomic if is_cluster(self.client) else self.client.mget
        got = await mget(names)
        glob = self._vec(got.pop(), global_len)
        size = 4 * row_len
        if all(b is not None and len(b) == size for b in got):  # the usual case: one copy
            rows = np.frombuffer(b"".join(got), dtype="<f4").astype(np.float32).reshape(len(got), row_len)
            return rows, np.ones(len(got), bool), glob
        rows = np.zeros((len(got), row_len), np.float32)
        found = np.zeros(len(got), bool)
        for i, b in enumerate(got):
            v = self._vec(b, row_len)
            if v is not None:
                rows[i], found[i] = v, True
        return rows, found, glob

    @staticmethod
    def _vec(raw: bytes | None, n: int) -> np.ndarray | None:
        if raw is None or len(raw) != 4 * n:
            return None
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    async def add(self, adds: Adds) -> int:
        """Add each increment to its key (missing keys start from their base),
        pipelined; returns how many keys started from their base.

        Calls Redis refused are sent again, and only those: the others were
        applied, and an increment must count once.  Refused means a node
        without the script cache (a restarted or promoted one), or -- with an
        ``on_full`` policy -- a full Redis (a script is refused whole at its
        first write, so a refused call added nothing)."""
        calls = self._calls(adds)
        if not calls:
            return 0
        replies = await self._send(calls)
        refusals = 0
        while True:
            if any(isinstance(x, NoScriptError) for x in replies):
                await self.client.script_load(_ADD_LUA)
                await resend_refused(self._send, calls, replies, NoScriptError)
            full = next((x for x in replies if isinstance(x, OutOfMemoryError)), None)
            if full is None or self.on_full is None:
                break
            refusals += 1
            await self.on_full.refused(full, refusals)
            await resend_refused(self._send, calls, replies, OutOfMemoryError)
        if refusals and self.on_full is not None:
            self.on_full.resumed(refusals)
        for x in replies:
            if isinstance(x, Exception):
                raise x
        return sum(int(x) for x in replies)

    def _calls(self, adds: Adds) -> list[tuple[list[str], bytes, bytes]]:
        """(key names, increments, bases) per script call: the rows by slot, then the globals."""
        calls = []
        if len(adds.ids):
            inc, base = np.ascontiguousarray(adds.inc, "<f4"), np.ascontiguousarray(adds.base, "<f4")
            names = [(self.key(i), n) for n, i in enumerate(adds.ids.tolist())]
            for group in by_slot(self.client, names):
                at = [n for _, n in group]
                calls.append(([name for name, _ in group], inc[at].tobytes(), base[at].tobytes()))
        if adds.global_inc is not None:
            calls.append(([self.key(None)], _f32(adds.global_inc), _f32(adds.global_base)))
        return calls

    async def _send(self, calls: Sequence[tuple[list[str], bytes, bytes]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        sha = self._add.sha
        for names, inc, base in calls:
            # execute_command: the cluster pipeline routes EVALSHA by its declared keys
            pipe.execute_command("EVALSHA", sha, len(names), *names, inc, base)
        return await pipe.execute(raise_on_error=False)

    async def drop(self) -> int:
        """Delete every movie-side key of this prefix; returns keys removed."""
        return await unlink_matching(self.client, keys.movie_side_patterns(self.prefix))
