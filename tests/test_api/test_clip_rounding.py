"""16-bit clipping matches torch bit for bit; the non-finite check sees the returned value.

Issue 10 items 1 (clip part) and 2, on both backends (Triton through the interpreter).
torch computes each per-tensor norm in the gradient dtype, the total (``vector_norm`` of
the stacked norms) and the coefficient ``clamp(max_norm / (total + 1e-6), max=1)`` in the
promoted dtype, then multiplies. Users who swap us in compare runs bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import fastgradstats as fgs
from tests.helpers import ODD_SIZES, assert_same_tensors, clone_grads, make_params

HALF_DTYPES = [torch.bfloat16, torch.float16]


def _twins(params):
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    return twins


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_16bit_grads_are_bit_identical_to_torch(backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [*ODD_SIZES, 4099, 300]
    params = make_params(sizes, dtype=dtype, scale=0.7, generator=gen)
    twins = _twins(params)
    max_norm = 0.37 + 0.1 * seed  # clips: the total is ~ 0.7 * sqrt(10k) ~ 70
    ours = fgs.clip_grad_norm_(params, max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(twins, max_norm)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    assert_same_tensors(clone_grads(params), clone_grads(twins))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_clipped_16bit_grads_bit_identical_with_stats_and_inf_norm(backend, dtype):
    params = make_params([17, 1031, 5], dtype=dtype, scale=2.0)
    twins = _twins(params)
    ours, stats = fgs.clip_grad_norm_(params, 0.5, norm_type="inf", return_stats=True)
    theirs = torch.nn.utils.clip_grad_norm_(twins, 0.5, norm_type="inf")
    assert torch.equal(ours, theirs)
    assert_same_tensors(clone_grads(params), clone_grads(twins))
    assert stats.clip_coef is not None and float(stats.clip_coef) < 1


def test_mixed_16bit_groups_match_torch(backend):
    params = make_params([33, 7], torch.bfloat16, scale=3.0)
    params += make_params([1023], torch.float16, scale=3.0)
    params += make_params([9], torch.float32, scale=3.0)
    twins = _twins(params)
    ours = fgs.clip_grad_norm_(params, 0.25)
    theirs = torch.nn.utils.clip_grad_norm_(twins, 0.25)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)  # fp32 sums: order
    for got, want in zip(clone_grads(params), clone_grads(twins)):
        if got.dtype != torch.float32:
            assert_same_tensors([got], [want])


def _fp16_over_65504():
    # every value finite (4e4 < 65504); each tensor's norm 8e4 is not, in fp16
    params = make_params([4, 4], dtype=torch.float16)
    for p in params:
        p.grad.fill_(4e4)
    return params


def test_fp16_total_above_65504_raises_like_torch(backend):
    params = _fp16_over_65504()
    before = clone_grads(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(_twins(params), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        fgs.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert_same_tensors(clone_grads(params), before)
    with pytest.raises(RuntimeError, match="non-finite"):
        fgs.get_total_norm([p.grad for p in params], error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        fgs.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, return_stats=True)
    assert_same_tensors(clone_grads(params), before)


def test_fp16_total_above_65504_without_the_check_does_what_torch_does(backend):
    params = _fp16_over_65504()
    twins = _twins(params)
    ours = fgs.clip_grad_norm_(params, 1.0)
    theirs = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    assert torch.equal(ours, theirs) and torch.isinf(ours)
    assert_same_tensors(clone_grads(params), clone_grads(twins))  # scaled by 0, as torch


def _expanded_next_to_dense():
    dense = torch.nn.Parameter(torch.zeros(200))
    dense.grad = torch.randn(200, generator=torch.Generator().manual_seed(5))
    wide = torch.nn.Parameter(torch.zeros(5, 9))
    wide.grad = torch.randn(1, 9, generator=torch.Generator().manual_seed(6)).expand(5, 9)
    return [("dense.weight", dense), ("wide.bias", wide)]


@pytest.mark.parametrize("op", ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"])
def test_expanded_grad_next_to_dense_raises_before_writing(backend, op):
    """Issue 10 item 9: validate everything, name the parameter, modify nothing."""
    pairs = _expanded_next_to_dense()
    before = clone_grads([p for _, p in pairs])
    with pytest.raises(RuntimeError, match=r"wide\.bias"):
        if op == "clip_grad_norm_":
            fgs.clip_grad_norm_(pairs, 0.01)
        elif op == "clip_grad_value_":
            fgs.clip_grad_value_(pairs, 0.01)
        else:
            fgs.clip_grads_with_norm_(pairs, 0.01, torch.tensor(100.0))
    assert_same_tensors(clone_grads([p for _, p in pairs]), before)
    # reading it is fine: stats of an expanded grad are those of its values
    stats = fgs.grad_stats(pairs)
    torch.testing.assert_close(
        stats.norms[1], torch.linalg.vector_norm(pairs[1][1].grad.contiguous()), rtol=1e-6, atol=0
    )
