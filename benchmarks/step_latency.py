"""``python -m benchmarks.step_latency``: the time from the end of backward to the end of
``optimizer.step()``, for torch's clip, today's fastgradstats clip and the in-backward
handle (issue 18; the ``step-latency`` step of ``python -m benchmarks gpu-check``).

Three copies of one GPT-2 (``transformers.GPT2LMHeadModel``, dropout off, the same
weights), each with an AdamW (fused on CUDA), on the same batch each round:

- ``torch``: ``loss.backward()``, ``torch.nn.utils.clip_grad_norm_(params, max_norm)``,
  ``optimizer.step()``;
- ``after``: the same with ``fastgradstats.clip_grad_norm_`` (one fused read after
  backward);
- ``during``: ``handle = fastgradstats.backward_stats(model)`` measures each bucket as
  backward finishes it; after backward ``handle.clip_grad_norm_(max_norm)`` only
  finalizes (and scales when clipping);
- ``during-side`` (CUDA only): the same with ``backward_stats(model, side_stream=True)``,
  the bucket launches on a stream of their own that can overlap the rest of backward.

No optimizer hand-off on any side, so the three differ only in the clip. On CUDA the
times are CUDA events recorded before backward, after it and after ``optimizer.step()``
on the current stream (GPU time, host gaps included); on a CPU (``--device cpu``, for
tests) ``time.perf_counter`` at the same points. The sides run in a rotating order; the
figures are medians over rounds of ``after_backward_ms`` (end of backward to end of step)
and ``total_ms`` (start of backward to end of step), and of the per-round ratios
``during / after`` and ``during / torch`` (and the same for ``during-side``).

Models: ``gpt2-124m`` (fp32, transformers' defaults) and ``gpt2-1b-bf16`` (18 layers, 2048
wide, 16 heads: about 1.0B parameters, bf16 weights and gradients); ``--quick``: a
2-layer, 64-wide GPT-2 in fp32 (seconds on a CPU). Each round also checks the totals:
``during`` (and ``during-side``) equals ``after`` exactly, and ``after`` is within float32
reduction-order error of torch's (bf16: within one bf16 rounding).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .in_backward import NO_DROPOUT, TINY_GPT2, timed_step

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "gpt2-124m": ({}, "float32"),
    "gpt2-1b-bf16": ({"n_layer": 18, "n_embd": 2048, "n_head": 16}, "bfloat16"),
}
SIDES = ("torch", "after", "during", "during-side")  # the last on CUDA only
IN_BACKWARD = ("during", "during-side")
# |total - torch's total| / torch's total: float32 reduction order; bf16 totals round once
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def _model(name: str, quick: bool, device: Any) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes, dtype = (TINY_GPT2, "float32") if quick else MODELS[name]
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(GPT2Config(**NO_DROPOUT, **sizes))
    return model.to(getattr(torch, dtype)), dtype


class _Clock:
    """CUDA events on the current stream, or ``perf_counter`` on a CPU."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._torch = torch

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return 1e3 * (end - start)
        end.synchronize()
        return float(start.elapsed_time(end))


def _handle_clip(handle: Any, max_norm: float) -> Any:
    return lambda: handle.clip_grad_norm_(max_norm)[0]


def measure(name: str, rounds: int, batch: int, seq: int, quick: bool, device: Any,
            max_norm: float) -> dict[str, Any]:  # fmt: skip
    """Time the three sides for ``rounds`` rounds (plus one warm-up round)."""
    import torch

    import fastgradstats as fgs

    base, dtype = _model(name, quick, device)
    sides = SIDES if device.type == "cuda" else SIDES[:3]
    models = {side: copy.deepcopy(base) for side in sides}
    del base
    fused = device.type == "cuda"
    optimizers = {
        side: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=fused) for side, m in models.items()
    }
    handles = {
        side: fgs.backward_stats(models[side], side_stream=side == "during-side")
        for side in sides
        if side in IN_BACKWARD
    }
    clips = {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(models["torch"].parameters(), max_norm),
        "after": lambda: fgs.clip_grad_norm_(models["after"].parameters(), max_norm),
        **{side: _handle_clip(handle, max_norm) for side, handle in handles.items()},
    }
    clock = _Clock(device)
    vocab = models["torch"].config.vocab_size
    gen = torch.Generator().manual_seed(1)

    def one_side(side: str, tokens: Any) -> tuple[float, float, Any]:
        def clip_and_step() -> Any:
            total = clips[side]()
            optimizers[side].step()
            return total

        (start, mid, end), total = timed_step(models[side], tokens, clip_and_step, clock.mark)
        return clock.ms(start, end), clock.ms(mid, end), total.detach().float().cpu()

    samples: list[dict[str, Any]] = []
    for r in range(rounds + 1):  # round 0 warms every side up (allocator, plans, hooks)
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        shift = r % len(sides)
        order = sides[shift:] + sides[:shift]
        times = {side: one_side(side, tokens) for side in order}
        if r == 0:
            continue
        sample: dict[str, Any] = {}
        for side in sides:
            sample[f"{side}_total_ms"], sample[f"{side}_after_backward_ms"] = times[side][:2]
        totals = {side: times[side][2] for side in sides}
        for side in handles:
            for other in ("after", "torch"):
                sample[f"after_backward_{side}_over_{other}"] = (
                    sample[f"{side}_after_backward_ms"] / sample[f"{other}_after_backward_ms"]
                )
                sample[f"total_{side}_over_{other}"] = (
                    sample[f"{side}_total_ms"] / sample[f"{other}_total_ms"]
                )
        # the sides' weights drift apart by their updates, so only round 1 compares
        if r == 1:
            reference = float(totals["torch"])
            sample["totals"] = {side: float(t) for side, t in totals.items()}
            sample["during_equals_after"] = all(
                torch.equal(totals[side], totals["after"]) for side in handles
            )
            error = abs(float(totals["after"]) - reference)
            sample["after_close_to_torch"] = error <= TOLERANCE[dtype] * abs(reference)
        samples.append(sample)
    first = samples[0]
    keys = [k for k in first if k.endswith("_ms") or "_over_" in k]
    return {
        "model": "gpt2-tiny" if quick else name,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in models["torch"].parameters()),
        "tensors": len(list(models["torch"].parameters())),
        "batch": batch,
        "seq": seq,
        "rounds": rounds,
        "max_norm": max_norm,
        "sides": list(sides),
        "buckets": handles["during"].num_buckets,
        "medians": {k: statistics.median(s[k] for s in samples) for k in keys},
        "round1_totals": first["totals"],
        "during_equals_after": first["during_equals_after"],
        "after_close_to_torch": first["after_close_to_torch"],
        "samples": samples,
    }


def format_result(result: dict[str, Any]) -> str:
    med = result["medians"]
    lines = [
        f"{result['model']} ({result['parameters'] / 1e6:.1f}M parameters, {result['dtype']}, "
        f"{result['tensors']} tensors, {result['buckets']} buckets), batch {result['batch']} x "
        f"{result['seq']}, {result['rounds']} rounds",
        f"  {'side':<8}{'backward + step ms':>20}{'after backward ms':>20}",
    ]
    for side in result["sides"]:
        lines.append(f"  {side:<8}{med[f'{side}_total_ms']:>20.2f}"
                     f"{med[f'{side}_after_backward_ms']:>20.2f}")  # fmt: skip
    for side in IN_BACKWARD:
        if side in result["sides"]:
            lines.append(
                f"  {side} / after: after backward {med[f'after_backward_{side}_over_after']:.3f}, "
                f"whole {med[f'total_{side}_over_after']:.3f}; {side} / torch: after backward "
                f"{med[f'after_backward_{side}_over_torch']:.3f}, "
                f"whole {med[f'total_{side}_over_torch']:.3f}"
            )
    lines.append(f"  totals of round 1 {result['round1_totals']}: during == after "
                 f"{result['during_equals_after']}, after ~ torch "
                 f"{result['after_close_to_torch']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_latency",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="a tiny GPT-2 (seconds on a CPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for step-latency-<device>-<date>.json (default {RESULTS}; "
                             "--quick writes only with --out)")  # fmt: skip
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = []
    for name in args.models[:1] if args.quick else args.models:
        runs.append(measure(name, args.rounds, args.batch, args.seq, args.quick, device,
                            args.max_norm))  # fmt: skip
        print(format_result(runs[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "meta": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "method": "CUDA events (CPU: perf_counter); rotating side order; medians",
        },
        "runs": runs,
        "ok": all(r["during_equals_after"] and r["after_close_to_torch"] for r in runs),
    }
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tag = device.type if device.type == "cpu" else result["meta"]["device"].lower()
        path = out / f"step-latency-{tag.replace(' ', '-')}-{result['meta']['date_utc'][:10]}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["IN_BACKWARD", "MODELS", "SIDES", "main", "measure"]
