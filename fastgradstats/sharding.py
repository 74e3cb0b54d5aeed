"""How sharded gradients are read and their partial statistics reduced across ranks.

The engine-side half of distributed support (:mod:`fastgradstats.distributed` is the
user-facing half: FSDP1/ZeRO helpers and pipeline combination). How each gradient is read
(the per-tensor partials come from whatever backend is selected; this module only combines
them across ranks):

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
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import inputs
from .torch_backend import GroupStats, host_to_device

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


def require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed to be initialized (dist.init_process_group)"
        )


def group_ranks(group: Any, arg_name: str) -> list[int]:
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


def check_norm_type(norm_type: float) -> None:
    if norm_type < 0:
        raise ValueError(
            f"norm_type must be >= 0 for sharded gradients (it is combined from per-shard "
            f"sums of |g|^p), got {norm_type}"
        )


def wide_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps NaN/Inf counts and numels exact (up to 2^53) in the same buffer as the
    # |g|^p sums; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def to_partial(norms: Tensor, norm_type: float, dtype: torch.dtype) -> Tensor:
    """Per-shard p-norms -> the additive quantity ``sum |g|^p`` (the count of nonzeros for p=0)."""
    wide = norms.to(dtype)
    return wide if norm_type in (0.0, 1.0) else wide.pow(norm_type)


def from_partial(sums: Tensor, norm_type: float) -> Tensor:
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
        device: torch.device | None = None,
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
        # which rows a SUM keeps (replicas counted once), on the gradients' ``device``: made
        # once, here, so that a reduction runs device ops only
        self.keep: Tensor | None = None
        if contributes is not None and not all(contributes):
            assert device is not None, "a Sharding with replicas needs the gradients' device"
            self.keep = host_to_device(contributes, torch.bool, device)

    def _all_reduce(self, buf: Tensor, op: Any) -> Tensor:
        for group in self.groups:
            dist.all_reduce(buf, op=op, group=group)
        return buf

    def _sum(self, rows: Tensor) -> Tensor:
        """SUM-reduce a [k, n] buffer of per-tensor additive partials."""
        if self.keep is not None:
            # where, not a multiply: a NaN in a replica must not leak in as NaN * 0 = NaN
            zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
            rows = torch.where(self.keep, rows, zero)
        return self._all_reduce(rows.contiguous(), dist.ReduceOp.SUM)

    def _max(self, values: Tensor) -> Tensor:
        """MAX-reduce per-tensor maxima (>= 0 or NaN); NaN anywhere gives NaN everywhere."""
        dtype = wide_dtype(values.device)
        isnan = torch.isnan(values)
        buf = torch.stack([values.to(dtype).masked_fill(isnan, 0.0), isnan.to(dtype)])
        buf = self._all_reduce(buf, dist.ReduceOp.MAX)
        return torch.where(buf[1] > 0, torch.nan, buf[0]).to(values.dtype)

    def reduce_norms(self, norms: Tensor, norm_type: float) -> Tensor:
        """Local per-shard norms [n] -> norms of the full parameters [n], same dtype."""
        check_norm_type(norm_type)
        if not self.groups:
            return norms
        if norm_type == INF:
            return self._max(norms)
        sums = self._sum(to_partial(norms, norm_type, wide_dtype(norms.device))[None])
        return from_partial(sums[0], norm_type).to(norms.dtype)

    def reduce_stats(self, stats: GroupStats, norm_type: float) -> tuple[GroupStats, list[int]]:
        """Local per-shard stats -> stats of the full parameters, and their element counts.

        One SUM and one MAX all-reduce per group. Only when some gradient is a plain shard
        (``process_group=``) are the element counts summed too, which costs one host sync.
        """
        check_norm_type(norm_type)
        if not self.groups:
            return stats, self.known_numels
        device, dtype = stats.norms.device, wide_dtype(stats.norms.device)
        rows = [stats.nan_count.to(dtype), stats.inf_count.to(dtype)]
        if norm_type != INF:
            rows.append(to_partial(stats.norms, norm_type, dtype))
        if self.sum_numels:
            # a plain copy: the summed counts are read back below, a host sync anyway
            rows.append(torch.tensor(self.local_numels, dtype=dtype, device=device))
        sums = self._sum(torch.stack(rows))
        max_abs = self._max(stats.max_abs)
        if norm_type == INF:
            norms = max_abs
        else:
            norms = from_partial(sums[2], norm_type).to(stats.norms.dtype)
        numels = self.known_numels
        if self.sum_numels:
            summed = sums[-1].to(torch.int64).tolist()  # the documented host sync
            numels = [known + int(extra) for known, extra in zip(numels, summed)]
        counts = sums[:2].round().to(torch.int64)
        return GroupStats(norms, max_abs, counts[0], counts[1]), numels

    def reduce_histograms(self, counts: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
        """Local per-shard histograms int64 [n, B] and zero counts [n] -> those of the
        full parameters: one SUM all-reduce, replicas counted once (like NaN counts)."""
        if not self.groups:
            return counts, zeros
        summed = self._sum(torch.cat([counts.t(), zeros[None]]))
        return summed[:-1].t().contiguous(), summed[-1].contiguous()


# Set on the placeholder tensors made by fsdp1_grads / deepspeed_zero_grads: (element count
# of the full parameter, whether every rank holds the whole gradient).
FULL_PARAMETER_ATTR = "_fastgradstats_full"


def _plain_shards(grads: inputs.GradList, process_group: Any) -> Sharding:
    """The Sharding of plain tensors that are shards over ``process_group``.

    Placeholders from :func:`fsdp1_grads` / :func:`deepspeed_zero_grads` say the full
    element count (no SUM of local counts, so no host sync) and whether the gradient is
    replicated (counted on the group's first rank only, as FSDP counts NO_SHARD gradients).
    """
    local = [g.numel() for g in grads.grads]
    marks = [getattr(p, FULL_PARAMETER_ATTR, None) for p in grads.params]
    if not any(marks):
        return Sharding([process_group], None, [0] * len(local), local, sum_numels=True)
    known = [m[0] if m else 0 for m in marks]
    unknown = [0 if m else n for m, n in zip(marks, local)]
    first = dist.get_rank(process_group) == 0
    contributes = [first or not (m and m[1]) for m in marks]
    # every rank builds the same list, so ``all(marks)`` (the buffer layout) agrees
    return Sharding([process_group], contributes, known, unknown, sum_numels=not all(marks),
                    device=grads.grads[0].device)  # fmt: skip


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


def localize(grads: inputs.GradList, process_group: Any = None) -> Sharding | None:
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
    require_initialized("process_group=" if not has_dtensor else "DTensor gradients")
    if not has_dtensor:
        group_ranks(process_group, "process_group")
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
            ranks = sorted(group_ranks(process_group, "process_group"))
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
    return Sharding(groups, contributes, known, local, sum_numels=plain_shards, mesh=mesh,
                    device=grads.grads[0].device)  # fmt: skip


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


def to_local_(grads: inputs.GradList) -> None:
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
