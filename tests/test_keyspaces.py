"""Nothing outside ``core/repos/`` builds a Redis key or reaches into a
repository's client: a key built by hand elsewhere is a second owner of the
layout, and the next layout change (or the cluster's hash tags) misses it."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", ".cache", ".stack", "node_modules", "runs", "__pycache__"}
OWNERS = ROOT / "core" / "repos"

#: (what it catches, pattern)
HAND_BUILT = [
    ("a key from a prefix in an f-string", re.compile(r"""f["'][^"'\n]*\{[^}\n]*prefix[^}\n]*\}:""")),
    ("a user-state key", re.compile(r"""[}"']:u:""")),
    ("a keyspace segment after an interpolation", re.compile(r"""\}:(model|trainer|meta|catalog)\b""")),
    ("a trainer key", re.compile(r""":trainer:(recent|reservoir|seq|offsets|requests|state|decisions)\b""")),
    ("a model key", re.compile(r""":model:(seq|current|history|v)\b""")),
    ("a users counter key", re.compile(r""":meta:users\b""")),
    ("a store's client or key prefix used from outside",
     re.compile(r"""\b(store|models|buffer|control|catalog)\.(r|p|_r|_prefix|_key)\b""")),
]


def _sources() -> list[Path]:
    """Every .py file of the project, pruning runtime directories *before*
    descending: a running stack deletes Kafka segment directories under
    .stack while a walk is inside them (CI failed on exactly that)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT, onerror=lambda _err: None):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and not path.is_relative_to(OWNERS) and path != Path(__file__).resolve():
                out.append(path)
    return out


def hand_built(line: str) -> list[str]:
    """What kinds of hand-built key ``line`` contains."""
    return [what for what, pat in HAND_BUILT if pat.search(line)]


def test_no_redis_key_is_built_outside_the_repositories():
    hits = []
    for path in _sources():
        for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{no}: {what}: {line.strip()}" for what in hand_built(line)]
    assert not hits, "build Redis keys through core.repos (keys.py and the store classes):\n" + "\n".join(hits)


def test_the_check_finds_each_kind_of_hand_built_key():
    """The patterns catch what the code base used to do (so the test above can fail)."""
    for line in [
        'r.scan_iter(match=f"{s.redis.key_prefix}:*")',
        'key = f"{ns.prefix}:trainer:requests"',
        'r.delete(f"{p}:u:7")',
        'r.get("fbp:model:current")',
        'await asyncio.to_thread(runtime.models.r.rpush, key, b"x")',
        'store.r.set(f"{store.p}:seq", 1)',
        'self.users_key = "x:meta:users"',
        'r.hget(f"{{{p}}}:catalog:movies", "50")',
        'catalog._r.hmget(catalog._key, ids)',
    ]:
        assert hand_built(line), f"not caught: {line}"
    for line in ['store = StateStore.from_settings(client, s.redis)', 'keys.drop_namespace(r, prefix)',
                 'buffer_key=EventBuffer.recent_key(ns.prefix)']:
        assert hand_built(line) == [], line
