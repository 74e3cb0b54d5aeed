"""Test helpers: random gradient lists, float64 references, torch comparisons."""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ODD_SIZES = [0, 1, 7, 13, 127, 1023, 1031]  # 13, 127, 1031 are primes


def make_params(
    sizes: list[int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[torch.nn.Parameter]:
    """Parameters of the given sizes with fresh random gradients (N(0, scale^2))."""
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        g = torch.randn(n, generator=generator, dtype=torch.float64) * scale
        p.grad = g.to(device=device, dtype=dtype)
        params.append(p)
    return params


def clone_grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def ref_norm(tensors, norm_type: float) -> float:
    """The exact-as-possible norm of all tensors as one vector, in float64."""
    flat = [t.detach().to(torch.float64).flatten() for t in tensors if t is not None]
    if not flat:
        return 0.0
    v = torch.cat(flat)
    if v.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(v, norm_type))


def ref_tensor_norm(t: torch.Tensor, norm_type: float) -> float:
    t = t.detach().to(torch.float64).flatten()
    if t.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(t, norm_type))


def rel_err(value: float, reference: float) -> float:
    if math.isinf(reference) or math.isnan(reference):
        return (
            0.0
            if (value == reference or (math.isnan(value) and math.isnan(reference)))
            else math.inf
        )
    return abs(value - reference) / max(abs(reference), 1e-30)


def assert_same_tensors(actual, expected, msg: str = "") -> None:
    """Bit-for-bit equality, NaN positions included."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{msg} tensor {i}"
        assert torch.equal(
            a.view(-1).view(torch.uint8) if a.numel() else a,
            e.view(-1).view(torch.uint8) if e.numel() else e,
        ), f"{msg} tensor {i} differs"


def require_extra(module: str) -> ModuleType:
    """Import an optional package for a test: skip without it, except in CI.

    ``.ci/run`` sets ``FASTGRADSTATS_REQUIRE_EXTRAS=1`` and installs every extra, so there a
    missing package fails the test instead of skipping it.
    """
    if os.environ.get("FASTGRADSTATS_REQUIRE_EXTRAS"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op run under it (``with OpRecorder() as rec``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class GradStorageRecorder(OpRecorder):
    """Records every aten op whose inputs or outputs share storage with a gradient."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        super().__init__()
        self.storages = {g.untyped_storage().data_ptr() for g in grads}
        self.touching: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten((args, kwargs, out))
        for t in flat:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages:
                self.touching.append(str(func))
                break
        self.ops.append(str(func))
        return out


def assert_same_stats(actual: Any, expected: Any) -> None:
    """Two ``GradStats`` hold the same names, sizes, norm type and per-tensor results,
    bit for bit."""
    assert actual.names == expected.names
    assert actual.numels == expected.numels
    assert actual.norm_type == expected.norm_type
    assert_same_tensors(
        [actual.norms, actual.max_abs, actual.nan_count, actual.inf_count, actual.total_norm],
        [expected.norms, expected.max_abs, expected.nan_count, expected.inf_count,
         expected.total_norm],
    )  # fmt: skip


def params_with_grads(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """A zero parameter per tensor of ``grads`` (its shape, dtype and device), with that
    tensor itself (not a copy) as its ``.grad``."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device))
        p.grad = g
        params.append(p)
    return params


def run_benchmark(
    module_args: list[str], out, pattern: str, interpreter: bool = False
) -> tuple[dict, str]:
    """``python -m <module_args> --out <out>`` from the repository root (the Triton
    interpreter on when asked); asserts it exits 0 and returns its one JSON ``pattern``
    (parsed) and its standard output."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if interpreter else {}))
    proc = subprocess.run(
        [sys.executable, "-m", *module_args, "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [path] = Path(out).glob(pattern)
    return json.loads(path.read_text()), proc.stdout
