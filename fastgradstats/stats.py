"""Named per-tensor gradient statistics that stay on the device until asked for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import core, distributed
from .torch_backend import host_to_device


@dataclass
class GradStats:
    """Per-tensor gradient statistics of one step, as device tensors (no host sync).

    Every per-tensor field has shape [n], one entry per gradient, in input order; tensors
    whose ``.grad`` was ``None`` are not listed. Float fields are float32 (float64 when a
    gradient is float64) and live on the first gradient's device.

    Attributes:
        names: parameter names; ``"0"``, ``"1"``, ... when the input was unnamed.
        norms: per-tensor ``norm_type``-norm of the gradient.
        max_abs: per-tensor max |g| (0 for an empty tensor; NaN when the tensor holds NaN).
        nan_count / inf_count: per-tensor number of NaN / ±Inf elements, int64.
        total_norm: 0-d, the ``norm_type``-norm of all gradients seen as one vector.
        norm_type: the p of the norms.
        clip_coef: 0-d clip coefficient ``min(max_norm / (total + 1e-6), 1)`` when the stats
            came from ``clip_grad_norm_(..., return_stats=True)``, else ``None``.
    """

    names: list[str]
    norms: Tensor
    max_abs: Tensor
    nan_count: Tensor
    inf_count: Tensor
    total_norm: Tensor
    norm_type: float = 2.0
    clip_coef: Tensor | None = None
    numels: list[int] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:  # never syncs: printing a step's stats must stay cheap
        return (
            f"GradStats(n={len(self)}, norm_type={self.norm_type}, "
            f"device={self.norms.device}, dtype={self.norms.dtype})"
        )

    @property
    def numel(self) -> Tensor:
        """Element count of each gradient, int64 [n], on the stats' device."""
        return host_to_device(self.numels, torch.int64, self.norms.device)

    @property
    def nonfinite(self) -> Tensor:
        """Bool [n] on the device: which gradients hold a NaN or an Inf (no sync)."""
        return (self.nan_count + self.inf_count) > 0

    @property
    def has_nonfinite(self) -> Tensor:
        """0-d bool tensor on the device: does any gradient hold a NaN or Inf (no sync)."""
        return self.nonfinite.any()

    def nonfinite_names(self) -> list[str]:
        """Names of the gradients that hold a NaN or Inf (one host sync)."""
        flags = self.nonfinite.tolist()
        return [name for name, bad in zip(self.names, flags) if bad]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python numbers, one host sync for everything.

        ``{"norm_type", "total_norm", "clip_coef", "tensors": {name: {"norm", "max_abs",
        "nan_count", "inf_count", "numel"}}}``, one entry per gradient in input order. A
        name given more than once (e.g. two models' ``named_parameters()`` chained) keeps
        every entry: its second occurrence is keyed ``"name#2"``, the third ``"name#3"``...
        (see :func:`unique_names`).
        """
        scalars = [self.total_norm.to(self.norms.dtype).reshape(1)]
        if self.clip_coef is not None:
            scalars.append(self.clip_coef.to(self.norms.device, self.norms.dtype).reshape(1))
        floats = torch.cat([self.norms, self.max_abs, *scalars]).tolist()
        counts = torch.cat([self.nan_count, self.inf_count]).tolist()
        n = len(self)
        tensors = {
            name: {
                "norm": floats[i],
                "max_abs": floats[n + i],
                "nan_count": int(counts[i]),
                "inf_count": int(counts[n + i]),
                "numel": self.numels[i],
            }
            for i, name in enumerate(unique_names(self.names))
        }
        return {
            "norm_type": self.norm_type,
            "total_norm": floats[2 * n],
            "clip_coef": floats[2 * n + 1] if self.clip_coef is not None else None,
            "tensors": tensors,
        }

    def table(self, limit: int | None = None) -> str:
        """A fixed-width text table of the per-tensor stats (one host sync)."""
        data = self.to_dict()
        rows = list(data["tensors"].items())[:limit]
        width = max([len("name"), *(len(name) for name, _ in rows)])
        header = f"{'norm':>11}  {'max|g|':>11}  {'NaN':>6}  {'Inf':>6}  {'numel':>11}"
        lines = [f"{'name':<{width}}  {header}"]
        for name, row in rows:
            lines.append(
                f"{name:<{width}}  {row['norm']:>11.4e}  {row['max_abs']:>11.4e}  "
                f"{row['nan_count']:>6d}  {row['inf_count']:>6d}  {row['numel']:>11d}"
            )
        lines.append(f"total {self.norm_type:g}-norm: {data['total_norm']:.6e}")
        return "\n".join(lines)


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats told apart: the k-th occurrence (k >= 2) of ``n`` becomes
    ``"n#k"`` (or the next free ``"n#j"`` when that name is taken too); unique names stay."""
    if len(set(names)) == len(names):
        return list(names)
    taken = set(names)
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        if count == 1:
            out.append(name)
            continue
        candidate = f"{name}#{count}"
        while candidate in taken:
            count += 1
            candidate = f"{name}#{count}"
        seen[name] = count
        taken.add(candidate)
        out.append(candidate)
    return out


def empty_stats(norm_type: float) -> GradStats:
    """The statistics of no gradients at all (CPU tensors, total norm 0)."""
    zeros = torch.zeros(0)
    counts = torch.zeros(0, dtype=torch.int64)
    return GradStats([], zeros, zeros.clone(), counts, counts.clone(), torch.tensor(0.0), norm_type)


def compute(
    grads: core.GradList,
    norm_type: float,
    backend: str | None = None,
    foreach: bool | None = None,
    groups: core.Groups | None = None,
    sharding: distributed.Sharding | None = None,
) -> GradStats:
    """Per-tensor stats and total norm of already collected gradients (no host sync)."""
    if not grads.grads:
        return empty_stats(norm_type)
    if sharding is None and groups is None:  # one stats + one finalize launch on Triton
        call = core.fused(grads.grads, norm_type, backend, use_grad=False, stats=True)
        if call is not None:
            return GradStats(
                names=grads.names,
                norms=call.floats[0],
                max_abs=call.floats[1],
                nan_count=call.counts[0],
                inf_count=call.counts[1],
                total_norm=call.exact_total,
                norm_type=norm_type,
                numels=call.numels,
            )
    groups = groups if groups is not None else core.group(grads.grads)
    n = len(grads.grads)
    per_tensor = core.per_tensor_stats(groups, n, norm_type, backend, foreach)
    numels = [g.numel() for g in grads.grads]
    if sharding is not None:  # sharded grads: combine the partials across ranks
        per_tensor, numels = sharding.reduce_stats(per_tensor, norm_type)
    total = core.total_norm(per_tensor.norms, norm_type)
    return GradStats(
        names=grads.names,
        norms=per_tensor.norms,
        max_abs=per_tensor.max_abs,
        nan_count=per_tensor.nan_count,
        inf_count=per_tensor.inf_count,
        total_norm=total,
        norm_type=norm_type,
        numels=numels,
    )


@torch.no_grad()
def grad_stats(
    parameters: Any,
    norm_type: float | str = 2.0,
    *,
    backend: str | None = None,
    process_group: Any = None,
) -> GradStats:
    """Per-tensor gradient norm, max |g|, NaN/Inf counts and the total norm, in one pass.

    Args:
        parameters: a Tensor, an iterable of Tensors (their ``.grad`` is read), or
            ``model.named_parameters()`` pairs (names are kept). ``None`` grads are skipped.
        norm_type: the p of the norms (any p torch accepts; 1, 2 and inf run fused).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; default ``$FASTGRADSTATS_BACKEND``
            or ``"auto"``.
        process_group: for plain tensors that are shards of parameters sharded over this
            torch.distributed group; DTensor gradients need nothing (see
            :mod:`fastgradstats.distributed`). Stats are then those of the full parameters.

    Returns:
        :class:`GradStats` holding device tensors; nothing is synced until you ask for
        numbers (``to_dict()``, ``nonfinite_names()``, ``table()``).
    """
    p = core.check_norm_type(norm_type)
    grads = core.collect(parameters)
    sharding = distributed.localize(grads, process_group)
    return compute(grads, p, backend, sharding=sharding)


__all__ = ["GradStats", "empty_stats", "grad_stats", "unique_names"]
