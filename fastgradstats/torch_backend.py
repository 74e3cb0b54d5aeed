"""Pure-PyTorch backend: the readable specification of the backend contract.

Every backend module exposes the same four functions, each working on ONE group of
gradients that share a device and a dtype (the grouping is done by ``fastgradstats.core``):

``group_norms(grads, norm_type, foreach)``
    -> Tensor [n] in the accumulation dtype (see :func:`acc_dtype`): per-tensor p-norms.
``group_stats(grads, norm_type, foreach)``
    -> ``GroupStats``: per-tensor p-norm, max |g|, NaN count, Inf count, all shape [n].
``scale_(grads, coef, foreach)``
    multiply every gradient in place by the 0-d device tensor ``coef``; gradient memory is
    left untouched when ``coef >= 1`` wherever the backend can tell without a host sync
    (and, for this backend, outside ``torch.compile``: see :func:`scale_`).
``clamp_(grads, clip_value, foreach)``
    clamp every gradient in place to ``[-clip_value, clip_value]``.

Conventions shared by all backends:
  * accumulation in float32 for 16/32-bit floats, float64 for float64 (complex: its real
    counterpart), whatever the gradient dtype;
  * the max |g| and the inf-norm of an empty tensor are 0 (torch raises there);
  * NaN propagates: a tensor holding a NaN has NaN norm and NaN max |g|.

This backend runs anywhere torch runs. It reads each gradient once for the norms; the
full statistics cost a second read (max |g|) and, only for tensors whose max |g| is not
finite, a third (the NaN/Inf counts). On CUDA it never syncs, at the price of always
counting NaN/Inf (as under ``torch.compile`` on any device: a graph cannot choose which
tensors to count from their values); the Triton backend does everything in one read.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .histogram import group_histogram  # the backend contract's histogram: the reference
from .overlap import overlap_rounds

INF = math.inf


class GroupStats(NamedTuple):
    """Per-tensor statistics of one (device, dtype) group; every field has shape [n]."""

    norms: Tensor  # p-norm of each tensor, accumulation dtype
    max_abs: Tensor  # max |g| of each tensor (0 for empty tensors), accumulation dtype
    nan_count: Tensor  # int64
    inf_count: Tensor  # int64


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a tensor on ``device``, without a host sync.

    On CUDA the copy goes through pinned memory with ``non_blocking=True``: a copy from
    pageable memory would wait for all queued GPU work first.
    """
    if torch.compiler.is_compiling():
        # traced as a graph constant: no host memory to pin (and pinning cannot be traced)
        return torch.tensor(values, dtype=dtype, device=device)
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in for gradients of ``dtype``."""
    if dtype in (torch.float64, torch.complex128):
        return torch.float64
    return torch.float32


def _use_foreach(grads: list[Tensor], foreach: bool | None) -> bool:
    if foreach is False:
        return False
    device = grads[0].device
    supported = torch.utils._foreach_utils._device_has_foreach_support(device)
    if foreach and not supported:
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return supported


# 16-bit gradients on the CPU: asking torch for a float32 norm converts the whole tensor
# first and runs the float32 kernel, whose one long accumulation drifts on big tensors
# (bf16, 38.6M elements: 46 ms and 2.2e-3 relative error). Native-dtype norms of rows of
# _ROW elements (float32 inside a row, one 16-bit rounding per row), combined in float32,
# are 2-25x faster and, from _CPU_ROWWISE_MIN_NUMEL elements up, as accurate or better
# (bf16, 6 seeds, worst relative error: 1M elements 3.3e-5 vs 4.2e-5 converting; 2.4M
# 3.2e-5 vs 6.0e-5; 38.6M ~1e-5 vs 2.2e-3).
_CPU_ROWWISE_MIN_NUMEL = 1 << 20
_ROW = 1 << 9


def _rowwise_norm(g: Tensor, ord: float) -> Tensor:
    flat = g.reshape(-1)
    rows = flat.numel() // _ROW
    parts = [torch.linalg.vector_norm(flat[: rows * _ROW].view(rows, _ROW), ord, dim=1)]
    if flat.numel() > rows * _ROW:
        parts.append(torch.linalg.vector_norm(flat[rows * _ROW :], ord).reshape(1))
    return torch.linalg.vector_norm(torch.cat(parts).to(torch.float32), ord)


def _norm_list(grads: list[Tensor], ord: float, foreach: bool | None) -> list[Tensor]:
    acc = acc_dtype(grads[0].dtype)
    # Asking for dtype=acc only when it differs keeps fp32/fp64 on torch's own code path,
    # so those results are bit-identical to torch.nn.utils; complex norms are real already.
    kwargs = {} if grads[0].dtype == acc or grads[0].is_complex() else {"dtype": acc}
    rowwise = (
        kwargs
        and grads[0].device.type == "cpu"
        and 0 < ord < INF
        and any(g.numel() >= _CPU_ROWWISE_MIN_NUMEL for g in grads)
    )
    if rowwise:
        big = [i for i, g in enumerate(grads) if g.numel() >= _CPU_ROWWISE_MIN_NUMEL]
        out = (
            _norm_list_plain(
                [g for g in grads if g.numel() < _CPU_ROWWISE_MIN_NUMEL], ord, foreach, kwargs
            )
            if len(big) < len(grads)
            else []
        )
        for i in big:
            out.insert(i, _rowwise_norm(grads[i], ord))
        return out
    return _norm_list_plain(grads, ord, foreach, kwargs)


def _norm_list_plain(
    grads: list[Tensor], ord: float, foreach: bool | None, kwargs: dict
) -> list[Tensor]:
    if _use_foreach(grads, foreach):
        return list(torch._foreach_norm(grads, ord, **kwargs))
    return [torch.linalg.vector_norm(g, ord, **kwargs) for g in grads]


# On the CPU, torch's inf-norm kernel is ~15x slower than aminmax on large tensors
# (GPT-2-124M fp32 grads, one thread: 670 ms vs 40 ms), and asking it for an fp32 result
# on bf16 input converts first; tensors from this size on take the aminmax route.
_CPU_AMINMAX_MIN_NUMEL = 1 << 15


def _max_abs_list(grads: list[Tensor], foreach: bool | None) -> list[Tensor]:
    """max |g| of each (non-empty) tensor as 0-d tensors; exact, NaN propagates.

    CPU results are in the accumulation dtype; elsewhere in torch's inf-norm dtype."""
    if grads[0].device.type != "cpu" or grads[0].is_complex():
        return _norm_list(grads, INF, foreach)
    acc = acc_dtype(grads[0].dtype)
    out: list[Tensor | None] = [None] * len(grads)
    small = []
    for i, g in enumerate(grads):
        if g.numel() >= _CPU_AMINMAX_MIN_NUMEL:
            lo, hi = torch.aminmax(g)
            out[i] = torch.maximum(hi, lo.neg()).to(acc)
        else:
            small.append(i)
    if small:
        for i, value in zip(small, _norm_list([grads[i] for i in small], INF, foreach)):
            out[i] = value
    return out  # type: ignore[return-value]


def _inf_norms(grads: list[Tensor], foreach: bool | None) -> Tensor:
    """max |g| per tensor, with 0 for empty tensors (torch refuses the inf-norm of those)."""
    nonempty = [i for i, g in enumerate(grads) if g.numel() > 0]
    acc = acc_dtype(grads[0].dtype)
    if len(nonempty) == len(grads):
        return torch.stack(_max_abs_list(grads, foreach)).to(acc)
    out = torch.zeros(len(grads), dtype=acc, device=grads[0].device)
    if nonempty:
        values = torch.stack(_max_abs_list([grads[i] for i in nonempty], foreach)).to(acc)
        out[host_to_device(nonempty, torch.int64, out.device)] = values
    return out


def group_norms(grads: list[Tensor], norm_type: float, foreach: bool | None = None) -> Tensor:
    """Per-tensor ``norm_type``-norms of a same-device, same-dtype list, shape [n]."""
    if norm_type == INF:
        return _inf_norms(grads, foreach)
    return torch.stack(_norm_list(grads, norm_type, foreach)).to(acc_dtype(grads[0].dtype))


def _count_nonfinite(grads: list[Tensor], max_abs: Tensor) -> tuple[Tensor, Tensor]:
    n, device = len(grads), grads[0].device
    if device.type == "cpu" and not torch.compiler.is_compiling():
        # On the host the check is free: only tensors whose max |g| is not finite can hold
        # a NaN or an Inf, so the common all-finite case costs no extra pass.
        suspects = (~torch.isfinite(max_abs)).nonzero().flatten().tolist()
    else:
        # Deciding which to skip would need a sync (or, under torch.compile, a
        # data-dependent graph): count them all.
        suspects = range(n)
    nan_count = torch.zeros(n, dtype=torch.int64, device=device)
    inf_count = torch.zeros(n, dtype=torch.int64, device=device)
    if len(suspects) == n:
        nan_count = torch.stack([torch.isnan(g).sum() for g in grads])
        inf_count = torch.stack([torch.isinf(g).sum() for g in grads])
    elif suspects:
        sel = [grads[i] for i in suspects]
        index = host_to_device(list(suspects), torch.int64, device)
        nan_count[index] = torch.stack([torch.isnan(g).sum() for g in sel])
        inf_count[index] = torch.stack([torch.isinf(g).sum() for g in sel])
    return nan_count, inf_count


def group_stats(grads: list[Tensor], norm_type: float, foreach: bool | None = None) -> GroupStats:
    """Per-tensor p-norm, max |g|, NaN and Inf counts of a same-device, same-dtype list."""
    max_abs = _inf_norms(grads, foreach)
    norms = max_abs if norm_type == INF else group_norms(grads, norm_type, foreach)
    nan_count, inf_count = _count_nonfinite(grads, max_abs)
    return GroupStats(norms, max_abs, nan_count, inf_count)


def scale_(grads: list[Tensor], coef: Tensor, foreach: bool | None = None) -> None:
    """Multiply each gradient in place by the 0-d tensor ``coef`` (on the grads' device).

    A coefficient >= 1 means "nothing to clip". In eager mode on the CPU, where reading
    ``coef`` is free, the gradients are then not written at all. Under ``torch.compile``,
    whose graphs cannot branch on a tensor value, they are multiplied by
    ``where(coef >= 1, 1, coef)``: written, with the values they had. On CUDA in eager
    mode they are multiplied by ``coef`` as torch does (the callers clamp it to <= 1).
    A NaN coefficient is applied, as torch applies it.
    """
    compiling = torch.compiler.is_compiling()
    if compiling:
        coef = torch.where(coef >= 1.0, torch.ones_like(coef), coef)  # NaN >= 1 is False
    elif coef.device.type == "cpu" and bool(coef >= 1.0):
        return
    use_foreach = _use_foreach(grads, foreach)
    parts = [grads]
    if grads[0].is_cuda and not compiling:
        # One CUDA foreach launch over a tensor passed twice has two blocks scaling the
        # same memory at once; one launch per round of disjoint tensors scales it twice,
        # in turn (the CPU foreach already runs the list in order).
        rounds = overlap_rounds([g.data_ptr() for g in grads], [g.nbytes for g in grads])
        if rounds is not None:
            parts = [[grads[t] for t in members] for members in rounds]
    for part in parts:
        if use_foreach:
            torch._foreach_mul_(part, coef)
        else:
            for g in part:
                g.mul_(coef)


def clamp_(grads: list[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """Clamp each gradient in place to ``[-clip_value, clip_value]`` (NaN stays NaN)."""
    if _use_foreach(grads, foreach):
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)
    else:
        for g in grads:
            g.clamp_(min=-clip_value, max=clip_value)


def zero_where_(grads: list[Tensor], flag: Tensor, foreach: bool | None = None) -> None:
    """Set each gradient to 0 in place where the 0-d bool tensor ``flag`` is true (a
    ``masked_fill``, not a multiply: NaN * 0 is NaN). On the CPU, where reading ``flag``
    is free, nothing is written when it is false."""
    if flag.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(flag):
            if _use_foreach(grads, foreach):
                torch._foreach_zero_(grads)
            else:
                for g in grads:
                    g.zero_()
        return
    for g in grads:
        g.masked_fill_(flag.to(g.device), 0)


def supports(device: torch.device, dtype: torch.dtype, norm_type: float) -> bool:
    """The torch backend handles every device, dtype and norm type torch does."""
    return True


__all__ = [
    "GroupStats",
    "acc_dtype",
    "clamp_",
    "group_histogram",
    "group_norms",
    "group_stats",
    "host_to_device",
    "scale_",
    "supports",
    "zero_where_",
]
