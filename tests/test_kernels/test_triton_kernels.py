"""The Triton kernels and their tensor tables, run through the CPU interpreter (or CUDA).

Small blocks (128 elements) and a small finalize chunk make little tensors cross block and
chunk boundaries, so the table logic is exercised at interpreter speed. References are
float64 torch on the same values; scale/clamp are compared bit for bit with torch.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HostSyncError

from fastgradstats import dispatch

pytest.importorskip("triton")  # only a missing Triton skips: a broken backend must fail
if not (torch.cuda.is_available() or dispatch.triton_interpreter_on()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import fastgradstats as fgs
from fastgradstats import kernels, torch_backend, triton_backend
from fastgradstats.kernels import scale as scale_kernels
from fastgradstats.kernels import stats as stats_kernels
from fastgradstats.kernels import tables

pytestmark = pytest.mark.backend_independent  # every call pins backend="triton" or a kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 128
TILE = 32
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORMS = [1.0, 2.0, math.inf]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Small blocks, loop steps and finalize chunks, and fresh caches, for every test.

    TILE = BLOCK / 4: a full block takes 4 loop steps, so the steady-state loop, its
    masked tail, and blocks that are all tail are all exercised."""
    monkeypatch.setattr(kernels, "BLOCK", BLOCK)
    monkeypatch.setattr(kernels, "TILE", TILE)
    monkeypatch.setattr(kernels, "FINALIZE_CHUNK", 4)
    tables.clear_cache()
    triton_backend.clear_plans()
    yield
    tables.clear_cache()
    triton_backend.clear_plans()


def _random(n: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


def stress_list(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """300+ tensors of sizes 1..17 with the awkward cases planted among them."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 18, (311,), generator=gen).tolist()
    grads = [_random(n, dtype, gen) for n in sizes]
    grads.insert(40, _random(3 * BLOCK + 5, dtype, gen))  # not a multiple of the block
    grads.insert(97, _random(0, dtype, gen))  # empty tensor inside the list
    grads.insert(150, _random(BLOCK + 1, dtype, gen))  # one block plus one element
    grads.insert(200, _random(9 * BLOCK - 1, dtype, gen))  # > FINALIZE_CHUNK blocks
    both = _random(2 * BLOCK + 3, dtype, gen)
    both[7], both[BLOCK + 1], both[-1] = INF, NAN, -INF  # Inf and NaN in the same tensor
    grads.insert(250, both)
    grads[-1][-1] = NAN  # NaN in the last element of the last tensor
    return grads


def awkward_list(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """A dozen tensors with the same awkward cases, cheap enough for many interpreter runs."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 17, 3 * BLOCK + 5, 0, BLOCK + 1, 9 * BLOCK - 1, 2 * BLOCK + 3, 5, BLOCK, 13]
    grads = [_random(n, dtype, gen) for n in sizes]
    grads[6][7], grads[6][BLOCK + 1], grads[6][-1] = INF, NAN, -INF
    grads[-1][-1] = NAN
    return grads


def reference_stats(grads: list[torch.Tensor], norm_type: float):
    """float64 per-tensor (norm, max |g|, NaN count, Inf count) with the backend conventions."""
    norms, maxes, nans, infs = [], [], [], []
    for g in grads:
        v = g.detach().to(torch.float64).flatten()
        n_nan = int(torch.isnan(v).sum())
        big = float(v.abs().max()) if v.numel() else 0.0
        norm = float(torch.linalg.vector_norm(v, norm_type)) if v.numel() else 0.0
        norms.append(NAN if n_nan else norm)
        maxes.append(NAN if n_nan else big)
        nans.append(n_nan)
        infs.append(int(torch.isinf(v).sum()))
    return (
        torch.tensor(norms, dtype=torch.float64),
        torch.tensor(maxes, dtype=torch.float64),
        torch.tensor(nans, dtype=torch.int64),
        torch.tensor(infs, dtype=torch.int64),
    )


def assert_stats_match(stats, grads, norm_type):
    n = len(grads)
    norms, maxes, nans, infs = reference_stats(grads, norm_type)
    fields = [stats.norms, stats.max_abs, stats.nan_count, stats.inf_count]
    for field, dtype in zip(fields, [torch.float32, torch.float32, torch.int64, torch.int64]):
        assert field.shape == (n,) and field.dtype == dtype
        assert field.device.type == DEVICE
    # Inputs are exact in float64, so only float32 accumulation separates the results.
    torch.testing.assert_close(stats.norms.double().cpu(), norms, rtol=2e-6, atol=0, equal_nan=True)
    # max |g| involves no arithmetic: exact.
    torch.testing.assert_close(stats.max_abs.double().cpu(), maxes, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(stats.nan_count.cpu(), nans)
    assert torch.equal(stats.inf_count.cpu(), infs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_table_stress_stats_against_float64_and_torch_backend(dtype):
    grads = stress_list(dtype, seed=KERNEL_DTYPES.index(dtype))
    stats = triton_backend.group_stats(grads, 2.0)
    assert_stats_match(stats, grads, 2.0)
    # Planted values land where planted.
    assert stats.nan_count[-1] == 1 and math.isnan(stats.norms[-1])
    assert stats.nan_count[250] == 1 and stats.inf_count[250] == 2
    assert stats.norms[97] == 0 and stats.max_abs[97] == 0
    theirs = torch_backend.group_stats(grads, 2.0)
    torch.testing.assert_close(stats.norms, theirs.norms, rtol=1e-5, atol=0, equal_nan=True)
    assert torch.equal(stats.max_abs.nan_to_num(-1.0), theirs.max_abs.nan_to_num(-1.0))
    assert torch.equal(stats.nan_count, theirs.nan_count)
    assert torch.equal(stats.inf_count, theirs.inf_count)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_table_stress_other_norms(dtype, norm_type):
    grads = stress_list(dtype, seed=10 + KERNEL_DTYPES.index(dtype))
    assert_stats_match(triton_backend.group_stats(grads, norm_type), grads, norm_type)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("norm_type", NORMS)
def test_awkward_list_every_norm(dtype, norm_type):
    grads = awkward_list(dtype, seed=20 + KERNEL_DTYPES.index(dtype))
    stats = triton_backend.group_stats(grads, norm_type)
    assert_stats_match(stats, grads, norm_type)
    assert stats.nan_count[6] == 1 and stats.inf_count[6] == 2 and stats.nan_count[-1] == 1
    # group_norms is the first field of the same computation.
    assert torch.equal(
        triton_backend.group_norms(grads, norm_type).nan_to_num(7.0),
        stats.norms.nan_to_num(7.0),
    )


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_max_abs_propagates_every_nan_bit_pattern(dtype, norm_type):
    """max |g| (and the inf-norm) reduce as integer bits with the sign cleared: a NaN with
    its sign bit set, or the smallest signaling payload, must still win over +-Inf and
    every finite value, in any lane and any block."""
    gen = torch.Generator().manual_seed(31 + KERNEL_DTYPES.index(dtype))
    int_type = {4: torch.int32, 2: torch.int16}[torch.finfo(dtype).bits // 8]
    nan_bits = {  # (negative quiet NaN, smallest positive signaling NaN) for the dtype
        torch.float32: (-0x400000, 0x7F800001),  # 0xFFC00000 as int32
        torch.bfloat16: (-0x40, 0x7F81),  # 0xFFC0 as int16
        torch.float16: (-0x200, 0x7C01),  # 0xFE00 as int16
    }[dtype]
    sizes = [1, 7, TILE + 1, 3 * BLOCK + 5, 2 * BLOCK, 5]
    grads = [_random(n, dtype, gen) for n in sizes]
    grads[0].view(int_type)[0] = nan_bits[0]  # a one-element tensor that is a negative NaN
    grads[2][3] = -INF  # -Inf next to a NaN in the same tile
    grads[2].view(int_type)[TILE] = nan_bits[1]
    grads[3].view(int_type)[2 * BLOCK + 1] = nan_bits[0]  # a NaN in a later block only
    grads[4][BLOCK + 9] = -INF  # no NaN: max |g| is +Inf, never a NaN
    grads[5][2] = -1e4  # largest |g| is negative: max |g| is its magnitude
    stats = triton_backend.group_stats(grads, norm_type)
    assert_stats_match(stats, grads, norm_type)
    planted = [True, False, True, True, False, False]
    assert [math.isnan(v) for v in stats.max_abs.tolist()] == planted
    assert stats.nan_count.tolist() == [1, 0, 1, 1, 0, 0]
    assert stats.max_abs[4] == INF and stats.max_abs[5] == abs(float(grads[5][2]))
    # the fused finalize's total (its last program's reduction) sees the NaN norms too
    ours, theirs = ([torch.nn.Parameter(g.clone()) for g in grads] for _ in range(2))
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    total = fgs.clip_grad_norm_(ours, 1.0, norm_type=norm_type, backend="triton")
    assert math.isnan(float(total))
    assert math.isnan(float(torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)))


def test_all_empty_group_gives_zeros_without_a_stats_launch():
    grads = [torch.empty(0, device=DEVICE), torch.empty(0, 3, device=DEVICE)]
    kernels.launch_counts.clear()
    stats = triton_backend.group_stats(grads, math.inf)
    assert kernels.launch_counts["stats_kernel"] == 0
    for field in stats:
        assert field.tolist() == [0, 0]


def test_clip_grad_norm_on_awkward_list_matches_torch():
    grads = [g.nan_to_num(0.0, 0.0, 0.0) for g in awkward_list(torch.float32, seed=11)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    twins = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(params, twins, grads):
        p.grad, q.grad = g.clone(), g.clone()
    ours = fgs.clip_grad_norm_(params, 1.0, backend="triton")
    theirs = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=1e-9)


# --- scale / clamp -----------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]).cpu()


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical, except that any NaN matches any NaN (payloads are not specified)."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(_bits(got)[~nan.cpu()], _bits(want)[~nan.cpu()])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_scale_is_bit_identical_to_torch_mul(dtype):
    grads = awkward_list(dtype, seed=3)
    coef = torch.rand((), generator=torch.Generator().manual_seed(1)).to(DEVICE) * 0.9
    expected = [g * coef for g in grads]
    triton_backend.scale_(grads, coef)
    for got, want in zip(grads, expected):
        assert_same_bits(got, want)


def _signaling_nan_list():
    """fp32 grads holding a signaling NaN: any multiply (even by 1) would quiet its bits."""
    grads = [torch.randn(n, device=DEVICE) for n in (5, BLOCK, 3 * BLOCK + 1)]
    for g in grads:
        g.view(torch.int32)[-1] = 0x7F800001
    return grads


@pytest.mark.parametrize("coef", [1.0, 1.5, 2.0**70])
def test_scale_leaves_memory_untouched_when_coef_at_least_one(coef):
    grads = _signaling_nan_list()
    before = [_bits(g).clone() for g in grads]
    triton_backend.scale_(grads, torch.tensor(coef, device=DEVICE))
    for g, bits in zip(grads, before):
        assert torch.equal(_bits(g), bits)


def test_scale_writes_when_coef_below_one_and_applies_nan():
    grads = _signaling_nan_list()
    triton_backend.scale_(grads, torch.tensor(0.5, device=DEVICE))
    assert all(_bits(g)[-1] != 0x7F800001 for g in grads)  # it did write
    triton_backend.scale_(grads, torch.tensor(NAN, device=DEVICE))
    assert all(bool(torch.isnan(g).all()) for g in grads)


def test_scale_reads_a_float64_coefficient_like_torch():
    grads = awkward_list(torch.bfloat16, seed=8)
    coef = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    expected = [g * coef for g in grads]
    triton_backend.scale_(grads, coef)
    for got, want in zip(grads, expected):
        assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("clip_value", [0.0, 0.3, 1.7])
def test_clamp_is_bit_identical_to_torch_and_keeps_nan_bits(dtype, clip_value):
    grads = awkward_list(dtype, seed=4)
    if dtype == torch.float32:
        grads[2].view(torch.int32)[0] = 0x7F800001  # untouched elements keep exact bits
    expected = [g.clamp(-clip_value, clip_value) for g in grads]
    triton_backend.clamp_(grads, clip_value)
    for got, want in zip(grads, expected):
        assert_same_bits(got, want)
    if dtype == torch.float32:
        assert _bits(grads[2])[0] == 0x7F800001


# --- tables ------------------------------------------------------------------------------


def test_table_layout_and_int64_entries():
    grads = [torch.randn(n, device=DEVICE) for n in (3, 0, BLOCK, BLOCK + 1)]
    grads.insert(1, torch.randn(2 * BLOCK, device=DEVICE, dtype=torch.bfloat16))
    table = tables.table_for(grads, BLOCK)
    assert table.data.dtype == torch.int64 and table.num_blocks == 1 + 2 + 0 + 1 + 2
    n = len(grads)
    data = table.data.cpu().tolist()
    assert data[:n] == [g.data_ptr() for g in grads]
    assert data[n : 2 * n] == [3, 2 * BLOCK, 0, BLOCK, BLOCK + 1]
    # fp32 blocks first (segment 0), then the bf16 tensor's (segment 1); input order kept
    assert data[2 * n : 3 * n] == [0, 4, 1, 1, 2]  # block_start
    assert data[3 * n : 4 * n] == [1, 6, 1, 2, 4]  # block_end
    assert data[4 * n : 5 * n] == [0, 1, 0, 0, 0]  # kinds
    assert data[5 * n :] == [0, 3, 4, 4, 1, 1]
    assert [(s.dtype, s.lo, s.hi) for s in table.segments] == [
        (torch.float32, 0, 4),
        (torch.bfloat16, 4, 6),
    ]


def _model_with_grads(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model.to(DEVICE)
    model(torch.randn(4, 9, device=DEVICE)).square().sum().backward()
    return model


def test_plan_cache_hit_then_rebuild_after_set_to_none():
    model = _model_with_grads(0)
    fgs.grad_stats(model.parameters(), backend="triton")
    assert triton_backend.plan_stats == {"hits": 0, "builds": 1}
    fgs.grad_stats(model.parameters(), backend="triton")
    assert triton_backend.plan_stats == {"hits": 1, "builds": 1}

    # Same storage, new values (zero_grad(set_to_none=False) + backward): cache hit, new values.
    model.zero_grad(set_to_none=False)
    model(torch.randn(4, 9, device=DEVICE)).sum().backward()
    stats = fgs.grad_stats(model.parameters(), backend="triton")
    assert triton_backend.plan_stats["hits"] == 2
    assert_stats_match(stats, [p.grad for p in model.parameters()], 2.0)

    # New storage: keep the old grads alive so the allocator cannot hand back their addresses.
    old = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 9, device=DEVICE)).sum().backward()
    new = [p.grad for p in model.parameters()]
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(old, new))
    stats = fgs.grad_stats(model.parameters(), backend="triton")
    assert triton_backend.plan_stats["builds"] == 2
    assert_stats_match(stats, new, 2.0)


# --- layouts -----------------------------------------------------------------------------


def test_dense_but_permuted_layouts_are_read_in_place():
    gen = torch.Generator().manual_seed(2)
    conv = torch.randn(5, 6, 3, 7, generator=gen).to(DEVICE)
    grads = [
        conv.to(memory_format=torch.channels_last),
        torch.randn(33, 17, generator=gen).to(DEVICE).t(),
        torch.randn(4, 1, 9, generator=gen).to(DEVICE).transpose(0, 2),
    ]
    assert all(tables.is_dense(g) and not g.is_contiguous() for g in grads)
    stats = triton_backend.group_stats(grads, 2.0)
    assert_stats_match(stats, grads, 2.0)
    triton_backend.group_stats(grads, 2.0)
    assert tables.cache_stats == {"hits": 1, "builds": 1}  # no copies: the table is reused
    expected = [g * 0.25 for g in grads]
    triton_backend.scale_(grads, torch.tensor(0.25, device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))


def _non_dense_grads():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=gen).to(DEVICE)
    gapped = base[:, ::3]  # a slice with gaps between its elements
    expanded = torch.randn(1, 9, generator=gen).to(DEVICE).expand(5, 9)  # overlapping
    dense = torch.randn(200, generator=gen).to(DEVICE)
    return base, gapped, expanded, dense


def test_non_dense_grads_stats_read_a_copy_and_are_correct():
    _, gapped, expanded, dense = _non_dense_grads()
    gapped[3, 4] = NAN
    assert not tables.is_dense(gapped) and not tables.is_dense(expanded)
    grads = [dense, gapped, expanded]
    kernels.launch_counts.clear()
    stats = triton_backend.group_stats(grads, 2.0)
    assert_stats_match(stats, grads, 2.0)
    assert kernels.launch_counts["stats_kernel"] == 1
    assert tables.cache_stats["hits"] == 0 and len(tables._cache) == 0  # copies: not cached


def test_non_dense_grads_scale_and_clamp_only_their_own_elements():
    base, gapped, _, dense = _non_dense_grads()
    base_before, dense_before = base.clone(), dense.clone()
    triton_backend.scale_([dense, gapped], torch.tensor(0.5, device=DEVICE))
    assert torch.equal(dense, dense_before * 0.5)
    expected_base = base_before.clone()
    expected_base[:, ::3] *= 0.5
    assert torch.equal(base, expected_base)  # elements between the slice's are untouched
    triton_backend.scale_([dense, gapped], torch.tensor(3.0, device=DEVICE))
    assert torch.equal(base, expected_base)  # coef >= 1: nothing changes on either path
    triton_backend.clamp_([gapped, dense], 0.2)
    expected_base[:, ::3] = expected_base[:, ::3].clamp(-0.2, 0.2)
    assert torch.equal(base, expected_base)
    assert torch.equal(dense, (dense_before * 0.5).clamp(-0.2, 0.2))


# --- 64-bit offsets --------------------------------------------------------------------


def test_offsets_past_two_to_the_31_elements():
    """A hand-made table describing a 2**31 + 2**20 + 100 element tensor whose last block is
    real memory: the kernels must reach it with 64-bit offsets (int32 would wrap)."""
    real = torch.randn(BLOCK, device=DEVICE)
    real[100:] = 0.0
    skipped = 2**31 + 2**20  # elements before the real block, a multiple of BLOCK
    virtual_base = real.data_ptr() - skipped * real.element_size()
    # ptrs, numels, block_start (block 0 is block skipped // BLOCK of the tensor),
    # block_end, kinds, block_tensor
    data = torch.tensor(
        [virtual_base, skipped + 100, -(skipped // BLOCK), 1, 0, 0], dtype=torch.int64
    ).to(DEVICE)
    segment = tables.Segment(torch.float32, False, 0, 1)
    table = tables.TensorTable(torch.device(DEVICE), BLOCK, 1, 1, (segment,), data, data.cpu())
    partials = torch.full((4, 1), NAN, device=DEVICE)
    stats_kernels.launch_stats(table, partials, 2.0, True)
    v = real[:100].double()
    assert math.isclose(float(partials[0, 0]), float(v.square().sum()), rel_tol=1e-6)
    assert float(partials[1, 0]) == float(v.abs().max())
    real[100:] = 7.0  # past the virtual end: must be neither read nor written
    expected = torch.cat([real[:100] * 0.5, real[100:]])
    scale_kernels.scale_(table, torch.tensor(0.5, device=DEVICE))
    assert torch.equal(real, expected)


# --- determinism, launches, no sync -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_run_to_run(dtype):
    gen = torch.Generator().manual_seed(9)
    grads = [_random(n, dtype, gen, scale=1e3) for n in (1, 17, 1031, 9 * BLOCK + 3)]
    first = triton_backend.group_stats(grads, 2.0)
    tables.clear_cache()  # a rebuilt table must not change the result either
    second = triton_backend.group_stats(grads, 2.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _three_dtype_params(count: int = 40):
    gen = torch.Generator().manual_seed(6)
    params = []
    for i in range(count):
        dtype = KERNEL_DTYPES[i % 3]
        p = torch.nn.Parameter(torch.zeros(1 + i % 13, dtype=dtype, device=DEVICE))
        p.grad = _random(p.numel(), dtype, gen, scale=10.0)
        params.append(p)
    return params


def test_one_stats_launch_per_device_dtype_group(monkeypatch):
    """Counted twice: by the launcher's counter and by patching Triton's own launch method."""
    runs = []
    kernel_class = type(stats_kernels.stats_kernel)
    original_run = kernel_class.run

    def counting_run(self, *args, **kwargs):
        runs.append(self.__name__)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", counting_run)
    params = _three_dtype_params(40)  # 40 tensors in 3 (device, dtype) groups

    kernels.launch_counts.clear()
    fgs.grad_stats(params, backend="triton")
    # one table for the whole list: a stats launch per dtype, one finalize for all
    assert runs.count("stats_kernel") == 3
    assert runs.count("finalize_kernel") == 1
    assert len(runs) == 4 and kernels.launch_counts.total() == 4

    runs.clear()
    fgs.clip_grad_norm_(params, 0.1, backend="triton")
    assert sorted(set(runs)) == ["finalize_kernel", "scale_kernel", "stats_kernel"]
    assert runs.count("stats_kernel") == runs.count("scale_kernel") == 3
    assert runs.count("finalize_kernel") == 1


def test_no_host_sync_on_the_triton_path(forbid_host_reads):
    params = _three_dtype_params(12)
    params[4].grad[0] = NAN
    fgs.clip_grad_norm_(params, 0.5, backend="triton")
    fgs.clip_grad_norm_(params, 0.5, backend="triton", return_stats=True)
    fgs.clip_grad_norm_(params, 0.5, norm_type="inf", backend="triton")
    fgs.grad_stats(params, norm_type=1, backend="triton")
    fgs.get_total_norm([p.grad for p in params], backend="triton")
    fgs.clip_grad_value_(params, 0.1, backend="triton")


def test_host_read_guard_can_fail(forbid_host_reads):
    # The torch backend reads the coefficient on the CPU: the guard must catch that.
    if DEVICE != "cpu":
        pytest.skip("the torch backend reads the coefficient only for CPU tensors")
    with pytest.raises(HostSyncError):
        fgs.clip_grad_norm_(_three_dtype_params(3), 0.5, backend="torch")


# --- routing -----------------------------------------------------------------------------


def test_supports_and_routing():
    dev = torch.device(DEVICE)
    for dtype in KERNEL_DTYPES:
        for p in NORMS:
            assert triton_backend.supports(dev, dtype, p)
        assert not triton_backend.supports(dev, dtype, 3.0)
    for dtype in (torch.float64, torch.complex64, torch.complex128):
        assert not triton_backend.supports(dev, dtype, 2.0)
        assert dispatch.backend_for(dev, dtype, 2.0, "triton") is torch_backend
    assert dispatch.backend_for(dev, torch.bfloat16, 2.0, "triton") is triton_backend
    with pytest.raises(TypeError, match="float64"):
        triton_backend.group_stats([torch.zeros(3, dtype=torch.float64)], 2.0)
    with pytest.raises(ValueError, match="one device and dtype"):
        triton_backend.scale_(
            [torch.zeros(3), torch.zeros(3, dtype=torch.float16)], torch.tensor(0.5)
        )


# --- torch.compile -----------------------------------------------------------------------


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_through_custom_ops(compiler):
    """The Triton path compiles without a graph break (custom ops hide the launches).

    ``aot_eager`` also runs the fake (shape-only) implementations and functionalizes the
    in-place scale; inductor needs a C++ toolchain and minutes on CPU, so it is left to GPU runs.
    """
    torch._dynamo.reset()
    params = _three_dtype_params(9)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()

    def step(ps):
        total = fgs.clip_grad_norm_(ps, 0.5, backend="triton")
        stats = fgs.grad_stats(ps, backend="triton")
        fgs.clip_grad_value_(ps, 0.05, backend="triton")
        return total, stats.norms, stats.nan_count

    compiled = torch.compile(step, backend=compiler, fullgraph=True)
    got = compiled(params)
    want = step(twins)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for p, q in zip(params, twins):
        assert torch.equal(p.grad, q.grad)
    torch._dynamo.reset()


class _PoisonedEmpty:
    """Stands in for ``torch`` inside kernels/stats.py: every ``empty`` buffer (partials
    and outputs) starts filled with a value no kernel result can have, so an entry the
    kernels never wrote shows up instead of passing on recycled memory."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        out = torch.empty(*args, **kwargs)
        return out.fill_(-12345.0 if out.is_floating_point() else -7)


@pytest.mark.parametrize("norm_type", NORMS)
def test_every_output_entry_is_written(monkeypatch, norm_type):
    monkeypatch.setattr(stats_kernels, "torch", _PoisonedEmpty())
    gen = torch.Generator().manual_seed(11)
    sizes = [0, 1, BLOCK, 0, BLOCK + 1, 7, 5 * BLOCK + 3, 0]
    grads = [_random(n, torch.float32, gen) for n in sizes]
    grads[4][3] = INF
    stats = triton_backend.group_stats(grads, norm_type)
    assert_stats_match(stats, grads, norm_type)
    all_empty = [_random(0, torch.bfloat16, gen) for _ in range(3)]
    assert_stats_match(triton_backend.group_stats(all_empty, norm_type), all_empty, norm_type)


@pytest.mark.parametrize("norm_type", NORMS)
def test_fused_path_writes_every_output(monkeypatch, norm_type):
    """The fused path's returned buffers (per-tensor stats, total, coefficient) start
    poisoned: each must be written by the kernels (many tensors: the finalize's total
    loops over several chunks of them)."""
    monkeypatch.setattr(triton_backend, "torch", _PoisonedEmpty())
    gen = torch.Generator().manual_seed(12)
    sizes = [0, 1, BLOCK, 7, 5 * BLOCK + 3, 0, 33, 2, 9, 300, 1]
    params = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in sizes]
    for p in params:
        p.grad = _random(p.numel(), torch.float32, gen)
    params[4].grad[17] = INF
    grads = [p.grad.clone() for p in params]
    total, stats = fgs.clip_grad_norm_(params, 1e9, norm_type=norm_type, return_stats=True,
                                       backend="triton")  # fmt: skip
    assert_stats_match(stats, grads, norm_type)
    assert float(total) == float("inf") and float(stats.total_norm) == float("inf")
    assert float(stats.clip_coef) == 0.0  # 1e9 / inf, as torch
    params[4].grad[17] = 1.0
    for p, g in zip(params, grads):
        p.grad.copy_(g.nan_to_num(posinf=1.0))
    total = fgs.clip_grad_norm_(params, 1e9, norm_type=norm_type, backend="triton")
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]), norm_type)
    torch.testing.assert_close(total, want, rtol=2e-6, atol=0)
    stats = fgs.grad_stats(params, norm_type=norm_type, backend="triton")
    torch.testing.assert_close(stats.total_norm, want, rtol=2e-6, atol=0)


def test_fused_clip_with_nan_gradient_matches_torch():
    params = [torch.nn.Parameter(torch.zeros(n, device=DEVICE)) for n in (5, BLOCK + 2)]
    for p in params:
        p.grad = torch.randn(p.numel(), device=DEVICE)
    params[1].grad[BLOCK] = NAN
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    ours = fgs.clip_grad_norm_(params, 1.0, backend="triton")
    theirs = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    assert math.isnan(float(ours)) and math.isnan(float(theirs))
    for p, q in zip(params, twins):
        assert torch.isnan(p.grad).all() and torch.isnan(q.grad).all()


# ------------------------------------------ conditional zeroing (skip_nonfinite, no sync)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("impl", [triton_backend, torch_backend], ids=["triton", "torch"])
def test_zero_where_zeroes_only_when_the_device_flag_is_set(impl, dtype):
    gen = torch.Generator().manual_seed(21)
    sizes = (0, 1, 7, 31, 129, 1023, 4099)
    grads = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in sizes]
    grads[3][5] = NAN
    grads[4][0] = -INF
    grads.append(torch.randn(9, 6, generator=gen).to(DEVICE, dtype).t())  # not contiguous
    grads.append(torch.randn(300, generator=gen).to(DEVICE, dtype)[1:])  # misaligned
    before = [g.clone() for g in grads]
    impl.zero_where_(grads, torch.tensor(False, device=DEVICE))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for g, b in zip(grads, before):  # untouched, bit for bit (NaN included)
        assert torch.equal(g.view(bits), b.view(bits))
    versions = [g._version for g in grads]
    impl.zero_where_(grads, torch.tensor(True, device=DEVICE))
    for g in grads:
        assert g.numel() == 0 or (g == 0).all(), g  # NaN/Inf too: not a multiply by 0
    assert all(g._version > v for g, v in zip(grads, versions))  # autograd is told


def test_zero_kernel_touches_nothing_on_a_finite_step_and_refuses_expanded_grads():
    g = torch.randn(257, device=DEVICE)
    expanded = torch.randn(1, device=DEVICE).expand(40)
    with pytest.raises(RuntimeError, match="share memory"):
        triton_backend.zero_where_([g, expanded], torch.tensor(True, device=DEVICE))
    assert (g != 0).any()  # refused before anything was written
    kernels.launch_counts.clear()
    triton_backend.zero_where_([g], torch.tensor(False, device=DEVICE))
    assert kernels.launch_counts["zero_kernel"] == 1  # one launch; it returns at once


def test_launch_configs_are_cached_per_key_and_follow_the_tuning_settings(monkeypatch):
    from fastgradstats import kernels
    from fastgradstats.kernels import histogram, scale, stats

    calls = {
        "stats": lambda: stats.stats_config(torch.bfloat16, 256, True, 2.0, True),
        "finalize": lambda: stats.finalize_config(2.0, True, stats.FINISH_CLIP, torch.float32),
        "elementwise": lambda: scale.elementwise_config(torch.float16, 256, False),
        "histogram": lambda: histogram.histogram_config(torch.float32, 256, True),
    }
    before = {name: make() for name, make in calls.items()}
    for name, make in calls.items():
        assert make() is before[name], name  # the steady state builds no dict
    monkeypatch.setattr(kernels, "NUM_WARPS", kernels.NUM_WARPS // 2)
    monkeypatch.setattr(kernels, "FINALIZE_CHUNK", kernels.FINALIZE_CHUNK // 2)
    after = {name: make() for name, make in calls.items()}
    for name in ("stats", "elementwise", "histogram"):
        assert after[name]["num_warps"] == kernels.NUM_WARPS, name
    assert after["finalize"]["CHUNK"] == kernels.FINALIZE_CHUNK
    monkeypatch.setattr(kernels, "TILE", 16)
    assert calls["stats"]()["TILE"] == calls["elementwise"]()["TILE"] == 16
    monkeypatch.setattr(kernels, "TILE", 3)
    with pytest.raises(ValueError, match="TILE"):
        stats.stats_config(torch.float32, 256, True, 2.0, True)
