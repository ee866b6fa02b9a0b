"""``fbp bench report``: BENCHMARKS.md from the JSON the benchmarks wrote.

Each section is generated from one results file and says how to reproduce
it; a section whose file is missing says it has not been measured (nothing is
ever filled in by hand).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench import plots

#: the command behind each file; ``{field}`` is filled from the file's JSON
REPRO = {
    "model": "fbp bench model --json bench/results/model.json",
    "stream": "fbp bench stream --batch-sizes 512,128,2048 --workers 1,2 --lingers 0.01,0.2 --json bench/results/stream.json",
    "swap": "fbp bench swap --json bench/results/swap.json",
    "soak": "fbp bench soak --minutes {minutes:g} --json bench/results/soak.json",
    "gpu": "bench/gpu.sh bench/results/gpu   # on a machine with a CUDA GPU",
    "evaluate": "fbp evaluate --data ml-100k --protocol both --json bench/results/evaluate.json",
}


def _load(path: Path) -> dict[str, Any] | None:
    return orjson.loads(path.read_bytes()) if path.is_file() else None


def _machine(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    bits = [f"{k}: {v}" for k, v in m.items() if v]
    return (f"Measured {res.get('date', '')} on " + ", ".join(bits)) if bits else ""


def _model_section(res: dict[str, Any], img: Path, rel: str) -> list[str]:
    out = [_machine(res), "", f"Clock: {res.get('clock', 'wall')}.", ""]
    bs = sorted({r["batch"] for r in res["throughput"]})
    rows: dict[tuple, dict[int, float]] = {}
    for r in res["throughput"]:
        rows.setdefault((r["model"], r["device"], r["amp"]), {})[r["batch"]] = r["user_steps_per_s"]
    out.append("| model | device | precision | " + " | ".join(f"B={b}" for b in bs) + " |")
    out.append("|---|---|---|" + "---|" * len(bs))
    for (m, d, a), v in rows.items():
        out.append(f"| {m} | {d} | {'bf16' if a else 'fp32'} | "
                   + " | ".join(f"{v.get(b, float('nan')):,.0f}" for b in bs) + " |")
    out += ["", "User-steps per second of one batched incremental `step`.", ""]
    out.append("| model | device | history L | step µs/event | recompute µs/event | speed-up |")
    out.append("|---|---|---|---|---|---|")
    for r in res["history"]:
        out.append(f"| {r['model']} | {r['device']} | {r['history']} | "
                   f"{r['incremental_s_per_event'] * 1e6:.2f} | {r['recompute_s_per_event'] * 1e6:.1f} | "
                   f"{r['speedup']:.0f}× |")
    out += ["", f"**{res['model']} on {res['device']}**: history cost ratio (per-event step cost at "
            f"L=1000 / L=10) = **{res['history_cost_ratio']:.2f}**; speed-up over recomputing the "
            "state from the full history: " + ", ".join(
                f"L={k}: **{v:.0f}×**" for k, v in res["recompute_speedup"].items()), ""]
    for m, d in (res.get("amp_max_abs_prediction_diff") or {}).items():
        out.append(f"- bf16 autocast, {m}: max |prediction difference| {d:.4f}")
    series = {f"{m} {d} {'bf16' if a else 'fp32'}": [v.get(b) for b in bs] for (m, d, a), v in rows.items()}
    plots.plot_throughput_vs_batch(bs, series, img, title="Incremental step: user-steps/s vs batch size", logy=True)
    out += ["", f"![step throughput]({rel})", ""]
    return out


def _stream_reading(res: dict[str, Any], target: float = 0.5) -> list[str]:
    """What the two references say about the ratio target, from the figures."""
    noop = res.get("faust_noop_events_per_s", 0) / res["baseline_events_per_s"]
    ours = res.get("no_faust_ratio")
    if ours is None or res["ratio"] >= target:
        return []
    limits = [name for name, r in (("Faust alone (no-op agent)", noop), ("our batch code alone", ours))
              if r < target]
    return [f"- ratio target {target}: not reached; "
            + (" and ".join(limits) + f" already {'stay' if len(limits) > 1 else 'stays'} below it"
               if limits else "each part alone is above it; their combination is not")]


def _stream_section(res: dict[str, Any], img: Path, rel: str) -> list[str]:
    out = [
        f"- full path: **{res['events_per_s']:,.0f} events/s**; bare aiokafka consume-and-produce "
        f"loop over the same events in the same run: {res['baseline_events_per_s']:,.0f} events/s; "
        f"**ratio {res['ratio']:.2f}**",
        f"- the worker's Faust path (`stream.consumer`: whole fetches to one handler) with a handler doing "
        f"only the bare loop's work: {res.get('faust_noop_events_per_s', float('nan')):,.0f} events/s; "
        f"full path / this no-op = **{res.get('ratio_to_faust_noop', float('nan')):.2f}**",
        f"- the worker's batch code (`stream.predictor`: Redis state, model, top-K, produce) fed by the "
        f"bare loop instead of Faust: {res.get('no_faust_events_per_s', float('nan')):,.0f} events/s, "
        f"ratio to baseline **{res.get('no_faust_ratio', float('nan')):.2f}** (our own per-event cost, "
        "without Faust's)",
        *_stream_reading(res),
        *([f"- ratios side by side: full / bare **{r['full_over_bare']:.2f}**, Faust no-op / bare "
           f"**{r['faust_noop_over_bare']:.2f}**, full / batch code on the bare loop "
           f"**{r['faust_batch_over_bare_batch']:.2f}**"] if (r := res.get("ratios")) else []),
        *(["- events per CPU-second: " + ", ".join(f"{k} {v:,.0f}" for k, v in c.items())]
          if (c := res.get("events_per_cpu_s")) else []),
        f"- event-to-prediction latency at {res.get('latency_rate_events_per_s', 0):,.0f} events/s: "
        f"p50 **{res['latency_ms']['p50']:.1f} ms**, p99 **{res['latency_ms']['p99']:.1f} ms**",
        f"- {res.get('events')} events, {res.get('partitions')} partitions", "",
        "| batch size | linger (s) | workers | events/s | ratio to baseline |", "|---|---|---|---|---|",
    ]
    for s in res["sweep"]:
        out.append(f"| {s['batch_size']} | {s.get('linger_s', '')} | {s['workers']} | "
                   f"{s['events_per_s']:,.0f} | {s['ratio']:.2f} |")
    if res.get("stage_share"):
        out += ["", "Where the time goes (first configuration, share of the worker's time):", "",
                "| stage | share |", "|---|---|"]
        for k, v in sorted(res["stage_share"].items(), key=lambda kv: -kv[1]):
            out.append(f"| {k} | {100 * v:.1f}% |")
    bs = sorted({s["batch_size"] for s in res["sweep"]})
    lg0 = res["sweep"][0].get("linger_s")
    series: dict[str, list] = {}
    for w in sorted({s["workers"] for s in res["sweep"]}):
        series[f"{w} worker(s)"] = [next((s["events_per_s"] for s in res["sweep"] if s["batch_size"] == b
                                          and s["workers"] == w and s.get("linger_s") == lg0), None)
                                    for b in bs]
    plots.plot_throughput_vs_batch(bs, series, img, title="Full path: events/s vs micro-batch size")
    out += ["", f"![stream throughput]({rel})", ""]
    return out


def _generic_section(res: dict[str, Any]) -> list[str]:
    flat: dict[str, Any] = {}
    for k, v in res.items():  # scalars, and one level of nested scalars (e.g. soak growth)
        if isinstance(v, (int, float, str)) and k not in ("date", "pid_note"):
            flat[k] = v
        elif isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
    out = ["| figure | value |", "|---|---|"]
    for k, v in flat.items():
        out.append(f"| {k} | {v:,.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return out + [""]


def _evaluate_section(res: dict[str, Any]) -> list[str]:
    """The tables ``fbp evaluate`` prints, from its JSON (one protocol, or "both")."""
    from trainer.evaluate import table

    docs = list(res["protocols"].values()) if "protocols" in res else [res]
    return [table(d) for d in docs if "models" in d]


def write_report(results: Path, out: Path) -> Path:
    img_dir = out.parent / "docs" / "bench"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmarks", "",
             "Generated by `fbp bench report` from the JSON files under `bench/results/`; every figure "
             "is measured side by side with its reference in the same run (this machine is shared "
             "and noisy, so ratios are what to compare).", ""]
    sections = [
        ("Model: incremental step vs recompute (CPU)", "model", _model_section),
        ("Model on the GPU", "gpu/model", _model_section),
        ("Stream: full path vs bare Kafka loop", "stream", _stream_section),
        ("Model hot swap", "swap", None),
        ("Soak", "soak", None),
        ("Offline evaluation", "evaluate", None),
    ]
    for title, key, fn in sections:
        res = _load(results / f"{key}.json")
        lines += [f"## {title}", ""]
        repro = REPRO["gpu" if key.startswith("gpu") else key]
        if res is None:
            lines += ["Not measured yet" + (": no GPU was available to this project so far."
                                            if key.startswith("gpu") else "."),
                      "", f"Reproduce: `{repro.format(minutes=5)}`", ""]
            continue
        name = key.replace("/", "-")
        if fn is not None:
            lines += fn(res, img_dir / f"{name}.png", f"docs/bench/{name}.png")
        elif key == "evaluate":
            lines += _evaluate_section(res)
        else:
            lines += _generic_section(res)
        lines += [f"Reproduce: `{repro.format(**res)}`", ""]
    out.write_text("\n".join(lines))
    return out
