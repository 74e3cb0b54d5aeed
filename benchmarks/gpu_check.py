"""``python -m benchmarks gpu-check``: everything that needs a GPU, in one command (< 10 min).

Steps, each with its own time limit, each recorded (status, seconds, details) in ONE
results JSON, ``benchmarks/results/gpu-check-<device>-<date>.json``:

1. ``pytest``: the test suite on CUDA (the kernels compiled and run, not interpreted);
2. ``big-tensor``: a bf16 gradient of 2**31 + 2**20 + 3 elements (64-bit offsets):
   its norm against a float64 reference, then a clip, checked at the far end;
3. ``cuda-graph``: ``clip_grad_norm_`` + a fused AdamW step captured in a CUDA graph
   after a warm-up, replayed on new gradients, compared with the same steps run eagerly
   by torch;
4. ``no-sync``: the steady-state calls under ``torch.cuda.set_sync_debug_mode("error")``
   (any host sync raises);
5. ``host``: ``python -m benchmarks host`` on CUDA tensors (launches stubbed);
6. ``histogram``: ``python -m benchmarks.histogram --device cuda`` for bf16 and fp32: the
   fused histogram pass against the plain stats pass (target <= 1.2x) and the torch code;
7. ``benchmark``: the full benchmark suite, ``python -m benchmarks --device cuda``;
8. ``plan-safety``: issue 19's GPU-only hazards of the plan cache, in a child process (a
   regression may crash the CUDA context): a graph replayed after its plan was evicted
   and ``clear_plans()`` ran, and freed blocks were handed out again (item 12); a table
   built behind a long kernel on one stream used at once on another, and evicted while
   that stream's kernels are pending (item 13); two threads on one stream alternating
   p=2 and p=inf on one plan (item 14); a parameter passed twice, both backends, against
   torch's in-order result (item 15);
9. ``step-latency``: ``python -m benchmarks.step_latency --device cuda``: the time from
   the end of backward to the end of ``optimizer.step()`` (CUDA events) with torch's
   clip, today's clip and the in-backward handle, on GPT-2 124M and a 1B bf16 GPT-2
   (issue 18).

What CUDA-graph capture requires (checked by step 3): one eager call first (it builds
the plan: the table's H2D copy and the workspace of the capturing stream are made then);
the same gradient tensors at every replay (refill them with ``copy_``, do not reassign
``.grad``); the returned total/stats are the graph's static outputs, overwritten at each
replay; ``error_if_nonfinite=True`` cannot be captured (it syncs by design).

Without CUDA it says so, writes the JSON with every step ``"skipped: needs CUDA"``, and
exits with status 2 after checking what a CPU can check (the steps exist and import).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LIMITS_S = {
    "pytest": 170,
    "big-tensor": 60,
    "cuda-graph": 60,
    "no-sync": 45,
    "host": 60,
    "histogram": 50,
    "benchmark": 75,
    "plan-safety": 25,
    "step-latency": 55,
}  # fmt: skip (sums to <= 10 min of limits, one device call; typical ~5 min)


def _run(cmd: list[str], limit: int, env: dict | None = None) -> dict[str, Any]:
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit,
                              env=env)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        return {"ok": False, "error": f"timed out after {limit} s", "tail": str(tail)}
    return {"ok": proc.returncode == 0, "returncode": proc.returncode,
            "tail": (proc.stdout + proc.stderr)[-4000:]}  # fmt: skip


def step_pytest() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                 "tests/"], LIMITS_S["pytest"] - 5, env)  # fmt: skip


def step_big_tensor() -> dict[str, Any]:
    import torch

    import fastgradstats as fgs

    n = 2**31 + 2**20 + 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    param = torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16, device="cuda"))
    param.grad = torch.empty_like(param).normal_(generator=gen)
    grad = param.grad
    grad[-1] = 7.0  # the far end must be read
    ref = sum(float(c.double().square().sum()) for c in grad.split(2**28)) ** 0.5
    ours = float(fgs.get_total_norm([grad], backend="triton"))
    rel = abs(ours - ref) / ref
    tail_before = grad[-4:].float().clone()
    fgs.clip_grad_norm_([param], 0.5 * ours, backend="triton")
    coef = 0.5 * ours / (ours + 1e-6)
    tail_ok = bool(torch.allclose(grad[-4:].float(), tail_before * coef, rtol=1e-2, atol=0))
    return {"ok": rel < 1e-3 and tail_ok, "numel": n, "norm": ours, "reference": ref,
            "rel_err": rel, "far_end_scaled": tail_ok}  # fmt: skip


def step_cuda_graph() -> dict[str, Any]:
    import torch

    import fastgradstats as fgs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                                torch.nn.Linear(512, 64)).cuda()  # fmt: skip
    twin = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                               torch.nn.Linear(512, 64)).cuda()  # fmt: skip
    twin.load_state_dict(model.state_dict())
    params, twins = list(model.parameters()), list(twin.parameters())
    for p, q in zip(params, twins):
        p.grad = torch.zeros_like(p)
        q.grad = torch.zeros_like(q)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
    ref_opt = torch.optim.AdamW(twins, lr=1e-3, fused=True, capturable=True)

    def fresh_grads(seed: int) -> list[torch.Tensor]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(p.shape, device="cuda", generator=g) for p in params]

    def step() -> torch.Tensor:
        total = fgs.clip_grad_norm_(params, 1.0, backend="triton")
        opt.step()
        return total

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture stream: plan + workspace
        for seed in range(3):
            for p, g in zip(params, fresh_grads(seed)):
                p.grad.copy_(g)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # the stream the warm-up ran on
        static_total = step()
    # the twin replays the same history eagerly with torch
    for seed in range(3):
        for q, g in zip(twins, fresh_grads(seed)):
            q.grad.copy_(g)
        torch.nn.utils.clip_grad_norm_(twins, 1.0)
        ref_opt.step()
    worst = 0.0
    for seed in range(10, 15):
        grads = fresh_grads(seed)
        for p, q, g in zip(params, twins, grads):
            p.grad.copy_(g)
            q.grad.copy_(g)
        graph.replay()
        ref_total = torch.nn.utils.clip_grad_norm_(twins, 1.0)
        ref_opt.step()
        torch.cuda.synchronize()
        worst = max(worst, abs(float(static_total) - float(ref_total)) / float(ref_total))
        for p, q in zip(params, twins):
            worst = max(worst, float((p - q).abs().max() / q.abs().max().clamp_min(1e-12)))
    return {"ok": worst < 1e-4, "replays": 5, "worst_rel_diff": worst}


def step_no_sync() -> dict[str, Any]:
    import torch

    import fastgradstats as fgs

    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (7, 4096, 1 << 20)]
    for p in params:
        p.grad = torch.randn_like(p)
    calls: dict[str, Callable[[], Any]] = {
        "clip_grad_norm_": lambda: fgs.clip_grad_norm_(params, 0.5),
        "clip_grad_norm_(return_stats)": lambda: fgs.clip_grad_norm_(params, 0.5,
                                                                     return_stats=True),
        "grad_stats": lambda: fgs.grad_stats(params),
        "get_total_norm": lambda: fgs.get_total_norm([p.grad for p in params]),
        "clip_grad_value_": lambda: fgs.clip_grad_value_(params, 0.1),
    }  # fmt: skip
    failed = {}
    for name, call in calls.items():
        call()  # warm-up (the plan's first H2D copy is pinned and non-blocking anyway)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        except RuntimeError as exc:
            failed[name] = str(exc)[:300]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"ok": not failed, "calls": list(calls), "failed": failed}


def step_host() -> dict[str, Any]:
    return _run([sys.executable, "-m", "benchmarks", "host", "--device", "cuda"],
                LIMITS_S["host"] - 5)  # fmt: skip


def step_histogram() -> dict[str, Any]:
    """Issue 12's GPU target: grad_stats(histogram=True) / grad_stats <= 1.2 (GPT-2, bf16
    and fp32), the fused counts checked against numpy.histogram."""
    out: dict[str, Any] = {"ok": True}
    for dtype in ("bf16", "fp32"):
        run = _run([sys.executable, "-m", "benchmarks.histogram", "--device", "cuda",
                    "--dtype", dtype, "--budget", "4"], LIMITS_S["histogram"] // 2 - 3)  # fmt: skip
        out[dtype] = run
        out["ok"] = out["ok"] and run["ok"]
    return out


def step_benchmark() -> dict[str, Any]:
    return _run([sys.executable, "-m", "benchmarks", "--device", "cuda", "--budget", "1"],
                LIMITS_S["benchmark"] - 5)  # fmt: skip


def _check_graph_after_eviction(device: str) -> dict[str, Any]:
    """Item 12: a captured clip replays correctly after its plan left the LRU, after
    ``clear_plans()``, and after freed blocks were handed out again."""
    import gc

    import torch

    import fastgradstats as fgs
    from fastgradstats import triton_backend
    from fastgradstats.kernels import tables

    sizes = (1000, 4096, 33)
    params = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in sizes]
    twins = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in sizes]
    for p in params:
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capturing stream
        for _ in range(2):
            fgs.clip_grad_norm_(params, 1.0, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        static_total = fgs.clip_grad_norm_(params, 1.0, backend="triton")
    for i in range(triton_backend.PLAN_CACHE_SIZE + 4):  # other layouts evict the plan
        fgs.get_total_norm([torch.randn(5 + i, device=device) for _ in range(3)],
                           backend="triton")  # fmt: skip
    triton_backend.clear_plans()
    tables.clear_cache()
    gc.collect()
    junk = [torch.full((64,), -1, dtype=torch.int64, device=device) for _ in range(2000)]
    worst = 0.0
    for seed in range(3):
        gen = torch.Generator(device=device).manual_seed(seed)
        grads = [torch.randn(n, device=device, generator=gen) * 10 for n in sizes]
        for p, q, g in zip(params, twins, grads):
            p.grad.copy_(g)
            q.grad = g.clone()
        graph.replay()
        ref_total = torch.nn.utils.clip_grad_norm_(twins, 1.0)
        torch.cuda.synchronize()
        worst = max(worst, abs(float(static_total) - float(ref_total)) / float(ref_total))
        for p, q in zip(params, twins):
            worst = max(worst, float((p.grad - q.grad).abs().max() / q.grad.abs().max()))
    del junk
    return {"ok": worst < 1e-5, "worst_rel_diff": worst}


def _check_cross_stream(device: str) -> dict[str, Any]:
    """Item 13: a plan built on stream A (its copy queued behind a long kernel) is used at
    once on stream B; then evicted while B's kernels are pending, A reusing freed memory."""
    import gc

    import torch

    import fastgradstats as fgs
    from fastgradstats import triton_backend

    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    gen = torch.Generator(device=device).manual_seed(0)
    out: dict[str, Any] = {}
    for case in ("copy-then-other-stream", "evicted-while-pending"):
        triton_backend.clear_plans()
        grads = [torch.randn(n, device=device, generator=gen) for n in (3000, 77, 1 << 16)]
        ref = torch.linalg.vector_norm(torch.cat(grads))
        torch.cuda.synchronize()
        if case == "copy-then-other-stream":
            with torch.cuda.stream(a):
                torch.cuda._sleep(100_000_000)  # the table's H2D copy waits behind this
                fgs.get_total_norm(grads, backend="triton")
            with torch.cuda.stream(b):
                total = fgs.get_total_norm(grads, backend="triton")
        else:
            with torch.cuda.stream(a):
                fgs.get_total_norm(grads, backend="triton")
            torch.cuda.synchronize()
            with torch.cuda.stream(b):
                torch.cuda._sleep(100_000_000)  # B's launches below stay pending
                total = fgs.get_total_norm(grads, backend="triton")
            triton_backend.clear_plans()  # frees the table (allocated on A)
            gc.collect()
            with torch.cuda.stream(a):  # A may reuse it only once B is done with it
                junk = [torch.full((64,), -1, dtype=torch.int64, device=device)
                        for _ in range(2000)]  # fmt: skip
            del junk
        torch.cuda.synchronize()
        out[case] = abs(float(total) - float(ref)) / float(ref)
    out["ok"] = all(v < 1e-5 for v in out.values())
    return out


def _check_threads(device: str, calls: int = 200) -> dict[str, Any]:
    """Item 14: two threads on one stream alternate p=2 and p=inf on the same plan (they
    share its workspace); every result must be its own."""
    import threading

    import torch

    import fastgradstats as fgs

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=gen).to(device) for n in (5000, 31, 700)]
    flat = torch.cat(grads)
    refs = {p: torch.linalg.vector_norm(flat, p) for p in (2.0, float("inf"))}
    fgs.get_total_norm(grads, backend="triton")  # one plan for both threads
    results: dict[float, list] = {p: [] for p in refs}
    errors: list[str] = []

    def work(p: float) -> None:
        try:
            for _ in range(calls):
                results[p].append(fgs.get_total_norm(grads, p, backend="triton"))
        except Exception as exc:  # recorded: the check fails, the others still run
            errors.append(repr(exc))

    pool = [threading.Thread(target=work, args=(p,)) for p in refs]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wrong = sum(
        int(not torch.allclose(r.cpu(), refs[p].cpu(), rtol=1e-5, atol=0))
        for p, rs in results.items() for r in rs
    )  # fmt: skip
    return {"ok": not errors and wrong == 0, "calls": 2 * calls, "wrong": wrong,
            "errors": errors[:3]}  # fmt: skip


def _check_duplicates(device: str) -> dict[str, Any]:
    """Item 15: a parameter passed twice is scaled twice, in order, on both backends: bit
    for bit ``g * c * c`` (each product rounded), with ``c`` from the returned total."""
    import torch

    import fastgradstats as fgs

    out: dict[str, Any] = {}
    for backend in ("triton", "torch"):
        gen = torch.Generator().manual_seed(2)
        values = [torch.randn(n, generator=gen).mul(3).to(device) for n in (40_000, 900)]
        params = [torch.nn.Parameter(torch.zeros_like(v)) for v in values]
        for p, v in zip(params, values):
            p.grad = v.clone()
        total = fgs.clip_grad_norm_([params[0], params[1], params[0]], 1.0, backend=backend)
        coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        expected = [values[0] * coef * coef, values[1] * coef]
        out[backend] = all(bool(torch.equal(p.grad, e)) for p, e in zip(params, expected))
    out["ok"] = all(out.values())
    return out


def plan_safety_checks(device: str = "cuda") -> dict[str, Any]:
    """The ``plan-safety`` checks on ``device``; those that need CUDA graphs or streams
    are skipped elsewhere (the CPU test of this file runs the rest, interpreted)."""
    import torch

    checks = {"threads": _check_threads, "duplicates": _check_duplicates}
    if torch.device(device).type == "cuda":
        checks = {"graph-after-eviction": _check_graph_after_eviction,
                  "cross-stream": _check_cross_stream, **checks}  # fmt: skip
    out: dict[str, Any] = {}
    for name, check in checks.items():
        try:
            out[name] = check(device)
        except Exception:
            out[name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def step_step_latency() -> dict[str, Any]:
    """Issue 18's row: end of backward to end of ``optimizer.step()`` (CUDA events) for
    torch's clip, today's clip and the in-backward handle, GPT-2 124M fp32 and a 1B bf16
    GPT-2 (``python -m benchmarks.step_latency``; its JSON goes to benchmarks/results)."""
    return _run([sys.executable, "-m", "benchmarks.step_latency", "--device", "cuda",
                 "--rounds", "8"], LIMITS_S["step-latency"] - 5)  # fmt: skip


def step_plan_safety() -> dict[str, Any]:
    code = ("import json\nfrom benchmarks.gpu_check import plan_safety_checks\n"
            "print(json.dumps(plan_safety_checks('cuda')))")  # fmt: skip
    run = _run([sys.executable, "-c", code], LIMITS_S["plan-safety"] - 3)
    try:
        result = json.loads(run["tail"].strip().splitlines()[-1])
    except (ValueError, IndexError, KeyError):
        return run  # crashed or timed out: its tail says how
    return result


STEPS: dict[str, Callable[[], dict[str, Any]]] = {
    "pytest": step_pytest,
    "big-tensor": step_big_tensor,
    "cuda-graph": step_cuda_graph,
    "no-sync": step_no_sync,
    "host": step_host,
    "histogram": step_histogram,
    "benchmark": step_benchmark,
    "plan-safety": step_plan_safety,
    "step-latency": step_step_latency,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__
                                     .split("\n")[0])  # fmt: skip
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    import torch

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    result: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "steps": {},
    }
    if not cuda:
        print("gpu-check needs a CUDA device (and TRITON_INTERPRET unset); none here. "
              "Nothing was measured.", file=sys.stderr)  # fmt: skip
        for name in args.steps:
            result["steps"][name] = {"ok": None, "status": "skipped: needs CUDA",
                                     "limit_s": LIMITS_S[name]}  # fmt: skip
    else:
        for name in args.steps:
            start = time.perf_counter()
            try:
                outcome = STEPS[name]()
            except Exception:  # a failed step is recorded, the others still run
                outcome = {"ok": False, "error": traceback.format_exc()[-3000:]}
            outcome["seconds"] = round(time.perf_counter() - start, 1)
            outcome["limit_s"] = LIMITS_S[name]
            result["steps"][name] = outcome
            print(f"{name:<12} {'ok' if outcome['ok'] else 'FAILED'} ({outcome['seconds']} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    result["ok"] = all(s["ok"] for s in result["steps"].values()) if cuda else None
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "none" if not cuda else result["meta"]["device"].lower().replace(" ", "-")
    path = args.out / f"gpu-check-{tag}-{result['meta']['date_utc'][:10]}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {path}")
    if not cuda:
        return 2
    return 0 if result["ok"] else 1


__all__ = ["LIMITS_S", "STEPS", "main"]
