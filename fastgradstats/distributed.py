"""Distributed training helpers: FSDP1 / DeepSpeed ZeRO shards by parameter, pipeline stages.

The public calls (``clip_grad_norm_``, ``grad_stats``, ...) already handle DTensor
gradients and ``process_group=`` shards through :mod:`fastgradstats.sharding`, which reads
sharded gradients and reduces their partial statistics across ranks (its names are
re-exported here). This module is what a user of a sharded setup calls besides them.

FSDP1 and DeepSpeed ZeRO 1/2 keep flat shards that cut parameters anywhere:
:func:`fsdp1_grads` and :func:`deepspeed_zero_grads` name each parameter's piece of this
rank's shard (placeholders whose ``.grad`` is the piece), to be passed with their group as
``process_group=``. They read the libraries' internal layouts (FSDP1's ``FlatParameter``
shard metadata, the ZeRO optimizer's ``averaged_gradients``); the tests run them against
torch 2.13's FSDP1 and DeepSpeed 0.19.8.

Pipeline stages hold different parameters: :func:`combine_pipeline_norm` combines their
total norms (one all-reduce, no sync) and :func:`combine_pipeline_stats` concatenates their
per-tensor statistics (one object all-gather of names on the host, then one all-gather).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import core, inputs
from .sharding import (
    FULL_PARAMETER_ATTR,
    Sharding,
    as_total_norm,
    check_norm_type,
    group_ranks,
    is_dtensor,
    local_tensor,
    localize,
    require_initialized,
    to_local_,
    wide_dtype,
)
from .stats import GradStats


def _placeholder(grad: Tensor, full_numel: int, replicated: bool, base: dict) -> Tensor:
    """A tensor whose ``.grad`` is ``grad`` (a stride-0 view of one element: no memory)."""
    key = (grad.dtype, grad.device)
    if key not in base:
        base[key] = grad.new_zeros(())
    holder = base[key].expand(grad.shape)
    holder.grad = grad
    setattr(holder, FULL_PARAMETER_ATTR, (int(full_numel), bool(replicated)))
    return holder


def _fsdp1_handles(model: Any) -> tuple[list[Any], Any]:
    """The FSDP1 handles in ``model`` and the one process group they shard over (None when
    no unit is sharded)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module wrapped by FSDP, got {type(model).__name__}")
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    handles = _get_fsdp_handles(model)
    if not handles:
        raise ValueError(
            "model: no FullyShardedDataParallel module found in it (for FSDP2's fully_shard "
            "pass model.named_parameters() to fastgradstats directly)"
        )
    groups = {h.process_group for h in handles if h.uses_sharded_strategy}
    if len(groups) > 1:
        raise ValueError(
            "model: its FSDP modules shard over different process groups; fastgradstats "
            "combines one group per call"
        )
    return handles, (groups.pop() if groups else None)


def _shard_piece(h: Any, i: int, grad: Tensor | None, flat: Tensor) -> Tensor:
    """This rank's piece of the gradient of original parameter ``i`` of FSDP handle ``h``
    (``grad``: the flat shard's gradient, or with use_orig_params the parameter's own)."""
    info = h.flat_param._shard_param_infos[i]
    if grad is None or not info.in_shard:
        return flat[:0]
    return grad if h._use_orig_params else grad[info.offset_in_shard :][: info.numel_in_shard]


def _module_order(model: Any) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    """``(module_pos, slot)``: each module's position in ``model.modules()`` and each
    parameter's ``(module position, position in the module)``, by id.

    FSDP1 lists its FlatParameters root unit first: sorting by these gives model order.
    """
    modules = list(model.modules())
    module_pos = {id(m): k for k, m in enumerate(modules)}
    slot: dict[int, tuple[int, int]] = {}
    for k, m in enumerate(modules):
        for j, q in enumerate(m._parameters.values()):
            slot.setdefault(id(q), (k, j))
    return module_pos, slot


_Keyed = tuple[tuple[int, int], str, Tensor]  # (model-order key, name, placeholder)


def _flat_param_entries(
    h: Any, param: Any, name: str, module_pos: dict[int, int], base: dict
) -> list[_Keyed]:
    """use_orig_params=False: one FlatParameter per FSDP unit, cut into its original
    parameters (none when the unit has no gradient)."""
    flat = param.grad
    if flat is None:
        return []
    prefix = name[: -len("_flat_param")] if name.endswith("_flat_param") else name
    replicated = not h.uses_sharded_strategy
    entries = []
    for i, (fqn, info) in enumerate(zip(param._fqns, param._param_infos)):
        holder = _placeholder(_shard_piece(h, i, flat, flat), param._numels[i], replicated, base)
        entries.append(((module_pos.get(id(info.module), -1), i), prefix + fqn, holder))
    return entries


def _orig_param_holder(param: Tensor, by_orig: dict[int, tuple[Any, int]], base: dict) -> Any:
    """The placeholder of an original parameter (use_orig_params=True: a 1-D view of the
    flat shard; not managed by FSDP: every rank holds all of it), or None without gradient."""
    if id(param) in by_orig:
        h, i = by_orig[id(param)]
        flat = h.flat_param.grad
        if flat is None:  # this unit took no part in backward (on every rank)
            return None
        grad = _shard_piece(h, i, param.grad, flat)
        return _placeholder(grad, h.flat_param._numels[i], not h.uses_sharded_strategy, base)
    if param.grad is not None:
        return _placeholder(param.grad, param.numel(), True, base)
    return None


def fsdp1_grads(model: Any) -> tuple[list[tuple[str, Tensor]], Any]:
    """The gradients of an FSDP1 model as named shards, and the group they are sharded over.

    ``model`` is a ``torch.distributed.fsdp.FullyShardedDataParallel`` module (or a module
    holding some), after ``backward()``. Returns ``(named, group)``: ``named`` lists, in
    ``model.named_parameters()`` order and with the original parameter names (FSDP's
    ``_fsdp_wrapped_module.`` prefixes removed), one ``(name, tensor)`` pair per original
    parameter whose ``tensor.grad`` is this rank's piece of its gradient (a view into
    FSDP's flat gradient shard, empty where this rank holds none of it), with
    ``use_orig_params=True`` or ``False`` alike. Pass both on::

        named, group = fsdp1_grads(model)
        total = fgs.clip_grad_norm_(named, 1.0, process_group=group)  # == FSDP.clip_grad_norm_
        stats = fgs.grad_stats(named, process_group=group)  # full-parameter stats

    Parameters under ``NO_SHARD`` or not managed by FSDP are counted once, as
    ``FSDP.clip_grad_norm_`` counts them. No collective, no host sync; call it again after
    each ``backward()`` (the views are those of this step's gradients).
    """
    handles, group = _fsdp1_handles(model)
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    by_flat = {id(h.flat_param): h for h in handles}
    by_orig = {
        id(q): (h, i)
        for h in handles
        if h._use_orig_params
        for i, q in enumerate(h.flat_param._params)
    }
    module_pos, slot = _module_order(model)
    base: dict = {}
    keyed: list[_Keyed] = []
    for raw_name, param in model.named_parameters():
        name = clean_tensor_name(raw_name)
        if id(param) in by_flat:
            keyed += _flat_param_entries(by_flat[id(param)], param, name, module_pos, base)
            continue
        holder = _orig_param_holder(param, by_orig, base)
        if holder is not None:
            keyed.append((slot.get(id(param), (-1, 0)), name, holder))
    keyed.sort(key=lambda entry: entry[0])
    return [(name, holder) for _, name, holder in keyed], group


def deepspeed_zero_grads(engine: Any) -> tuple[list[tuple[str, Tensor]], Any]:
    """The gradient partitions of a DeepSpeed ZeRO stage 1/2 engine, named, and their group.

    Call it after ``engine.backward(loss)`` at a gradient accumulation boundary and before
    ``engine.step()``. Returns ``(named, group)`` as :func:`fsdp1_grads` does: one pair per
    trainable parameter, in ``engine.module.named_parameters()`` order, whose ``.grad`` is
    this rank's piece of the reduced gradient (the tensors ``engine.step()`` reads, so
    clipping them in place clips the step), and the data-parallel group::

        named, group = deepspeed_zero_grads(engine)
        stats = fgs.grad_stats(named, process_group=group)  # total == get_global_grad_norm()
        fgs.clip_grad_norm_(named, 1.0, process_group=group)  # as "gradient_clipping": 1.0

    One SUM (and one MAX) all-reduce for all parameters, instead of one collective per
    parameter with ``safe_get_full_grad``. With fp16 loss scaling the gradients hold the
    scaled values (divide by ``engine.optimizer.loss_scale``). No host sync.
    """
    stage = getattr(engine, "zero_optimization_stage", None)
    if callable(stage) and stage() not in (1, 2):
        raise ValueError(
            f"engine: ZeRO stage {stage()} is not supported (stage 0: the parameters' .grad "
            "are whole, call fastgradstats as under DDP; stage 3: not supported)"
        )
    opt = getattr(engine, "optimizer", None)
    needed = ("averaged_gradients", "params_in_partition", "bit16_groups", "real_dp_process_group")
    if not all(hasattr(opt, attr) for attr in needed):
        raise ValueError(
            f"engine: its optimizer ({type(opt).__name__}) is not DeepSpeed's ZeRO stage 1/2 "
            "optimizer; for stage 0 the parameters' .grad are whole (call fastgradstats as "
            "under DDP), stage 3 is not supported"
        )
    if getattr(opt, "cpu_offload", False):
        raise ValueError("engine: ZeRO offload_optimizer is not supported (the gradients are "
                         "copied into the offloaded fp32 partition)")  # fmt: skip
    mp_group = getattr(opt, "model_parallel_group", None)
    if mp_group is not None and dist.get_world_size(mp_group) > 1:
        raise ValueError("engine: model (tensor) parallelism is not supported")
    groups = {id(g): g for g in opt.real_dp_process_group}
    if len(groups) > 1:
        raise ValueError("engine: parameter groups use different data-parallel groups (MoE)")
    pieces: dict[int, Tensor] = {}
    in_groups: set[int] = set()
    for i, params in enumerate(opt.bit16_groups):
        grads = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) else None
        if grads is None:
            raise RuntimeError(
                "engine: no reduced gradients; call deepspeed_zero_grads after "
                "engine.backward(loss) at a gradient accumulation boundary, before engine.step()"
            )
        grads = [g for g in grads if not getattr(g, "_zero_padding", False)]
        local = opt.params_in_partition[i]
        # a trailing block of zeros (not always marked _zero_padding) pads the last
        # partition; DeepSpeed's own norm pairs pieces with parameters the same way
        extra = len(grads) - len(local)
        if extra not in (0, 1) or any(g.numel() > p.numel() for p, g in zip(local, grads)):
            raise RuntimeError(
                f"engine: parameter group {i} holds {len(grads)} gradient pieces for "
                f"{len(local)} parameters in this partition (unknown DeepSpeed layout)"
            )
        pieces.update((id(p), g) for p, g in zip(local, grads[: len(local)]))
        in_groups.update(id(p) for p in params)
    base: dict = {}
    named: list[tuple[str, Tensor]] = []
    for name, param in engine.module.named_parameters():
        if id(param) not in in_groups:
            continue  # frozen: not handed to the optimizer
        grad = pieces.get(id(param))
        if grad is None:  # none of it in this rank's partition
            grad = torch.empty(0, dtype=opt.gradient_accumulation_dtype, device=param.device)
        named.append((name, _placeholder(grad, param.numel(), False, base)))
    return named, next(iter(groups.values()))


def combine_pipeline_norm(
    total_norm: Tensor, norm_type: float | str = 2.0, pp_group: Any = None
) -> Tensor:
    """Combine the total norms of pipeline stages into the norm of the whole model.

    Every stage passes the total ``norm_type``-norm of its own gradients (a 0-d tensor,
    e.g. from :func:`fastgradstats.get_total_norm`); each gets back the same 0-d tensor,
    same dtype and device. One all-reduce over ``pp_group`` (``None``: the default group),
    no host sync. NaN on any stage gives NaN on all.
    """
    p = inputs.check_norm_type(norm_type)
    check_norm_type(p)
    require_initialized("combine_pipeline_norm")
    group_ranks(pp_group, "pp_group")
    if not isinstance(total_norm, Tensor):
        raise TypeError(f"total_norm must be a Tensor, got {type(total_norm).__name__}")
    total_norm = local_tensor(total_norm)
    return Sharding([pp_group]).reduce_norms(total_norm.reshape(1), p).reshape(())


def _stage_names(per_stage: list[list[str]]) -> list[str]:
    names = [name for stage in per_stage for name in stage]
    if len(set(names)) == len(names):
        return names
    # Stages built separately often reuse names ("0.weight"): tell them apart by stage.
    return [f"stage{rank}.{name}" for rank, stage in enumerate(per_stage) for name in stage]


def combine_pipeline_stats(stats: GradStats, pp_group: Any = None) -> GradStats:
    """Concatenate the per-tensor statistics of all pipeline stages, in stage (rank) order.

    Every rank of ``pp_group`` (``None``: the default group) passes the
    :class:`~fastgradstats.GradStats` of its own stage and gets back the statistics of the
    whole model: per-tensor lists of length ``sum(n_stage)``, total norm of everything.
    Names are kept, prefixed ``"stage{k}."`` only when two stages use the same name.
    ``clip_coef`` is not carried over (it was a per-stage value).

    Costs one host-side ``all_gather_object`` of names and sizes (a sync; use
    :func:`combine_pipeline_norm` in the clipping hot path) and one ``all_gather``.
    """
    require_initialized("combine_pipeline_stats")
    ranks = group_ranks(pp_group, "pp_group")
    if not isinstance(stats, GradStats):
        raise TypeError(f"stats must be a GradStats, got {type(stats).__name__}")
    header = (list(stats.names), list(stats.numels), stats.norm_type, str(stats.norms.dtype))
    headers: list[Any] = [None] * len(ranks)
    dist.all_gather_object(headers, header, group=pp_group)
    norm_types = {h[2] for h in headers}
    if len(norm_types) > 1:
        raise ValueError(f"stats: pipeline stages used different norm_type values {norm_types}")
    wide_on_any = any(h[3] == str(torch.float64) for h in headers)
    out_dtype = torch.float64 if wide_on_any else stats.norms.dtype

    device, wide = stats.norms.device, wide_dtype(stats.norms.device)
    width = max(len(h[0]) for h in headers)
    local = torch.zeros(4, width, dtype=wide, device=device)
    n = len(stats)
    fields = (stats.norms, stats.max_abs, stats.nan_count, stats.inf_count)
    for row, values in enumerate(fields):
        local[row, :n] = values.to(device, wide)
    gathered = [torch.empty_like(local) for _ in ranks]
    dist.all_gather(gathered, local, group=pp_group)
    table = torch.cat([g[:, : len(h[0])] for g, h in zip(gathered, headers)], dim=1)

    norms = table[0].to(out_dtype)
    counts = table[2:].round().to(torch.int64)
    # per-stage extras (clip_coef, histograms) are not carried over
    return dataclasses.replace(
        stats,
        clip_coef=None,
        histogram=None,
        histogram_edges=None,
        zero_count=None,
        names=_stage_names([h[0] for h in headers]),
        norms=norms,
        max_abs=table[1].to(out_dtype),
        nan_count=counts[0],
        inf_count=counts[1],
        total_norm=core.total_norm(norms, stats.norm_type),
        norm_type=stats.norm_type,
        numels=[numel for h in headers for numel in h[1]],
    )


__all__ = [
    "Sharding",
    "as_total_norm",
    "combine_pipeline_norm",
    "combine_pipeline_stats",
    "deepspeed_zero_grads",
    "fsdp1_grads",
    "is_dtensor",
    "local_tensor",
    "localize",
    "to_local_",
]
