"""grad_stats / GradStats against float64 references, planted NaN/Inf, property tests."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    ODD_SIZES,
    assert_same_tensors,
    clone_grads,
    make_params,
    ref_tensor_norm,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgradstats as fgs

NORM_TYPES = [2.0, 1.0, math.inf, 3.0]
# relative tolerance of a per-tensor norm accumulated in float32 (float64 for float64)
NORM_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def _check_against_reference(stats, grads, norm_type):
    assert len(stats) == len(grads)
    for i, g in enumerate(grads):
        g64 = g.detach().to(torch.float64).flatten()
        n_nan, n_inf = int(g64.isnan().sum()), int(g64.isinf().sum())
        assert int(stats.nan_count[i]) == n_nan, f"nan_count[{i}]"
        assert int(stats.inf_count[i]) == n_inf, f"inf_count[{i}]"
        assert int(stats.numel[i]) == g.numel()
        if n_nan:
            assert math.isnan(float(stats.norms[i])) and math.isnan(float(stats.max_abs[i]))
            continue
        max_abs = float(g64.abs().max()) if g.numel() else 0.0
        assert float(stats.max_abs[i]) == max_abs, f"max_abs[{i}] must be exact"
        want = ref_tensor_norm(g, norm_type)
        got = float(stats.norms[i])
        if math.isinf(want):
            assert got == want
        else:
            assert got == pytest.approx(want, rel=NORM_RTOL[g.dtype], abs=1e-30), f"norms[{i}]"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_per_tensor_stats_against_float64(backend, dtype, norm_type):
    params = make_params(ODD_SIZES + [2053], dtype=dtype, scale=0.3)
    original = clone_grads(params)
    stats = fgs.grad_stats(params, norm_type)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.norms.dtype == stats.max_abs.dtype == expected_dtype
    assert stats.nan_count.dtype == stats.inf_count.dtype == torch.int64
    assert stats.names == [str(i) for i in range(len(params))]
    _check_against_reference(stats, original, norm_type)
    total_ref = torch.linalg.vector_norm(
        torch.cat([g.double().flatten() for g in original]), norm_type
    )
    assert float(stats.total_norm) == pytest.approx(float(total_ref), rel=NORM_RTOL[dtype])
    assert_same_tensors(clone_grads(params), original, "grad_stats wrote gradients")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_planted_nan_and_inf_are_counted_where_planted(backend, dtype):
    params = make_params([1, 7, 1023, 0, 13, 4099], dtype=dtype)
    params[0].grad[0] = float("nan")  # the only element
    params[2].grad[1022] = float("inf")  # last element
    params[2].grad[0] = -float("inf")  # first element
    params[4].grad[5] = float("nan")  # NaN and Inf in the same tensor
    params[4].grad[6] = float("inf")
    params[5].grad[-1] = float("nan")  # last element of the last tensor
    params[5].grad[100:103] = float("nan")
    stats = fgs.grad_stats(params)
    assert stats.nan_count.tolist() == [1, 0, 0, 0, 1, 4]
    assert stats.inf_count.tolist() == [0, 0, 2, 0, 1, 0]
    assert stats.nonfinite_names() == ["0", "2", "4", "5"]
    assert stats.nonfinite.tolist() == [True, False, True, False, True, True]
    assert bool(stats.has_nonfinite)
    assert float(stats.norms[2]) == math.inf and float(stats.max_abs[2]) == math.inf
    assert float(stats.norms[3]) == 0.0 and float(stats.max_abs[3]) == 0.0
    _check_against_reference(stats, [p.grad for p in params], 2.0)
    assert math.isnan(float(stats.total_norm))


def test_named_parameters_keep_names_and_skip_none(backend):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    model[2].bias.grad = None
    stats = fgs.grad_stats(model.named_parameters())
    assert stats.names == ["0.weight", "0.bias", "2.weight"]
    by_name = dict(model.named_parameters())
    for i, name in enumerate(stats.names):
        assert float(stats.norms[i]) == pytest.approx(
            ref_tensor_norm(by_name[name].grad, 2.0), rel=2e-6
        )
    assert not bool(stats.has_nonfinite)
    assert stats.nonfinite_names() == []


def test_to_dict_and_table(backend):
    params = make_params([3, 0, 5])
    params[2].grad[4] = float("inf")
    stats = fgs.grad_stats(params)
    data = stats.to_dict()
    json.dumps(data, allow_nan=True)  # plain Python numbers only
    assert data["norm_type"] == 2.0 and data["clip_coef"] is None
    assert list(data["tensors"]) == ["0", "1", "2"]
    assert data["tensors"]["1"] == {
        "norm": 0.0,
        "max_abs": 0.0,
        "nan_count": 0,
        "inf_count": 0,
        "numel": 0,
    }
    assert data["tensors"]["2"]["inf_count"] == 1 and data["total_norm"] == math.inf
    assert data["tensors"]["0"]["norm"] == pytest.approx(ref_tensor_norm(params[0].grad, 2.0))
    table = stats.table()
    assert table.splitlines()[0].split()[:3] == ["name", "norm", "max|g|"]
    assert len(table.splitlines()) == 5
    assert "n=3" in repr(stats)


def test_duplicate_names_keep_every_entry_in_to_dict(backend):
    """Two models' named_parameters() chained reuse names: no entry may be lost."""
    first = torch.nn.Linear(3, 2)
    second = torch.nn.Linear(4, 2)
    for model, scale in ((first, 1.0), (second, 100.0)):
        model(torch.randn(5, model.in_features)).sum().mul(scale).backward()
    second.bias.grad[0] = float("nan")
    named = [*first.named_parameters(), *second.named_parameters(), ("weight#2", first.weight)]
    stats = fgs.grad_stats(named)
    assert stats.names == ["weight", "bias", "weight", "bias", "weight#2"]  # as given
    tensors = stats.to_dict()["tensors"]
    assert list(tensors) == ["weight", "bias", "weight#3", "bias#2", "weight#2"]
    grads = [p.grad for _, p in named]
    for (key, row), g in zip(tensors.items(), grads):
        assert row["numel"] == g.numel(), key
        assert row["nan_count"] == int(g.isnan().sum()), key
        if not row["nan_count"]:
            assert row["norm"] == pytest.approx(ref_tensor_norm(g, 2.0), rel=2e-6), key
    assert tensors["bias#2"]["nan_count"] == 1 and tensors["bias"]["nan_count"] == 0
    table = stats.table(sort=False).splitlines()  # model order
    assert [line.split()[0] for line in table[1:-1]] == list(tensors)


def test_empty_input_gives_empty_stats(backend):
    stats = fgs.grad_stats([])
    assert len(stats) == 0 and stats.norms.shape == (0,) and float(stats.total_norm) == 0.0
    assert stats.to_dict()["tensors"] == {}
    assert stats.nonfinite_names() == []


def test_mixed_dtypes_keep_input_order(backend):
    sizes = [5, 9, 3, 12, 1]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.bfloat16]
    params = [
        make_params([n], dt, scale=i + 1.0)[0] for i, (n, dt) in enumerate(zip(sizes, dtypes))
    ]
    params[3].grad[2] = float("nan")
    stats = fgs.grad_stats(params)
    _check_against_reference(stats, [p.grad for p in params], 2.0)
    assert stats.nan_count.tolist() == [0, 0, 0, 1, 0]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_return_stats_is_the_pre_clip_view_and_clip_coef(backend, norm_type):
    params = make_params([31, 7, 1023], scale=2.0)
    before = fgs.grad_stats(params, norm_type).to_dict()
    total, stats = fgs.clip_grad_norm_(params, 0.5, norm_type, return_stats=True)
    after = stats.to_dict()
    assert after["total_norm"] == pytest.approx(before["total_norm"], rel=1e-6)
    assert float(total) == pytest.approx(before["total_norm"], rel=1e-6)
    for name, row in before["tensors"].items():
        assert after["tensors"][name]["norm"] == pytest.approx(row["norm"], rel=1e-6)
        assert after["tensors"][name]["max_abs"] == row["max_abs"]
    expected_coef = min(0.5 / (before["total_norm"] + 1e-6), 1.0)
    assert after["clip_coef"] == pytest.approx(expected_coef, rel=1e-6)
    clipped = fgs.grad_stats(params, norm_type).to_dict()
    assert clipped["total_norm"] == pytest.approx(0.5, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_combine_on_first_device(backend):
    cpu = make_params([5, 7])
    gpu = make_params([9, 4], device="cuda")
    params = [gpu[0], cpu[0], gpu[1], cpu[1]]
    grads = [p.grad for p in params]
    expected = torch.nn.utils.get_total_norm(grads)
    total = fgs.get_total_norm(grads)
    assert total.device == expected.device
    torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)
    stats = fgs.grad_stats(params)
    assert stats.norms.device.type == "cuda"
    _check_against_reference(stats, grads, 2.0)


_shapes = st.lists(
    st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=3),
    min_size=1,
    max_size=12,
)


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shapes=_shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    norm_type=st.sampled_from(NORM_TYPES),
    plant=st.integers(min_value=0, max_value=2),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_random_shapes(backend, shapes, dtype, norm_type, plant, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [
        (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype) for shape in shapes
    ]
    nonempty = [g for g in grads if g.numel()]
    if plant and nonempty:
        victim = nonempty[seed % len(nonempty)].view(-1)
        victim[seed % victim.numel()] = float("nan") if plant == 1 else float("inf")
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    stats = fgs.grad_stats(params, norm_type)
    _check_against_reference(stats, grads, norm_type)
    total = fgs.get_total_norm(grads, norm_type)
    flat = torch.cat([g.double().flatten() for g in grads])
    want = float(torch.linalg.vector_norm(flat, norm_type)) if flat.numel() else 0.0
    got = float(total)
    if math.isnan(want) or math.isinf(want):
        assert got == want or (math.isnan(got) and math.isnan(want))
    else:
        # rounded as torch rounds it: each per-tensor norm, then the total, to the gradient
        # dtype (half an ulp, 2**-8 for bf16 and 2**-11 for fp16, each time)
        rtol = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(dtype, NORM_RTOL[dtype] * 10)
        assert got == pytest.approx(want, rel=rtol, abs=1e-30)
