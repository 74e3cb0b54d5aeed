"""Timing: medians of many runs, implementations interleaved, inputs rotated.

* CPU: ``time.perf_counter`` around each call. The implementations of one op run in
  round-robin (a different one first each round), so a load spike from another process
  hits all of them alike and the ratios from one run stay fair on a shared machine.
* CUDA: a pair of CUDA events around each call, calls back to back with no sync between
  them (what a training loop pays: max of host overhead and device time), median over
  many calls after a warm-up, in several interleaved blocks (the method of
  ``triton.testing.do_bench``, with input rotation instead of a cache flush).
* Inputs rotate over enough copies of the gradients that one pass is larger than the
  last-level cache, so the cache is not what gets measured.

Nothing here initialises CUDA unless asked to time on a CUDA device.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

ROTATION_BYTES = 256 << 20  # > 4x the L2 of an H100 (50 MiB) and most CPUs' last-level cache
MAX_ROTATION = 8


@dataclass
class Timing:
    """Summary of repeated timings of one implementation, seconds per call."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples: list[float]) -> Timing:
    """Median, quartiles and minimum of ``samples`` (seconds)."""
    if not samples:
        raise ValueError("samples must not be empty")
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(statistics.median(ordered), q1, q3, ordered[0], len(ordered))


def rotation_count(nbytes: int, budget_bytes: float | None = None) -> int:
    """How many input copies make one rotation exceed :data:`ROTATION_BYTES` (1..8),
    limited so the copies fit in ``budget_bytes`` when given."""
    if nbytes <= 0:
        return 1
    want = min(MAX_ROTATION, max(1, math.ceil(ROTATION_BYTES / nbytes)))
    if budget_bytes is not None:
        want = min(want, max(1, int(budget_bytes // nbytes)))
    return want


Fn = Callable[[int], Any]  # fn(i) runs one call on input copy i % n_copies
Reset = Callable[[int], Any] | None  # reset(i), untimed, right after fn(i)


def time_cpu(
    fns: dict[str, Fn],
    *,
    budget_s: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 200,
    warmup: int = 2,
    reset: Reset = None,
) -> dict[str, Timing]:
    """Median wall time per call of each ``fns[name]``, implementations interleaved.

    Runs ``warmup`` untimed rounds, then as many timed rounds as fit in ``budget_s``
    (within ``[min_rounds, max_rounds]``); in round r the order starts at name r mod k.
    ``reset(i)``, when given, runs untimed after each call.
    """
    names = list(fns)
    call = 0
    started = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            fns[name](call)
            if reset is not None:
                reset(call)
            call += 1
    per_round = (time.perf_counter() - started) / max(1, warmup)
    rounds = min_rounds if per_round <= 0 else int(budget_s / per_round)
    rounds = max(min_rounds, min(max_rounds, rounds))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name](call)
            samples[name].append(time.perf_counter() - t0)
            if reset is not None:
                reset(call)
            call += 1
    return {name: summarize(s) for name, s in samples.items()}


def time_cuda(
    fns: dict[str, Fn],
    *,
    budget_s: float = 1.0,
    min_calls: int = 10,
    max_calls: int = 2000,
    blocks: int = 3,
    warmup_s: float = 0.025,
    reset: Reset = None,
) -> dict[str, Timing]:
    """Median device time per call of each ``fns[name]``, measured with CUDA events.

    Per implementation: warm up for ``warmup_s`` (at least 3 calls: compilation, table
    building and allocator growth stay out), estimate the time per call, then time
    ``n`` calls in each of ``blocks`` blocks, the implementations interleaved by block.
    Calls run back to back, an event pair around each, one sync per block; ``reset(i)``,
    when given, is enqueued after the end event of call i, so its work is not timed.
    """
    names = list(fns)
    call = 0
    per_call: dict[str, float] = {}
    for name in names:
        fn = fns[name]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        while n < 3 or time.perf_counter() - t0 < warmup_s:
            fn(call)
            if reset is not None:
                reset(call)
            call += 1
            n += 1
            if n % 8 == 0 or n < 4:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        estimate = 0.0
        for _ in range(5):
            start.record()
            fn(call)
            end.record()
            end.synchronize()
            estimate += start.elapsed_time(end)
            if reset is not None:
                reset(call)
            call += 1
        per_call[name] = max(estimate / 5e3, 1e-7)
    samples: dict[str, list[float]] = {name: [] for name in names}
    share = budget_s / (blocks * len(names))
    for b in range(blocks):
        order = names[b % len(names) :] + names[: b % len(names)]
        for name in order:
            fn = fns[name]
            n = max(min_calls, min(max_calls, int(share / per_call[name])))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            torch.cuda.synchronize()
            for i in range(n):
                starts[i].record()
                fn(call)
                ends[i].record()
                if reset is not None:
                    reset(call)
                call += 1
            torch.cuda.synchronize()
            samples[name] += [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    return {name: summarize(s) for name, s in samples.items()}


def time_fns(device: torch.device, fns: dict[str, Fn], **kwargs: Any) -> dict[str, Timing]:
    """:func:`time_cuda` on a CUDA device, else :func:`time_cpu` (``kwargs`` of time_cpu;
    on CUDA ``budget_s`` is used, and ``min_rounds`` as the minimum calls per block)."""
    if device.type == "cuda":
        return time_cuda(
            fns,
            budget_s=kwargs.get("budget_s", 1.0),
            min_calls=kwargs.get("min_rounds", 10),
            reset=kwargs.get("reset"),
        )
    return time_cpu(fns, **kwargs)


def copy_bandwidth(
    device: torch.device, nbytes: int | None = None, budget_s: float = 1.0
) -> dict[str, Any]:
    """Measured device copy bandwidth: ``dst.copy_(src)`` of a large buffer.

    GB/s counts bytes read plus bytes written (2 x ``nbytes``) over the median time, the
    same accounting as the ops' GB/s. Default buffer: 256 MiB on the CPU; on CUDA
    1 GiB, or an eighth of the free memory when that is smaller.
    """
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(1 << 30, free // 8))
        else:
            nbytes = 256 << 20
    numel = max(1, nbytes // 4)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timing = time_fns(device, {"copy": lambda _i: dst.copy_(src)}, budget_s=budget_s)["copy"]
    moved = 2 * numel * 4
    return {
        "buffer_bytes": numel * 4,
        "bytes_moved": moved,
        "median_s": timing.median_s,
        "gbps": moved / timing.median_s / 1e9,
        "method": "dst.copy_(src), (read + write bytes) / median time",
    }


__all__ = [
    "ROTATION_BYTES",
    "Timing",
    "copy_bandwidth",
    "rotation_count",
    "summarize",
    "time_cpu",
    "time_cuda",
    "time_fns",
]
