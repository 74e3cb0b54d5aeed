"""Logs a person can read (issue 20, item 3): totals / blocks / layers, include / exclude,
top-k, and a sorted ``GradStats.table()`` that says what it left out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fastgradstats as fgs
from fastgradstats import GradMonitor
from fastgradstats.monitor import LogSpec, TensorBoardWriter, WandbWriter
from fastgradstats.monitor.logspec import combine_norms

# The shaping is host-side work on the recorded rows; the stats under it are tested on both
# backends elsewhere, so the routed Triton pass need not repeat these.
pytestmark = pytest.mark.backend_independent

TOTALS = {
    "grad_norm_total",
    "grad_clip_coef",
    "grad_nonfinite",
    "grad_skipped",
    "grad_spike_total",
    "grad_stats/nonfinite_steps",
    "grad_stats/skipped_steps",
    "grad_stats/spikes",
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)


class Net(nn.Module):
    """Parameter names like a transformer: ``layers.0.attn.weight`` ... ``head.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2, bias=False)


def stepped(seed=0, nan_in=(), **kw):
    """A Net with random gradients (NaN in the named parameters), one monitor step."""
    torch.manual_seed(seed)
    model = Net()
    for j, (name, p) in enumerate(model.named_parameters()):
        p.grad = torch.randn_like(p) * (j + 1)
        if name in nan_in:
            p.grad.view(-1)[0] = float("nan")
    monitor = GradMonitor(model, **kw)
    monitor.step()
    return model, monitor


def grads64(model, prefix):
    pairs = model.named_parameters()
    return [p.grad.double().reshape(-1) for n, p in pairs if n.startswith(prefix)]


def per_name_keys(values):
    return {k for k in values if k not in TOTALS and not k.endswith("_total")}


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5, math.inf])
def test_blocks_by_depth_reduce_norms_as_norms(p):
    model, monitor = stepped(norm_type=p, log="blocks", group_by=2)
    values = monitor.to_dict()
    stem = "grad_norm" if p == 2.0 else f"grad_norm_{p:g}"
    assert per_name_keys(values) == {
        f"{stem}/layers.0",
        f"{stem}/layers.1",
        f"{stem}/head.weight",
        "grad_max_abs/layers.0",
        "grad_max_abs/layers.1",
        "grad_max_abs/head.weight",
    }
    for block in ("layers.0", "layers.1", "head.weight"):
        flat = torch.cat(grads64(model, block))
        ref = torch.linalg.vector_norm(flat, p).item()  # the block as one vector, float64
        assert values[f"{stem}/{block}"] == pytest.approx(ref, rel=1e-5), block
        assert values[f"grad_max_abs/{block}"] == pytest.approx(flat.abs().max().item())
    assert values["grad_norm_total" if p == 2.0 else f"grad_norm_{p:g}_total"] == pytest.approx(
        torch.linalg.vector_norm(torch.cat(grads64(model, "")), p).item(), rel=1e-5
    )


def test_blocks_add_nonfinite_counts_and_keep_nan():
    bad = ("layers.0.attn.weight", "layers.0.mlp.bias")
    _, monitor = stepped(nan_in=bad, log="blocks", group_by=2)
    values = monitor.to_dict()
    assert values["grad_nonfinite/layers.0"] == 2.0
    assert math.isnan(values["grad_norm/layers.0"])
    assert math.isnan(values["grad_max_abs/layers.0"])
    assert "grad_nonfinite/layers.1" not in values and math.isfinite(values["grad_norm/layers.1"])


def test_blocks_by_regex_and_by_module():
    model, by_regex = stepped(group_by=r"^(layers\.\d+)\.")
    values = by_regex.to_dict()
    assert by_regex.log_spec.log == "blocks"  # group_by alone means blocks
    assert {k for k in per_name_keys(values) if k.startswith("grad_norm/")} == {
        "grad_norm/layers.0",
        "grad_norm/layers.1",
        "grad_norm/head.weight",  # not matched: a block of its own
    }
    ref = torch.linalg.vector_norm(torch.cat(grads64(model, "layers.1."))).item()
    assert values["grad_norm/layers.1"] == pytest.approx(ref, rel=1e-5)
    _, by_module = stepped(log="blocks")
    norms = {k for k in by_module.to_dict() if k.startswith("grad_norm/")}
    assert norms == {
        "grad_norm/layers.0.attn",
        "grad_norm/layers.0.mlp",
        "grad_norm/layers.1.attn",
        "grad_norm/layers.1.mlp",
        "grad_norm/head",
    }


def test_combine_norms_matches_torch():
    gen = torch.Generator().manual_seed(0)
    pieces = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (3, 7, 1)]
    for p in (0.5, 1.0, 2.0, 3.0, math.inf, -math.inf, 0.0):
        norms = [torch.linalg.vector_norm(x, p).item() for x in pieces]
        ref = torch.linalg.vector_norm(torch.cat(pieces), p).item()
        assert combine_norms(norms, p) == pytest.approx(ref, rel=1e-12), p
    assert combine_norms([1e300, 1e300], 2.0) == pytest.approx(math.sqrt(2) * 1e300)
    assert math.isnan(combine_norms([1.0, math.nan], 2.0))
    assert combine_norms([], 2.0) == 0.0


# ---------------------------------------------------------------- totals, filters, top-k


def test_totals_only():
    _, monitor = stepped(log="totals")
    assert set(monitor.to_dict()) == TOTALS


def test_layers_default_is_every_parameter():
    model, monitor = stepped()
    names = [n for n, _ in model.named_parameters()]
    values = monitor.to_dict()
    assert per_name_keys(values) == {f"grad_norm/{n}" for n in names} | {
        f"grad_max_abs/{n}" for n in names
    }
    # and the same keys as History.row_dict (the full record)
    hist = monitor.history()
    assert set(hist.row_dict(len(hist) - 1)) == set(values) - {
        k for k in TOTALS if k.startswith("grad_stats/")
    }
    assert monitor.log_spec.log == "layers"


def test_include_exclude_patterns():
    _, monitor = stepped(include="attn", exclude=[r"\.bias$"])
    keys = per_name_keys(monitor.to_dict())
    assert keys == {
        "grad_norm/layers.0.attn.weight",
        "grad_norm/layers.1.attn.weight",
        "grad_max_abs/layers.0.attn.weight",
        "grad_max_abs/layers.1.attn.weight",
    }
    # the totals still cover every parameter
    _, full = stepped()
    assert monitor.to_dict()["grad_norm_total"] == full.to_dict()["grad_norm_total"]


def test_top_k_keeps_the_largest_and_nonfinite_first():
    model, monitor = stepped(top_k=3)
    norms = {
        n: torch.linalg.vector_norm(p.grad.double()).item() for n, p in model.named_parameters()
    }
    largest = sorted(norms, key=norms.get, reverse=True)[:3]
    assert per_name_keys(monitor.to_dict()) == {f"grad_norm/{n}" for n in largest} | {
        f"grad_max_abs/{n}" for n in largest
    }
    _, with_nan = stepped(nan_in=("layers.0.attn.bias",), top_k=1)
    assert per_name_keys(with_nan.to_dict()) == {
        "grad_norm/layers.0.attn.bias",
        "grad_max_abs/layers.0.attn.bias",
        "grad_nonfinite/layers.0.attn.bias",
    }
    _, blocks = stepped(group_by=2, top_k=1)
    kept = {k for k in per_name_keys(blocks.to_dict()) if k.startswith("grad_norm/")}
    assert kept == {"grad_norm/layers.1"}  # the later layers got the larger gradients


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"log": "everything"}, ValueError, "log must be one of"),
        ({"log": "layers", "group_by": 2}, ValueError, 'needs log="blocks"'),
        ({"group_by": 0}, ValueError, "group_by must be"),
        ({"group_by": 1.5}, TypeError, "group_by must be"),
        ({"group_by": "("}, ValueError, "group_by: "),
        ({"include": "["}, ValueError, "include"),
        ({"exclude": 3}, TypeError, "exclude must be"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": True}, TypeError, "top_k must be"),
    ],
)
def test_bad_log_options_fail_clearly(kwargs, error, match):
    model = Net()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        GradMonitor(model, **kwargs)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------- writers


class FakeSummaryWriter:
    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, tag, value, step) -> None:
        self.scalars[tag] = value


class FakeHistogramWriter(FakeSummaryWriter):
    def __init__(self) -> None:
        super().__init__()
        self.histograms: dict[str, float] = {}

    def add_histogram_raw(self, tag, global_step=None, **kwargs) -> None:
        self.histograms[tag] = kwargs["num"]


class FakeRun:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def define_metric(self, *a, **kw) -> None:
        pass

    def log(self, row, commit=True) -> None:
        self.rows.append(dict(row))


def test_tensorboard_and_wandb_writers_follow_the_spec():
    model = Net()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    monitor = GradMonitor(model, log="blocks", group_by=2, exclude="head")
    board, run = FakeSummaryWriter(), FakeRun()
    monitor.log_tensorboard(board)
    monitor.log_wandb(run)
    monitor.step()
    monitor.flush()
    expected = {"grad_norm/layers.0", "grad_norm/layers.1"}
    assert {k for k in board.scalars if k.startswith("grad_norm/")} == expected
    assert {k for k in run.rows[-1] if k.startswith("grad_norm/")} == expected
    assert board.scalars["grad_norm/layers.0"] == pytest.approx(math.sqrt(40.0))
    with pytest.raises(TypeError, match="spec"):
        TensorBoardWriter(board, spec="totals")
    with pytest.raises(TypeError, match="spec"):
        WandbWriter(run, spec={"log": "totals"})
    assert isinstance(monitor.log_spec, LogSpec)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"group_by": 2}, {"layers.0": 40, "layers.1": 40, "head.weight": 8}),  # 16+4+16+4
        ({"log": "layers", "include": "head"}, {"head.weight": 8}),
        ({"log": "totals"}, {}),
    ],
)
def test_histograms_follow_the_spec_and_add_per_block(options, expected):
    model = Net()
    for p in model.parameters():
        p.grad = torch.linspace(0.5, 2.0, p.numel()).reshape(p.shape)
    monitor = GradMonitor(model, histograms=True, **options)
    board = FakeHistogramWriter()
    monitor.log_tensorboard(board)
    monitor.step()
    monitor.flush()
    # a block's histogram holds every value of its members: counts add
    assert board.histograms == {f"grad_hist/{k}": float(v) for k, v in expected.items()}


# ---------------------------------------------------------------- table


def test_table_sorts_nonfinite_first_then_by_norm_and_counts_what_it_cut():
    grads = [torch.full((4,), float(v)) for v in (1.0, 5.0, 3.0, 2.0, 4.0)]
    grads[3][0] = float("nan")
    params = []
    for g in grads:
        p = torch.zeros(4, requires_grad=True)
        p.grad = g
        params.append(p)
    stats = fgs.grad_stats(list(zip(["a", "b", "c", "d", "e"], params)))
    lines = stats.table(limit=3).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["d", "b", "e"]
    assert lines[4] == "... 2 more rows"
    assert lines[-1].startswith("total")
    full = stats.table().splitlines()
    assert [line.split()[0] for line in full[1:6]] == ["d", "b", "e", "c", "a"]
    assert "more row" not in stats.table()
    assert [line.split()[0] for line in stats.table(sort=False).splitlines()[1:6]] == list("abcde")
    assert stats.table(limit=4).splitlines()[5] == "... 1 more row"
    with pytest.raises(ValueError, match="limit"):
        stats.table(limit=-1)
    np.testing.assert_equal(len(lines), 6)
