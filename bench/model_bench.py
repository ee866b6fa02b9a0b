"""``fbp bench model``: model-only cost of the incremental ``step``.

Two questions, answered side by side in one run:

1. Throughput: user-steps per second of a batched ``step`` at batch sizes
   from 1 to 65,536, per model and device (CUDA when present, with bf16
   autocast where it keeps accuracy -- the prediction difference is shown).
2. Incremental vs recompute: per-event cost of one ``step`` from a state that
   has absorbed L events, against recomputing the user's state from the full
   history of L events (``forward_sequence``), for L = 10, 100, 1,000.  The
   step's cost must not grow with L; the ratio is the speed-up the stream gets
   from keeping state.
"""

from __future__ import annotations

import contextlib
import platform
import time
from typing import Any, Callable

import torch

from models.registry import available, build

LENGTHS = (10, 100, 1000)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device: torch.device) -> Callable[[], float]:
    """CPU runs are timed in process CPU time: other load on a shared machine
    then barely moves the figures (wall time is used on the GPU)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _round(fn: Callable[[], Any], device: torch.device, min_s: float, max_iter: int = 1_000_000) -> float:
    """Seconds per call over one round of at least ``min_s`` (or ``max_iter`` calls)."""
    clock = _clock(device)
    n, t0 = 0, clock()
    while True:
        fn()
        n += 1
        _sync(device)
        el = clock() - t0
        if el >= min_s or n >= max_iter:
            return el / n


def _time(fn: Callable[[], Any], device: torch.device, min_s: float = 0.05, repeats: int = 7,
          max_iter: int = 200) -> float:
    """Seconds per call: the best of ``repeats`` rounds.  The minimum is the
    figure least disturbed by other load on a shared machine (noise only ever
    adds time)."""
    for _ in range(2):
        fn()
    _sync(device)
    return min(_round(fn, device, min_s, max_iter) for _ in range(repeats))


def _events(B: int, T: int, cap: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    movie = torch.randint(1, cap, (B, T), generator=g)
    rating = torch.randint(1, 6, (B, T), generator=g).float()
    ts = 880_000_000 + torch.cumsum(torch.randint(1, 5000, (B, T), generator=g), 1)
    mask = torch.ones(B, T, dtype=torch.bool)
    return tuple(x.to(device) for x in (movie, rating, ts, mask))


@torch.inference_mode()
def step_throughput(name: str, device: torch.device, batch_sizes: list[int], amp: bool = False) -> list[dict]:
    model = build(name).to(device).eval()
    out = []
    for B in batch_sizes:
        movie, rating, ts, _ = _events(B, 1, model.capacity, device)
        state = model.init_state(B, device)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

        def run() -> None:
            with ctx:
                model.step(state, movie[:, 0], rating[:, 0], ts[:, 0])

        s = _time(run, device)
        out.append({"model": name, "device": device.type, "amp": amp, "batch": B,
                    "user_steps_per_s": B / s, "seconds_per_call": s})
    return out


@torch.inference_mode()
def amp_difference(name: str, device: torch.device, B: int = 4096, T: int = 50) -> float:
    """Max |prediction(bf16 autocast) - prediction(fp32)| over T steps of B users."""
    model = build(name).to(device).eval()
    movie, rating, ts, _ = _events(B, T, model.capacity, device)
    s32 = model.init_state(B, device)
    s16 = model.init_state(B, device)
    worst = 0.0
    for t in range(T):
        s32, p32 = model.step(s32, movie[:, t], rating[:, t], ts[:, t])
        with torch.autocast(device.type, dtype=torch.bfloat16):
            s16, p16 = model.step(s16, movie[:, t], rating[:, t], ts[:, t])
        s16 = {k: v.to(s32[k].dtype) for k, v in s16.items()}
        worst = max(worst, float((p16.float() - p32.float()).abs().max()))
    return worst


@torch.inference_mode()
def history_cost(name: str, device: torch.device, B: int = 256, repeats: int = 9) -> list[dict]:
    """Per-event cost: one step after L events vs recomputing from L events.

    All lengths are timed in interleaved rounds (L=10, 100, 1000, L=10, ...)
    and each keeps its best round, so load on the machine hits every length
    alike and the ratios between them hold."""
    model = build(name).to(device).eval()
    inc_fns, rec_fns = {}, {}
    for L in LENGTHS:
        movie, rating, ts, mask = _events(B, L + 1, model.capacity, device, seed=L)
        # state after L events (built by the sequence forward: same result as L steps)
        _, state = model.forward_sequence(movie[:, :L], rating[:, :L], ts[:, :L], mask[:, :L],
                                          return_state=True)
        inc_fns[L] = (lambda st=state, m=movie, r=rating, t=ts, L=L:
                      model.step(st, m[:, L], r[:, L], t[:, L]))
        rec_fns[L] = (lambda m=movie, r=rating, t=ts, k=mask:
                      model.forward_sequence(m, r, t, k, return_state=True))
    for fn in (*inc_fns.values(), *rec_fns.values()):
        fn()  # warm-up
    inc = {L: float("inf") for L in LENGTHS}
    rec = {L: float("inf") for L in LENGTHS}
    for _ in range(repeats):
        for L in LENGTHS:
            inc[L] = min(inc[L], _round(inc_fns[L], device, 0.03) / B)
            rec[L] = min(rec[L], _round(rec_fns[L], device, 0.0) / B)
    return [{"model": name, "device": device.type, "history": L,
             "incremental_s_per_event": inc[L], "recompute_s_per_event": rec[L],
             "speedup": rec[L] / inc[L]} for L in LENGTHS]


def bench_model(models: list[str] | None = None, batch_sizes: list[int] | None = None,
                devices: list[str] | None = None, threads: int | None = 1) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)  # 1 by default: CPU time then equals the work done
    models = models or available()
    batch_sizes = batch_sizes or [1, 16, 256, 4096, 65536]
    devs = [torch.device(d) for d in (devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))]
    throughput: list[dict] = []
    history: list[dict] = []
    amp: dict[str, float] = {}
    for d in devs:
        for name in models:
            throughput += step_throughput(name, d, batch_sizes)
            if d.type == "cuda":
                throughput += step_throughput(name, d, batch_sizes, amp=True)
                amp[name] = amp_difference(name, d)
            history += history_cost(name, d)
    main = "lstm" if "lstm" in models else models[0]
    dev0 = devs[-1].type  # the GPU when present, else the CPU
    h = {r["history"]: r for r in history if r["model"] == main and r["device"] == dev0}
    return {
        "model": main,
        "device": dev0,
        "history_cost_ratio": h[1000]["incremental_s_per_event"] / h[10]["incremental_s_per_event"],
        "recompute_speedup": {str(L): h[L]["speedup"] for L in LENGTHS},
        "throughput": throughput,
        "history": history,
        "amp_max_abs_prediction_diff": amp,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "clock": "process CPU time on CPU (torch threads as above), wall time on CUDA",
    }
