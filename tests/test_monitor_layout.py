"""The monitor package layout: public names stay importable, no import circle, light imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.backend_independent  # no gradient op routed by the environment


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_public_names_stay_importable():
    import fastgradstats
    import fastgradstats.monitor as monitor
    from fastgradstats.plot import plot_heatmap, plot_history, plot_total_norm

    assert fastgradstats.GradMonitor is monitor.GradMonitor
    for name in monitor.__all__:
        assert getattr(monitor, name) is not None
    assert monitor._Events is monitor.Events  # the old private name, used by diagnose()
    assert plot_history is monitor.plots.plot_history
    assert plot_heatmap is monitor.plots.plot_heatmap
    assert plot_total_norm is monitor.plots.plot_total_norm


def test_monitor_never_imports_the_plot_shim_or_optional_packages():
    out = _run(
        "import sys, fastgradstats, fastgradstats.monitor\n"
        "import fastgradstats.monitor.plots\n"
        "bad = [m for m in ('fastgradstats.plot', 'matplotlib', 'wandb', 'tensorboard',"
        " 'lightning', 'transformers') if m in sys.modules]\n"
        "print(bad)\n"
    )
    assert out.strip() == "[]"


def test_plot_shim_imports_first():
    # The shim used to be half of a circle (plot -> monitor -> plot); importing it first in a
    # fresh interpreter must work.
    _run("import fastgradstats.plot as p; assert callable(p.plot_history)")
