"""Triton backend: the backend contract of ``torch_backend`` on fused Triton kernels.

Per (device, dtype) group (float32, bfloat16, float16; p in {1, 2, inf}):

* ``group_stats`` / ``group_norms``: ONE stats launch reads every element once and a tiny
  finalize launch reduces per tensor (deterministic, float32 accumulation);
* ``scale_``: one launch that reads the coefficient on the device and leaves gradient
  memory untouched when it is >= 1 (NaN is applied);
* ``clamp_``: one launch that stores only the elements that change.

No host sync anywhere: tensor tables are built from Python ints (``data_ptr()``,
``numel()``) and cached per storage layout (see ``kernels/tables.py``).

Layouts: any non-overlapping and dense gradient (contiguous, channels_last, transposed)
is read in place. Other strided gradients (gapped slices, expanded views) take a clear
path: the stats read a contiguous copy (same single launch, uncached table), while
scale/clamp apply the torch op to those tensors only.

float64 and complex gradients, and other p, are not handled here: ``supports`` says so and
``dispatch`` sends them to the torch backend (whose conventions this backend follows).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from . import kernels, torch_backend
from .dispatch import triton_interpreter_on
from .kernels import scale as scale_kernels
from .kernels import stats as stats_kernels
from .kernels import tables
from .torch_backend import GroupStats

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_NORMS = (1.0, 2.0, math.inf)


def supports(device: torch.device, dtype: torch.dtype, norm_type: float) -> bool:
    """True for fp32/bf16/fp16 groups and p in {1, 2, inf}, on CUDA (or CPU when interpreted)."""
    device = torch.device(device)
    runs_here = device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on())
    return runs_here and dtype in SUPPORTED_DTYPES and float(norm_type) in SUPPORTED_NORMS


def _check_group(grads: list[Tensor]) -> None:
    device, dtype = grads[0].device, grads[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton backend does not handle {dtype} gradients")
    for g in grads:
        if g.device != device or g.dtype != dtype:
            raise ValueError(
                "grads must share one device and dtype, got "
                f"{device}/{dtype} and {g.device}/{g.dtype}"
            )


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """Launch on ``device`` (Triton uses the current CUDA device and stream)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _bump_versions(tensors: list[Tensor]) -> None:
    # Kernels write through raw pointers, which autograd cannot see; tell it.
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _split_dense(grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    dense, other = [], []
    for g in grads:
        (dense if tables.is_dense(g) else other).append(g)
    return dense, other


def _fused_stats_eager(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    dense = [g if tables.is_dense(g) else g.contiguous() for g in grads]
    cacheable = all(d is g for d, g in zip(dense, grads))
    with _on_device(grads[0].device):
        table = tables.table_for(dense, kernels.block_size(), cache=cacheable)
        return stats_kernels.group_stats(table, norm_type)


def _scale_eager(grads: list[Tensor], coef: Tensor) -> None:
    dense, other = _split_dense(grads)
    if dense:
        with _on_device(coef.device):
            scale_kernels.scale_(tables.table_for(dense, kernels.block_size()), coef)
        _bump_versions(dense)
    if other:
        # Same rule as the kernel, decided on the device: coef >= 1 leaves values as they are.
        effective = torch.where(coef >= 1.0, torch.ones_like(coef), coef)
        for g in other:
            g.mul_(effective)


def _clamp_eager(grads: list[Tensor], clip_value: float) -> None:
    dense, other = _split_dense(grads)
    if dense:
        with _on_device(grads[0].device):
            scale_kernels.clamp_(tables.table_for(dense, kernels.block_size()), clip_value)
        _bump_versions(dense)
    for g in other:
        g.clamp_(min=-clip_value, max=clip_value)


# torch.compile cannot trace Triton launches over raw pointer tables (nor the interpreter):
# while compiling, the same work goes through opaque custom ops with shape-only fake
# implementations. Eager calls skip the op layer and its dispatch overhead.


@torch.library.custom_op("fastgradstats::triton_group_stats", mutates_args=())
def _group_stats_op(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    floats, counts = _fused_stats_eager(grads, norm_type)
    return floats, counts


@_group_stats_op.register_fake
def _(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    n = len(grads)
    return (
        grads[0].new_empty((2, n), dtype=torch.float32),
        grads[0].new_empty((2, n), dtype=torch.int64),
    )


@torch.library.custom_op("fastgradstats::triton_scale_", mutates_args=("grads",))
def _scale_op(grads: list[Tensor], coef: Tensor) -> None:
    _scale_eager(grads, coef)


@_scale_op.register_fake
def _(grads: list[Tensor], coef: Tensor) -> None:
    return None


@torch.library.custom_op("fastgradstats::triton_clamp_", mutates_args=("grads",))
def _clamp_op(grads: list[Tensor], clip_value: float) -> None:
    _clamp_eager(grads, clip_value)


@_clamp_op.register_fake
def _(grads: list[Tensor], clip_value: float) -> None:
    return None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _fused_stats(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    _check_group(grads)
    if _compiling():
        return _group_stats_op(grads, float(norm_type))
    return _fused_stats_eager(grads, norm_type)


def group_norms(grads: list[Tensor], norm_type: float, foreach: bool | None = None) -> Tensor:
    """Per-tensor ``norm_type``-norms of a same-device, same-dtype list, float32 [n].

    ``foreach`` is accepted for the contract and ignored (the kernel is always fused).
    """
    if float(norm_type) not in SUPPORTED_NORMS:
        return torch_backend.group_norms(grads, norm_type, foreach)
    floats, _ = _fused_stats(grads, norm_type)
    return floats[0]


def group_stats(grads: list[Tensor], norm_type: float, foreach: bool | None = None) -> GroupStats:
    """Per-tensor p-norm, max |g|, NaN and Inf counts (each [n]) in one read of the group."""
    if float(norm_type) not in SUPPORTED_NORMS:
        return torch_backend.group_stats(grads, norm_type, foreach)
    floats, counts = _fused_stats(grads, norm_type)
    return GroupStats(floats[0], floats[1], counts[0], counts[1])


def scale_(grads: list[Tensor], coef: Tensor, foreach: bool | None = None) -> None:
    """Multiply each gradient in place by the 0-d device tensor ``coef`` (float32 math).

    Nothing is read or written when ``coef >= 1``; a NaN ``coef`` is applied. The decision
    is taken on the device: no host sync.
    """
    _check_group(grads)
    device = grads[0].device
    if not isinstance(coef, Tensor):
        coef = torch.tensor(float(coef), dtype=torch.float32)
    if coef.numel() != 1:
        raise ValueError(f"coef must hold a single number, got shape {tuple(coef.shape)}")
    coef = coef.to(device).reshape(())
    if _compiling():
        _scale_op(grads, coef)
    else:
        _scale_eager(grads, coef)


def clamp_(grads: list[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """Clamp each gradient in place to ``[-clip_value, clip_value]`` (NaN stays NaN)."""
    _check_group(grads)
    if _compiling():
        _clamp_op(grads, float(clip_value))
    else:
        _clamp_eager(grads, float(clip_value))


__all__ = ["clamp_", "group_norms", "group_stats", "scale_", "supports"]
