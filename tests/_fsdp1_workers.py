"""Worker side of tests/test_distributed/test_fsdp1_deepspeed.py: FSDP1 and DeepSpeed ZeRO
1/2 on 2 gloo ranks.

``fsdp1_main`` / ``deepspeed_main(rank, world_size, seed, out_dir)`` run one family of
scenarios in one process group (spawned by ``_dist_workers.spawn``) and save, per rank,
``{scenario: {key: value}}`` to ``out_dir/rank{rank}.pt``: what fastgradstats returned next
to what the library itself returned on an identical model (its own clip, its own global
norm, its own full gradients) and a float64 single-process reference on the full batch.
"""

from __future__ import annotations

import copy
import faulthandler
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from _dist_workers import (
    TIMEOUT,
    WORKER_LIMIT_S,
    count_all_reduce,
    error_text,
    mlp,
    ref_stats,
    ref_total,
    run_scenarios,
)
from torch import nn

WORLD = 2
NORM_TYPES = (2.0, 1.0, float("inf"), 3.0)


def batches(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(WORLD, 6, 7, generator=g), torch.randn(WORLD, 6, generator=g)


def reference(model: nn.Module, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Full-batch gradients of a single-process copy: what the ranks' mean gradient equals."""
    xs, ys = batches(seed)
    nn.functional.mse_loss(model(xs.flatten(0, 1)).squeeze(-1), ys.flatten()).backward()
    return [(n, p.grad) for n, p in model.named_parameters()]


def local_loss(
    model: nn.Module, rank: int, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    xs, ys = batches(seed)
    return nn.functional.mse_loss(model(xs[rank].to(dtype)).float().squeeze(-1), ys[rank])


# ---------------------------------------------------------------- FSDP1


def _fsdp1(model: nn.Module, use_orig_params: bool, mixed: bool) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    cpu = torch.device("cpu")  # FSDP1 looks for an accelerator unless told the device
    inner = ShardingStrategy.NO_SHARD if mixed else ShardingStrategy.FULL_SHARD
    model[0] = FSDP(model[0], use_orig_params=use_orig_params, device_id=cpu,
                    sharding_strategy=inner)  # fmt: skip
    ignored = [model[4]] if mixed else None  # the last Linear: not managed by FSDP
    return FSDP(model, use_orig_params=use_orig_params, device_id=cpu, ignored_modules=ignored)


def _fsdp1_case(rank: int, seed: int, use_orig_params: bool, mixed: bool) -> dict[str, Any]:
    import fastgradstats as fgs
    from fastgradstats.distributed import fsdp1_grads

    torch.manual_seed(seed)
    base = mlp(7, 13, 5, 1)  # 104 + 14 + 70 + 5 + 6 elements: shard edges cut parameters
    out: dict[str, Any] = {"want_stats": ref_stats(reference(copy.deepcopy(base), seed))}
    ours = _fsdp1(copy.deepcopy(base), use_orig_params, mixed)
    theirs = _fsdp1(copy.deepcopy(base), use_orig_params, mixed)
    for model in (ours, theirs):
        local_loss(model, rank, seed).backward()
        if mixed:  # FSDP leaves ignored parameters alone: average them as DDP would
            for p in model.module[4].parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD

    named, group = fsdp1_grads(ours)
    out["names"] = [name for name, _ in named]
    with count_all_reduce() as calls:
        stats = fgs.grad_stats(named, process_group=group)
    out["stats"], out["all_reduces_stats"] = stats.to_dict(), len(calls)
    out["totals"] = {
        p: fgs.grad_stats(named, p, process_group=group).total_norm.item() for p in NORM_TYPES
    }
    out["want_totals"] = {p: ref_total([g for _, g in reference(copy.deepcopy(base), seed)], p)
                          for p in NORM_TYPES}  # fmt: skip

    # clipping: ours by fastgradstats, theirs by FSDP.clip_grad_norm_, on the same gradients
    out["max_norm"] = max_norm = 0.05 * out["totals"][2.0]
    with count_all_reduce() as calls:
        total = fgs.clip_grad_norm_(named, max_norm, process_group=group)
    out["all_reduces_clip"] = len(calls)
    want = theirs.clip_grad_norm_(max_norm)
    out["clip_total"], out["want_clip_total"] = total.item(), want.item()
    out["clip_dtype"], out["want_clip_dtype"] = total.dtype, want.dtype
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    want_grads = [p.grad for p in theirs.parameters() if p.grad is not None]
    out["clipped"] = [g.clone() for g in grads]  # clones: a NaN is planted below
    out["want_clipped"] = [g.clone() for g in want_grads]
    # the inf-norm: a second clip, on the already clipped gradients
    out["clip_inf"] = fgs.clip_grad_norm_(named, 1e-3, float("inf"), process_group=group).item()
    out["want_clip_inf"] = theirs.clip_grad_norm_(1e-3, float("inf")).item()
    out["clipped_inf"] = [g.clone() for g in grads]
    out["want_clipped_inf"] = [g.clone() for g in want_grads]
    # histograms of the full parameters: every element binned once (replicas too)
    hist = fgs.grad_stats(named, process_group=group, histogram=True)
    out["hist_elements"] = (hist.histogram.sum(1) + hist.zero_count).tolist()
    out["hist_numels"] = hist.numels
    # a NaN in one rank's piece of a sharded parameter is counted once, on every rank
    # (replicated gradients are read on the group's first rank only, as DTensor replicas)
    if rank == 1:
        sharded = (h for _, h in named if not h._fastgradstats_full[1])
        holder = next(h for h in sharded if h.grad.numel())
        holder.grad.view(-1)[0] = float("nan")
    nan_stats = fgs.grad_stats(named, process_group=group)
    out["nan_counts"] = nan_stats.nan_count.tolist()
    out["nan_names"] = nan_stats.nonfinite_names()
    if rank == 0:
        out["bad_model"] = error_text(lambda: fsdp1_grads(nn.Linear(2, 2)))
        out["not_module"] = error_text(lambda: fsdp1_grads("model"))
    return out


def scenario_fsdp1_orig(rank: int, seed: int) -> dict[str, Any]:
    return _fsdp1_case(rank, seed, use_orig_params=True, mixed=False)


def scenario_fsdp1_flat(rank: int, seed: int) -> dict[str, Any]:
    return _fsdp1_case(rank, seed, use_orig_params=False, mixed=False)


def scenario_fsdp1_mixed(rank: int, seed: int) -> dict[str, Any]:
    """NO_SHARD inner unit and an ignored module next to FULL_SHARD: counted once each."""
    return _fsdp1_case(rank, seed, use_orig_params=False, mixed=True)


def scenario_fsdp1_mixed_orig(rank: int, seed: int) -> dict[str, Any]:
    return _fsdp1_case(rank, seed, use_orig_params=True, mixed=True)


FSDP1_SCENARIOS = {
    "fsdp1_orig": scenario_fsdp1_orig,
    "fsdp1_flat": scenario_fsdp1_flat,
    "fsdp1_mixed": scenario_fsdp1_mixed,
    "fsdp1_mixed_orig": scenario_fsdp1_mixed_orig,
}


# ---------------------------------------------------------------- DeepSpeed ZeRO 1/2


def _engine(model: nn.Module, stage: int, clipping: float, bf16: bool) -> Any:
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch SGD: DeepSpeed warns, nothing else
        "gradient_clipping": clipping,
        # bf16 parameters, fp32 gradient partitions: DeepSpeed's compact buffer layout
        "bf16": {"enabled": bf16},
        "data_types": {"grad_accum_dtype": "fp32" if bf16 else None},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)  # fmt: skip
    return engine


def _zero_case(rank: int, seed: int, stage: int, bf16: bool = False) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_grad

    import fastgradstats as fgs
    from fastgradstats.distributed import deepspeed_zero_grads

    torch.manual_seed(seed)
    base = mlp(7, 11, 5, 1)  # 154 elements: partitions cut a parameter, and end in padding
    out: dict[str, Any] = {"want_stats": ref_stats(reference(copy.deepcopy(base), seed))}
    max_norm = 0.02
    ours = _engine(copy.deepcopy(base), stage, 0.0, bf16)  # clipped by fastgradstats
    theirs = _engine(copy.deepcopy(base), stage, max_norm, bf16)  # clipped by DeepSpeed
    dtype = torch.bfloat16 if bf16 else torch.float32
    for engine in (ours, theirs):
        engine.backward(local_loss(engine, rank, seed, dtype))
    out["bf16"] = bf16
    out["stage"] = (ours.zero_optimization_stage(), theirs.zero_optimization_stage())

    opt = ours.optimizer
    out["compact"] = opt._use_compact_grad_partition_buffer(0)
    out["pieces"] = (len(opt.averaged_gradients[0]), len(opt.params_in_partition[0]))
    named, group = deepspeed_zero_grads(ours)
    out["names"] = [name for name, _ in named]
    out["grad_dtypes"] = sorted({str(h.grad.dtype) for _, h in named})
    with count_all_reduce() as calls:
        out["stats"] = fgs.grad_stats(named, process_group=group).to_dict()
    out["all_reduces_stats"] = len(calls)
    # DeepSpeed's own full gradients, one collective per parameter
    with count_all_reduce() as calls:
        full = {n: safe_get_full_grad(p) for n, p in theirs.module.named_parameters()}
    out["full_grads"], out["all_reduces_full_grads"] = full, len(calls)
    total = fgs.clip_grad_norm_(named, max_norm, process_group=group)
    out["clip_total"] = total.item()
    ours.step()
    theirs.step()
    out["want_clip_total"] = float(theirs.get_global_grad_norm())
    out["params"] = [p.detach().clone() for p in ours.module.parameters()]
    out["want_params"] = [p.detach().clone() for p in theirs.module.parameters()]
    out["after_step"] = error_text(lambda: deepspeed_zero_grads(ours))
    return out


def scenario_zero1(rank: int, seed: int) -> dict[str, Any]:
    return _zero_case(rank, seed, 1)


def scenario_zero2(rank: int, seed: int) -> dict[str, Any]:
    return _zero_case(rank, seed, 2)


def scenario_zero2_bf16(rank: int, seed: int) -> dict[str, Any]:
    return _zero_case(rank, seed, 2, bf16=True)


DEEPSPEED_SCENARIOS = {
    "zero1": scenario_zero1,
    "zero2": scenario_zero2,
    "zero2_bf16": scenario_zero2_bf16,
}


# ---------------------------------------------------------------- process side


def _run(rank: int, world_size: int, seed: int, out_dir: str,
         scenarios: dict[str, Callable[[int, int], dict[str, Any]]]) -> None:  # fmt: skip
    os.environ["FASTGRADSTATS_BACKEND"] = os.environ.get("FASTGRADSTATS_DIST_BACKEND", "torch")
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )
    run_scenarios(scenarios, rank, seed, out_dir, {"seed": seed})


def fsdp1_main(rank: int, world_size: int, seed: int, out_dir: str) -> None:
    _run(rank, world_size, seed, out_dir, FSDP1_SCENARIOS)


def deepspeed_main(rank: int, world_size: int, seed: int, out_dir: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm.torch as ds_torch_comm

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build of a
    # minute or two on first use); the ZeRO optimizer under test works the same on gloo's.
    ds_torch_comm.build_shm_op = lambda: None
    _run(rank, world_size, seed, out_dir, DEEPSPEED_SCENARIOS)
