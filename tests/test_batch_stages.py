"""The batch path stays small stages (``stream/batch/``) strung together by
``stream/predictor.py``: size limits, one module per metric label, and the
imports that keep it independent of Faust and of the worker's wiring."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream import metrics

ROOT = Path(__file__).resolve().parent.parent
BATCH = ROOT / "stream" / "batch"
FILES = [ROOT / "stream" / "predictor.py", *sorted(BATCH.glob("*.py"))]
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 200, 40
#: what the batch path must never import: the Faust app, the worker's wiring, the web views
FORBIDDEN = ("faust", "stream.app", "stream.runtime", "stream.api", "stream.live", "stream.worker",
             "stream.consumer", "trainer")


def oversized(path: Path) -> list[str]:
    """Classes over 200 lines and functions over 40 (decorators and docstrings included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        limit = {ast.ClassDef: MAX_CLASS_LINES, ast.FunctionDef: MAX_FUNCTION_LINES,
                 ast.AsyncFunctionDef: MAX_FUNCTION_LINES}.get(type(node))
        if limit is None:
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        lines = node.end_lineno - first + 1
        if lines > limit:
            out.append(f"{path.name}:{node.lineno} {node.name} is {lines} lines (limit {limit})")
    return out


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def stage_of(path: Path) -> str | None:
    """The module's ``STAGE = "..."`` constant, if it has one."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["STAGE"]:
            return ast.literal_eval(node.value)
    return None


def test_no_class_over_200_lines_and_no_function_over_40():
    assert len(FILES) > 5
    bad = [msg for f in FILES for msg in oversized(f)]
    assert not bad, "; ".join(bad)


def test_the_size_check_can_fail(tmp_path):
    f = tmp_path / "big.py"
    f.write_text("def f():\n" + "    x = 1\n" * 45 + "\nclass C:\n    pass\n")
    assert oversized(f) == [f"big.py:1 f is 46 lines (limit {MAX_FUNCTION_LINES})"]


def test_every_stage_label_has_its_module_and_every_stage_module_its_label():
    declared = {f.stem: stage_of(f) for f in BATCH.glob("*.py") if stage_of(f) is not None}
    assert all(stem == stage for stem, stage in declared.items()), declared
    assert set(declared) == set(metrics.STAGES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_batch_path_never_imports_faust_or_the_worker_wiring(path):
    got = {name for name in imports(path) for bad in FORBIDDEN if name == bad or name.startswith(bad + ".")}
    assert not got, f"{path.name} imports {sorted(got)}"


def test_the_import_check_can_fail(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from stream.runtime import runtime\nimport faust\n")
    assert {"stream.runtime", "faust"} <= imports(f)


@given(st.lists(st.integers(0, 20), max_size=200))
def test_occurrence_rank_counts_the_earlier_events_of_the_same_user(users):
    """The model stage's rounds (round j = each user's j-th event of the batch)."""
    from models.batch import occurrence_rank

    expected = [users[:i].count(u) for i, u in enumerate(users)]
    assert occurrence_rank(np.array(users, dtype=np.int64)).tolist() == expected
