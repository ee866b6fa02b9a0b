"""Every Redis key name of one deployment (one ``key_prefix``), built here and
only here, so a layout change is one edit and one layout number.

Layout 1 (``LAYOUT``); ``{...}`` is a Redis Cluster hash tag, so the keys of
one group always sit in one slot and a script or MULTI over them is legal on
a cluster as on a single Redis:

* user states (:mod:`core.repos.states`): ``{<prefix>:<b>}:u:<user_id>`` with
  ``b = user_id mod STATE_BUCKETS``, and that bucket's users counter
  ``{<prefix>:<b>}:users``.  A user's state and its bucket counter share a
  slot (one script call per user writes both); the buckets spread users over
  the cluster's slots.
* published models (:mod:`core.repos.models`): ``{<prefix>:model}:...``
* the trainer's buffer and requests (:mod:`core.repos.buffer`,
  :mod:`core.repos.trainer`): ``{<prefix>:trainer}:...``
* dead letters already replayed (:mod:`core.repos.replays`): ``{<prefix>:dlq}:...``
* the erasure count (:mod:`core.repos.erasure`): ``{<prefix>:erasure}:...``
* the online movie side (:mod:`core.repos.movies`): one key per movie row
  ``{<prefix>:ms:<b>}:m:<movie_id>`` with ``b = movie_id mod STATE_BUCKETS``
  (spread over the slots like user states), and the globals ``{<prefix>:ms}:g``.
* the movie catalog (:mod:`core.repos.catalog`): one hash
  ``{<prefix>:catalog}:movies`` (field: movie id, value: the movie's JSON),
  so one slot; it is read in small HMGETs where people look, never per event.

Keys of the unversioned layout before this one (``<prefix>:u:<id>``,
``<prefix>:model:...``, ``<prefix>:trainer:...``, ``<prefix>:meta:users``)
are not read: :func:`migrate_unversioned` moves them to this layout's names
(once, on the single Redis that layout ran on), :func:`drop_namespace`
removes them.
"""

from __future__ import annotations

from typing import Any

from fbp_errors import ConfigError

#: Version of the key and state-hash layout; stored in each user-state hash.
LAYOUT = 1

#: Buckets user states are spread over.  Fixed by the layout: changing it
#: moves every user, so it needs a new LAYOUT.  1024 tags spread evenly enough
#: over up to ~100 masters (each slot range receives whole buckets).
STATE_BUCKETS = 1024

_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\^"})


def check_prefix(prefix: str) -> str:
    """A prefix goes inside a hash tag, so braces would break the grouping."""
    if not prefix or "{" in prefix or "}" in prefix:
        raise ConfigError(f"redis key_prefix {prefix!r}: must be non-empty and free of '{{' and '}}' "
                          "(it is used inside Redis Cluster hash tags)")
    return prefix


def state_bucket(user_id: int) -> int:
    return int(user_id) % STATE_BUCKETS


def state_key(prefix: str, user_id: int) -> str:
    return f"{{{prefix}:{state_bucket(user_id)}}}:u:{int(user_id)}"


def users_key(prefix: str, bucket: int) -> str:
    return f"{{{prefix}:{int(bucket)}}}:users"


def model_key(prefix: str, *parts: object) -> str:
    return ":".join([f"{{{prefix}:model}}", *map(str, parts)])


def trainer_key(prefix: str, *parts: object) -> str:
    return ":".join([f"{{{prefix}:trainer}}", *map(str, parts)])


def dlq_key(prefix: str, *parts: object) -> str:
    return ":".join([f"{{{prefix}:dlq}}", *map(str, parts)])


def erasure_key(prefix: str, *parts: object) -> str:
    return ":".join([f"{{{prefix}:erasure}}", *map(str, parts)])


def movie_side_key(prefix: str, movie_id: int | None) -> str:
    """A movie's row of the online movie side; ``None``: its global tensors."""
    if movie_id is None:
        return f"{{{prefix}:ms}}:g"
    return f"{{{prefix}:ms:{int(movie_id) % STATE_BUCKETS}}}:m:{int(movie_id)}"


def catalog_key(prefix: str, *parts: object) -> str:
    """A key of the movie catalog (titles, years, genres by movie id)."""
    return ":".join([f"{{{prefix}:catalog}}", *map(str, parts)])


def movie_side_patterns(prefix: str) -> list[str]:
    """SCAN MATCH patterns of every movie-side key of ``prefix``."""
    p = prefix.translate(_GLOB)
    return [f"{{{p}:ms:*}}:m:*", f"{{{p}:ms}}:g"]


def state_pattern(prefix: str) -> str:
    """SCAN MATCH pattern of every user-state hash of ``prefix``."""
    return f"{{{prefix.translate(_GLOB)}:*}}:u:*"


def namespace_patterns(prefix: str) -> list[str]:
    """SCAN MATCH patterns of every key of ``prefix`` (this layout and the unversioned one)."""
    p = prefix.translate(_GLOB)
    return [f"{{{p}:*", f"{p}:*"]


def drop_namespace(client: Any, prefix: str) -> int:
    """Delete every key of ``prefix`` (sync client, single Redis or cluster:
    the cluster client scans every master and splits the deletes by slot)."""
    n = 0
    for pattern in namespace_patterns(check_prefix(prefix)):
        keys = list(client.scan_iter(match=pattern, count=5000))
        for i in range(0, len(keys), 1000):
            n += int(client.unlink(*keys[i:i + 1000]))
    return n


async def adrop_namespace(client: Any, prefix: str) -> int:
    """:func:`drop_namespace` for an asyncio client."""
    n = 0
    for pattern in namespace_patterns(check_prefix(prefix)):
        keys = [k async for k in client.scan_iter(match=pattern, count=5000)]
        for i in range(0, len(keys), 1000):
            n += int(await client.unlink(*keys[i:i + 1000]))
    return n


def unversioned_key(prefix: str, *parts: object) -> str:
    """A key name of the layout before LAYOUT 1 (``<prefix>:<parts>``), for
    :func:`migrate_unversioned` and its test only."""
    return ":".join([prefix, *map(str, parts)])


def migrate_unversioned(client: Any, prefix: str) -> dict[str, int]:
    """Rename the keys of the unversioned layout to this layout's names (sync
    client, single Redis: that layout never ran on a cluster, and RENAME
    cannot cross slots).  Models and trainer keys move under their hash tags;
    user hashes move to their buckets and are counted there (the old users
    counter is dropped).  A key whose new name is taken is left where it is.
    Moved user hashes have no ``l`` field and are read as before; their next
    write adds it.  Idempotent; returns what moved."""
    p = check_prefix(prefix)
    glob = p.translate(_GLOB)
    moved = {"model": 0, "trainer": 0, "users": 0}
    for part, build in (("model", model_key), ("trainer", trainer_key)):
        head = len(unversioned_key(p, part)) + 1
        for k in list(client.scan_iter(match=f"{glob}:{part}:*", count=5000)):
            if client.renamenx(k, build(p, k.decode()[head:])):
                moved[part] += 1
    for k in list(client.scan_iter(match=f"{glob}:u:*", count=5000)):
        uid = int(k.decode().rsplit(":", 1)[1])
        if client.renamenx(k, state_key(p, uid)):
            client.incr(users_key(p, state_bucket(uid)))
            moved["users"] += 1
    client.delete(unversioned_key(p, "meta", "users"))
    return moved
