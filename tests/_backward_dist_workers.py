"""Worker side of tests/test_backward/test_backward_distributed.py: 2 gloo ranks, each
running every scenario of ``fgs.backward_stats`` on a DistributedDataParallel model (the
comm-hook source) and on an FSDP2 model (parameter hooks on the DTensor shards).

Each scenario stores, per step, whether the handle's statistics equal, bit for bit, those of
``grad_stats(ddp.named_parameters(), backend="torch")`` after backward, and the catch-up
count; the pytest side asserts.
"""

from __future__ import annotations

import faulthandler
import os
from typing import Any

import torch
import torch.distributed as dist
from _dist_workers import TIMEOUT, WORKER_LIMIT_S, run_scenarios
from torch.nn.parallel import DistributedDataParallel as DDP

import fastgradstats as fgs


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )  # fmt: skip


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _compare(handle: Any, ddp: torch.nn.Module) -> dict[str, Any]:
    want = fgs.grad_stats(ddp.named_parameters(), backend="torch")
    got = handle.finalize()
    fields = ("norms", "max_abs", "nan_count", "inf_count", "total_norm")
    return {
        "names": got.names == want.names and got.numels == want.numels,
        "equal": {f: _same(getattr(got, f), getattr(want, f)) for f in fields},
        "catchup": got.catchup_tensors,
        "n": len(got),
        "total": float(got.total_norm),
    }


def _batch(rank: int, seed: int, step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed + 100 * step + rank))


def _steps(ddp: torch.nn.Module, handle: Any, rank: int, seed: int, micro: int = 1) -> list:
    out = []
    for step in range(3):  # DDP rebuilds its buckets after the first iteration
        ddp.zero_grad(set_to_none=step % 2 == 0)
        for m in range(micro - 1):
            with ddp.no_sync():
                ddp(_batch(rank, seed, 10 * step + m)).pow(2).sum().backward()
        ddp(_batch(rank, seed, 10 * step + micro)).pow(2).sum().backward()
        out.append(_compare(handle, ddp))
    return out


def _plain(view: bool):
    def scenario(rank: int, seed: int) -> dict[str, Any]:
        ddp = DDP(_model(), gradient_as_bucket_view=view, bucket_cap_mb=0.0005)
        handle = fgs.backward_stats(ddp)
        return {"steps": _steps(ddp, handle, rank, seed), "source": handle.source}

    return scenario


def scenario_no_sync(rank: int, seed: int) -> dict[str, Any]:
    ddp = DDP(_model(), bucket_cap_mb=0.0005)
    handle = fgs.backward_stats(ddp)
    return {"steps": _steps(ddp, handle, rank, seed, micro=2)}


def scenario_user_hook(rank: int, seed: int) -> dict[str, Any]:
    calls: list[int] = []

    def user_hook(state: list, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        # a user's hook that all-reduces a copy, then halves it twice: the reduced values
        # are not the ones the default hook would give, so the measurement must see these
        state.append(1)
        tensor = bucket.buffer().clone()
        fut = dist.all_reduce(tensor, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / 4)

    ddp = DDP(_model(), bucket_cap_mb=0.0005)
    handle = fgs.backward_stats(ddp, comm_hook=user_hook, comm_state=calls)
    steps = _steps(ddp, handle, rank, seed)
    refused = None
    try:
        fgs.backward_stats(ddp)  # the comm-hook slot is taken
    except ValueError as exc:
        refused = str(exc)
    return {"steps": steps, "calls": len(calls), "refused": refused}


def scenario_params_refused(rank: int, seed: int) -> dict[str, Any]:
    ddp = DDP(_model())
    try:
        fgs.backward_stats(ddp, source="params")
    except ValueError as exc:
        return {"refused": str(exc)}
    return {"refused": None}


def _fsdp2_model() -> torch.nn.Module:
    """``_model`` under FSDP2: each Linear its own ``fully_shard`` unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _fsdp2(micro: int, sync_last_only: bool):
    """FSDP2 (the parameter-hook source on DTensor shards): ``micro`` backward passes per
    step; with ``sync_last_only`` the earlier ones skip the reduce-scatter (FSDP2's
    ``set_requires_gradient_sync(False)``, its no_sync), so no hook fires for them."""

    def scenario(rank: int, seed: int) -> dict[str, Any]:
        model = _fsdp2_model()
        handle = fgs.backward_stats(model)
        out = []
        for step in range(3):
            model.zero_grad(set_to_none=step % 2 == 0)  # in place: FSDP2 then accumulates
            for m in range(micro):
                model.set_requires_gradient_sync(not sync_last_only or m == micro - 1)
                model(_batch(rank, seed, 10 * step + m)).pow(2).sum().backward()
            out.append(_compare(handle, model))
        return {"steps": out, "source": handle.source, "sharded": handle._sharded}

    return scenario


def scenario_fsdp2_clip(rank: int, seed: int) -> dict[str, Any]:
    """``handle.clip_grad_norm_`` and ``GradMonitor(in_backward=True)`` clip an FSDP2 model
    as ``fgs.clip_grad_norm_`` after backward clips its twin (same weights, same batch)."""
    models = [_fsdp2_model() for _ in range(3)]
    handle = fgs.backward_stats(models[0])
    monitor = fgs.GradMonitor(models[1], max_norm=0.5, in_backward=True)
    out = []
    for step in range(2):
        for model in models:
            model.zero_grad()
            model(_batch(rank, seed, step)).pow(2).sum().backward()
        total_h, stats = handle.clip_grad_norm_(0.5)
        total_m = monitor.step()
        total_ref = fgs.clip_grad_norm_(models[2].parameters(), 0.5)
        ref = [p.grad.to_local() for p in models[2].parameters()]
        out.append({
            "totals": [type(t).__name__ for t in (total_h, total_m, total_ref)],
            "same_total": [_same(t.full_tensor(), total_ref.full_tensor())
                           for t in (total_h, total_m)],
            "clipped": [all(_same(p.grad.to_local(), r) for p, r in zip(m.parameters(), ref))
                        for m in models[:2]],
            "coef_below_one": bool(stats.clip_coef < 1),
            "catchup": [stats.catchup_tensors, monitor.last_stats.catchup_tensors],
        })  # fmt: skip
    return {"steps": out}


SCENARIOS = {
    "plain": _plain(False),
    "bucket_view": _plain(True),
    "no_sync": scenario_no_sync,
    "user_hook": scenario_user_hook,
    "params_refused": scenario_params_refused,
    "fsdp2": _fsdp2(1, False),
    "fsdp2_accumulate": _fsdp2(2, False),
    "fsdp2_sync_last": _fsdp2(3, True),
    "fsdp2_clip": scenario_fsdp2_clip,
}


def main(rank: int, world_size: int, seed: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )
    run_scenarios(SCENARIOS, rank, seed, out_dir, {"seed": seed})
