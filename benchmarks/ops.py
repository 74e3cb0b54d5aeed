"""The benchmarked operations, each with its fastgradstats call and the torch baselines.

Every op is timed on the same gradients for every implementation, in the same run:

==============  ==========================================  ===================================
op              fastgradstats                               torch baselines
==============  ==========================================  ===================================
total_norm      get_total_norm(grads)                       torch.nn.utils.get_total_norm,
                                                            foreach=True / False
clip_noclip     clip_grad_norm_(params, 2 x total)          torch.nn.utils.clip_grad_norm_,
                                                            foreach=True / False
clip            clip_grad_norm_(params, total / 2)          same
grad_stats      grad_stats(params)                          user code: _foreach_norm 2 and inf,
                                                            isnan / isinf counts, total norm
stats_clip      clip_grad_norm_(..., return_stats=True)     the same user code, then
                                                            clip_grads_with_norm_(foreach=True)
==============  ==========================================  ===================================

The clip cases use ``max_norm`` = half the initial total norm, so a call scales by ~0.5.
A clipped list's norm then sits at ``max_norm`` and a second call would not clip (the
coefficient rounds to 1), so the timers run the op's ``reset`` after every timed call,
outside the timed region: it doubles the gradients back, and every timed call clips.

:func:`check_op` runs fastgradstats and the primary baseline on the same inputs and reports
the relative differences, so a benchmark never times a wrong result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import fastgradstats as fgs
from fastgradstats import handoff

from .workloads import clone_grads, grad_holders

INF = math.inf
FGS = "fastgradstats"
TORCH_FOREACH = "torch_foreach"
TORCH_LOOP = "torch_loop"
TORCH_USER = "torch_user"


@dataclass
class Case:
    """One set of benchmark inputs: gradients, parameter-like holders, the two max norms."""

    grads: list[Tensor]
    params: list[Tensor]
    max_norm_noclip: float  # twice the initial total norm: nothing to clip
    max_norm_clip: float  # half the initial total norm: a call scales by ~0.5
    backend: str | None = None  # fastgradstats backend (None: env / auto)


def total_norm_f64(grads: list[Tensor]) -> float:
    """The exact-ish 2-norm of all gradients (float64 accumulation, one host sync)."""
    if not grads:
        return 0.0
    parts = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(parts)))


def make_case(grads: list[Tensor], backend: str | None = None) -> Case:
    """Wrap ``grads`` into a :class:`Case` whose max norms are set from their total norm."""
    total = total_norm_f64(grads)
    if not math.isfinite(total) or total == 0:
        total = 1.0  # planted NaN/Inf in checks: any positive max_norm exercises the path
    return Case(grads, grad_holders(grads), 2.0 * total, 0.5 * total, backend)


def torch_user_stats(grads: list[Tensor]) -> dict[str, Tensor]:
    """What a user writes today for per-tensor stats with plain torch (no host sync)."""
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    max_abs = torch.stack(torch._foreach_norm(grads, INF))
    nan_count = torch.stack([torch.isnan(g).sum() for g in grads])
    inf_count = torch.stack([torch.isinf(g).sum() for g in grads])
    total = torch.linalg.vector_norm(norms, 2.0)
    return {
        "norms": norms,
        "max_abs": max_abs,
        "nan_count": nan_count,
        "inf_count": inf_count,
        "total_norm": total,
    }


def _fgs_stats_dict(stats: fgs.GradStats) -> dict[str, Tensor]:
    return {
        "norms": stats.norms,
        "max_abs": stats.max_abs,
        "nan_count": stats.nan_count,
        "inf_count": stats.inf_count,
        "total_norm": stats.total_norm,
    }


def _torch_user_stats_clip(case: Case) -> dict[str, Tensor]:
    out = torch_user_stats(case.grads)
    torch.nn.utils.clip_grads_with_norm_(
        case.params, case.max_norm_clip, out["total_norm"], foreach=True
    )
    return out


def _fgs_stats_clip(case: Case) -> dict[str, Tensor]:
    _total, stats = fgs.clip_grad_norm_(
        case.params, case.max_norm_clip, return_stats=True, backend=case.backend
    )
    return _fgs_stats_dict(stats)


Impl = Callable[[Case], Any]


def restore_after_clip(case: Case) -> None:
    """Undo a clip to ``max_norm_clip`` (half the initial norm): double every gradient.

    Run untimed between calls. Each call+restore pair multiplies by
    ``2 * max_norm / (total + 1e-6)``, i.e. by 1 - ~1e-6: no drift worth the name."""
    torch._foreach_mul_(case.grads, 2.0)


@dataclass(frozen=True)
class Op:
    """A benchmarked operation: implementations by name, the primary baseline, the bytes."""

    name: str
    description: str
    writes: bool  # True when the op scales the gradients (clipping needed)
    impls: dict[str, Impl]
    baseline: str  # the torch implementation ratios are taken against
    reset: Callable[[Case], None] | None = None  # untimed, after each call (clip ops)

    def min_bytes(self, grad_bytes: int) -> int:
        """Bytes the op must move at least: read every gradient once; a clip that scales
        reads and writes every gradient once more."""
        return 3 * grad_bytes if self.writes else grad_bytes


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            "total_norm",
            "total 2-norm of all gradients",
            False,
            {
                FGS: lambda c: fgs.get_total_norm(c.grads, backend=c.backend),
                TORCH_FOREACH: lambda c: torch.nn.utils.get_total_norm(c.grads, foreach=True),
                TORCH_LOOP: lambda c: torch.nn.utils.get_total_norm(c.grads, foreach=False),
            },
            TORCH_FOREACH,
        ),
        Op(
            "clip_noclip",
            "clip_grad_norm_, max_norm above the total norm (nothing to clip)",
            False,
            {
                FGS: lambda c: fgs.clip_grad_norm_(c.params, c.max_norm_noclip, backend=c.backend),
                TORCH_FOREACH: lambda c: torch.nn.utils.clip_grad_norm_(
                    c.params, c.max_norm_noclip, foreach=True
                ),
                TORCH_LOOP: lambda c: torch.nn.utils.clip_grad_norm_(
                    c.params, c.max_norm_noclip, foreach=False
                ),
            },
            TORCH_FOREACH,
        ),
        Op(
            "clip",
            "clip_grad_norm_, max_norm half the total norm (every call scales)",
            True,
            {
                FGS: lambda c: fgs.clip_grad_norm_(c.params, c.max_norm_clip, backend=c.backend),
                TORCH_FOREACH: lambda c: torch.nn.utils.clip_grad_norm_(
                    c.params, c.max_norm_clip, foreach=True
                ),
                TORCH_LOOP: lambda c: torch.nn.utils.clip_grad_norm_(
                    c.params, c.max_norm_clip, foreach=False
                ),
            },
            TORCH_FOREACH,
            restore_after_clip,
        ),
        Op(
            "grad_stats",
            "per-tensor 2-norm, max|g|, NaN and Inf counts, total norm",
            False,
            {
                FGS: lambda c: _fgs_stats_dict(fgs.grad_stats(c.params, backend=c.backend)),
                TORCH_USER: lambda c: torch_user_stats(c.grads),
            },
            TORCH_USER,
        ),
        Op(
            "stats_clip",
            "grad_stats and clipping (needed) in one call",
            True,
            {FGS: _fgs_stats_clip, TORCH_USER: _torch_user_stats_clip},
            TORCH_USER,
            restore_after_clip,
        ),
    )
}
OP_NAMES = tuple(OPS)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 over finite entries; ``inf`` when
    the NaN or ±Inf positions differ (a wrong non-finite answer is never "close")."""
    # On the tensors' own device: moving a 7B-parameter model's grads to the host is slow.
    a = actual.detach().to(torch.float64).flatten()
    e = expected.detach().to(a.device, torch.float64).flatten()
    if a.shape != e.shape:
        return INF
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return INF
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    if not torch.equal(a_inf, e_inf) or not torch.equal(a[a_inf], e[e_inf]):
        return INF
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    ref = float(torch.linalg.vector_norm(e))
    diff = float(torch.linalg.vector_norm(a - e))
    if ref == 0:
        return 0.0 if diff == 0 else INF
    return diff / ref


def _list_rel_err(actual: list[Tensor], expected: list[Tensor]) -> float:
    """Relative difference of two gradient lists seen as one vector (non-finite: as rel_err)."""
    if len(actual) != len(expected):
        return INF
    if all(torch.equal(a, e) for a, e in zip(actual, expected)):
        return 0.0  # the common case, one cheap pass; NaN never compares equal, so it goes on
    num = den = 0.0
    for a, e in zip(actual, expected):
        if torch.equal(a, e):
            den += float(torch.linalg.vector_norm(e, dtype=torch.float64)) ** 2
            continue
        err = rel_err(a, e)
        if err == INF:
            return INF
        finite = torch.isfinite(e)
        e64 = e[finite].to(torch.float64)
        num += float(torch.linalg.vector_norm(a[finite].to(torch.float64) - e64)) ** 2
        den += float(torch.linalg.vector_norm(e64)) ** 2
    if den == 0:
        return 0.0 if num == 0 else INF
    return math.sqrt(num / den)


def tolerance(dtype: torch.dtype) -> float:
    """Allowed relative difference to torch: fastgradstats accumulates 16-bit grads in
    fp32 while torch rounds each per-tensor norm to the grad dtype (2^-8 for bf16)."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)


def _as_dict(result: Any) -> dict[str, Tensor]:
    if isinstance(result, dict):
        return result
    return {"total_norm": result}


def check_op(op_name: str, grads: list[Tensor], backend: str | None = None) -> dict[str, Any]:
    """Run fastgradstats and the torch baseline of ``op_name`` on copies of ``grads``.

    Returns ``{"ok": bool, "tolerance": float, "errors": {field: rel_err}}``, comparing
    every returned number and, for ops that clip, the gradients afterwards.
    """
    op = OPS[op_name]
    fgs_grads, torch_grads = clone_grads(grads), clone_grads(grads)
    fgs_case = make_case(fgs_grads, backend)
    torch_case = make_case(torch_grads, backend)
    got = _as_dict(op.impls[FGS](fgs_case))
    want = _as_dict(op.impls[op.baseline](torch_case))
    errors = {}
    for key in want.keys() & got.keys():
        if key.endswith("_count"):  # counts must match exactly, whatever the dtype
            same = torch.equal(got[key].cpu().to(torch.int64), want[key].cpu().to(torch.int64))
            errors[key] = 0.0 if same else INF
        else:
            errors[key] = rel_err(got[key], want[key])
    if op.writes or op_name == "clip_noclip":
        errors["grads_after"] = _list_rel_err(fgs_grads, torch_grads)
    tol = tolerance(grads[0].dtype)
    ok = set(errors) >= set(want) and all(err <= tol for err in errors.values())
    return {"ok": ok, "tolerance": tol, "errors": errors}


# ----------------------------------------------------------------- clip + optimizer step
#
# Not part of the OPS matrix: each implementation steps a real optimizer on real
# parameters, so it has its own runner (suite.run_clip_step). Implementations, all with
# ``AdamW(fused=True)``, on the same parameters, gradients and optimizer:
#
#   step             opt.step() alone (the floor)
#   handoff          fgs.clip_grad_norm_(params, max_norm, optimizer=opt); opt.step()
#   fgs_clip_step    fgs.clip_grad_norm_(params, max_norm); opt.step()
#   torch_clip_step  torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True); opt.step()
#
# max_norm is half the initial total norm, so every call clips by ~0.5; the untimed reset
# doubles the gradients back (the hand-off's step writes them back divided, like a clip).

STEP = "step"
HANDOFF = "handoff"
FGS_CLIP_STEP = "fgs_clip_step"
TORCH_CLIP_STEP = "torch_clip_step"
CLIP_STEP_IMPLS = (STEP, HANDOFF, FGS_CLIP_STEP, TORCH_CLIP_STEP)


@dataclass
class StepCase:
    """Parameters with gradients, the fused optimizer stepping them, the clip threshold."""

    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    max_norm: float
    backend: str | None = None

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]


def make_step_case(grads: list[Tensor], backend: str | None = None, lr: float = 1e-4) -> StepCase:
    """Parameters (random, same shapes, dtype, device as ``grads``) holding ``grads``, and
    ``AdamW(fused=True)`` over them; ``max_norm`` is half the gradients' total norm."""
    gen = torch.Generator(device=grads[0].device).manual_seed(1) if grads else None
    params = []
    for g in grads:
        p = torch.nn.Parameter(
            torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype) * 0.02
        )
        p.grad = g
        params.append(p)
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    total = total_norm_f64(grads)
    return StepCase(params, optimizer, 0.5 * (total if total > 0 else 1.0), backend)


def clip_step_impls(case: StepCase) -> dict[str, Callable[[], Any]]:
    """The four implementations of one training-step tail, as zero-argument callables."""
    opt, params, max_norm, backend = case.optimizer, case.params, case.max_norm, case.backend

    def step() -> None:
        opt.step()

    def handoff() -> None:
        fgs.clip_grad_norm_(params, max_norm, backend=backend, optimizer=opt)
        opt.step()

    def fgs_clip_step() -> None:
        fgs.clip_grad_norm_(params, max_norm, backend=backend)
        opt.step()

    def torch_clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        opt.step()

    return {
        STEP: step,
        HANDOFF: handoff,
        FGS_CLIP_STEP: fgs_clip_step,
        TORCH_CLIP_STEP: torch_clip_step,
    }


def restore_after_clip_step(case: StepCase) -> None:
    """Untimed, after a clipping implementation: double the gradients back."""
    torch._foreach_mul_(case.grads, 2.0)


def _copy_case(grads: list[Tensor], backend: str | None) -> StepCase:
    return make_step_case([g.clone() for g in grads], backend)


def check_clip_step(grads: list[Tensor], backend: str | None = None) -> dict[str, Any]:
    """One step of each clipping implementation from identical parameters, gradients and
    optimizer state; the hand-off must match torch's clip + step (params, grads, moments)
    and must actually hand the coefficient over (no scaling pass of its own)."""
    cases = {name: _copy_case(grads, backend) for name in (HANDOFF, FGS_CLIP_STEP,
                                                            TORCH_CLIP_STEP)}  # fmt: skip
    used = False
    for name, case in cases.items():
        if name == HANDOFF:  # the impl, unrolled to see the coefficient wait for the step
            handoff.watch(case.optimizer)  # a fresh optimizer: else its first clip scales
            fgs.clip_grad_norm_(case.params, case.max_norm, backend=backend,
                                optimizer=case.optimizer)  # fmt: skip
            used = handoff.pending_scale(case.optimizer) is not None
            case.optimizer.step()
        else:
            clip_step_impls(case)[name]()
    ref = cases[TORCH_CLIP_STEP]
    errors: dict[str, float] = {}
    for name in (HANDOFF, FGS_CLIP_STEP):
        case = cases[name]
        errors[f"{name}_params"] = _list_rel_err([p.detach() for p in case.params],
                                                 [p.detach() for p in ref.params])  # fmt: skip
        errors[f"{name}_grads"] = _list_rel_err(case.grads, ref.grads)
        for key in ("exp_avg", "exp_avg_sq"):
            errors[f"{name}_{key}"] = _list_rel_err(
                [case.optimizer.state[p][key] for p in case.params],
                [ref.optimizer.state[p][key] for p in ref.params],
            )
    tol = tolerance(grads[0].dtype)
    ok = used and all(err <= tol for err in errors.values())
    return {"ok": ok, "tolerance": tol, "handoff_used": used, "errors": errors}


__all__ = [
    "CLIP_STEP_IMPLS",
    "FGS",
    "FGS_CLIP_STEP",
    "HANDOFF",
    "OPS",
    "OP_NAMES",
    "STEP",
    "TORCH_CLIP_STEP",
    "TORCH_FOREACH",
    "TORCH_LOOP",
    "TORCH_USER",
    "Case",
    "Op",
    "StepCase",
    "check_clip_step",
    "check_op",
    "clip_step_impls",
    "make_case",
    "make_step_case",
    "rel_err",
    "restore_after_clip",
    "restore_after_clip_step",
    "tolerance",
    "torch_user_stats",
    "total_norm_f64",
]
