"""Global gradient norms and statistics when gradients are sharded across processes.

How each gradient is read (the per-tensor partials come from whatever backend is selected;
this module only combines them across ranks):

* a ``DTensor`` gradient (FSDP2 ``fully_shard``, tensor parallel, ``distribute_tensor``):
  its local shard is read; per-tensor partials are summed over the mesh dims where it is
  sharded (``Shard``, ``_StridedShard``) and counted once over the mesh dims where it is
  ``Replicate`` (only the rank at coordinate 0 of such a dim contributes). ``Partial``
  placements (a sum still pending) are refused.
* a plain tensor with ``process_group=None``: a whole tensor, as DDP leaves it after its
  all-reduce; nothing is communicated for it.
* a plain tensor with ``process_group=G``: a shard of a parameter sharded over ``G``.

Collectives per call, on device tensors, without a host sync: one SUM all-reduce of a
packed float64 buffer (per-tensor ``sum |g|^p`` and the NaN/Inf counts together) and, for
the inf-norm or the full statistics, one MAX all-reduce (max |g| with NaN flags, because
MAX of NaN is not portable across collective backends). That is per reduction group: one
group for a 1-D mesh or a ``process_group``; on an N-D mesh one group per sharded mesh dim,
or the default group when more than one dim is sharded and the mesh spans the whole world.

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
import math
import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import core
from .torch_backend import GroupStats, host_to_device

if TYPE_CHECKING:
    from .stats import GradStats

INF = math.inf


def _dtensor_class() -> type | None:
    # Nobody can hold a DTensor without having imported torch.distributed.tensor, so looking
    # in sys.modules keeps the plain single-process path free of that (slow) import.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(tensor: Any) -> bool:
    """True when ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed to be initialized (dist.init_process_group)"
        )


def _group_ranks(group: Any, arg_name: str) -> list[int]:
    """Global ranks of ``group`` (``None``: the default group), checking this rank is in it."""
    if group is None:
        return list(range(dist.get_world_size()))
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{arg_name}: this rank (global rank {dist.get_rank()}) is not a member of the group"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{arg_name} must be a torch.distributed ProcessGroup or None, "
            f"got {type(group).__name__}"
        )
    ranks = dist.get_process_group_ranks(group)
    if dist.get_rank() not in ranks:
        raise ValueError(
            f"{arg_name}: this rank (global rank {dist.get_rank()}) is not a member of the "
            f"group of ranks {ranks}"
        )
    return ranks


def _check_norm_type(norm_type: float) -> None:
    if norm_type < 0:
        raise ValueError(
            f"norm_type must be >= 0 for sharded gradients (it is combined from per-shard "
            f"sums of |g|^p), got {norm_type}"
        )


def _wide_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps NaN/Inf counts and numels exact (up to 2^53) in the same buffer as the
    # |g|^p sums; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _to_partial(norms: Tensor, norm_type: float, dtype: torch.dtype) -> Tensor:
    """Per-shard p-norms -> the additive quantity ``sum |g|^p`` (the count of nonzeros for p=0)."""
    wide = norms.to(dtype)
    return wide if norm_type in (0.0, 1.0) else wide.pow(norm_type)


def _from_partial(sums: Tensor, norm_type: float) -> Tensor:
    if norm_type in (0.0, 1.0):
        return sums
    if norm_type == 2.0:
        return sums.sqrt()
    return sums.pow(1.0 / norm_type)


class Sharding:
    """How to combine per-tensor partials of one gradient list across ranks.

    Made by :func:`localize`; ``reduce_norms`` / ``reduce_stats`` do the collectives.
    ``groups`` are reduced over in sequence; ``contributes[i]`` is False on ranks whose
    copy of tensor ``i`` is a replica that another rank already counts.
    """

    def __init__(
        self,
        groups: list[Any],
        contributes: list[bool] | None = None,
        known_numels: list[int] | None = None,
        local_numels: list[int] | None = None,
        sum_numels: bool = False,
        mesh: Any = None,
    ) -> None:
        self.groups = groups
        self.mesh = mesh  # the DTensor gradients' device mesh; None for process_group shards
        self.contributes = contributes
        # Full-parameter element counts: DTensors know theirs; plain shards need a SUM of
        # their local counts (``local_numels`` holds those, 0 where the count is known).
        # ``sum_numels`` must agree on all ranks (it sets the buffer size), so it comes from
        # the kinds of gradients, never from local counts, which can all be 0 on one rank.
        self.known_numels = known_numels or []
        self.local_numels = local_numels or []
        self.sum_numels = sum_numels

    def _all_reduce(self, buf: Tensor, op: Any) -> Tensor:
        for group in self.groups:
            dist.all_reduce(buf, op=op, group=group)
        return buf

    def _sum(self, rows: Tensor) -> Tensor:
        """SUM-reduce a [k, n] buffer of per-tensor additive partials."""
        if self.contributes is not None and not all(self.contributes):
            keep = host_to_device(self.contributes, torch.bool, rows.device)
            # where, not a multiply: a NaN in a replica must not leak in as NaN * 0 = NaN
            rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        return self._all_reduce(rows.contiguous(), dist.ReduceOp.SUM)

    def _max(self, values: Tensor) -> Tensor:
        """MAX-reduce per-tensor maxima (>= 0 or NaN); NaN anywhere gives NaN everywhere."""
        dtype = _wide_dtype(values.device)
        isnan = torch.isnan(values)
        buf = torch.stack([values.to(dtype).masked_fill(isnan, 0.0), isnan.to(dtype)])
        buf = self._all_reduce(buf, dist.ReduceOp.MAX)
        return torch.where(buf[1] > 0, torch.nan, buf[0]).to(values.dtype)

    def reduce_norms(self, norms: Tensor, norm_type: float) -> Tensor:
        """Local per-shard norms [n] -> norms of the full parameters [n], same dtype."""
        _check_norm_type(norm_type)
        if not self.groups:
            return norms
        if norm_type == INF:
            return self._max(norms)
        sums = self._sum(_to_partial(norms, norm_type, _wide_dtype(norms.device))[None])
        return _from_partial(sums[0], norm_type).to(norms.dtype)

    def reduce_stats(self, stats: GroupStats, norm_type: float) -> tuple[GroupStats, list[int]]:
        """Local per-shard stats -> stats of the full parameters, and their element counts.

        One SUM and one MAX all-reduce per group. Only when some gradient is a plain shard
        (``process_group=``) are the element counts summed too, which costs one host sync.
        """
        _check_norm_type(norm_type)
        if not self.groups:
            return stats, self.known_numels
        device, dtype = stats.norms.device, _wide_dtype(stats.norms.device)
        rows = [stats.nan_count.to(dtype), stats.inf_count.to(dtype)]
        if norm_type != INF:
            rows.append(_to_partial(stats.norms, norm_type, dtype))
        if self.sum_numels:
            rows.append(host_to_device(self.local_numels, dtype, device))
        sums = self._sum(torch.stack(rows))
        max_abs = self._max(stats.max_abs)
        if norm_type == INF:
            norms = max_abs
        else:
            norms = _from_partial(sums[2], norm_type).to(stats.norms.dtype)
        numels = self.known_numels
        if self.sum_numels:
            summed = sums[-1].to(torch.int64).tolist()  # the documented host sync
            numels = [known + int(extra) for known, extra in zip(numels, summed)]
        counts = sums[:2].round().to(torch.int64)
        return GroupStats(norms, max_abs, counts[0], counts[1]), numels


# Set on the placeholder tensors made by fsdp1_grads / deepspeed_zero_grads: (element count
# of the full parameter, whether every rank holds the whole gradient).
_FULL = "_fastgradstats_full"


def _plain_shards(grads: core.GradList, process_group: Any) -> Sharding:
    """The Sharding of plain tensors that are shards over ``process_group``.

    Placeholders from :func:`fsdp1_grads` / :func:`deepspeed_zero_grads` say the full
    element count (no SUM of local counts, so no host sync) and whether the gradient is
    replicated (counted on the group's first rank only, as FSDP counts NO_SHARD gradients).
    """
    local = [g.numel() for g in grads.grads]
    marks = [getattr(p, _FULL, None) for p in grads.params]
    if not any(marks):
        return Sharding([process_group], None, [0] * len(local), local, sum_numels=True)
    known = [m[0] if m else 0 for m in marks]
    unknown = [0 if m else n for m, n in zip(marks, local)]
    first = dist.get_rank(process_group) == 0
    contributes = [first or not (m and m[1]) for m in marks]
    # every rank builds the same list, so ``all(marks)`` (the buffer layout) agrees
    return Sharding([process_group], contributes, known, unknown, sum_numels=not all(marks))


def _placeholder(grad: Tensor, full_numel: int, replicated: bool, base: dict) -> Tensor:
    """A tensor whose ``.grad`` is ``grad`` (a stride-0 view of one element: no memory)."""
    key = (grad.dtype, grad.device)
    if key not in base:
        base[key] = grad.new_zeros(())
    holder = base[key].expand(grad.shape)
    holder.grad = grad
    setattr(holder, _FULL, (int(full_numel), bool(replicated)))
    return holder


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
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module wrapped by FSDP, got {type(model).__name__}")
    from torch.distributed.fsdp._common_utils import clean_tensor_name
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles

    handles = _get_fsdp_handles(model)
    if not handles:
        raise ValueError(
            "model: no FullyShardedDataParallel module found in it (for FSDP2's fully_shard "
            "pass model.named_parameters() to fastgradstats directly)"
        )
    by_flat = {id(h.flat_param): h for h in handles}
    by_orig = {}
    for h in handles:
        if h._use_orig_params:
            by_orig.update((id(q), (h, i)) for i, q in enumerate(h.flat_param._params))
    groups = {h.process_group for h in handles if h.uses_sharded_strategy}
    if len(groups) > 1:
        raise ValueError(
            "model: its FSDP modules shard over different process groups; fastgradstats "
            "combines one group per call"
        )
    group = groups.pop() if groups else None
    base: dict = {}

    def piece(h: Any, i: int, grad: Tensor | None, flat: Tensor) -> Tensor:
        info = h.flat_param._shard_param_infos[i]
        if grad is None or not info.in_shard:
            return flat[:0]
        return grad if h._use_orig_params else grad[info.offset_in_shard :][: info.numel_in_shard]

    # model order: FSDP1 lists its FlatParameters root unit first, so sort the original
    # parameters by (position of their module in model.modules(), position in the module)
    modules = list(model.modules())
    module_pos = {id(m): k for k, m in enumerate(modules)}
    slot = {}
    for k, m in enumerate(modules):
        for j, q in enumerate(m._parameters.values()):
            slot.setdefault(id(q), (k, j))
    keyed: list[tuple[tuple[int, int], str, Tensor]] = []
    for raw_name, param in model.named_parameters():
        name = clean_tensor_name(raw_name)
        if id(param) in by_flat:  # use_orig_params=False: one FlatParameter per FSDP unit
            h = by_flat[id(param)]
            flat = param.grad
            if flat is None:
                continue
            prefix = name[: -len("_flat_param")] if name.endswith("_flat_param") else name
            replicated = not h.uses_sharded_strategy
            for i, (fqn, info) in enumerate(zip(param._fqns, param._param_infos)):
                holder = _placeholder(piece(h, i, flat, flat), param._numels[i], replicated, base)
                keyed.append(((module_pos.get(id(info.module), -1), i), prefix + fqn, holder))
            continue
        if id(param) in by_orig:  # use_orig_params=True: 1-D views of the flat shard
            h, i = by_orig[id(param)]
            flat = h.flat_param.grad
            if flat is None:  # this unit took no part in backward (on every rank)
                continue
            grad = piece(h, i, param.grad, flat)
            holder = _placeholder(grad, h.flat_param._numels[i], not h.uses_sharded_strategy, base)
        elif param.grad is not None:  # not managed by FSDP: every rank holds all of it
            holder = _placeholder(param.grad, param.numel(), True, base)
        else:
            continue
        keyed.append((slot.get(id(param), (-1, 0)), name, holder))
    keyed.sort(key=lambda entry: entry[0])
    named = [(name, holder) for _, name, holder in keyed]
    return named, group


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


def _placement_kinds(grad: Any, name: str) -> tuple[bool, ...]:
    """Per mesh dim: True where ``grad`` is split across that dim, False where replicated."""
    kinds = []
    for dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise ValueError(
                f"gradient of parameter {name!r} has a Partial placement on mesh dim {dim} "
                "(a sum still pending); redistribute it first, e.g. "
                "grad.redistribute(placements=[Replicate()] * mesh.ndim)"
            )
        # Shard and _StridedShard (FSDP2 + TP) both split the tensor; only Replicate copies it
        kinds.append(not placement.is_replicate())
    return tuple(kinds)


def _mesh_ranks(mesh: Any) -> list[int]:
    return sorted(mesh.mesh.flatten().tolist())


def localize(grads: core.GradList, process_group: Any = None) -> Sharding | None:
    """Replace DTensor gradients in ``grads.grads`` by their local shards; say how to reduce.

    The local shards alias the DTensors' storage, so scaling them in place clips the
    DTensors. Returns ``None`` (nothing to communicate) when there is no DTensor and no
    ``process_group``: the plain single-process path. Raises ``ValueError`` for DTensors
    on different meshes, ``Partial`` placements, or a ``process_group`` whose ranks are
    not those of the DTensors' mesh, naming the parameter.
    """
    dtensor = _dtensor_class()
    has_dtensor = dtensor is not None and any(isinstance(g, dtensor) for g in grads.grads)
    if not has_dtensor and process_group is None:
        return None
    _require_initialized("process_group=" if not has_dtensor else "DTensor gradients")
    if not has_dtensor:
        _group_ranks(process_group, "process_group")
        return _plain_shards(grads, process_group)

    mesh, mesh_owner = None, ""
    kinds: list[tuple[bool, ...] | None] = []
    known, local = [], []
    for i, (name, grad) in enumerate(zip(grads.names, grads.grads)):
        if not is_dtensor(grad):
            kinds.append(None)
            known.append(0 if process_group is not None else grad.numel())
            local.append(grad.numel() if process_group is not None else 0)
            continue
        if mesh is None:
            mesh, mesh_owner = grad.device_mesh, name
        elif grad.device_mesh != mesh:
            raise ValueError(
                f"gradient of parameter {name!r} lives on {grad.device_mesh}, but that of "
                f"{mesh_owner!r} on {mesh}: all DTensor gradients of one call must share one "
                "device mesh (call once per mesh and combine the norms)"
            )
        kinds.append(_placement_kinds(grad, name))
        known.append(grad.numel())
        local.append(0)
        grads.grads[i] = grad.to_local()

    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise RuntimeError(
            f"this rank is not part of the device mesh of parameter {mesh_owner!r} ({mesh})"
        )
    if process_group is not None:
        if process_group is dist.GroupMember.NON_GROUP_MEMBER:
            ranks = []  # this rank is outside the group: it cannot match any mesh it is in
        else:
            ranks = sorted(_group_ranks(process_group, "process_group"))
        if ranks != _mesh_ranks(mesh):
            raise ValueError(
                f"process_group spans ranks {ranks}, but the gradient of parameter "
                f"{mesh_owner!r} is a DTensor on a mesh over ranks {_mesh_ranks(mesh)}; pass "
                "process_group=None (DTensor placements say how gradients are sharded) or "
                "the group of the whole mesh"
            )
    ndim = mesh.ndim
    # Plain tensors next to DTensors: shards over the whole mesh when a process_group is
    # given, else whole tensors that every rank holds (e.g. parameters left unsharded).
    plain = (True,) * ndim if process_group is not None else (False,) * ndim
    kinds_full = [k if k is not None else plain for k in kinds]
    dims = [d for d in range(ndim) if any(k[d] for k in kinds_full)]
    if len(dims) > 1 and mesh.size() == dist.get_world_size():
        dims = list(range(ndim))
        groups: list[Any] = [None]  # the default group: one collective instead of len(dims)
    else:
        groups = [mesh.get_group(d) for d in dims]
    contributes = [all(k[d] or coordinate[d] == 0 for d in dims) for k in kinds_full]
    plain_shards = process_group is not None and any(k is None for k in kinds)
    return Sharding(groups, contributes, known, local, sum_numels=plain_shards, mesh=mesh)


def as_total_norm(total: Tensor, sharding: Sharding | None) -> Tensor:
    """The total norm in the form torch returns it: for DTensor gradients a DTensor on
    their mesh, ``Replicate`` on every mesh dim (its local value is already the global
    norm, so ``full_tensor()`` and ``to_local()`` cost no collective); else ``total``.

    torch returns ``Replicate`` too, except for the inf-norm, where its result is still a
    ``Partial(max)`` DTensor (reduced on first use); the value is the same.
    """
    if sharding is None or sharding.mesh is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate

    mesh = sharding.mesh
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def to_local_(grads: core.GradList) -> None:
    """Replace DTensor gradients in ``grads.grads`` by their local shards (aliases), unchecked.

    For the element-wise operations (scaling by a given norm, clamping), which need no
    reduction and so accept DTensors on any mix of meshes and placements.
    """
    dtensor = _dtensor_class()
    if dtensor is not None:
        grads.grads[:] = [g.to_local() if isinstance(g, dtensor) else g for g in grads.grads]


def local_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or the full value of a DTensor (a collective when it is sharded)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def combine_pipeline_norm(
    total_norm: Tensor, norm_type: float | str = 2.0, pp_group: Any = None
) -> Tensor:
    """Combine the total norms of pipeline stages into the norm of the whole model.

    Every stage passes the total ``norm_type``-norm of its own gradients (a 0-d tensor,
    e.g. from :func:`fastgradstats.get_total_norm`); each gets back the same 0-d tensor,
    same dtype and device. One all-reduce over ``pp_group`` (``None``: the default group),
    no host sync. NaN on any stage gives NaN on all.
    """
    p = core.check_norm_type(norm_type)
    _check_norm_type(p)
    _require_initialized("combine_pipeline_norm")
    _group_ranks(pp_group, "pp_group")
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
    _require_initialized("combine_pipeline_stats")
    ranks = _group_ranks(pp_group, "pp_group")
    if not (dataclasses.is_dataclass(stats) and hasattr(stats, "nan_count")):
        raise TypeError(f"stats must be a GradStats, got {type(stats).__name__}")
    header = (list(stats.names), list(stats.numels), stats.norm_type, str(stats.norms.dtype))
    headers: list[Any] = [None] * len(ranks)
    dist.all_gather_object(headers, header, group=pp_group)
    norm_types = {h[2] for h in headers}
    if len(norm_types) > 1:
        raise ValueError(f"stats: pipeline stages used different norm_type values {norm_types}")
    wide_on_any = any(h[3] == str(torch.float64) for h in headers)
    out_dtype = torch.float64 if wide_on_any else stats.norms.dtype

    device, wide = stats.norms.device, _wide_dtype(stats.norms.device)
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
    # dataclasses.replace: a GradStats of the same class without importing stats (which
    # imports this module); per-stage extras (clip_coef, histograms) are not carried over.
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
