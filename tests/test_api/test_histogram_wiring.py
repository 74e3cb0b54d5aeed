"""grad_stats(..., histogram=True): GradStats.histogram / zero_count / precision_report.

Counts are checked against numpy.histogram on both backends (the ``backend`` fixture),
precision fractions against what torch's cast does (float64 reference).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_same_tensors, clone_grads
from histogram_helpers import cast_truth, numpy_reference, planted, report_values

import fastgradstats as fgs
from fastgradstats import constants as C
from fastgradstats import histogram as H
from fastgradstats import precision as P
from fastgradstats import stats as stats_module

NAN, INF = float("nan"), float("inf")


def _params(tensors: list[torch.Tensor]) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for i, t in enumerate(tensors):
        p = torch.nn.Parameter(torch.zeros(t.shape, dtype=t.dtype, device=t.device))
        p.grad = t.clone()
        out.append((f"p{i}", p))
    return out


def _check_counts(stats: fgs.GradStats, grads: list[torch.Tensor]) -> None:
    assert stats.histogram.dtype == torch.int64 and stats.zero_count.dtype == torch.int64
    assert stats.histogram.shape == (len(grads), C.NUM_BINS)
    assert stats.histogram.device == stats.norms.device
    assert stats.histogram_edges.dtype == torch.float64
    assert torch.equal(stats.histogram_edges.cpu(), H.histogram_edges())
    for i, g in enumerate(grads):
        ref, zeros = numpy_reference(g)
        np.testing.assert_array_equal(stats.histogram[i].cpu().numpy(), ref, err_msg=str(i))
        assert int(stats.zero_count[i]) == zeros, i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_stats_histogram_matches_numpy(backend, dtype):
    # planted zeros, subnormals, huge values, NaN, Inf; odd sizes incl. 0 and 1
    grads = [planted(1031, dtype, seed=7), planted(1023, dtype, seed=8).reshape(31, 33)]
    grads += [torch.zeros(0, dtype=dtype), torch.tensor([-0.0], dtype=dtype)]
    grads += [planted(127, dtype, seed=3).reshape(127, 1), torch.full((7,), NAN, dtype=dtype)]
    params = _params(grads)
    before = clone_grads([p for _, p in params])
    stats = fgs.grad_stats(params, histogram=True)
    _check_counts(stats, grads)
    assert_same_tensors([p.grad for _, p in params], before)  # read only
    # the norms are those of the stats without histograms
    plain = fgs.grad_stats(params)
    torch.testing.assert_close(plain.norms, stats.norms, rtol=0, atol=0, equal_nan=True)
    assert plain.histogram is None
    assert plain.histogram_edges is None and plain.zero_count is None


def test_grad_stats_histogram_mixed_dtypes_in_input_order(backend):
    grads = [
        planted(300, torch.float16, seed=1),
        planted(200, torch.float32, seed=2),
        planted(100, torch.bfloat16, seed=3),
        planted(50, torch.float64, seed=4),
        planted(70, torch.float32, seed=5).reshape(7, 10).t(),  # transposed: dense, not contig.
        planted(80, torch.float32, seed=6)[::2],  # gapped: read through a copy
    ]
    stats = fgs.grad_stats(_params(grads), histogram=True)
    _check_counts(stats, grads)


def test_histograms_for_dispatches_per_group(backend, monkeypatch):
    from fastgradstats.kernels import histogram as kernel_module

    launched = []
    original = kernel_module.group_histogram_triton

    def spy(table):
        launched.extend(seg.dtype for seg in table.segments)
        return original(table)

    monkeypatch.setattr(kernel_module, "group_histogram_triton", spy)
    grads = [planted(64, torch.float32, 1), planted(64, torch.float64, 2)]
    grads.append(planted(64, torch.float32, 3))
    counts, zeros = stats_module.histograms_for(grads)
    ref_counts, ref_zeros = H.group_histogram(grads)
    assert torch.equal(counts, ref_counts) and torch.equal(zeros, ref_zeros)
    # triton: one launch for the fp32 group; float64 goes to the torch reference
    assert launched == ([torch.float32] if backend == "triton" else [])


def test_grad_stats_histogram_empty_and_none_grads(backend):
    assert fgs.grad_stats([], histogram=True).histogram.shape == (0, C.NUM_BINS)
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(4))
    q.grad = torch.tensor([0.0, 1.0, 2.0**-20, NAN])
    stats = fgs.grad_stats([("p", p), ("q", q)], histogram=True)
    assert stats.names == ["q"] and stats.zero_count.tolist() == [1]
    assert int(stats.histogram.sum()) == 3


def test_grad_stats_histogram_bad_input_changes_nothing():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    p.grad = torch.ones(3, dtype=torch.complex64)
    before = p.grad.clone()
    with pytest.raises(TypeError, match=r"'0'.*histogram"):
        fgs.grad_stats([p], histogram=True)
    assert torch.equal(p.grad, before)
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.ones(3)
    with pytest.raises(TypeError, match="histogram must be a bool"):
        fgs.grad_stats([q], histogram="yes")
    with pytest.raises(ValueError, match="histogram=True"):
        fgs.grad_stats([q]).precision_report(torch.float16)
    with pytest.raises(ValueError, match="histogram=True"):
        fgs.grad_stats([q]).to_dict(precision=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_clip_grad_norm_histogram_is_that_of_the_grads_before_clipping(backend, dtype):
    grads = [planted(1031, dtype, seed=11), planted(7, dtype, seed=12)]
    grads += [torch.zeros(0, dtype=dtype), planted(257, dtype, seed=13).reshape(257, 1)]
    grads = [g.nan_to_num(nan=0.5, posinf=3.0, neginf=-3.0) for g in grads]  # clips for real
    params = _params(grads)
    twins = _params(grads)
    total, stats = fgs.clip_grad_norm_(params, 1e-2, return_stats=True, histogram=True)
    _check_counts(stats, grads)
    assert float(stats.clip_coef) < 1
    # the same clipping, total and norms as without histograms
    twin_total, plain = fgs.clip_grad_norm_(twins, 1e-2, return_stats=True)
    assert torch.equal(total, twin_total) and plain.histogram is None
    torch.testing.assert_close(plain.norms, stats.norms, rtol=0, atol=0)
    assert_same_tensors([p.grad for _, p in params], [p.grad for _, p in twins])


def test_clip_grad_norm_histogram_bad_input_changes_nothing(backend):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    p.grad = torch.full((3,), 5 + 5j, dtype=torch.complex64)
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.full((3,), 5.0)
    before = clone_grads([p, q])
    with pytest.raises(TypeError, match=r"'0'.*histogram"):
        fgs.clip_grad_norm_([p, q], 1.0, return_stats=True, histogram=True)
    with pytest.raises(ValueError, match="histogram=True needs return_stats=True"):
        fgs.clip_grad_norm_([q], 1.0, histogram=True)
    with pytest.raises(TypeError, match="histogram must be a bool"):
        fgs.clip_grad_norm_([q], 1.0, return_stats=True, histogram=1)
    assert_same_tensors([p.grad, q.grad], before)
    total, stats = fgs.clip_grad_norm_([], 1.0, return_stats=True, histogram=True)
    assert stats.histogram.shape == (0, C.NUM_BINS) and float(total) == 0


def test_histogram_path_never_syncs_on_meta_device():
    """On the meta device any read of a value raises: a clean pass proves no host sync in
    grad_stats(histogram=True) (the non-CPU reference path) and precision_report."""
    params = []
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32]):
        p = torch.nn.Parameter(torch.empty(5 + i, device="meta", dtype=dtype))
        p.grad = torch.empty_like(p)
        params.append((f"p{i}", p))
    stats = fgs.grad_stats(params, histogram=True, backend="torch")
    assert stats.histogram.device.type == "meta" and stats.histogram.shape == (4, C.NUM_BINS)
    assert stats.zero_count.device.type == "meta"
    report = stats.precision_report(torch.float8_e4m3fn)
    assert report.flush_to_zero.device.type == "meta"


# ------------------------------------------------------------------- precision report


@pytest.mark.parametrize("target", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_precision_report_matches_torch_cast(backend, target):
    x = report_values(target, 4000, seed=11)  # has NaN and -Inf: max_abs is NaN there
    y = report_values(target, 999, seed=12, source=torch.bfloat16)
    clean = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    grads = [x, y, clean]
    stats = fgs.grad_stats(_params(grads), histogram=True)
    report = stats.precision_report(target)
    fmt = P.float_format(target)
    for i, g in enumerate(grads):
        truth = cast_truth(g, fmt)
        d = truth["nonzero"]
        assert float(report.flush_to_zero[i]) == pytest.approx(truth["flush"] / d, abs=1e-15)
        assert float(report.subnormal[i]) == pytest.approx(truth["sub"] / d, abs=1e-15)
        assert float(report.overflow[i]) <= truth["over"] / d <= float(report.overflow_upper[i])
    # scaled: the exact amax comes from GradStats.max_abs (finite for ``clean``)
    k = int(report.scale_exponent[2])
    v = clean.double().abs()
    amax = float(v.max())
    assert float(stats.max_abs[2]) == amax
    assert amax * 2.0**k <= fmt.max < amax * 2.0 ** (k + 1)
    scaled = cast_truth(clean, fmt, k)
    d = scaled["nonzero"]
    assert float(report.scaled_overflow[2]) == 0.0 == scaled["over"]
    assert float(report.scaled_flush_to_zero[2]) == pytest.approx(scaled["flush"] / d, abs=1e-15)
    assert float(report.scaled_subnormal[2]) == pytest.approx(scaled["sub"] / d, abs=1e-15)


def test_precision_overflow_exact_from_max_abs():
    """max_abs below the threshold settles the ambiguous overflow bin: exactly 0."""
    x = torch.tensor([60000.0, 1.0, 0.5])  # 60000 shares the bin [2^15, 2^16) with 65520
    stats = fgs.grad_stats(_params([x]), histogram=True)
    report = stats.precision_report(torch.float16)
    assert float(report.overflow[0]) == 0.0 == float(report.overflow_upper[0])
    bare = P.precision_report(stats.histogram, stats.zero_count, dtype=torch.float16)
    assert float(bare.overflow_upper[0]) > 0  # without max_abs the bin is ambiguous


def test_to_dict_precision_keys(backend):
    x = torch.tensor([0.0, 0.0, 2.0**-30, 2.0**-20, 1.0, 70000.0])
    y = torch.tensor([1.0, NAN])
    stats = fgs.grad_stats(_params([x, y]), histogram=True)
    data = stats.to_dict(precision=[torch.float16, "e4m3"])
    row = data["tensors"]["p0"]
    assert row["zero_count"] == 2 and row["norm"] == pytest.approx(70000.0)
    nonzero = 4
    assert row["fp16_flush_to_zero"] == pytest.approx(1 / nonzero)
    assert row["fp16_subnormal"] == pytest.approx(1 / nonzero)
    assert row["fp16_overflow"] == pytest.approx(1 / nonzero)
    for field in P.PrecisionReport.FIELDS:
        assert f"fp8_e4m3fn_{field}" in row and f"fp16_{field}" in row
    assert data["tensors"]["p1"]["fp16_subnormal"] == 0.0
    assert data["tensors"]["p1"]["nan_count"] == 1
    # plain to_dict is unchanged apart from zero_count
    plain = stats.to_dict()
    assert set(plain["tensors"]["p0"]) == {
        "norm",
        "max_abs",
        "nan_count",
        "inf_count",
        "numel",
        "zero_count",
    }
    assert math.isnan(plain["total_norm"]) and math.isnan(data["total_norm"])
    assert plain["tensors"]["p0"] == {k: row[k] for k in plain["tensors"]["p0"]}
    with pytest.raises(ValueError, match="dtype"):
        stats.to_dict(precision=torch.float32)


# ----------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world: int, seed: int, out_dir: str) -> None:
    """Each rank: DTensor gradients (Shard / Replicate, uneven shards, bf16) and plain
    ``process_group=`` shards; saves the histograms grad_stats and GradMonitor give."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ["FASTGRADSTATS_BACKEND"] = "torch"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world
    )
    try:
        full = _dist_full(seed)
        mesh = init_device_mesh("cpu", (world,))
        placements = {"col": [Shard(0)], "row": [Shard(1)], "rep": [Replicate()]}
        placements["half"] = [Shard(0)]
        params = []
        for name, value in full.items():
            p = distribute_tensor(torch.zeros_like(value), mesh, placements[name])
            p.grad = distribute_tensor(value.clone(), mesh, placements[name])
            params.append((name, p))
        dt = fgs.grad_stats(params, histogram=True)
        monitor = fgs.GradMonitor(params, histograms=True)
        monitor.step()
        hist = monitor.histogram_history()
        mon = (torch.from_numpy(hist.counts[0]), torch.from_numpy(hist.zero_count[0]))
        shards = []
        for name, value in full.items():
            local = value.reshape(-1).chunk(world)[rank].clone()
            p = torch.nn.Parameter(torch.zeros_like(local))
            p.grad = local
            shards.append((name, p))
        pg = fgs.grad_stats(shards, histogram=True, process_group=dist.group.WORLD)
        out = {
            "dtensor": (dt.histogram, dt.zero_count, dt.nan_count),
            "process_group": (pg.histogram, pg.zero_count, pg.nan_count),
            "monitor": (*mon, dt.nan_count),
        }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _dist_full(seed: int) -> dict[str, torch.Tensor]:
    return {
        "col": planted(7 * 5, torch.float32, seed).reshape(7, 5),  # 4 + 3 rows
        "row": planted(6 * 9, torch.float32, seed + 1).reshape(6, 9),
        "rep": planted(13, torch.float32, seed + 2),  # a replica: counted once
        "half": planted(11 * 3, torch.bfloat16, seed + 3).reshape(11, 3),
    }


@pytest.mark.distributed
def test_sharded_histograms_are_those_of_the_full_parameters(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    import _dist_workers

    seed = 5
    codes, hung = _dist_workers.spawn(_dist_worker, 2, (seed,), str(tmp_path), 120)
    assert not hung and codes == [0, 0], codes
    full = _dist_full(seed)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for case in ("dtensor", "process_group", "monitor"):
            hist, zeros, nan = got[case]
            for i, (name, value) in enumerate(full.items()):
                ref, ref_zeros = numpy_reference(value)
                np.testing.assert_array_equal(hist[i].numpy(), ref, err_msg=f"{case} {name}")
                assert int(zeros[i]) == ref_zeros, (case, name)
                assert int(nan[i]) == int(torch.isnan(value).sum()), (case, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grad_stats_histogram_and_monitor_do_not_sync(backend):
    """CUDA's sync debug mode raises on any device->host wait."""
    from fastgradstats import GradMonitor

    sizes = ((1023, torch.float32), (4097, torch.bfloat16))
    finite = [planted(n, dtype, seed=n).nan_to_num(0.0, 0.0, 0.0) for n, dtype in sizes]
    params = _params([g.cuda() for g in finite])
    monitor = GradMonitor(params, max_norm=1.0, histograms=True, histogram_history=4)
    fgs.grad_stats(params, histogram=True)  # warm-up: kernel compile, table and LUT caches
    monitor.step()  # clips the gradients in place: compare with what they are now
    expected = [p.grad.detach().cpu().clone() for _, p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = fgs.grad_stats(params, histogram=True)
        stats.precision_report(torch.float8_e4m3fn)
        monitor.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check_counts(stats, expected)
