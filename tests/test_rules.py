"""Prometheus rules and metric exposition pass ``promtool``.

* ``promtool check rules`` over deploy/prometheus/rules/*.yml;
* ``promtool test rules`` over deploy/prometheus/tests/*.yml (every alert firing
  and not firing, main recording rules);
* ``promtool check metrics`` over the exposition text of the worker's and the
  trainer's registries with every metric (and every labelled child) touched;
* every raw metric name the rules use exists in one of the registries.

No stack needed: promtool runs offline.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import Counter, Gauge, Histogram, MetricWrapperBase

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
TESTS_DIR = REPO / "deploy" / "prometheus" / "tests"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, timeout=120)


def _fresh_module(dotted: str):
    """A private copy of a metrics module (own REGISTRY), so touching its metrics
    leaves the process-wide registries (and other tests' counters) alone."""
    path = REPO / (dotted.replace(".", "/") + ".py")
    name = f"_fbp_copy_{dotted.replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod


def _touch_all(mod) -> list[str]:
    """Increment/set/observe every metric of ``mod`` (one child per labelled metric)."""
    touched = []
    for value in vars(mod).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        metric = value
        names = getattr(metric, "_labelnames", ())
        if names:
            metric = metric.labels(*[f"x_{n}" for n in names])
        if isinstance(value, Counter):
            metric.inc(2)
        elif isinstance(value, Gauge):
            metric.set(1.5)
        elif isinstance(value, Histogram):
            metric.observe(0.3)
        else:
            raise AssertionError(f"unhandled metric type {type(value)}")
        touched.append(value._name)
    return touched


def _registry_names(mod) -> set[str]:
    """Sample names a registry exposes (with _total/_bucket/... suffixes)."""
    names = set()
    for fam in mod.REGISTRY.collect():
        names.add(fam.name)
        for s in fam.samples:
            names.add(s.name)
    return names


def all_metric_names() -> set[str]:
    """Every sample name the worker and the trainer can expose."""
    out = set()
    for dotted in ("stream.metrics", "trainer.metrics"):
        mod = _fresh_module(dotted)
        _touch_all(mod)
        out |= _registry_names(mod)
    return out


def test_check_rules():
    files = sorted(str(p) for p in RULES_DIR.glob("*.yml"))
    assert files, "no rule files"
    r = _promtool("check", "rules", *files)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_rule_unit_tests():
    files = sorted(str(p) for p in TESTS_DIR.glob("*.yml"))
    assert files, "no promtool unit tests"
    r = subprocess.run([PROMTOOL, "test", "rules", *files], capture_output=True,
                       timeout=300, cwd=TESTS_DIR)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_every_alert_has_a_unit_test_and_annotations():
    alerts = {}
    for f in RULES_DIR.glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            for rule in g["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    tested_firing, tested_quiet = set(), set()
    for f in TESTS_DIR.glob("*.yml"):
        for t in yaml.safe_load(f.read_text())["tests"]:
            for a in t.get("alert_rule_test", []):
                (tested_firing if a.get("exp_alerts") else tested_quiet).add(a["alertname"])
    for name, rule in alerts.items():
        assert rule.get("labels", {}).get("severity") in ("critical", "warning", "info"), name
        for key in ("summary", "description", "runbook"):
            assert rule.get("annotations", {}).get(key), f"{name} lacks annotation {key}"
    assert set(alerts) <= tested_firing, f"alerts never tested firing: {set(alerts) - tested_firing}"
    assert set(alerts) <= tested_quiet, f"alerts never tested quiet: {set(alerts) - tested_quiet}"


@pytest.mark.parametrize("dotted", ["stream.metrics", "trainer.metrics"])
def test_check_metrics_exposition(dotted):
    mod = _fresh_module(dotted)
    touched = _touch_all(mod)
    assert touched, f"{dotted} defines no metrics"
    text = generate_latest(mod.REGISTRY)
    r = _promtool("check", "metrics", stdin=text)
    out = (r.stdout + r.stderr).decode().strip()
    assert r.returncode == 0 and not out, f"promtool check metrics on {dotted}:\n{out}\n---\n{text.decode()}"


def test_the_real_registries_expose_the_same_names():
    """The private copies used above define what the real modules define."""
    import stream.metrics
    import trainer.metrics

    for real in (stream.metrics, trainer.metrics):
        copy = _fresh_module(real.__name__)
        assert {f.name for f in real.REGISTRY.collect()} == {f.name for f in copy.REGISTRY.collect()}


def test_rules_use_only_existing_metrics():
    known = all_metric_names() | {"up"}
    recorded = set()
    used = set()
    for f in RULES_DIR.glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            for rule in g["rules"]:
                if "record" in rule:
                    recorded.add(rule["record"])
                used |= set(re.findall(r"\b(fbp_[a-z0-9_]+|fbp:[a-z0-9_:]+)", rule["expr"]))
    missing = {n for n in used if n not in known and n not in recorded}
    assert not missing, f"rules use metrics nobody exports: {sorted(missing)}"
