"""Per-layer |g| histograms: fastgradstats' reference against the torch code users write today.

Run: ``python -m benchmarks.histogram`` (``--quick`` for a 1/32-scale smoke run).

Workload: the 148 gradients of GPT-2 small (124M elements, fp32 by default). Every
implementation produces, per tensor, counts on power-of-two bins of the finite |g| and the
zero count, ending with host lists ready to log (a logger needs numbers):

``fastgradstats``
    :func:`fastgradstats.histogram.group_histogram`, then one ``tolist()``.
``torch_log2_histc``
    What a user writes today, following the steps of ``wandb.watch``'s gradient hook
    (``wandb/integration/torch/wandb_torch.py``: flatten, upcast to fp32, drop NaN/Inf
    after an ``isfinite().all()`` check, ``histc``, ``tolist()``), on log2 |g| over the
    same 152 bins, plus the zero count.
``torch_log2_bincount``
    The same with ``bincount`` of ``floor(log2 |g|)`` instead of ``histc``.
``wandb_hook``
    ``wandb.watch``'s own per-tensor work (64 linear bins between min and max, each read
    with ``.item()``), for scale: not the same histogram.
``grad_stats``
    ``fastgradstats.grad_stats`` (norms, max |g|, NaN/Inf counts), the plain stats pass.

On CUDA (``--device cuda``) the ``fastgradstats`` row is ``grad_stats(..., histogram=True,
backend="triton")``: the fused kernel, binning in the stats read, results left on the
device as a training step leaves them; ``grad_stats`` is the same call without histograms,
so ``histogram_over_stats`` is what histograms add to the stats pass (issue 12's GPU
target: <= 1.2). The torch rows sync per tensor, as the code they stand for does.

Timing: every implementation runs once per round, rounds interleaved (a different one first
each round), so a load spike on a shared machine hits all alike; the speedup is the median
over rounds of ``baseline / fastgradstats`` within a round. CPU runs use ONE torch thread
by default (``--threads``): on a small shared machine, multi-threaded timings measure the
neighbours. Writes ``benchmarks/results/<device>-<date>-histogram.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastgradstats as fgs
from benchmarks import suite, timing
from benchmarks.provenance import REPO_ROOT
from benchmarks.workloads import DTYPES, grad_holders, make_grads, make_workload
from fastgradstats import constants as C
from fastgradstats import histogram as H

TARGET_SPEEDUP = 10.0  # issue 12: on CPU >= 10x faster than the user's torch code
TARGET_GPU_OVERHEAD = 1.2  # issue 12: with the GPU kernels <= 1.2x the plain stats pass
BASELINE = "torch_log2_histc"
WANDB_BINS = 64  # wandb.watch's TorchHistory._num_bins


def fastgradstats_hist(grads: list[Tensor]) -> Any:
    hist, zeros = H.group_histogram(grads)
    return hist.tolist(), zeros.tolist()


def _user_finite_abs(g: Tensor) -> Tensor | None:
    flat = g.detach().reshape(-1).float()
    if flat.numel() == 0 or not torch.isfinite(flat).any().item():
        return None
    if not torch.isfinite(flat).all().item():
        flat = flat[torch.isfinite(flat)]
    return flat.abs()


def torch_log2_histc(grads: list[Tensor]) -> Any:
    out = []
    for g in grads:
        a = _user_finite_abs(g)
        if a is None:
            out.append(None)
            continue
        zeros = (a == 0).sum().item()
        # log2(0) = -inf falls outside [min, max] and is dropped: add the zeros to bin 0.
        counts = torch.histc(
            torch.log2(a), bins=C.NUM_BINS, min=C.LOW_EXPONENT - 1, max=C.HIGH_EXPONENT + 1
        )
        counts[0] += zeros
        out.append((counts.tolist(), zeros))
    return out


def torch_log2_bincount(grads: list[Tensor]) -> Any:
    out = []
    for g in grads:
        a = _user_finite_abs(g)
        if a is None:
            out.append(None)
            continue
        zeros = (a == 0).sum().item()
        exps = torch.floor(torch.log2(a[a > 0])).clamp_(C.LOW_EXPONENT - 1, C.HIGH_EXPONENT)
        counts = torch.bincount(exps.long() + C.BIN_OFFSET, minlength=C.NUM_BINS)
        counts[0] += zeros
        out.append((counts.tolist(), zeros))
    return out


def wandb_hook(grads: list[Tensor]) -> Any:
    out = []
    for g in grads:
        flat = g.detach().clone().reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        if flat.numel() == 0 or (~torch.isfinite(flat)).all().item():
            out.append(None)
            continue
        if not torch.isfinite(flat).all():
            flat = flat[torch.isfinite(flat)]
        tmin, tmax = flat.min().item(), flat.max().item()
        if tmin == tmax:
            out.append(([flat.numel()], [tmin, tmax]))
            continue
        counts = flat.histc(bins=WANDB_BINS, min=tmin, max=tmax)
        edges = torch.linspace(tmin, tmax, steps=WANDB_BINS + 1)
        out.append((counts.tolist(), edges.tolist()))
    return out


def check(grads: list[Tensor], hist: Tensor, zeros: Tensor, sample: int = 12) -> dict[str, Any]:
    """The measured implementation's counts (``hist``, ``zeros``) vs numpy.histogram
    (exact), and how many elements the baseline puts in another bin."""
    hist, zeros = hist.cpu(), zeros.cpu()
    step = max(1, len(grads) // sample)
    picked = list(range(0, len(grads), step))
    edges = H.histogram_edges().numpy()
    exact = True
    for i in picked:
        a = np.abs(grads[i].detach().double().cpu().numpy().ravel())
        a = a[np.isfinite(a)]
        exact &= bool((np.histogram(a, bins=edges)[0] == hist[i].numpy()).all())
        exact &= int(zeros[i]) == int((a == 0).sum())
    user = torch_log2_histc([grads[i] for i in picked])
    moved = sum(
        int(np.abs(np.asarray(row[0]) - hist[i].numpy()).sum()) // 2
        for i, row in zip(picked, user)
        if row is not None
    )
    return {
        "tensors_checked": len(picked),
        "equals_numpy_histogram": exact,
        "baseline_elements_in_another_bin": moved,
        "zero_count_total": int(zeros.sum()),
    }


def measure(
    fns: dict[str, Callable[[], Any]], rounds: int, budget_s: float, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each fn, interleaved rounds (within [rounds, budget])."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - started < budget_s and r < 10 * rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        r += 1
    return samples


def _implementations(device: torch.device, grads: list[Tensor]) -> dict[str, Callable[[], Any]]:
    holders = grad_holders(grads)
    torch_rows: dict[str, Callable[[], Any]] = {
        "torch_log2_histc": lambda: torch_log2_histc(grads),
        "torch_log2_bincount": lambda: torch_log2_bincount(grads),
        "wandb_hook": lambda: wandb_hook(grads),
    }
    if device.type == "cuda":  # the fused kernel against the same kernel without bins
        return {
            "fastgradstats": lambda: fgs.grad_stats(holders, histogram=True, backend="triton"),
            "grad_stats": lambda: fgs.grad_stats(holders, backend="triton"),
            **torch_rows,
        }
    return {
        "fastgradstats": lambda: fastgradstats_hist(grads),
        **torch_rows,
        "grad_stats": lambda: fgs.grad_stats(holders, backend="torch").to_dict(),
    }


def _counts(device: torch.device, grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The counts of the implementation measured as ``fastgradstats``."""
    if device.type == "cuda":
        stats = fgs.grad_stats(grad_holders(grads), histogram=True, backend="triton")
        assert stats.histogram is not None and stats.zero_count is not None
        return stats.histogram, stats.zero_count
    return H.group_histogram(grads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    scale = 1 / 32 if args.quick else 1.0
    name = f"gpt2-124m-{args.dtype}"
    workload = make_workload(name, device, scale)
    grads = make_grads(workload, device)
    fns = _implementations(device, grads)
    if device.type == "cuda":
        # CUDA events per call, implementations interleaved by block (benchmarks.timing)
        per_call = {k: (lambda i, f=f: f()) for k, f in fns.items()}
        timed = timing.time_cuda(per_call, budget_s=args.budget)
        samples = {k: [t.median_s] for k, t in timed.items()}
    else:
        samples = measure(fns, args.rounds, args.budget)
    ours = samples["fastgradstats"]
    medians = {k: statistics.median(v) for k, v in samples.items()}
    speedups = {
        k: statistics.median(b / o for b, o in zip(v, ours))
        for k, v in samples.items()
        if k not in ("fastgradstats", "grad_stats")
    }
    over_stats = statistics.median(o / s for o, s in zip(ours, samples["grad_stats"]))
    settings = suite.Settings(device=device, workloads=[name], ops=[], quick=args.quick)
    meta = suite.metadata(settings)
    meta["host"]["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        target = {
            "histogram_over_stats_max": TARGET_GPU_OVERHEAD,
            "histogram_over_stats": over_stats,
            "met": over_stats <= TARGET_GPU_OVERHEAD,
            "baseline": BASELINE,
            "speedup": speedups[BASELINE],
        }
    else:
        target = {
            "baseline": BASELINE,
            "speedup_min": TARGET_SPEEDUP,
            "speedup": speedups[BASELINE],
            "met": speedups[BASELINE] >= TARGET_SPEEDUP,
        }
    target["note"] = "targets are for full size" if args.quick else ""
    result = {
        "meta": meta,
        "benchmark": "histogram",
        "workload": {
            "name": name,
            "tensors": workload.count,
            "numel": workload.numel,
            "grad_bytes": workload.nbytes,
            "scale": scale,
        },
        "rounds": len(ours),
        "median_s": medians,
        "ns_per_element": {k: 1e9 * v / workload.numel for k, v in medians.items()},
        "speedup_vs": speedups,
        "histogram_over_stats": over_stats,
        "target": target,
        "check": check(grads, *_counts(device, grads)),
        "samples_s": samples,
    }
    if device.type == "cuda":
        result["cuda_timings"] = {k: t.to_json() for k, t in timed.items()}
        result["rounds"] = min(t.n for t in timed.values())  # timed calls per implementation
    return result


def format_summary(result: dict[str, Any]) -> str:
    w = result["workload"]
    lines = [
        f"{w['name']}: {w['tensors']} tensors, {w['numel']:,} elements, "
        f"{result['rounds']} interleaved rounds, {result['meta']['host']['torch_threads']} "
        "thread(s)",
        f"{'implementation':<22}{'median ms':>11}{'ns/elem':>9}{'fgs speedup':>13}",
    ]
    for name, median in result["median_s"].items():
        speed = result["speedup_vs"].get(name)
        lines.append(
            f"{name:<22}{1e3 * median:>11.1f}{result['ns_per_element'][name]:>9.2f}"
            f"{(f'{speed:.1f}x' if speed else '-'):>13}"
        )
    t = result["target"]
    verdict = "met" if t["met"] else "NOT met"
    if "speedup_min" in t:
        lines.append(
            f"target: >= {t['speedup_min']:g}x vs {t['baseline']}: {t['speedup']:.1f}x "
            f"({verdict}) {t['note']}".rstrip()
        )
    lines.append(f"histogram / grad_stats time: {result['histogram_over_stats']:.2f}")
    if "histogram_over_stats_max" in t:
        lines.append(
            f"target: histogram / grad_stats <= {t['histogram_over_stats_max']:g}: "
            f"{t['histogram_over_stats']:.2f} ({verdict}) {t['note']}".rstrip()
        )
    c = result["check"]
    lines.append(
        f"check: equals numpy.histogram on {c['tensors_checked']} tensors: "
        f"{c['equals_numpy_histogram']}; baseline puts {c['baseline_elements_in_another_bin']} "
        "of their elements in another bin (histc's float edges)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--rounds", type=int, default=7, help="minimum interleaved rounds")
    parser.add_argument(
        "--budget", type=float, default=60.0, help="seconds of rounds (CUDA: of timed calls)"
    )
    parser.add_argument("--quick", action="store_true", help="1/32-scale shapes, a smoke run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(format_summary(result))
    if not args.no_write:
        suffix = f"-histogram-{args.dtype}" + ("-quick" if args.quick else "")
        path = suite.write_json(result, suite.results_path(args.out, result, suffix))
        print(f"wrote {path}")
    if not math.isfinite(result["target"]["speedup"]):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
