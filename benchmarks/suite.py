"""Run the benchmark matrix (workloads x ops x implementations), report and save it.

Used by ``python -m benchmarks`` and by the quick CI test; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fastgradstats
from fastgradstats import dispatch

from . import timing
from .ops import (
    CLIP_STEP_IMPLS,
    FGS,
    FGS_CLIP_STEP,
    HANDOFF,
    OP_NAMES,
    OPS,
    STEP,
    TORCH_CLIP_STEP,
    TORCH_FOREACH,
    TORCH_LOOP,
    Case,
    check_clip_step,
    check_op,
    clip_step_impls,
    make_step_case,
    restore_after_clip_step,
)
from .ops import make_case as _make_case
from .progress import progress, write_line
from .provenance import git
from .workloads import WORKLOAD_NAMES, Workload, grad_holders, make_grads, make_workload

QUICK_SCALE = 1 / 32
# Issue 2 (CPU, GPT-2-124M fp32, ratios of times to torch foreach in the same run).
CPU_TARGETS = {"clip_noclip": 0.75, "clip": 1.05, "grad_stats_vs_torch_clip": 1.5}
# Issue 4 (H100): speedups over torch, and share of the measured copy bandwidth.
GPU_TARGETS = {
    "clip_noclip_speedup": 2.5,
    "clip_speedup": 1.3,
    "grad_stats_speedup": 3.0,
    "tiny10k_grad_stats_speedup": 5.0,
    "pct_copy_min": 85.0,
    "pct_copy_min_numel": 100_000_000,
}


@dataclass
class Settings:
    """What to run: device, workloads, ops, sizes and the time budget per measurement."""

    device: torch.device
    workloads: list[str] = field(default_factory=lambda: list(WORKLOAD_NAMES))
    ops: list[str] = field(default_factory=lambda: list(OP_NAMES))
    quick: bool = False
    backend: str | None = None  # fastgradstats backend: None -> $FASTGRADSTATS_BACKEND / auto
    budget_s: float | None = None  # seconds per (workload, op) measurement
    verify: bool = True
    clip_step: bool = True  # also "clip + optimizer step" (GPT-2 workloads, when "clip" runs)

    @property
    def scale(self) -> float:
        return QUICK_SCALE if self.quick else 1.0

    @property
    def budget(self) -> float:
        if self.budget_s is not None:
            return self.budget_s
        return 0.05 if self.quick else 3.0

    def timing_kwargs(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"budget_s": self.budget}
        if self.quick:
            return {"budget_s": self.budget, "min_rounds": 3, "max_rounds": 5, "warmup": 1}
        return {"budget_s": self.budget, "min_rounds": 7, "max_rounds": 100, "warmup": 2}


def default_device() -> torch.device:
    """CUDA when present, else the CPU (called at run time only, never at import)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- metadata


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} logical cores)"


def device_slug(device: torch.device) -> str:
    """File-name-safe device label: ``cpu`` or e.g. ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def metadata(settings: Settings) -> dict[str, Any]:
    """Device, versions, date, git commit and host facts recorded with every result."""
    device = settings.device
    status = git("status", "--porcelain", "--", "fastgradstats", "benchmarks")
    meta: dict[str, Any] = {
        "device_type": device.type,
        "device_name": device_name(device),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "triton_version": _version("triton"),
        "fastgradstats_version": fastgradstats.__version__,
        "python_version": platform.python_version(),
        "host": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "ram_bytes": _ram_bytes(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "settings": {
            "quick": settings.quick,
            "scale": settings.scale,
            "budget_s": settings.budget,
            "backend_requested": dispatch.requested_backend(settings.backend),
            "argv": sys.argv,
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["cuda"] = {
            "total_memory_bytes": props.total_memory,
            "multi_processor_count": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }
    return meta


# ----------------------------------------------------------------------------- the run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rotation_budget(device: torch.device) -> float | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.25 * free
    return 1 << 30


def build_cases(
    workload: Workload,
    device: torch.device,
    backend: str | None,
    budget: float | None,
    quick: bool = False,
) -> list[Case]:
    """Input copies for rotation (one when ``quick``): the first is random, the rest
    clones sharing its max norms."""
    grads = make_grads(workload, device)
    first = _make_case(grads, backend)
    cases = [first]
    extra_budget = None if budget is None else budget - workload.nbytes
    copies = 1 if quick else timing.rotation_count(workload.nbytes, extra_budget)
    for _ in range(copies - 1):
        copy = [g.clone() for g in grads]
        cases.append(
            Case(copy, grad_holders(copy), first.max_norm_noclip, first.max_norm_clip, backend)
        )
    _sync(device)
    return cases


def fgs_backend_name(device: torch.device, dtype: torch.dtype, backend: str | None) -> str:
    """Which fastgradstats backend module handles this group (for the record)."""
    module = dispatch.backend_for(device, dtype, 2.0, backend)
    return module.__name__.rsplit(".", 1)[-1]


def run_workload(name: str, settings: Settings, copy_gbps: float) -> list[dict[str, Any]]:
    """Verify, then time, every op of ``settings`` on one workload; one row per op."""
    device = settings.device
    workload = make_workload(name, device, settings.scale)
    cases = build_cases(
        workload, device, settings.backend, _rotation_budget(device), settings.quick
    )
    backend_name = fgs_backend_name(device, workload.dtype, settings.backend)
    rows = []
    for op_name in settings.ops:
        op = OPS[op_name]
        check = check_op(op_name, cases[0].grads, settings.backend) if settings.verify else None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the check's clones back before timing
        fns = {impl: (lambda i, f=fn: f(cases[i % len(cases)])) for impl, fn in op.impls.items()}
        reset = None
        if op.reset is not None:
            reset = lambda i, r=op.reset: r(cases[i % len(cases)])  # noqa: E731
        times = timing.time_fns(device, fns, reset=reset, **settings.timing_kwargs())
        fgs_s = times[FGS].median_s
        base_s = times[op.baseline].median_s
        min_bytes = op.min_bytes(workload.nbytes)
        gbps = min_bytes / fgs_s / 1e9
        rows.append(
            {
                "workload": name,
                "description": workload.description,
                "dtype": str(workload.dtype).replace("torch.", ""),
                "tensors": workload.count,
                "numel": workload.numel,
                "grad_bytes": workload.nbytes,
                "rotation_copies": len(cases),
                "op": op_name,
                "op_description": op.description,
                "fgs_backend": backend_name,
                "baseline": op.baseline,
                "times": {impl: t.to_json() for impl, t in times.items()},
                "fgs_s": fgs_s,
                "torch_s": base_s,
                "ratio": fgs_s / base_s,
                "speedup": base_s / fgs_s,
                "min_bytes": min_bytes,
                "gbps": gbps,
                "pct_copy": 100.0 * gbps / copy_gbps,
                "torch_gbps": min_bytes / base_s / 1e9,
                "check": check,
            }
        )
    cases.clear()
    _free(device)
    return rows


def _row(rows: list[dict[str, Any]], workload: str, op: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["workload"] == workload and r["op"] == op), None)


def cpu_targets(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 2's CPU ratios on GPT-2-124M fp32 (None when that workload was not run)."""
    w = "gpt2-124m-fp32"
    noclip, clip = _row(rows, w, "clip_noclip"), _row(rows, w, "clip")
    stats = _row(rows, w, "grad_stats")
    out: dict[str, Any] = {
        "workload": w,
        "baseline": "torch.nn.utils.clip_grad_norm_(foreach=True)",
    }
    if noclip:
        r = noclip["fgs_s"] / noclip["times"][TORCH_FOREACH]["median_s"]
        out["clip_noclip"] = {"ratio": r, "target": CPU_TARGETS["clip_noclip"]}
    if clip:
        r = clip["fgs_s"] / clip["times"][TORCH_FOREACH]["median_s"]
        out["clip"] = {"ratio": r, "target": CPU_TARGETS["clip"]}
    if stats and clip:
        r = stats["fgs_s"] / clip["times"][TORCH_FOREACH]["median_s"]
        out["grad_stats_vs_torch_clip"] = {
            "ratio": r,
            "target": CPU_TARGETS["grad_stats_vs_torch_clip"],
        }
    for value in out.values():
        if isinstance(value, dict):
            value["met"] = value["ratio"] <= value["target"]
    return out if len(out) > 2 else None


def gpu_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 4's H100 targets, one entry per (workload, target) that applies."""
    out = []
    for r in rows:
        checks = []
        if r["op"] == "clip_noclip":
            checks.append(("speedup", r["speedup"], GPU_TARGETS["clip_noclip_speedup"]))
        if r["op"] == "clip":
            checks.append(("speedup", r["speedup"], GPU_TARGETS["clip_speedup"]))
        if r["op"] == "grad_stats":
            key = (
                "tiny10k_grad_stats_speedup"
                if r["workload"].startswith("tiny10k")
                else ("grad_stats_speedup")
            )
            checks.append(("speedup", r["speedup"], GPU_TARGETS[key]))
        if (
            r["op"] in ("clip_noclip", "grad_stats")
            and r["numel"] >= GPU_TARGETS["pct_copy_min_numel"]
        ):
            checks.append(("pct_copy", r["pct_copy"], GPU_TARGETS["pct_copy_min"]))
        for what, value, target in checks:
            out.append(
                {
                    "workload": r["workload"],
                    "op": r["op"],
                    "what": what,
                    "value": value,
                    "target": target,
                    "met": value >= target,
                }
            )
    return out


CLIP_STEP_WORKLOADS = ("gpt2-124m-fp32", "gpt2-124m-bf16")
CLIP_STEP_RATIOS = (
    (HANDOFF, FGS_CLIP_STEP),  # the hand-off against our own clip + step: must be <= 1
    (HANDOFF, TORCH_CLIP_STEP),
    (FGS_CLIP_STEP, TORCH_CLIP_STEP),
    (STEP, HANDOFF),  # how much of the hand-off's time is the step itself
)


def _timed_rounds(
    device: torch.device,
    fns: dict[str, Any],
    resets: dict[str, Any],
    *,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    warmup: int,
) -> dict[str, list[float]]:
    """Seconds per call, one sample per implementation per round, the order rotating each
    round, so a neighbour's load spike hits every implementation of that round alike.

    Each call starts on an idle device (CUDA: synchronized, timed with events); the
    untimed reset runs after it."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            resets[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    started, r = time.perf_counter(), 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() - started < budget_s):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e-3)
            else:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - t0)
            resets[name]()
        r += 1
    return samples


def run_clip_step(name: str, settings: Settings) -> dict[str, Any]:
    """The "clip + optimizer step" row: ``AdamW(fused=True)`` on one workload's shapes.

    The hand-off (norm, then ``grad_scale = 1/coef`` for the fused step), our own clip +
    step and torch's clip + step, plus the step alone, interleaved in one run; ratios are
    medians of per-round ratios. The correctness check runs on the same shapes at the
    ``--quick`` scale (three optimizers at full size would triple the memory).
    """
    device = settings.device
    workload = make_workload(name, device, settings.scale)
    check = None
    if settings.verify:
        small = make_workload(name, device, QUICK_SCALE)
        check = check_clip_step(make_grads(small, device), settings.backend)
    case = make_step_case(make_grads(workload, device), settings.backend)
    fns = clip_step_impls(case)
    resets = {
        impl: (lambda: None) if impl == STEP else (lambda: restore_after_clip_step(case))
        for impl in CLIP_STEP_IMPLS
    }
    if settings.quick:
        rounds = {"min_rounds": 3, "max_rounds": 5, "warmup": 1}
    else:
        rounds = {"min_rounds": 9, "max_rounds": 60, "warmup": 2}
    samples = _timed_rounds(device, fns, resets, budget_s=2 * settings.budget, **rounds)
    clip_max_norm = case.max_norm
    # Nothing to clip (max_norm above the norm): what the hand-off costs on such steps.
    case.max_norm = 4.0 * clip_max_norm
    noclip_fns = clip_step_impls(case)
    noclip_resets = {impl: (lambda: None) for impl in CLIP_STEP_IMPLS}
    noclip = _timed_rounds(device, noclip_fns, noclip_resets, budget_s=settings.budget, **rounds)

    def median_ratios(samples: dict[str, list[float]]) -> dict[str, float]:
        return {
            f"{a}/{b}": statistics.median(x / y for x, y in zip(samples[a], samples[b]))
            for a, b in CLIP_STEP_RATIOS
        }

    ratios = median_ratios(samples)
    key = f"{HANDOFF}/{FGS_CLIP_STEP}"
    row = {
        "workload": name,
        "description": workload.description,
        "dtype": str(workload.dtype).replace("torch.", ""),
        "tensors": workload.count,
        "numel": workload.numel,
        "grad_bytes": workload.nbytes,
        "op": "clip_step",
        "op_description": "clip_grad_norm_ (clipping needed) + AdamW(fused=True).step()",
        "optimizer": "AdamW(fused=True, lr=1e-4)",
        "max_norm": clip_max_norm,
        "fgs_backend": fgs_backend_name(device, workload.dtype, settings.backend),
        "rounds": len(samples[STEP]),
        "times": {impl: timing.summarize(samples[impl]).to_json() for impl in CLIP_STEP_IMPLS},
        "ratios": ratios,
        "target": {"ratio": key, "value": ratios[key], "target": 1.0, "met": ratios[key] <= 1.0},
        "noclip": {
            "max_norm": case.max_norm,
            "rounds": len(noclip[STEP]),
            "times": {impl: timing.summarize(noclip[impl]).to_json() for impl in CLIP_STEP_IMPLS},
            "ratios": median_ratios(noclip),
        },
        "check": check,
    }
    case = fns = resets = noclip_fns = None  # free params, grads and optimizer state
    _free(device)
    return row


def run_suite(settings: Settings, log: Any = None) -> dict[str, Any]:
    """Measure copy bandwidth, then every workload x op; returns the JSON-able result."""
    for name in settings.workloads:
        if name not in WORKLOAD_NAMES:
            raise ValueError(f"workloads: unknown workload {name!r}; choose from {WORKLOAD_NAMES}")
    for name in settings.ops:
        if name not in OPS:
            raise ValueError(f"ops: unknown op {name!r}; choose from {OP_NAMES}")
    device = settings.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
    meta = metadata(settings)
    copy_bytes = (16 << 20) if settings.quick else None
    bandwidth = timing.copy_bandwidth(device, copy_bytes, budget_s=min(1.0, settings.budget))
    if log:
        print(f"copy bandwidth: {bandwidth['gbps']:.1f} GB/s on {meta['device_name']}", file=log)
    rows: list[dict[str, Any]] = []
    workloads = progress(settings.workloads, len(settings.workloads), "workloads", log)
    for name in workloads:
        new = run_workload(name, settings, bandwidth["gbps"])
        rows += new
        for r in new:
            write_line(
                f"  {r['workload']:<15} {r['op']:<12} {_fmt_ms(r['fgs_s'])} ms "
                f"vs {_fmt_ms(r['torch_s'])} ms",
                log,
            )
    steps = []
    if settings.clip_step and "clip" in settings.ops:
        for name in settings.workloads:
            if name in CLIP_STEP_WORKLOADS:
                steps.append(run_clip_step(name, settings))
                if log:
                    t = steps[-1]["times"]
                    print(
                        f"  {name:<15} clip_step    hand-off {_fmt_ms(t[HANDOFF]['median_s'])} ms "
                        f"vs {_fmt_ms(t[FGS_CLIP_STEP]['median_s'])} ms",
                        file=log,
                        flush=True,
                    )
    if hasattr(os, "getloadavg"):
        meta["host"]["loadavg_end"] = list(os.getloadavg())
    result = {"meta": meta, "copy_bandwidth": bandwidth, "results": rows}
    if steps:
        result["clip_step"] = steps
    if device.type == "cpu":
        result["targets_cpu_issue2"] = cpu_targets(rows)
    else:
        result["targets_gpu_issue4"] = gpu_targets(rows)
    return result


# ----------------------------------------------------------------------------- output


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


COLUMNS = (
    ("workload", 15), ("op", 12), ("fgs ms", 8), ("torch ms", 9), ("baseline", 13),
    ("ratio", 6), ("speedup", 7), ("loop ms", 8), ("GB/s", 7), ("% copy", 6), ("check", 5),
)  # fmt: skip


def format_clip_step(rows: list[dict[str, Any]]) -> list[str]:
    """Lines for the "clip + optimizer step" rows (medians; ratios: medians per round)."""
    lines = ["clip + optimizer step, AdamW(fused=True), clipping needed (median ms):"]
    head = (
        f"  {'workload':<15} {'step':>8} {'hand-off':>9} {'fgs clip':>9} {'torch clip':>10}"
        f"  {'hand-off/fgs':>12} {'hand-off/torch':>14}  check"
    )
    lines.append(head)
    for r in rows:
        t, q = r["times"], r["ratios"]
        check = r["check"]
        verdict = "-" if check is None else ("ok" if check["ok"] else "FAIL")
        lines.append(
            f"  {r['workload']:<15} {_fmt_ms(t[STEP]['median_s']):>8} "
            f"{_fmt_ms(t[HANDOFF]['median_s']):>9} {_fmt_ms(t[FGS_CLIP_STEP]['median_s']):>9} "
            f"{_fmt_ms(t[TORCH_CLIP_STEP]['median_s']):>10}  "
            f"{q[f'{HANDOFF}/{FGS_CLIP_STEP}']:>12.3f} {q[f'{HANDOFF}/{TORCH_CLIP_STEP}']:>14.3f}"
            f"  {verdict}  ({'met' if r['target']['met'] else 'MISSED'}: hand-off/fgs <= 1)"
        )
        if "noclip" in r:
            t, q = r["noclip"]["times"], r["noclip"]["ratios"]
            lines.append(
                f"  {'  no clip needed':<15} {_fmt_ms(t[STEP]['median_s']):>8} "
                f"{_fmt_ms(t[HANDOFF]['median_s']):>9} "
                f"{_fmt_ms(t[FGS_CLIP_STEP]['median_s']):>9} "
                f"{_fmt_ms(t[TORCH_CLIP_STEP]['median_s']):>10}  "
                f"{q[f'{HANDOFF}/{FGS_CLIP_STEP}']:>12.3f} "
                f"{q[f'{HANDOFF}/{TORCH_CLIP_STEP}']:>14.3f}"
            )
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The summary table: one line per workload x op (ratio = fgs time / torch time)."""
    meta, bw = result["meta"], result["copy_bandwidth"]
    head = "  ".join(
        f"{name:>{w}}" if i > 1 else f"{name:<{w}}" for i, (name, w) in enumerate(COLUMNS)
    )
    lines = [
        f"fastgradstats benchmark on {meta['device_name']}, {meta['date_utc']}, "
        f"torch {meta['torch_version']}, commit {(meta['git_commit'] or '?')[:10]}",
        f"measured copy bandwidth: {bw['gbps']:.1f} GB/s (read + write)",
        head,
        "-" * len(head),
    ]
    for r in result["results"]:
        loop = r["times"].get(TORCH_LOOP)
        check = r["check"]
        cells = [
            r["workload"], r["op"], _fmt_ms(r["fgs_s"]), _fmt_ms(r["torch_s"]), r["baseline"],
            f"{r['ratio']:.2f}", f"{r['speedup']:.2f}", _fmt_ms(loop["median_s"]) if loop else "-",
            f"{r['gbps']:.1f}", f"{r['pct_copy']:.0f}",
            "-" if check is None else ("ok" if check["ok"] else "FAIL"),
        ]  # fmt: skip
        lines.append(
            "  ".join(
                f"{c:>{w}}" if i > 1 else f"{c:<{w}}"
                for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS))
            )
        )
    targets = result.get("targets_cpu_issue2")
    if targets:
        lines.append("")
        lines.append(f"issue-2 CPU targets ({targets['workload']}, time / {targets['baseline']}):")
        if result["meta"]["settings"].get("quick"):
            lines.append("  (--quick sizes: the targets are for full-size grads; these are not)")
        for key in CPU_TARGETS:
            if key in targets:
                t = targets[key]
                verdict = "met" if t["met"] else "MISSED"
                lines.append(f"  {key:<26} {t['ratio']:.3f}  (target <= {t['target']})  {verdict}")
    if result.get("clip_step"):
        lines.append("")
        lines += format_clip_step(result["clip_step"])
    gpu = result.get("targets_gpu_issue4")
    if gpu:
        lines.append("")
        lines.append("issue-4 GPU targets:")
        for t in gpu:
            verdict = "met" if t["met"] else "MISSED"
            lines.append(
                f"  {t['workload']:<15} {t['op']:<12} {t['what']:<8} {t['value']:.2f} "
                f"(target >= {t['target']})  {verdict}"
            )
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    """The summary as a markdown table (for benchmarks/README.md)."""
    lines = [
        "| workload | op | fastgradstats ms | torch ms | baseline | ratio | torch loop ms "
        "| GB/s | % copy |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"]:
        loop = r["times"].get(TORCH_LOOP)
        lines.append(
            f"| {r['workload']} | {r['op']} | {_fmt_ms(r['fgs_s'])} | {_fmt_ms(r['torch_s'])} "
            f"| {r['baseline']} | {r['ratio']:.2f} | "
            f"{_fmt_ms(loop['median_s']) if loop else '-'} | {r['gbps']:.1f} "
            f"| {r['pct_copy']:.0f} |"
        )
    return "\n".join(lines)


def results_path(out_dir: Path, result: dict[str, Any], suffix: str = "") -> Path:
    """``<out_dir>/<device>-<YYYY-MM-DD><suffix>.json``."""
    meta = result["meta"]
    slug = "cpu" if meta["device_type"] == "cpu" else device_slug(torch.device("cuda"))
    return Path(out_dir) / f"{slug}-{meta['date_utc'][:10]}{suffix}.json"


def _finite_json(value: Any) -> Any:
    """Replace inf/nan floats by strings so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def write_json(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as indented strict JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_json(result), indent=1, allow_nan=False) + "\n")
    return path


__all__ = [
    "CPU_TARGETS",
    "GPU_TARGETS",
    "QUICK_SCALE",
    "Settings",
    "cpu_targets",
    "default_device",
    "format_clip_step",
    "format_markdown",
    "format_table",
    "gpu_targets",
    "metadata",
    "results_path",
    "run_clip_step",
    "run_suite",
    "run_workload",
    "write_json",
]
