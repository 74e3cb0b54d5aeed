"""Keeps the benchmark suite from rotting: ``python -m benchmarks --quick`` in-process.

No timing is asserted (speed is for the benchmarks themselves); these tests check that
every workload x op is measured, that the numbers and the JSON are well formed, and that
each fastgradstats op computes what its torch baseline computes on the benchmark inputs.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # plain `pytest` from anywhere

from benchmarks import suite
from benchmarks.__main__ import main
from benchmarks.ops import (
    FGS,
    OP_NAMES,
    OPS,
    check_op,
    make_case,
    rel_err,
    tolerance,
    total_norm_f64,
)
from benchmarks.timing import time_cpu
from benchmarks.workloads import (
    WORKLOAD_NAMES,
    gpt2_124m_shapes,
    llama_7b_shapes,
    make_grads,
    make_workload,
    resnet50_shapes,
)

# The harness (timing, JSON, tables, sweeps) does not depend on the backend; the backend
# that the benchmarked calls take is checked by the `backend`-parametrized test below.
pytestmark = pytest.mark.backend_independent

META_FIELDS = (
    "device_type",
    "device_name",
    "date_utc",
    "git_commit",
    "torch_version",
    "triton_version",
    "fastgradstats_version",
    "python_version",
    "host",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = main(
        ["--quick", "--device", "cpu", "--backend", "auto", "--budget", "0.01", "--out", str(out)]
    )
    return result, out


def test_quick_run_measures_every_workload_and_op(quick_run, capsys):
    result, _ = quick_run
    pairs = [(r["workload"], r["op"]) for r in result["results"]]
    assert sorted(pairs) == sorted((w, op) for w in WORKLOAD_NAMES for op in OP_NAMES)
    for row in result["results"]:
        for key in ("fgs_s", "torch_s", "ratio", "speedup", "gbps", "pct_copy"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["workload"], row["op"], key)
        assert set(row["times"]) == set(OPS[row["op"]].impls)
        assert row["min_bytes"] >= row["grad_bytes"] > 0
        assert row["check"]["ok"], (row["workload"], row["op"], row["check"])
    assert result["copy_bandwidth"]["gbps"] > 0
    targets = result["targets_cpu_issue2"]
    for key in suite.CPU_TARGETS:
        assert math.isfinite(targets[key]["ratio"]) and targets[key]["ratio"] > 0


def test_quick_run_table_lists_every_row(quick_run):
    result, _ = quick_run
    table = suite.format_table(result)
    for w in WORKLOAD_NAMES:
        for op in OP_NAMES:
            assert any(line.startswith(w) and f" {op} " in line for line in table.splitlines())
    assert "FAIL" not in table


def test_quick_run_writes_json_with_metadata(quick_run):
    result, out = quick_run
    files = list(Path(out).glob("cpu-*-quick.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    for field in META_FIELDS:
        assert field in data["meta"], field
    assert data["meta"]["device_type"] == "cpu"
    assert data["meta"]["torch_version"] == torch.__version__
    assert len(data["results"]) == len(WORKLOAD_NAMES) * len(OP_NAMES)
    assert data["copy_bandwidth"]["gbps"] == pytest.approx(result["copy_bandwidth"]["gbps"])


def test_workload_shapes_match_the_models():
    gpt2 = gpt2_124m_shapes()
    assert len(gpt2) == 148
    assert sum(math.prod(s) for s in gpt2) == 124_439_808  # GPT-2 small, wte tied to lm_head
    resnet = resnet50_shapes()
    assert len(resnet) == 161
    assert sum(math.prod(s) for s in resnet) == 25_557_032  # torchvision resnet50
    llama, note = llama_7b_shapes(None, torch.bfloat16)
    assert sum(math.prod(s) for s in llama) == 6_738_415_616 and note.startswith("32/32")
    assert len(make_workload("tiny10k-fp32", "cpu").shapes) == 10_000


@pytest.mark.parametrize("budget_gib", [0.5, 1.2, 2.0, 20.0])
def test_llama_workload_fits_its_memory_budget(budget_gib):
    budget = budget_gib * 2**30
    shapes, note = llama_7b_shapes(budget, torch.bfloat16)
    assert sum(math.prod(s) for s in shapes) * 2 <= budget
    assert len(shapes) >= 9  # at least one decoder layer
    layers = int(note.split("/")[0])
    more, _ = llama_7b_shapes(budget + 0.4 * 2**30, torch.bfloat16)  # one layer is 0.38 GiB
    assert layers == 32 or sum(math.prod(s) for s in more) > sum(math.prod(s) for s in shapes)


def test_llama_workload_below_one_layer_keeps_one_layer():
    shapes, note = llama_7b_shapes(0.1 * 2**30, torch.bfloat16)
    assert note == "1/32 layers" and len(shapes) == 9


@pytest.mark.parametrize("workload", WORKLOAD_NAMES)
def test_fastgradstats_matches_torch_on_fresh_inputs(workload):
    grads = make_grads(make_workload(workload, "cpu", 1 / 32), "cpu", seed=random.randrange(2**31))
    for op in OP_NAMES:
        result = check_op(op, grads, backend="auto")
        assert result["ok"], (workload, op, result)


@pytest.mark.parametrize("workload", ["gpt2-124m-fp32", "resnet50-bf16"])
def test_nan_and_inf_are_counted_like_torch(workload):
    grads = make_grads(make_workload(workload, "cpu", 1 / 32), "cpu", seed=random.randrange(2**31))
    grads[3].view(-1)[0] = float("nan")
    grads[5].view(-1)[-1] = float("inf")
    grads[5].view(-1)[0] = float("-inf")
    result = check_op("grad_stats", grads, backend="auto")
    assert result["ok"], result
    for op in OP_NAMES:
        assert check_op(op, grads, backend="auto")["ok"], op


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
def test_benchmarked_calls_match_torch_on_each_backend(backend):
    """The benchmarked calls, run on the backend the fixture selects (Triton: interpreter)."""
    grads = make_grads(make_workload("gpt2-124m-bf16", "cpu", 1 / 64), "cpu", seed=1)
    for op in OP_NAMES:
        result = check_op(op, grads, backend=backend)
        assert result["ok"], (backend, op, result)


@pytest.mark.parametrize("op_name", ["clip", "stats_clip"])
def test_every_timed_clip_call_clips(op_name):
    """The reset between calls keeps the clip case a clip case (coefficient ~0.5)."""
    grads = make_grads(make_workload("resnet50-fp32", "cpu", 1 / 32), "cpu", seed=3)
    case = make_case(grads)
    op = OPS[op_name]
    seen = []
    fns = {
        impl: (lambda _i, f=fn: seen.append(total_norm_f64(case.grads)) or f(case))
        for impl, fn in op.impls.items()
    }
    time_cpu(
        fns, budget_s=0.0, min_rounds=4, max_rounds=4, warmup=1, reset=lambda _i: op.reset(case)
    )
    assert len(seen) == 5 * len(fns)
    for before in seen:  # every call starts at ~the initial norm: twice max_norm_clip
        assert before == pytest.approx(2 * case.max_norm_clip, rel=1e-4)


def test_check_catches_a_wrong_result():
    x = torch.randn(1000, dtype=torch.float64)
    assert rel_err(x * (1 + 10 * tolerance(torch.float32)), x) > tolerance(torch.float32)
    y = x.clone()
    y[7] = float("nan")
    assert rel_err(y, x) == math.inf
    assert rel_err(x, x) == 0.0


def test_every_op_times_fastgradstats_against_a_torch_baseline():
    for op in OPS.values():
        assert FGS in op.impls and op.baseline in op.impls and op.baseline != FGS


def test_quick_sweep_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.sweep import SWEEP_OPS, plot_sweep, run_sweep

    settings = suite.Settings(device=torch.device("cpu"), quick=True, budget_s=0.005)
    sweep = run_sweep(settings)
    assert len(sweep["size"]) >= 2 and len(sweep["count"]["points"]) >= 2
    for point in sweep["size"] + sweep["count"]["points"]:
        for op in SWEEP_OPS:
            assert point[op]["fgs_s"] > 0 and point[op]["torch_s"] > 0
    paths = plot_sweep(sweep, 10.0, "quick", tmp_path / "sweep")
    assert [p.name for p in paths] == ["sweep-size.png", "sweep-count.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
