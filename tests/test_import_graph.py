"""The top-level packages depend on each other one way only.

Layers, lowest first (a package may import only those listed for it):

* ``fbp_errors`` -- the exception hierarchy; imports nothing of ours;
* ``models``     -- the rating models; no Kafka, no Redis;
* ``core``       -- settings, the event contract, Kafka/Redis clients and the
  Redis repositories: what the stream and the trainer share;
* ``stream`` and ``trainer`` -- never each other;
* ``stack``      -- the local services and the project's own processes;
* ``bench``      -- benchmarks;
* ``fbp``        -- the command line, on top of everything.

Every ``import`` statement counts, including those inside functions, and so
do the CLI's lazily imported subcommand modules (``fbp.cli._COMMANDS``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("fbp_errors", "models", "core", "stream", "trainer", "stack", "bench", "fbp")
ALLOWED: dict[str, set[str]] = {
    "fbp_errors": set(),
    "models": {"fbp_errors"},
    "core": {"fbp_errors", "models"},
    "stream": {"fbp_errors", "models", "core"},
    "trainer": {"fbp_errors", "models", "core"},
    "stack": {"fbp_errors", "models", "core"},
    "bench": {"fbp_errors", "models", "core", "stream", "trainer", "stack"},
    "fbp": {"fbp_errors", "models", "core", "stream", "trainer", "stack", "bench"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages of ours that ``path`` imports (statically)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in OURS)
    return found


def lazy_cli_targets() -> set[str]:
    from fbp.cli import _COMMANDS

    return {mod.split(".")[0] for mod, _, _ in _COMMANDS.values()}


def edges() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) -> files where it happens."""
    out: dict[tuple[str, str], list[str]] = {}
    for pkg in OURS:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for dep in imported_packages(f) - {pkg}:
                out.setdefault((pkg, dep), []).append(str(f.relative_to(ROOT)))
    for dep in lazy_cli_targets() - {"fbp"}:
        out.setdefault(("fbp", dep), []).append("fbp/cli.py (_COMMANDS)")
    return out


def test_every_package_exists_and_is_layered():
    for pkg in OURS:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg
    bad = {e: files for e, files in edges().items() if e[1] not in ALLOWED[e[0]]}
    assert not bad, "imports against the layering: " + "; ".join(
        f"{a} -> {b} in {', '.join(fs)}" for (a, b), fs in sorted(bad.items())
    )


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {p: set() for p in OURS}
    for a, b in edges():
        graph[a].add(b)
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 1:
            pytest.fail("import cycle: " + " -> ".join(path + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in sorted(graph[n]):
            visit(m, path + [n])
        state[n] = 2

    for p in OURS:
        visit(p, [])


def test_the_checker_sees_a_cycle(tmp_path):
    """The checker itself can fail: a file importing upwards is reported."""
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from stream.app import app\nimport core.settings\n")
    assert imported_packages(f) == {"stream", "core"}
