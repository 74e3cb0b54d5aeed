"""Scaling sweeps: time against total size, and against tensor count at fixed bytes.

* size sweep: 100 equal fp32 tensors, total 1M elements and up by 4x (GPU: to 1B+,
  capped at an eighth of the free memory; CPU: to 64M);
* count sweep: fixed total elements (GPU 64M, CPU 4M), split into 1, 10, ... 100,000
  equal tensors.

Ops: clip_noclip, clip, grad_stats; fastgradstats against the primary torch baseline.
Results go to the JSON and to two PNGs (matplotlib, imported only here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import timing
from .ops import FGS, OPS, make_case
from .suite import Settings, _free, _sync

SWEEP_OPS = ("clip_noclip", "clip", "grad_stats")
SWEEP_COUNT = 100


def size_points(settings: Settings) -> list[int]:
    """Total element counts of the size sweep (powers of 4 from 2^20)."""
    if settings.quick:
        return [1 << 12, 1 << 14]
    if settings.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(settings.device)
        cap = free // 8 // 4  # fp32 elements: grads, plus room for torch's temporaries
        top = 1 << 31
    else:
        cap, top = 1 << 26, 1 << 26
    points, n = [], 1 << 20
    while n <= min(cap, top):
        points.append(n)
        n *= 4
    return points


def count_points(settings: Settings) -> tuple[int, list[int]]:
    """(total elements, tensor counts) of the count sweep."""
    if settings.quick:
        return 1 << 12, [1, 10, 100]
    total = (1 << 26) if settings.device.type == "cuda" else (1 << 22)
    return total, [1, 10, 100, 1000, 10_000, 100_000]


def _even_shapes(total: int, count: int) -> list[tuple[int, ...]]:
    base, extra = divmod(total, count)
    return [(base + (1 if i < extra else 0),) for i in range(count)]


def _measure(settings: Settings, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    device = settings.device
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(s, generator=gen, device=device) for s in shapes]
    case = make_case(grads, settings.backend)
    _sync(device)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    out: dict[str, Any] = {"numel": nbytes // 4, "tensors": len(shapes), "bytes": nbytes}
    kwargs = settings.timing_kwargs()
    kwargs["budget_s"] = min(kwargs["budget_s"], 1.0)
    kwargs["min_rounds"] = 3  # the 100,000-tensor baselines take seconds per call
    for op_name in SWEEP_OPS:
        op = OPS[op_name]
        fns = {impl: (lambda _i, f=op.impls[impl]: f(case)) for impl in (FGS, op.baseline)}
        reset = None if op.reset is None else (lambda _i, r=op.reset: r(case))
        times = timing.time_fns(device, fns, reset=reset, **kwargs)
        out[op_name] = {
            "fgs_s": times[FGS].median_s,
            "torch_s": times[op.baseline].median_s,
            "baseline": op.baseline,
            "gbps": op.min_bytes(nbytes) / times[FGS].median_s / 1e9,
        }
    grads.clear()
    _free(device)
    return out


def run_sweep(settings: Settings, log: Any = None) -> dict[str, Any]:
    """Both sweeps; returns ``{"size": [...], "count": {...}}``."""
    sizes = []
    for total in size_points(settings):
        sizes.append(_measure(settings, _even_shapes(total, SWEEP_COUNT)))
        if log:
            print(f"  size sweep: {total} elements done", file=log, flush=True)
    total, counts = count_points(settings)
    by_count = []
    for count in counts:
        by_count.append(_measure(settings, _even_shapes(total, count)))
        if log:
            print(f"  count sweep: {count} tensors done", file=log, flush=True)
    return {"size": sizes, "count": {"total_numel": total, "points": by_count}}


def plot_sweep(sweep: dict[str, Any], copy_gbps: float, title: str, prefix: Path) -> list[Path]:
    """Write ``<prefix>-size.png`` and ``<prefix>-count.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind, points, x_key, x_label in (
        ("size", sweep["size"], "numel", "total elements (100 fp32 tensors)"),
        ("count", sweep["count"]["points"], "tensors",
         f"tensor count ({sweep['count']['total_numel']} fp32 elements in all)"),
    ):  # fmt: skip
        if not points:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        xs = [p[x_key] for p in points]
        for op_name in SWEEP_OPS:
            axes[0].plot(xs, [p[op_name]["fgs_s"] * 1e3 for p in points], "o-",
                         label=f"fastgradstats {op_name}")  # fmt: skip
            axes[0].plot(xs, [p[op_name]["torch_s"] * 1e3 for p in points], "x--",
                         label=f"{points[0][op_name]['baseline']} {op_name}")  # fmt: skip
            axes[1].plot(xs, [100 * p[op_name]["gbps"] / copy_gbps for p in points], "o-",
                         label=f"fastgradstats {op_name}")  # fmt: skip
        axes[0].set(xscale="log", yscale="log", xlabel=x_label, ylabel="time per call (ms)")
        axes[1].set(xscale="log", xlabel=x_label, ylabel="% of measured copy bandwidth")
        axes[1].axhline(100, color="grey", lw=0.8)
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = Path(f"{prefix}-{kind}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["SWEEP_OPS", "count_points", "plot_sweep", "run_sweep", "size_points"]
