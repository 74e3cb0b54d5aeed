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
        local = [g.numel() for g in grads.grads]
        return Sharding([process_group], None, [0] * len(local), local, sum_numels=True)

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
    "is_dtensor",
    "local_tensor",
    "localize",
    "to_local_",
]
