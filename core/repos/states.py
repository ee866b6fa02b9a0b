"""Per-user state in Redis, written together with its Kafka watermarks.

One hash per user, ``{<prefix>:<bucket>}:u:<user_id>`` (names built by
:mod:`core.repos.keys`), with fields

* ``s``: the model state bytes (``models.state`` format; carries the model version),
* ``l``: the layout version of this hash (:data:`core.repos.keys.LAYOUT`),
* ``o:<topic>:<partition>``: the offset of the last event from that source
  (topic, partition) folded into ``s`` -- one field per source;
* ``x:<topic>:<partition>`` (``worker.exactly_once`` only): the prediction
  records the last write produced for that source's events, by offset
  (:func:`pack_outputs`).  Written in the same atomic call as the state, so
  a redelivered event the watermark filters can be answered with its
  original record when the transaction that carried it never committed.

Why one watermark per *source*: a user's events can reach the worker from
more than one (topic, partition) -- the ratings topic and its repartition
topic (re-keyed events), or a new partition after the topic grew.  Offsets
of different sources are unrelated numbers, so a single (partition, offset)
pair would either skip new events or apply redelivered ones twice.  (Kafka
topic names cannot contain ``:``, so the field name parses unambiguously.)

Loads are one pipelined round trip; stores are one Lua script call *per
user*, all pipelined (one round trip per Redis node): a user's state and
watermarks are one hash, so each write is atomic on one Redis and on a Redis
Cluster alike (a script may only touch keys of one slot, and each call's keys
-- the user's hash and its bucket's users counter -- share a hash tag).  A
write that brings nothing newer than the stored watermarks is dropped.  The
worker skips any event at or below its source's watermark, so redelivery
after a crash never applies an event twice.

Layout: a hash whose ``l`` is another layout (written by another version of
this program) is not read: :meth:`StateStore.load` hands it back as a fresh
user with :attr:`Stored.foreign` set to a :class:`StateLayoutError` (a
``StateMismatch``) whose message says what to do; the worker resets such a
user (and can count them), and its next write replaces the hash whole.
Hashes without ``l`` predate layouts and are read.

Durability: with ``wait_replicas`` > 0 every store ends with ``WAIT`` on each
master it wrote to and fails (:class:`StateNotDurable`) unless that many
replicas acknowledged; the worker then exits without committing offsets, so
a failover cannot lose a write whose events Kafka already counts as consumed.

Lifecycle: with ``idle_ttl_ms`` > 0 every write that lands sets the hash's
expiry to that long from now (``PEXPIRE`` in the same script call, so state,
watermarks and expiry change together); a user idle that long disappears
whole and is next served as a new user (cold start).  The watermarks go with
the state, so an event of that user redelivered *after* the expiry would be
applied again: the default TTL (``state.idle_ttl_s``, 90 days) is far longer
than any event stays in Kafka, which is what rules that out (README, "State
lifecycle").  The bucket counters count states *created*: a user whose state
expired and who returns is counted again (:meth:`StateStore.users` is an upper
bound of the live users then).  :meth:`StateStore.forget` erases users.

A full Redis (``maxmemory`` with ``noeviction``) refuses the script with an
``OutOfMemoryError``; with an ``on_full`` policy (:class:`core.redis_conn.OnFull`)
the store waits on it and sends the batch again (every write is conditional,
so resending is harmless) until Redis takes it, instead of raising.

Hashes written before per-source watermarks (fields ``p``/``o``) are read as
a watermark for partition ``p`` of any topic (what they meant then) and lose
those fields on their next write.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from redis.exceptions import NoScriptError, OutOfMemoryError

from core.redis_conn import OnFull, by_slot, first_full, is_cluster, queue_wait, resend_refused, unlink_matching
from core.repos import keys
from fbp_errors import InfrastructureError, StateMismatch

#: (topic, partition, offset) of the last event of one source in a stored state
Mark = tuple[str, int, int]

# One call writes a group of users that share a slot (all users of a batch on
# a single Redis; per hash slot on a cluster).  Why a group and not one call
# per user: redis-py spends ~16 us of client CPU per pipelined command (packing,
# reply parsing), ~12 us per event at batch 512 -- a third of the worker's CPU.
# KEYS: per user, its hash and its bucket's users counter (same hash tag).
# ARGV: layout, idle TTL in ms (0: none), then per user: blob, n, and n (field, value) pairs -- its
# watermarks and, in exactly-once mode, (outputs field, packed outputs).
# A user's write lands when its key is new or some source's offset moved
# forward; each watermark only ever grows, so a zombie worker replaying old
# offsets cannot overwrite newer state or move a mark back.  A hash of another
# layout is replaced whole.  Returns (written, created) per user, flat.
_STORE_LUA = """
local layout = ARGV[1]
local ttl = tonumber(ARGV[2])
local out = {}
local a = 3
for i = 1, #KEYS, 2 do
  local key = KEYS[i]
  local blob, n = ARGV[a], tonumber(ARGV[a + 1])
  local first, last = a + 2, a + 2 * n
  a = last + 2
  local was = redis.call('HGET', key, 'l')
  local foreign = was and was ~= layout
  if foreign then redis.call('DEL', key) end
  local new = redis.call('HEXISTS', key, 's') == 0
  local newer = new
  local sets = {}
  for j = first, last, 2 do
    local f, v = ARGV[j], ARGV[j + 1]
    if string.byte(f, 1) == 120 then  -- 'x:<source>': its outputs, set with the state
      sets[#sets + 1] = f
      sets[#sets + 1] = v
    else
      local cur = tonumber(redis.call('HGET', key, f))
      if (not cur) or cur < tonumber(v) then
        newer = true
        sets[#sets + 1] = f
        sets[#sets + 1] = v
      end
    end
  end
  local written, created = 0, 0
  if newer then
    redis.call('HSET', key, 's', blob, 'l', layout, unpack(sets))
    redis.call('HDEL', key, 'p', 'o')
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
    written = 1
    if new and not foreign then
      redis.call('INCR', KEYS[i + 1])
      created = 1
    end
  end
  out[#out + 1] = written
  out[#out + 1] = created
end
return out
"""

# Erase a group of users that share a slot.  KEYS: per user, its hash and its
# bucket's users counter.  A deleted hash is uncounted.  Returns the hashes deleted.
_FORGET_LUA = """
local n = 0
for i = 1, #KEYS, 2 do
  if redis.call('DEL', KEYS[i]) == 1 then
    n = n + 1
    if tonumber(redis.call('GET', KEYS[i + 1]) or '0') > 0 then redis.call('DECR', KEYS[i + 1]) end
  end
end
return n
"""

# The hashes of a group of users that share a slot, in KEYS order (for the
# same reason as above: one command instead of one HGETALL per user).
_LOAD_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
"""


class StateLayoutError(StateMismatch):
    """A stored state hash of a layout this version cannot read."""


class StateNotDurable(InfrastructureError):
    """Fewer replicas than ``wait_replicas`` acknowledged a state write in time."""


#: (topic, partition, [(offset, encoded record), ...]): one source's outputs of a write
Outputs = tuple[str, int, Sequence[tuple[int, bytes]]]

_OUT_HEAD = struct.Struct(">qI")


def mark_field(topic: str, partition: int) -> str:
    """The hash field holding the watermark of one source."""
    return f"o:{topic}:{partition}"


def outputs_field(topic: str, partition: int) -> str:
    """The hash field holding the last outputs of one source (exactly-once mode)."""
    return f"x:{topic}:{partition}"


def pack_outputs(outs: Sequence[tuple[int, bytes]]) -> bytes:
    """(offset, record) pairs as one value: per pair an 8-byte offset, a
    4-byte length and the record's bytes."""
    return b"".join(_OUT_HEAD.pack(o, len(v)) + v for o, v in outs)


def unpack_outputs(blob: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i, n = 0, len(blob)
    while i < n:
        off, size = _OUT_HEAD.unpack_from(blob, i)
        i += _OUT_HEAD.size
        out[off] = bytes(blob[i:i + size])
        i += size
    return out


@dataclass(frozen=True, slots=True)
class Stored:
    """What Redis holds for one user (``blob`` None for a user never seen).

    ``marks`` maps (topic, partition) to the last folded-in offset; a legacy
    single watermark is stored under topic ``None`` (any topic).  ``foreign``
    is set (and ``blob`` None) when Redis holds a state of another layout."""

    blob: bytes | None
    marks: dict[tuple[str | None, int], int] = field(default_factory=dict)
    foreign: StateLayoutError | None = None
    #: packed last outputs per (topic, partition) (exactly-once mode writes them)
    outputs: dict[tuple[str, int], bytes] = field(default_factory=dict)

    def covers(self, topic: str, partition: int, offset: int) -> bool:
        """True when the event at (topic, partition, offset) is already folded in."""
        if self.blob is None:
            return False
        done = self.marks.get((topic, partition))
        if done is None:
            done = self.marks.get((None, partition))
        return done is not None and offset <= done

    def output(self, topic: str, partition: int, offset: int) -> bytes | None:
        """The record last produced for the event at (topic, partition, offset), if stored."""
        blob = self.outputs.get((topic, partition))
        return None if blob is None else unpack_outputs(blob).get(offset)


_EMPTY = Stored(None)
_LAYOUT = str(keys.LAYOUT).encode()


def _parse(prefix: str, user_id: int, h: dict[bytes, bytes]) -> Stored:
    blob = h.get(b"s")
    if blob is None:
        return _EMPTY
    layout = h.get(b"l")
    if layout is not None and layout != _LAYOUT:
        return Stored(None, foreign=StateLayoutError(
            f"user {user_id}: stored state has layout {layout.decode(errors='replace')}, this version "
            f"reads layout {keys.LAYOUT}; run the matching version, or drop the states of prefix "
            f"{prefix!r} (the worker resets such users when it meets them)"))
    marks: dict[tuple[str | None, int], int] = {}
    outputs: dict[tuple[str, int], bytes] = {}
    for f, v in h.items():
        if f.startswith(b"o:"):
            topic, _, part = f[2:].decode().rpartition(":")
            marks[(topic, int(part))] = int(v)
        elif f.startswith(b"x:"):
            topic, _, part = f[2:].decode().rpartition(":")
            outputs[(topic, int(part))] = v
    if b"p" in h and b"o" in h:  # written before per-source watermarks
        marks.setdefault((None, int(h[b"p"])), int(h[b"o"]))
    return Stored(blob, marks, outputs=outputs)


class StateStore:
    """Async access to the user states of one deployment (one key prefix);
    ``client`` is an asyncio Redis or RedisCluster client."""

    def __init__(self, client: Any, prefix: str = "fbp", *,
                 wait_replicas: int = 0, wait_timeout_ms: int = 1000,
                 idle_ttl_ms: int = 0, on_full: OnFull | None = None) -> None:
        self.client = client
        self.prefix = keys.check_prefix(prefix)
        self.wait_replicas = int(wait_replicas)
        self.wait_timeout_ms = int(wait_timeout_ms)
        self.idle_ttl_ms = int(idle_ttl_ms)
        self.on_full = on_full
        self._store = client.register_script(_STORE_LUA)
        self._load = client.register_script(_LOAD_LUA)
        self._forget = client.register_script(_FORGET_LUA)

    @classmethod
    def from_settings(cls, client: Any, redis_settings: Any, state_settings: Any = None,
                      on_full: OnFull | None = None) -> StateStore:
        """The store as ``RedisSettings`` (prefix, WAIT) and ``StateSettings``
        (idle TTL; none when not given) configure it."""
        r = redis_settings
        ttl_ms = 0 if state_settings is None else int(state_settings.idle_ttl_s) * 1000
        return cls(client, r.key_prefix, wait_replicas=r.wait_replicas, wait_timeout_ms=r.wait_timeout_ms,
                   idle_ttl_ms=ttl_ms, on_full=on_full)

    def key(self, user_id: int) -> str:
        return keys.state_key(self.prefix, user_id)

    async def load(self, user_ids: Sequence[int]) -> list[Stored]:
        """States and watermarks of ``user_ids``: one script call per slot group, pipelined."""
        if not user_ids:
            return []
        groups = by_slot(self.client, [(self.key(u), u) for u in user_ids])
        replies = await self._read(groups)
        if any(isinstance(x, NoScriptError) for x in replies):  # a node without the script cache
            await self.client.script_load(_LOAD_LUA)
            replies = await self._read(groups)
        got: dict[int, Stored] = {}
        for group, reply in zip(groups, replies):
            if isinstance(reply, Exception):
                raise reply
            for (_, u), flat in zip(group, reply):
                got[u] = _parse(self.prefix, u, dict(zip(flat[::2], flat[1::2])))
        return [got[u] for u in user_ids]

    async def _read(self, groups: Sequence[Sequence[tuple[str, int]]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        sha = self._load.sha
        for group in groups:
            pipe.execute_command("EVALSHA", sha, len(group), *(name for name, _ in group))
        return await pipe.execute(raise_on_error=False)

    async def store(self, rows: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
        """Write (user_id, blob, [(topic, partition, offset), ...]) rows, each
        atomically: the state with the last offset of each source it folded in.
        A row may carry a fourth element, its :data:`Outputs` (exactly-once
        mode): each source's outputs replace that source's stored ones in the
        same write.

        Returns (rows written, users created).  Raises StateNotDurable when
        ``wait_replicas`` replicas did not acknowledge in time."""
        if not rows:
            return 0, 0
        groups = by_slot(self.client, [(self.key(row[0]), row) for row in rows])
        replies = await self._send(groups)
        acks = replies[len(groups):]
        del replies[len(groups):]
        refusals = 0
        while True:
            if any(isinstance(x, NoScriptError) for x in replies):
                # a restarted or promoted node has no script cache
                await self.client.script_load(_STORE_LUA)
                acks += await resend_refused(self._send, groups, replies, NoScriptError)
            full = first_full(replies)
            if full is None or self.on_full is None:
                break
            refusals += 1  # Redis is full: wait on the policy, then send the refused writes again
            await self.on_full.refused(full, refusals)
            acks += await resend_refused(self._send, groups, replies, OutOfMemoryError)
        if refusals and self.on_full is not None:
            self.on_full.resumed(refusals)
        for x in (*replies, *acks):
            if isinstance(x, Exception):
                raise x
        flags = [int(v) for reply in replies for v in reply]
        self._check_acks(acks)
        return sum(flags[0::2]), sum(flags[1::2])

    async def _send(self, groups: Sequence[Sequence[tuple[str, tuple[Any, ...]]]]) -> list[Any]:
        """One EVALSHA per slot group and, with WAIT, one WAIT per master, pipelined."""
        pipe = self.client.pipeline(transaction=False)
        layout, sha, prefix = keys.LAYOUT, self._store.sha, self.prefix
        for group in groups:
            names: list[str] = []
            args: list[bytes | str | int] = [layout, self.idle_ttl_ms]
            for name, row in group:
                u, blob, marks = row[0], row[1], row[2]
                names += (name, keys.users_key(prefix, keys.state_bucket(u)))
                fields: list[bytes | str | int] = []
                for t, p, o in marks:
                    fields += (mark_field(t, p), o)
                if len(row) > 3:
                    for t, p, outs in row[3]:
                        fields += (outputs_field(t, p), pack_outputs(outs))
                args += (blob, len(fields) // 2, *fields)
            # execute_command: the cluster pipeline blocks its evalsha() helper, not
            # the command (it routes EVALSHA by its declared keys)
            pipe.execute_command("EVALSHA", sha, len(names), *names, *args)
        if self.wait_replicas:
            queue_wait(self.client, pipe, self.wait_replicas, self.wait_timeout_ms)
            # with WAIT, a MOVED write must not be retried on another connection,
            # which WAIT would not cover: fail the batch instead (redelivered)
            if hasattr(pipe, "cluster_client"):
                return await pipe.execute(raise_on_error=False, allow_redirections=False)
        return await pipe.execute(raise_on_error=False)

    def _check_acks(self, acks: Sequence[Any]) -> None:
        short = [int(a) for a in acks if int(a) < self.wait_replicas]
        if short:
            raise StateNotDurable(
                f"state write acknowledged by {min(short)} of the {self.wait_replicas} replica(s) asked "
                f"for within {self.wait_timeout_ms} ms; not committing (a failover could lose it): "
                "check the Redis replicas, or lower redis.wait_replicas")

    async def users(self) -> int:
        """Number of users with a stored state (the buckets' counters summed)."""
        names = [keys.users_key(self.prefix, b) for b in range(keys.STATE_BUCKETS)]
        # one MGET on a single Redis; the cluster client splits it by slot
        # (MGET across slots is refused) and pipelines the parts per node
        mget = self.client.mget_nonatomic if is_cluster(self.client) else self.client.mget
        return sum(int(v or 0) for v in await mget(names))

    async def forget(self, user_ids: Sequence[int]) -> int:
        """Delete the states (with their watermarks and outputs) of ``user_ids``
        and uncount them: one script call per slot group, pipelined.  Returns
        how many had a state."""
        if not user_ids:
            return 0
        groups = by_slot(self.client, [(self.key(u), u) for u in set(user_ids)])

        async def send(groups: Sequence[Sequence[tuple[str, int]]]) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for group in groups:
                names = [n for name, u in group for n in (name, keys.users_key(self.prefix, keys.state_bucket(u)))]
                pipe.execute_command("EVALSHA", self._forget.sha, len(names), *names)
            return await pipe.execute(raise_on_error=False)

        replies = await send(groups)
        if any(isinstance(x, NoScriptError) for x in replies):
            await self.client.script_load(_FORGET_LUA)
            # only the refused calls: the others already deleted (and counted) theirs
            await resend_refused(send, groups, replies, NoScriptError)
        for x in replies:
            if isinstance(x, Exception):
                raise x
        return sum(int(x) for x in replies)

    async def ttl_ms(self, user_id: int) -> int:
        """Milliseconds until the user's state expires (-1: never, -2: no state)."""
        return int(await self.client.pttl(self.key(user_id)))

    async def get(self, user_id: int) -> Stored:
        """One user's state (a state of another layout: blob None, ``foreign`` set)."""
        return (await self.load([user_id]))[0]

    async def user_ids(self) -> list[int]:
        """Every user with a stored state (a SCAN of all nodes: for tools, not the hot path)."""
        out = [int(k.rsplit(b":", 1)[1]) async for k in
               self.client.scan_iter(match=keys.state_pattern(self.prefix), count=5000)]
        return sorted(out)

    async def drop(self) -> int:
        """Delete every user state and users counter of this prefix; returns keys removed."""
        buckets = [keys.users_key(self.prefix, b) for b in range(keys.STATE_BUCKETS)]
        return await unlink_matching(self.client, [keys.state_pattern(self.prefix)], also=buckets)
