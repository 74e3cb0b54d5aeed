"""Named per-tensor gradient statistics that stay on the device until asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import core
from .constants import NUM_BINS
from .histogram import SUPPORTED_DTYPES as HISTOGRAM_DTYPES
from .histogram import edges_on
from .precision import PrecisionReport, precision_report
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
        histogram: int64 [n, B] (``B = constants.NUM_BINS = 152``) counts of finite |g| in
            ``[histogram_edges[i], histogram_edges[i+1])``; NaN/Inf are in no bin. Only with
            ``grad_stats(..., histogram=True)``, else ``None``.
        histogram_edges: float64 [B + 1] on the device: 0, 2^-133, 2^-132, ..., 2^17, inf.
        zero_count: int64 [n], exact zeros (also counted in bin 0).
        catchup_tensors: from :meth:`fastgradstats.BackwardStats.finalize`, how many
            tensors were measured after backward because their slot was not fresh; else
            ``None``.
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
    histogram: Tensor | None = None
    histogram_edges: Tensor | None = None
    zero_count: Tensor | None = None
    catchup_tensors: int | None = None
    # the fused pass's float [2, n] (norms, max_abs) and int64 [2, n] (NaN, Inf) results,
    # which the per-tensor fields are rows of (GradMonitor copies them in two ops)
    _packed: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.histogram is not None:  # on the stats' device, with the edges they count in
            device = self.norms.device
            self.histogram = self.histogram.to(device)
            if self.zero_count is not None:
                self.zero_count = self.zero_count.to(device)
            if self.histogram_edges is None:
                self.histogram_edges = edges_on(device).clone()

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

    def precision_report(
        self, dtype: torch.dtype | str = torch.float16, *, margin: int = 0
    ) -> PrecisionReport:
        """Per-tensor share of nonzero finite values a cast to ``dtype`` would hurt.

        ``dtype``: torch.float16, torch.bfloat16, torch.float8_e4m3fn or float8_e5m2 (or
        "fp16", "bf16", "e4m3", "e5m2"). Returns a
        :class:`fastgradstats.precision.PrecisionReport` of device tensors (no sync), from
        :attr:`histogram` with :attr:`max_abs` as the exact amax (so ``overflow`` is exactly
        0 wherever max |g| is below the overflow threshold). Needs ``histogram=True``.
        """
        if self.histogram is None or self.zero_count is None:
            raise ValueError(
                "precision_report needs histograms: call grad_stats(..., histogram=True)"
            )
        return precision_report(
            self.histogram,
            self.zero_count,
            self.numels,
            dtype,
            max_abs=self.max_abs.to(self.histogram.device),
            margin=margin,
        )

    def to_dict(self, precision: Any = None) -> dict[str, Any]:
        """Plain Python numbers, one host sync for everything.

        ``{"norm_type", "total_norm", "clip_coef", "tensors": {name: {"norm", "max_abs",
        "nan_count", "inf_count", "numel"}}}``, one entry per gradient in input order. A
        name given more than once (e.g. two models' ``named_parameters()`` chained) keeps
        every entry: its second occurrence is keyed ``"name#2"``, the third ``"name#3"``...
        (see :func:`unique_names`).

        With histograms, each tensor also has ``"zero_count"``. ``precision`` (a target
        dtype, or a list of them; needs histograms) adds the fields of
        :meth:`precision_report` to each tensor, keyed ``"<fmt>_<field>"``, e.g.
        ``"fp16_flush_to_zero"``, ``"fp16_subnormal"``, ``"fp16_overflow"``,
        ``"fp8_e4m3fn_scaled_subnormal"`` (see ``PrecisionReport.FIELDS``).
        """
        targets = _precision_targets(precision)
        if targets and self.histogram is None:
            raise ValueError("to_dict(precision=...) needs grad_stats(..., histogram=True)")
        reports = [self.precision_report(t) for t in targets]
        fields = PrecisionReport.FIELDS
        # Everything in one float64 buffer: one device->host copy (counts < 2**53 are exact).
        f64, device = torch.float64, self.norms.device
        acc = self.norms.dtype  # the scalars are reported in the norms' dtype
        scalars = [self.total_norm.to(device, acc).to(f64).reshape(1)]
        if self.clip_coef is not None:
            scalars.append(self.clip_coef.to(device, acc).to(f64).reshape(1))
        extra = []
        if self.zero_count is not None:
            extra.append(self.zero_count.to(device, f64))
        for report in reports:
            extra += [getattr(report, f).to(device, f64) for f in fields]
        n = len(self)
        values = torch.cat(
            [self.norms.to(f64), self.max_abs.to(f64), self.nan_count.to(f64)]
            + [self.inf_count.to(f64), *extra, *scalars]
        ).tolist()
        floats = values[:n] + values[n : 2 * n] + values[len(values) - len(scalars) :]
        counts = values[2 * n : 4 * n]
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
        offset = 4 * n
        if self.zero_count is not None:
            for i, row in enumerate(tensors.values()):
                row["zero_count"] = int(values[offset + i])
            offset += n
        for report in reports:
            prefix = report.format.name
            for f in fields:
                for i, row in enumerate(tensors.values()):
                    row[f"{prefix}_{f}"] = values[offset + i]
                offset += n
        return {
            "norm_type": self.norm_type,
            "total_norm": floats[2 * n],
            "clip_coef": floats[2 * n + 1] if self.clip_coef is not None else None,
            "tensors": tensors,
        }

    def table(self, limit: int | None = None, sort: bool = True) -> str:
        """A fixed-width text table of the per-tensor stats (one host sync).

        Rows are sorted (``sort=True``): tensors holding NaN/Inf (or with a non-finite
        norm) first, then by norm, largest first; ``sort=False`` keeps model order.
        ``limit`` rows at most (``None``: all); the table then says how many it left out
        (``... 138 more rows``).
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int or None, got {limit!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        data = self.to_dict()
        rows = list(data["tensors"].items())
        if sort:
            rows.sort(key=lambda item: _table_rank(item[1]))  # stable: model order in ties
        left_out = 0 if limit is None else max(0, len(rows) - limit)
        rows = rows if limit is None else rows[:limit]
        width = max([len("name"), *(len(name) for name, _ in rows)])
        header = f"{'norm':>11}  {'max|g|':>11}  {'NaN':>6}  {'Inf':>6}  {'numel':>11}"
        lines = [f"{'name':<{width}}  {header}"]
        for name, row in rows:
            lines.append(
                f"{name:<{width}}  {row['norm']:>11.4e}  {row['max_abs']:>11.4e}  "
                f"{row['nan_count']:>6d}  {row['inf_count']:>6d}  {row['numel']:>11d}"
            )
        if left_out:
            lines.append(f"... {left_out} more row{'s' if left_out != 1 else ''}")
        lines.append(f"total {self.norm_type:g}-norm: {data['total_norm']:.6e}")
        return "\n".join(lines)


def _table_rank(row: dict[str, Any]) -> tuple[int, float]:
    """Sort key of a :meth:`GradStats.table` row: non-finite first, then largest norm."""
    norm = row["norm"]
    broken = row["nan_count"] > 0 or row["inf_count"] > 0 or not math.isfinite(norm)
    return (0 if broken else 1, -norm if math.isfinite(norm) else 0.0)


def _precision_targets(precision: Any) -> list[Any]:
    if precision is None:
        return []
    if isinstance(precision, (torch.dtype, str)):
        return [precision]
    try:
        return list(precision)
    except TypeError:
        raise TypeError(
            f"precision must be a dtype, a name or a list of them, got {precision!r}"
        ) from None


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


def empty_stats(norm_type: float, histogram: bool = False) -> GradStats:
    """The statistics of no gradients at all (CPU tensors, total norm 0); ``histogram``:
    with empty histogram fields ([0, B] counts, the edges)."""
    zeros = torch.zeros(0)
    counts = torch.zeros(0, dtype=torch.int64)
    bins = torch.zeros((0, NUM_BINS), dtype=torch.int64) if histogram else None
    return GradStats(
        [], zeros, zeros.clone(), counts, counts.clone(), torch.tensor(0.0), norm_type,
        histogram=bins, zero_count=counts.clone() if histogram else None,
    )  # fmt: skip


def fused_stats(call: core.Fused, names: list[str], norm_type: float) -> GradStats:
    """The :class:`GradStats` of a fused stats pass (``core.fused(..., stats=True)``): its
    device tensors as they are, the histogram fields when the stats launches binned."""
    norms, max_abs = call.floats.unbind(0)  # one op for both rows' views
    nan_count, inf_count = call.counts.unbind(0)
    return GradStats(
        names=names,
        norms=norms,
        max_abs=max_abs,
        nan_count=nan_count,
        inf_count=inf_count,
        total_norm=call.exact_total,
        norm_type=norm_type,
        clip_coef=call.coef,
        numels=call.numels,
        histogram=call.histogram,  # binned by the same read, or None
        zero_count=call.zero_count,
        _packed=(call.floats, call.counts),
    )


@torch.no_grad()
def histograms_for(grads: Sequence[Tensor], backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-tensor |g| histograms of ``grads`` with a read of their own, each (device,
    dtype) group on its backend (``group_histogram`` of the torch reference, or Triton's
    histogram kernel, one launch per table segment). ``grad_stats``, ``clip_grad_norm_``
    and ``GradMonitor`` with histograms on the fused Triton path bin in the stats launch
    instead (``stats_kernel`` with ``HISTOGRAM``).

    Returns:
        ``(counts, zeros)``: int64 ``[n, NUM_BINS]`` and int64 ``[n]`` on ``grads[0]``'s
        device, in input order. No host sync.
    """
    grads = list(grads)
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"grads[{i}] must be a Tensor, got {type(g).__name__}")
        if g.dtype not in HISTOGRAM_DTYPES:
            raise TypeError(
                f"grads[{i}] has dtype {g.dtype}; histograms support "
                f"{', '.join(str(d) for d in HISTOGRAM_DTYPES)}"
            )
    if not grads:
        return torch.zeros((0, NUM_BINS), dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return core.per_tensor_histograms(core.group(grads), len(grads), backend)


__all__ = [
    "GradStats",
    "empty_stats",
    "fused_stats",
    "histograms_for",
    "unique_names",
]
