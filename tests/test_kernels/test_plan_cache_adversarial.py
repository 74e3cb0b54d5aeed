"""The fused plan cache never serves a plan to gradients it was not built for.

A plan is found by the list's head (length, end addresses) and checked in runs of
``CHECK_CHUNK`` gradients (``Plan.matches``). Here every kind of change at the same
address, in any run, a short last run, ``None`` gradients, duplicates, lists that share a
head, non-fusable lists at the same addresses and changed tiling settings: each call must
equal torch's, and nothing outside the gradients may be written."""

from __future__ import annotations

import pytest
import torch
from helpers import params_with_grads

from fastgradstats import dispatch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import fastgradstats as fgs
from fastgradstats import kernels, triton_backend

pytestmark = pytest.mark.backend_independent  # every call names the Triton backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_blocks(small_kernel_blocks):
    """Every test here runs with the small blocks (tests/conftest.py)."""


def ref_norm(grads, p=2.0):
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.double(), p) for g in grads]), p
    )


def check(grads, p=2.0):
    expected = torch.nn.utils.get_total_norm([g.clone() for g in grads], p)
    got = fgs.get_total_norm(grads, norm_type=p, backend="triton")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


class Sub(torch.Tensor):
    pass


def _changed_views(buf, where, change):
    grads = [buf[64 * i : 64 * i + 64] for i in range(5)]
    base = buf[64 * where :]
    if change in ("fp16", "bf16"):
        new = base[:64].view(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[change]))[:64]
    elif change == "shorter":
        new = base[:40]
    elif change == "longer":
        new = base[:100] if where < 4 else base[:64]
    elif change == "gapped":
        new = base[:128:2] if where < 4 else base[:64:2]
    elif change == "transposed":
        new = base[:64].view(8, 8).t()
    elif change == "subclass":
        new = base[:64].as_subclass(Sub)
    else:
        new = torch._neg_view(base[:64])
    grads[where] = new
    return grads


def _plain(g):
    g = g.resolve_neg() if g.is_neg() else g
    return g.as_subclass(torch.Tensor) if type(g) is not torch.Tensor else g


@pytest.mark.parametrize("chunk", [1, 3, 1024])  # runs of 1, 3 (last run short), one run
@pytest.mark.parametrize("where", [0, 3, 4])
@pytest.mark.parametrize(
    "change", ["fp16", "bf16", "shorter", "longer", "gapped", "transposed", "subclass", "negview"]
)
def test_a_gradient_changed_at_its_address_in_any_run_is_seen(chunk, where, change, monkeypatch):
    monkeypatch.setattr(triton_backend, "CHECK_CHUNK", chunk)
    gen = torch.Generator().manual_seed(where)
    buf = (torch.randn(5 * 64 + 64, generator=gen) * 3).to(DEVICE)
    grads = [buf[64 * i : 64 * i + 64] for i in range(5)]  # last run short for chunk 2/3/4
    check(grads)
    check(grads)  # steady (cached_plan)
    changed = _changed_views(buf, where, change)
    if change in ("fp16", "bf16"):
        changed[where].copy_(torch.randn(64, generator=gen) * 5)
    assert changed[where].data_ptr() == grads[where].data_ptr()
    twin = buf.clone()
    ref_views = [_plain(g) for g in _changed_views(twin, where, change)]
    sentinel = buf.clone()
    total = fgs.get_total_norm(changed, backend="triton")
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(ref_views), rtol=1e-6, atol=0)
    torch.testing.assert_close(buf, sentinel, rtol=0, atol=0)
    ref_total = torch.nn.utils.clip_grad_norm_(params_with_grads(ref_views), 1.0, foreach=False)
    total = fgs.clip_grad_norm_(params_with_grads(changed), 1.0, backend="triton")
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    if change != "negview":
        torch.testing.assert_close(buf, twin, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pos", ["start", "middle", "end", "all"])
def test_none_gradients_anywhere_are_left_out(pos):
    ps = params_with_grads([torch.randn(n, device=DEVICE) for n in (30, 200, 7, 90)])
    extra = torch.nn.Parameter(torch.zeros(5, device=DEVICE))
    order = {
        "start": [extra, *ps],
        "middle": [*ps[:2], extra, *ps[2:]],
        "end": [*ps, extra],
        "all": [extra],
    }[pos]
    for _ in range(3):
        s = fgs.grad_stats(order, backend="triton")
        present = [p.grad for p in order if p.grad is not None]
        if not present:
            assert len(s.names) == 0
            continue
        torch.testing.assert_close(s.total_norm.double(), ref_norm(present), rtol=1e-5, atol=0)
        t = fgs.clip_grad_norm_(order, 1e9, backend="triton")
        torch.testing.assert_close(t.double(), ref_norm(present), rtol=1e-5, atol=0)


def test_one_gradient_and_repeated_gradients():
    buf = torch.randn(256, device=DEVICE)
    a = buf[:64]
    check([a])
    check([a])
    bf16 = a.view(torch.bfloat16)[:64]  # values of its own (raw fp32 bits can be NaN)
    bf16.copy_(torch.randn(64, generator=torch.Generator().manual_seed(4)))
    check([a])
    check([bf16])
    check([a[:32]])
    check([a, a])
    check([a, a, a])
    check([a, bf16, a])
    check([a, a[:10], a])


def test_three_lists_sharing_a_head_alternate():
    gs = [torch.randn(n, device=DEVICE) for n in (30, 50, 50, 50, 20)]
    lists = [[gs[0], gs[1], gs[4]], [gs[0], gs[2], gs[4]], [gs[0], gs[3], gs[4]]]
    for _ in range(3):
        for lst in lists:
            check(lst)


def test_a_non_fusable_list_at_the_same_addresses_as_a_fusable_one():
    buf = torch.randn(512, device=DEVICE)
    a, c = torch.randn(30, device=DEVICE), torch.randn(20, device=DEVICE)
    dense = buf[:64]
    gapped = buf[:128:2]
    for _ in range(3):
        for lst in ([a, dense, c], [a, gapped, c], [a, buf[200:264], c]):
            check(lst)
    # same addresses: fusable and non-fusable alternately
    for _ in range(3):
        check([a, dense, c])
        check([a, gapped, c])


def test_tiling_changed_between_calls(monkeypatch):
    grads = [torch.randn(n, device=DEVICE) for n in (300, 17, 1000)]
    for block in (128, 64, 256, 128, 16):
        monkeypatch.setattr(kernels, "BLOCK", block)
        monkeypatch.setattr(kernels, "TILE", min(32, block))
        check(grads)
        check(grads, 1.0)
        check(grads, float("inf"))


def test_chunk_changed_after_build(monkeypatch):
    buf = torch.randn(640, device=DEVICE)
    grads = [buf[64 * i : 64 * i + 64] for i in range(10)]
    monkeypatch.setattr(triton_backend, "CHECK_CHUNK", 3)
    check(grads)
    monkeypatch.setattr(triton_backend, "CHECK_CHUNK", 1024)
    changed = list(grads)
    changed[7] = buf[448 : 448 + 64].view(torch.bfloat16)[:64]
    # bf16 values of their own: reinterpreted fp32 bits can be NaN patterns (and the fp32
    # view of bf16 pairs stays finite: its high half is a finite bf16)
    changed[7].copy_(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    check(changed)
    check(grads)


def test_forty_layouts_evicting_each_other():
    bufs = [torch.randn(64 * 4, device=DEVICE) for _ in range(40)]
    lists = [[b[:64], b[64:128], b[128:]] for b in bufs]
    for _ in range(2):
        for lst in lists:
            check(lst)


def test_empty_and_scalar_gradients():
    z1, z2 = torch.empty(0, device=DEVICE), torch.empty(0, device=DEVICE)
    a = torch.randn(50, device=DEVICE)
    for lst in ([z1, a, z2], [z2, a, z1], [z1, z2], [torch.randn((), device=DEVICE), a]):
        check(lst)
        check(lst)


def test_grad_mode_and_inference_mode():
    grads = [torch.randn(n, device=DEVICE) for n in (64, 64, 64)]
    check(grads)
    with torch.no_grad():
        check(grads)
    with torch.inference_mode():
        check(grads)
    check([g.clone().requires_grad_() for g in grads])


@pytest.mark.parametrize("where", [0, 1023, 1024, 2047, 2048, 2099])
def test_default_runs_of_a_long_list_with_a_short_last_run(where):
    """2,100 gradients: runs of 1,024, 1,024 and 52 with the default ``CHECK_CHUNK``. The
    plan's own check (no launch: thousands of interpreted programs would take minutes)
    accepts the unchanged list and refuses a change at either edge of any run."""
    assert triton_backend.CHECK_CHUNK == 1024
    buf = torch.randn(2100 * 4 + 8, device=DEVICE)
    grads = [buf[4 * i : 4 * i + 4] for i in range(2100)]
    plan = triton_backend.build_plan(grads)
    assert [(lo, hi) for lo, hi, _, _ in plan.chunks] == [(0, 1024), (1024, 2048), (2048, 2100)]
    assert plan.matches(grads) and plan.matches(list(grads))
    for new in (
        buf[4 * where : 4 * where + 8].view(torch.bfloat16)[:4],  # same address and size
        buf[4 * where : 4 * where + 8 : 2],  # gapped
        buf[4 * where : 4 * where + 3],  # shorter
        buf[4 * where + 4 : 4 * where + 8],  # another address
    ):
        changed = list(grads)
        changed[where] = new
        assert not plan.matches(changed)
    assert not plan.matches(grads[:-1]) and not plan.matches([*grads, grads[0]])
