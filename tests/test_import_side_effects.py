"""Importing any module of ours does nothing but define things: no file or
directory created, no socket opened or connected.  (The worker's Faust app,
its data directory and its clients are built on first use.)

Each check runs in a fresh interpreter, so modules imported by earlier tests
cannot hide an import-time effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fbp_errors", "models", "core", "stream", "trainer", "stack", "bench", "fbp")

# Records every directory made, file opened for writing, and socket connected
# or bound, while importing the modules named on the command line.
PROBE = textwrap.dedent("""
    import builtins, importlib, io, json, os, socket, sys
    seen = []
    def spy(name, real, pick):
        def wrapper(*a, **k):
            what = pick(*a, **k)
            if what is not None:
                seen.append([name, str(what)])
            return real(*a, **k)
        return wrapper
    writes = lambda f, mode="r", *a, **k: f if any(c in mode for c in "wax+") else None
    os.mkdir = spy("mkdir", os.mkdir, lambda p, *a, **k: p)
    builtins.open = spy("open", builtins.open, writes)
    io.open = builtins.open
    socket.socket.connect = spy("connect", socket.socket.connect, lambda s, addr: addr)
    socket.socket.bind = spy("bind", socket.socket.bind, lambda s, addr: addr)
    failed = {}
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = repr(exc)
    print(json.dumps({"effects": seen, "failed": failed}))
""")


def modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append(".".join(parts))
    return out


def probe(tmp_path: Path, names: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
           "FBP_STACK__DATA_DIR": str(tmp_path / "data"), "HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", PROBE, *names], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(effects: list[list[str]]) -> list[list[str]]:
    """Effects other than numba's: ``@numba.njit(cache=True)`` probes (and
    makes) the module's ``__pycache__`` when the kernel module is imported,
    as Python itself does for bytecode: a cache, not state of ours."""
    return [e for e in effects if "__pycache__" not in Path(e[1]).parts]


def test_importing_every_module_creates_and_connects_nothing(tmp_path):
    names = modules()
    assert "stream.app" in names and "stream.predictor" in names and len(names) > 80
    got = probe(tmp_path, names)
    assert not got["failed"], got["failed"]
    assert ours(got["effects"]) == [], got["effects"]
    assert not (tmp_path / "data").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_probe_sees_an_import_that_makes_a_directory(tmp_path):
    pkg = tmp_path / "noisy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import pathlib\npathlib.Path('made-at-import').mkdir()\n")
    env_path = f"{tmp_path}{os.pathsep}{ROOT}"
    got = subprocess.run([sys.executable, "-c", PROBE, "noisy"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": env_path, "PYTHONDONTWRITEBYTECODE": "1"}, check=True)
    effects = json.loads(got.stdout.strip().splitlines()[-1])["effects"]
    assert ["mkdir", "made-at-import"] in effects
