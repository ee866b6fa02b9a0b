"""Published model checkpoints in Redis, so every worker on every machine can
fetch the serving model without a shared filesystem.

Keys (``<prefix>`` from settings.redis.key_prefix; built by
:func:`core.repos.keys.model_key`, all under the hash tag ``{<prefix>:model}``
so that a publish -- checkpoint, meta, current, history -- is one MULTI/EXEC
on a Redis Cluster as on one Redis):

* ``{<prefix>:model}:seq``            version counter (INCR)
* ``{<prefix>:model}:v:<n>``          checkpoint bytes of version n (``models.checkpoint`` format)
* ``{<prefix>:model}:v:<n>:meta``     JSON: sha256, model, metrics, published_at, reason
* ``{<prefix>:model}:current``        the serving version number
* ``{<prefix>:model}:history``        JSON lines of every publish/rollback, newest first

A checkpoint is checked against its sha256 before anything loads it; a
mismatch is refused and the worker keeps the model it has.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from core.repos import keys
from models.base import RatingModel
from models.checkpoint import CheckpointError, checkpoint_from_bytes, checkpoint_to_bytes
from fbp_errors import ModelRefused


@dataclass(frozen=True)
class Published:
    version: int
    sha256: str
    meta: dict[str, Any]


class ModelStore:
    """Blocking access (publishing is rare; workers poll it from a timer);
    ``client`` is a sync Redis or RedisCluster client."""

    def __init__(self, client: Any, prefix: str = "fbp") -> None:
        self._r = client
        self._prefix = keys.check_prefix(prefix)

    def key(self, *parts: object) -> str:
        """Name of one key of this keyspace (``key("v", 3)``), for tools and
        fault tests that must touch raw bytes; everything else uses the methods."""
        return keys.model_key(self._prefix, *parts)

    _k = key

    def publish(self, model: RatingModel, meta: dict[str, Any] | None = None, *, reason: str = "publish") -> Published:
        """Give ``model`` the next version, store it and make it current."""
        version = int(self._r.incr(self._k("seq")))
        model.version = version
        meta = dict(meta or {}, version=version)
        blob = checkpoint_to_bytes(model, meta)
        return self.put(version, blob, meta, reason=reason)

    def put(self, version: int, blob: bytes, meta: dict[str, Any], *, reason: str = "publish") -> Published:
        """Store raw checkpoint bytes as ``version`` and make it current."""
        sha = hashlib.sha256(blob).hexdigest()
        info = {"version": version, "sha256": sha, "model": meta.get("model"),
                "metrics": meta.get("metrics", {}), "published_at": time.time(), "reason": reason}
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self._k("v", version), blob)
        pipe.set(self._k("v", version, "meta"), orjson.dumps(info))
        pipe.set(self._k("current"), version)
        pipe.lpush(self._k("history"), orjson.dumps(info))
        pipe.execute()
        return Published(version, sha, info)

    def current(self) -> Published | None:
        v = self._r.get(self._k("current"))
        if v is None:
            return None
        return self.info(int(v))

    def info(self, version: int) -> Published | None:
        raw = self._r.get(self._k("v", version, "meta"))
        if raw is None:
            return None
        meta = orjson.loads(raw)
        return Published(version, meta["sha256"], meta)

    def load(self, version: int) -> RatingModel:
        """Fetch, verify and build version ``version``; :class:`ModelRefused`
        (a CheckpointError) with the reason if unusable."""
        info = self.info(version)
        blob = self._r.get(self._k("v", version))
        if info is None or blob is None:
            raise ModelRefused(f"model version {version} is not published in Redis", "not_published")
        sha = hashlib.sha256(blob).hexdigest()
        if sha != info.sha256:
            raise ModelRefused(
                f"model version {version}: sha256 {sha[:12]}… does not match the published "
                f"{info.sha256[:12]}…; republish the checkpoint", "sha256_mismatch"
            )
        try:
            model, _meta = checkpoint_from_bytes(blob)
        except ModelRefused:
            raise
        except (CheckpointError, ValueError, RuntimeError) as exc:  # torch's and safetensors' own errors too
            raise ModelRefused(f"model version {version} cannot be loaded: {exc}", "unloadable") from exc
        model.version = version
        return model

    def blob(self, version: int) -> bytes | None:
        """The raw checkpoint bytes of ``version`` (unverified; :meth:`load` checks them)."""
        return self._r.get(self._k("v", version))

    def ensure_seq_at_least(self, version: int) -> None:
        """Start the version counter at ``version`` if it has none yet, so the
        next publish gets a higher number (a model served from a local
        checkpoint, never published, already carries a version)."""
        self._r.set(self._k("seq"), int(version), nx=True)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in self._r.lrange(self._k("history"), 0, limit - 1)]

    def versions(self) -> list[int]:
        keys = self._r.scan_iter(match=self._k("v", "*", "meta"), count=1000)
        return sorted(int(k.decode().split(":")[-2]) for k in keys)

    def rollback(self, to_version: int | None = None) -> Published:
        """Make an earlier version current again (default: the one before current)."""
        cur = self.current()
        if to_version is None:
            older = [v for v in self.versions() if cur is None or v < cur.version]
            if not older:
                raise CheckpointError("no earlier model version to roll back to")
            to_version = older[-1]
        info = self.info(to_version)
        if info is None:
            raise CheckpointError(f"model version {to_version} is not published")
        self.load(to_version)  # refuse to roll back onto a corrupt checkpoint
        entry = dict(info.meta, reason=f"rollback from {cur.version if cur else None}",
                     published_at=time.time())
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self._k("current"), to_version)
        pipe.lpush(self._k("history"), orjson.dumps(entry))
        pipe.execute()
        return Published(to_version, info.sha256, entry)
