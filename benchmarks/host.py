"""``python -m benchmarks host``: the Python cost of a call, with the device launches stubbed.

On a GPU the kernels of a clip take ~170 us for GPT-2-124M (issue 9), so the host work
around them must not dominate. This measures that host work alone: ``kernels.launch`` (the
one launch point) is replaced by a counter, so everything else a call does (walking the
gradients, the plan lookup, allocating the returned tensors) is timed, and the launches
per call are counted.

The yardstick is the one-pass floor, measured in the same run::

    hash(tuple(g.data_ptr() for g in [p.grad for p in params]))

Each round times a batch of floor calls and a batch of each fastgradstats call, one after
the other (interleaved, so machine load hits both alike); the reported ratio is the median
of the per-round ratios. Targets (issue 9): ``clip_grad_norm_`` with and without
``return_stats`` at most 4x the floor for GPT-2-124M (148 fp32 tensors) and 2x for
10,000 x 64-element tensors; ``grad_stats`` has had the same targets since it takes the
same fused path. ``GradMonitor.step`` and ``grad_stats(histogram)`` are measured without a
target: besides the launches they run small torch ops (the history-ring writes, the zero
fills of the histogram outputs), each a kernel launch on a GPU. Host numbers from a CPU
are legitimate here: this is Python cost; on a CPU the Triton path is taken through
``TRITON_INTERPRET=1`` (nothing is interpreted: the launches are stubbed).

On a CPU it also measures ``backward_stats`` (issue 18) on the Triton path with the
launches stubbed: the Python cost per tensor of its hooks during backward (target 3 us, in
the steady state; a new handle's first backward, which builds the buckets' tables, is
reported apart) and of the after-backward finalize against the same floor (target 1.5x),
with the launches of one step (one per bucket during backward, one after).

Exit status 1 when a target is missed (not with ``--quick``, whose timings are too short).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .provenance import short_commit

TARGETS = {"gpt2-124m": 4.0, "tiny10k": 2.0}  # clip_grad_norm_ (+ return_stats) / floor
# backward_stats (issue 18), Triton path, launches stubbed: Python per tensor during
# backward, and the after-backward finalize against the floor
BACKWARD_ROWS = ((148, 20), (10_000, 20))  # (tensors, buckets): GPT-2 124M at 25 MB
HOOK_US_PER_TENSOR_TARGET = 3.0
FINALIZE_TARGET = 1.5
TARGET_OPS = ("clip_grad_norm_", "clip_grad_norm_(return_stats)", "grad_stats")
RESULTS = Path(__file__).resolve().parent / "results"


def _workload(name: str, device: Any) -> list[Any]:
    import torch

    from .workloads import gpt2_124m_shapes

    shapes = gpt2_124m_shapes() if name == "gpt2-124m" else [(64,)] * 10_000
    params = []
    for shape in shapes:
        # torch.empty: real tensors of the real shapes, but no page is touched (nothing
        # reads the values: the launches are stubbed)
        p = torch.nn.Parameter(torch.empty(shape, device=device))
        p.grad = torch.empty(shape, device=device)
        params.append(p)
    return params


def _ops(params: list[Any]) -> dict[str, Any]:
    import fastgradstats as fgs

    return {
        "floor": lambda: hash(tuple(g.data_ptr() for g in [p.grad for p in params])),
        **calls(fgs, params),
    }


def calls(fgs: Any, params: list[Any]) -> dict[str, Any]:
    """The timed calls of ``fgs`` (this package, or an earlier commit's copy: see
    ``host_ab``) on ``params``, all on the Triton path."""
    grads = [p.grad for p in params]
    try:
        monitor = fgs.GradMonitor(params, max_norm=1.0, backend="triton", hand_off=False)
    except TypeError:  # a commit before the optimizer hand-off
        monitor = fgs.GradMonitor(params, max_norm=1.0, backend="triton")
    return {
        "clip_grad_norm_": lambda: fgs.clip_grad_norm_(params, 1.0, backend="triton"),
        "clip_grad_norm_(return_stats)": lambda: fgs.clip_grad_norm_(
            params, 1.0, return_stats=True, backend="triton"
        ),
        "grad_stats": lambda: fgs.grad_stats(params, backend="triton"),
        "get_total_norm": lambda: fgs.get_total_norm(grads, backend="triton"),
        "grad_stats(histogram)": lambda: fgs.grad_stats(params, histogram=True, backend="triton"),
        "GradMonitor.step(max_norm)": monitor.step,
    }


class _Stub:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
        self.counts[kernel.__name__] += 1


def measure(name: str, device: Any, rounds: int, batch: int) -> dict[str, Any]:
    """Host us per call of every op and its ratio to the floor, for one workload."""
    from fastgradstats import kernels

    params = _workload(name, device)
    ops = _ops(params)
    stub = _Stub()
    real_launch = kernels.launch
    kernels.launch = stub
    try:
        launches = {}
        for op, fn in ops.items():  # warm-up (plans built) and launches per call
            fn()
            stub.counts.clear()
            fn()
            launches[op] = sum(stub.counts.values())
        times: dict[str, list[float]] = {op: [] for op in ops}
        ratios: dict[str, list[float]] = {op: [] for op in ops if op != "floor"}
        for _ in range(rounds):
            per_call = {}
            for op, fn in ops.items():
                start = time.perf_counter()
                for _ in range(batch):
                    fn()
                per_call[op] = (time.perf_counter() - start) / batch * 1e6
                times[op].append(per_call[op])
            for op in ratios:
                ratios[op].append(per_call[op] / per_call["floor"])
    finally:
        kernels.launch = real_launch
    out: dict[str, Any] = {"tensors": len(params), "ops": {}}
    for op in ops:
        entry = {"us_median": round(statistics.median(times[op]), 2), "launches": launches[op]}
        if op != "floor":
            entry["ratio_to_floor"] = round(statistics.median(ratios[op]), 3)
            target = TARGETS.get(name) if op in TARGET_OPS else None
            if target is not None:
                entry["target"] = target
                entry["ok"] = entry["ratio_to_floor"] <= target
        out["ops"][op] = entry
    return out


def run(device_name: str | None, quick: bool) -> dict[str, Any]:
    import torch

    import fastgradstats
    from fastgradstats import dispatch

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not dispatch.triton_interpreter_on():
        raise RuntimeError("on a CPU the Triton path needs TRITON_INTERPRET=1 (set by main)")
    rounds, batch = (3, 2) if quick else (31, 20)
    result = {
        "meta": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "fastgradstats": getattr(fastgradstats, "__version__", "?"),
            "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": short_commit(),
            "rounds": rounds,
            "batch": batch,
            "quick": quick,
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "method": "launches stubbed; median of per-round ratios to the floor",
        },
        "workloads": {},
    }
    for name in TARGETS:
        result["workloads"][name] = measure(name, device, rounds, batch)
    if device.type == "cpu":  # the CPU autograd engine runs the hooks on this thread
        result["backward_stats"] = measure_backward(rounds, batch)
    result["ok"] = all(
        entry.get("ok", True) for w in result["workloads"].values() for entry in w["ops"].values()
    ) and all(row["ok"] for row in result.get("backward_stats", []))
    return result


def measure_backward(rounds: int, batch: int) -> list[dict[str, Any]]:
    """``backward_stats`` on the Triton path, launches stubbed: hook us per tensor during
    backward and finalize / floor after it (see ``benchmarks/backward_hooks.py``), with
    the launch counts of one step. Tiny parameters, so backward itself costs little."""
    from .backward_hooks import measure as measure_hooks

    rows = []
    for n, buckets in BACKWARD_ROWS:
        row = measure_hooks(n, buckets, rounds, batch if n < 1000 else 2, "triton")
        row["hook_target_us"] = HOOK_US_PER_TENSOR_TARGET
        row["finalize_target"] = FINALIZE_TARGET
        row["ok"] = (
            row["hook_us_per_tensor"] <= HOOK_US_PER_TENSOR_TARGET
            and row["finalize_x_floor"] <= FINALIZE_TARGET
        )
        rows.append(row)
    return rows


def format_result(result: dict[str, Any]) -> str:
    lines = []
    for name, w in result["workloads"].items():
        lines.append(f"{name} ({w['tensors']} tensors)")
        lines.append(f"  {'call':<32}{'host us':>10}{'x floor':>9}{'launches':>10}  target")
        for op, e in w["ops"].items():
            ratio = f"{e['ratio_to_floor']:.2f}" if "ratio_to_floor" in e else "1"
            target = ""
            if "target" in e:
                target = f"<= {e['target']:g}x {'ok' if e['ok'] else 'MISSED'}"
            lines.append(
                f"  {op:<32}{e['us_median']:>10.1f}{ratio:>9}{e['launches']:>10}  {target}"
            )
    rows = result.get("backward_stats", [])
    if rows:
        lines.append("backward_stats (Triton path): hooks during backward, finalize after")
        lines.append(f"  {'tensors':>8}{'buckets':>8}{'hook us/tensor':>16}{'(1st bw)':>10}"
                     f"{'finalize us':>13}{'x floor':>9}{'launches':>10}  target")  # fmt: skip
        for r in rows:
            target = (f"<= {r['hook_target_us']:g} us, <= {r['finalize_target']:g}x "
                      f"{'ok' if r['ok'] else 'MISSED'}")  # fmt: skip
            launches = f"{r['launches_backward']}+{r['launches_finalize']}"
            lines.append(f"  {r['tensors']:>8}{r['buckets']:>8}{r['hook_us_per_tensor']:>16.2f}"
                         f"{r['first_backward_us_per_tensor']:>10.2f}{r['finalize_us']:>13.1f}{r['finalize_x_floor']:>9.2f}"
                         f"{launches:>10}  {target}")  # fmt: skip
    lines.append("host targets: " + ("met" if result["ok"] else "MISSED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks host", description=__doc__
                                     .split("\n")[0])  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--quick", action="store_true", help="a few rounds (CI); no verdict")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for host-<device>-<date>-<commit>.json (default {RESULTS}; "
                             "--quick writes only with --out)")  # fmt: skip
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    import torch

    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if on_cpu and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules or "fastgradstats.kernels" in sys.modules:
            raise RuntimeError("set TRITON_INTERPRET=1 before importing triton")
        os.environ["TRITON_INTERPRET"] = "1"  # Triton path on CPU tensors (stubbed)
    result = run(args.device, args.quick)
    print(format_result(result))
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta = result["meta"]
        device = meta["device"].split(":")[0]
        path = out / f"host-{device}-{meta['date_utc'][:10]}-{meta['commit']}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {path}")
    if args.quick:
        return 0
    return 0 if result["ok"] else 1


__all__ = ["TARGETS", "calls", "main", "measure", "run"]
