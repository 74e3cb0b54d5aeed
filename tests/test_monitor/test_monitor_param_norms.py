"""GradMonitor(param_norms=True): per-parameter ||w||, update ratio ||w_t - w_prev|| / ||w_t||
and param_norm_total, checked against float64 references from copies of the weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import OpRecorder

from fastgradstats import GradMonitor


def _model(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(layers)])


def _train(model, monitor, optimizer, steps: int) -> list[dict[str, torch.Tensor]]:
    """Runs ``steps`` steps; returns float64 copies of the weights at each monitor.step()."""
    seen = []
    for _ in range(steps):
        model(torch.randn(3, 4)).pow(2).sum().backward()
        seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        monitor.step()
        optimizer.step()
        optimizer.zero_grad()
    return seen


def _norm(t: torch.Tensor, p: float) -> float:
    return float(torch.linalg.vector_norm(t.flatten(), p))


@pytest.mark.slow_on_triton  # the interpreter makes it slow; CI runs it
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_param_norms_and_update_ratio_match_float64(backend, opt, norm_type):
    model = _model()
    make = torch.optim.SGD if opt == "sgd" else torch.optim.Adam
    optimizer = make(model.parameters(), lr=0.05)
    monitor = GradMonitor(model, norm_type=norm_type, param_norms=True)
    seen = _train(model, monitor, optimizer, 4)
    hist = monitor.history()
    ratio = hist.update_ratio()
    for t, weights in enumerate(seen):
        for j, name in enumerate(hist.names):
            w = weights[name]
            assert hist.param_norm[t, j] == pytest.approx(_norm(w, norm_type), rel=1e-6)
            if t == 0:
                assert math.isnan(ratio[t, j])  # no previous weights
            else:
                dw = _norm(w - seen[t - 1][name], norm_type)
                assert ratio[t, j] == pytest.approx(dw / _norm(w, norm_type), rel=1e-5)
        total = _norm(torch.cat([w.flatten() for w in weights.values()]), norm_type)
        assert hist.param_norm_total()[t] == pytest.approx(total, rel=1e-6)
    row = monitor.to_dict()
    suffix = "" if norm_type == 2.0 else "_inf"
    name = hist.names[0]
    assert row[f"param_norm{suffix}/{name}"] == pytest.approx(hist.param_norm[-1, 0])
    assert row[f"update_ratio{suffix}/{name}"] == pytest.approx(ratio[-1, 0])
    assert row[f"param_norm{suffix}_total"] == pytest.approx(hist.param_norm_total()[-1])


def test_frozen_layer_has_no_rows_and_every_2_spans_two_updates():
    model = _model(1, layers=3)
    for p in model[1].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    monitor = GradMonitor(model, every=2, param_norms=True)
    seen = _train(model, monitor, optimizer, 5)  # recorded: steps 0, 2, 4
    hist = monitor.history()
    assert list(hist.steps) == [0, 2, 4]
    ratio = hist.update_ratio()
    row = monitor.to_dict()
    for j, name in enumerate(hist.names):
        if name.startswith("1."):
            assert not hist.present[:, j].any()
            assert np.isnan(ratio[:, j]).all()
            assert f"param_norm/{name}" not in row and f"update_ratio/{name}" not in row
            continue
        for t, step in enumerate([0, 2, 4]):
            w = seen[step][name]
            assert hist.param_norm[t, j] == pytest.approx(_norm(w, 2), rel=1e-6)
            if t:
                want = _norm(w - seen[step - 2][name], 2) / _norm(w, 2)
                assert ratio[t, j] == pytest.approx(want, rel=1e-5)
    live = torch.cat([w.flatten() for n, w in seen[4].items() if not n.startswith("1.")])
    assert row["param_norm_total"] == pytest.approx(_norm(live, 2), rel=1e-6)


def test_block_ratio_combines_norms_before_dividing():
    model = _model(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, param_norms=True, log="blocks", group_by=1)
    seen = _train(model, monitor, optimizer, 2)
    row = monitor.to_dict()
    for block in ("0", "1"):
        w = torch.cat([v.flatten() for n, v in seen[1].items() if n.startswith(block + ".")])
        prev = torch.cat([v.flatten() for n, v in seen[0].items() if n.startswith(block + ".")])
        assert row[f"param_norm/{block}"] == pytest.approx(_norm(w, 2), rel=1e-6)
        assert row[f"update_ratio/{block}"] == pytest.approx(
            _norm(w - prev, 2) / _norm(w, 2), rel=1e-5
        )


def test_zero_weights_give_nan_ratio():
    model = _model(3)
    with torch.no_grad():
        model[0].bias.zero_()
    monitor = GradMonitor(model, param_norms=True)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        monitor.step()  # no optimizer: the weights do not move
        model.zero_grad()
    hist = monitor.history()
    j = hist.names.index("0.bias")
    assert hist.param_norm[-1, j] == 0.0
    assert math.isnan(hist.update_ratio()[-1, j])
    assert hist.update_ratio()[-1, hist.names.index("0.weight")] == 0.0


def test_off_by_default_no_keys():
    model = _model()
    monitor = GradMonitor(model)
    model(torch.randn(3, 4)).sum().backward()
    monitor.step()
    assert not [k for k in monitor.to_dict() if k.startswith(("param_norm", "update_ratio"))]
    hist = monitor.history()
    assert hist.param_norm is None and hist.update_ratio() is None
    assert hist.param_norm_total() is None


def test_bad_value_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="param_norms must be a bool"):
        GradMonitor(_model(), param_norms="yes")


def test_step_makes_no_host_read(forbid_host_reads, monkeypatch):
    """The Triton path reads nothing back, weight norms included (the torch backend reads
    CPU values for free)."""
    from conftest import BACKENDS

    from fastgradstats import dispatch

    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton backend (CUDA or TRITON_INTERPRET=1)")
    monkeypatch.setenv(dispatch.ENV_BACKEND, "triton")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, max_norm=1.0, param_norms=True)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        monitor.step()
        optimizer.step()
        optimizer.zero_grad()


def test_state_dict_keeps_rows_and_resume_starts_with_nan_ratio():
    model = _model(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, param_norms=True)
    _train(model, monitor, optimizer, 2)
    before = monitor.history()
    other = GradMonitor(model, param_norms=True)
    other.load_state_dict(monitor.state_dict())
    _train(model, other, optimizer, 1)
    after = other.history()
    np.testing.assert_array_equal(after.param_norm[:2], before.param_norm)
    assert np.isnan(after.update_ratio()[2]).all()  # previous weights are not in the state


def _steady_ops(layers: int, param_norms: bool) -> list[str]:
    model = _model(5, layers)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    monitor = GradMonitor(model, history=8, param_norms=param_norms, backend="torch")
    monitor.step()
    with OpRecorder() as rec:
        monitor.step()
    return rec.ops


def test_param_norm_ops_do_not_grow_with_the_parameters():
    extra = []
    for layers in (4, 20):
        on, off = _steady_ops(layers, True), _steady_ops(layers, False)
        assert len(on) > len(off)
        extra.append(len(on) - len(off))
    assert extra[0] == extra[1], extra


def test_jsonl_has_param_norms(tmp_path):
    import json

    model = _model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, param_norms=True)
    writer = monitor.log_jsonl(tmp_path / "g.jsonl")
    _train(model, monitor, optimizer, 2)
    hist = monitor.history()
    lines = [json.loads(line) for line in writer.path.read_text().splitlines()]
    name = hist.names[0]
    assert lines[0]["update_ratio"][name] == "NaN"
    assert lines[1]["param_norm"][name] == pytest.approx(hist.param_norm[1, 0])
    assert lines[1]["update_ratio"][name] == pytest.approx(hist.update_ratio()[1, 0])


def test_mixed_dtypes_are_grouped_and_fp64_is_exact():
    torch.manual_seed(7)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4).double()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(model, param_norms=True)
    seen = []
    for _ in range(3):
        x = torch.randn(3, 4)
        (model["a"](x).sum() + model["b"](x.double()).sum()).backward()
        seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        monitor.step()
        optimizer.step()
        optimizer.zero_grad()
    hist = monitor.history()
    ratio = hist.update_ratio()
    for t in (1, 2):
        for j, name in enumerate(hist.names):
            w, prev = seen[t][name], seen[t - 1][name]
            rel = 1e-12 if name.startswith("b.") else 1e-6
            assert hist.param_norm[t, j] == pytest.approx(_norm(w, 2), rel=rel)
            assert ratio[t, j] == pytest.approx(_norm(w - prev, 2) / _norm(w, 2), rel=rel * 10)
