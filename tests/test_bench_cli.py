"""The benchmark commands run and write the JSON shapes their issues give
(the figures themselves are for BENCHMARKS.md, not asserted)."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from bench.cli import app

runner = CliRunner()


def test_bench_model_json_shape(tmp_path):
    out = tmp_path / "model.json"
    res = runner.invoke(app, ["model", "--models", "lstm,baseline", "--batch-sizes", "1,64",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = orjson.loads(out.read_bytes())
    assert data["history_cost_ratio"] > 0
    assert set(data["recompute_speedup"]) == {"10", "100", "1000"}
    assert {r["model"] for r in data["throughput"]} == {"lstm", "baseline"}
    assert (tmp_path / "model.png").stat().st_size > 0
    assert "speed-up over recompute" in res.output


@pytest.mark.integration
def test_bench_stream_json_shape(stack, tmp_path):
    out = tmp_path / "stream.json"
    res = runner.invoke(app, ["stream", "--events", "2000", "--batch-sizes", "256",
                              "--logdir", str(tmp_path / "logs"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = orjson.loads(out.read_bytes())
    for key in ("events_per_s", "baseline_events_per_s", "ratio", "faust_noop_events_per_s",
                "no_faust_events_per_s", "no_faust_ratio"):
        assert data[key] > 0, key
    assert set(data["latency_ms"]) == {"p50", "p99"}
    # read back from the broker's append times: every latency event found, none negative
    assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p99"] < 60_000
    assert "LogAppendTime" in data["latency_clock"]
    assert set(data["ratios"]) == {"full_over_bare", "faust_noop_over_bare", "faust_batch_over_bare_batch"}
    assert data["ratios"]["full_over_bare"] == data["ratio"]
    assert data["ratios"]["faust_batch_over_bare_batch"] == data["events_per_s"] / data["no_faust_events_per_s"]
    assert all(v > 0 for v in data["ratios"].values())
    assert set(data["events_per_cpu_s"]) == {"full", "bare", "faust_noop", "bare_batch"}
    assert all(v > 0 for v in data["events_per_cpu_s"].values())
    assert "faust_overhead" in data["stage_share"] and "model_step" in data["stage_share"]
    # every stage of the batch path, per event, from the same worker run as the ratios
    from stream.metrics import STAGES

    us = data["stage_us_per_event"]
    assert set(STAGES) <= set(us) and all(us[k] > 0 for k in STAGES)
    assert abs(sum(us.values()) * data["events"] / 1e6 - sum(data["sweep"][0]["stages_s"].values())) < 1e-6
    assert "where the time goes" in res.output and "full/batch-code-on-bare-loop" in res.output
