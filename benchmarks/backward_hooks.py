"""``python -m benchmarks.backward_hooks``: host cost of ``fgs.backward_stats``'s hooks.

Issue 18's target: at most 3 us of Python per tensor during backward (launches stubbed),
and the after-backward step (``finalize``) at most 1.5x the one-pass floor
``hash(tuple(g.data_ptr() for g in [p.grad for p in params]))``.

The model is ``n`` tiny parameters (4 elements each) feeding one sum, so backward itself is
cheap and the difference is the hooks. Each round times a batch of backward passes
without the handle, then with it (interleaved: machine load hits both alike); the cost per
tensor is the median over rounds of (with - without) / n. Each round makes a new handle,
whose first backward builds every bucket's table, layout check and launches (once per
handle and gradient layout in a training run): that backward is timed apart
(``first_backward_us_per_tensor``) and the batch after it, a finalize after each
backward as in training, is the steady state. "stubbed": the measurement seam
``fastgradstats.backward._measure_bucket`` returns preallocated results (a GPU would only
enqueue its launches); "torch": the real torch-path measurement on the CPU; "triton": the
Triton path with its launches stubbed (``python -m benchmarks host`` runs this row, with
the targets). ``--buckets``
sets how many buckets the tensors are split into (GPT-2 124M at 25 MB: about 20).

Times are the CPU time of the calling thread (``time.thread_time``; the CPU autograd
engine runs backward and its hooks there), so the load of other processes mostly stays out
of them. Not a test: numbers depend on the machine. No exit status verdict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

import fastgradstats as fgs
from fastgradstats import backward as bwd
from fastgradstats.torch_backend import GroupStats


class _Tiny(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.ones(4)) for _ in range(n))

    def forward(self) -> torch.Tensor:
        # one stacked sum: the graph has n AccumulateGrad nodes and little else
        return torch.stack(list(self.ps)).sum()


def _stub_measure() -> Any:
    cache: dict[int, GroupStats] = {}

    def stub(grads: list[torch.Tensor], norm_type: float) -> GroupStats:
        n = len(grads)
        if n not in cache:
            z = torch.zeros(n)
            c = torch.zeros(n, dtype=torch.int64)
            cache[n] = GroupStats(z, z.clone(), c, c.clone())
        return cache[n]

    return stub


# CPU time of this thread (the CPU autograd engine runs backward, hooks included, on the
# calling thread): on a shared, loaded machine, wall-clock time mostly measures the waiting
_clock = time.thread_time


class _LaunchCounter:
    """Stands in for ``kernels.launch`` (the one launch point): counts, runs nothing."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
        self.count += 1


MODES = ("stubbed", "torch", "triton")


def measure(n: int, buckets: int, rounds: int, batch: int, mode: str) -> dict[str, Any]:
    """Host us per tensor of the hooks during backward, and of finalize vs the floor.

    ``mode``: "stubbed" (torch path, its measurement replaced by preallocated results),
    "torch" (the real torch-path measurement) or "triton" (the Triton path with
    ``kernels.launch`` stubbed, as ``python -m benchmarks host`` measures the other calls;
    needs Triton, and ``TRITON_INTERPRET=1`` on a CPU). The "triton" row also counts the
    launches during one backward and in one finalize."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = _Tiny(n)
    params = list(model.parameters())
    bucket_bytes = max(1, (n * 16) // buckets)
    backend = "triton" if mode == "triton" else "torch"
    real = bwd._measure_bucket
    counter = _LaunchCounter()
    if mode == "stubbed":
        bwd._measure_bucket = _stub_measure()
    if mode == "triton":
        from fastgradstats import kernels

        real_launch, kernels.launch = kernels.launch, counter

    def timed(fn: Any) -> float:
        start = _clock()
        for _ in range(batch):
            fn()
        return (_clock() - start) / batch

    def backward() -> None:
        model().backward()

    try:
        handle = fgs.backward_stats(model, bucket_bytes=bucket_bytes, backend=backend)
        num_buckets = handle.num_buckets
        backward()  # warm-up (the plans' tables are built), then one counted step
        handle.finalize()
        counter.count = 0
        backward()
        launches_backward = counter.count
        handle.finalize()
        launches_finalize = counter.count - launches_backward
        handle.remove()
        noop, hooked, first, fin, flo, ratios = [], [], [], [], [], []
        for _ in range(rounds):
            # interleaved: plain backward, no-op hooks (any hook's floor), the handle
            without = timed(backward)
            removable = [p.register_post_accumulate_grad_hook(_noop) for p in params]
            noop.append((timed(backward) - without) / n * 1e6)
            for r in removable:
                r.remove()
            handle = fgs.backward_stats(model, bucket_bytes=bucket_bytes, backend=backend)
            # a new handle's first backward builds each bucket's table, check and launches
            # (once per handle and layout): timed apart, then the steady state
            start = _clock()
            backward()
            first.append((_clock() - start - without) / n * 1e6)
            handle.finalize()
            spent = 0.0
            for _ in range(batch):  # as in training: a finalize after each backward
                start = _clock()
                backward()
                spent += _clock() - start
                handle.finalize()
            hooked.append((spent / batch - without) / n * 1e6)
            # after backward: finalize against the one-pass floor, on the same gradients
            f_sum = floor_sum = 0.0
            for _ in range(batch):
                backward()
                t0 = _clock()
                hash(tuple(g.data_ptr() for g in [p.grad for p in params]))
                t1 = _clock()
                handle.finalize()
                t2 = _clock()
                floor_sum += t1 - t0
                f_sum += t2 - t1
            handle.remove()
            fin.append(f_sum / batch * 1e6)
            flo.append(floor_sum / batch * 1e6)
            ratios.append(f_sum / floor_sum)
    finally:
        bwd._measure_bucket = real
        if mode == "triton":
            kernels.launch = real_launch
    return {
        "tensors": n,
        "buckets": num_buckets,
        "measure": mode,
        "launches_backward": launches_backward if mode == "triton" else None,
        "launches_finalize": launches_finalize if mode == "triton" else None,
        "noop_hook_us_per_tensor": round(statistics.median(noop), 3),
        "hook_us_per_tensor": round(statistics.median(hooked), 3),
        "first_backward_us_per_tensor": round(statistics.median(first), 3),
        "finalize_us": round(statistics.median(fin), 1),
        "floor_us": round(statistics.median(flo), 1),
        "finalize_x_floor": round(statistics.median(ratios), 2),
    }


def _noop(param: torch.Tensor) -> None:
    return None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backward_hooks")
    parser.add_argument("--quick", action="store_true", help="a few rounds (smoke run)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rounds, batch = (2, 2) if args.quick else (21, 10)
    torch.set_num_threads(1)
    rows = []
    for n, buckets in ((148, 20), (10_000, 20), (10_000, 1)):
        for mode in ("stubbed", "torch"):
            rows.append(measure(n, buckets, rounds, batch if n < 1000 else 2, mode))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'tensors':>8}{'buckets':>8}  {'measure':<8}{'no-op hook':>11}"
              f"{'hook us/tensor':>15}{'(1st bw)':>10}"
              f"{'finalize us':>13}{'floor us':>10}{'x floor':>9}")  # fmt: skip
        for r in rows:
            print(f"{r['tensors']:>8}{r['buckets']:>8}  {r['measure']:<8}"
                  f"{r['noop_hook_us_per_tensor']:>11.2f}{r['hook_us_per_tensor']:>15.2f}"
                  f"{r['first_backward_us_per_tensor']:>10.2f}"
                  f"{r['finalize_us']:>13.1f}{r['floor_us']:>10.1f}"
                  f"{r['finalize_x_floor']:>9.2f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
