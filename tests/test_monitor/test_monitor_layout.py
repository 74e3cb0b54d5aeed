"""The monitor package layout: public names importable, light imports, one place for plots."""

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

    assert fastgradstats.GradMonitor is monitor.GradMonitor
    for name in monitor.__all__:
        assert getattr(monitor, name) is not None
    assert monitor._Events is monitor.Events  # the old private name, used by diagnose()
    for name in ("plot_heatmap", "plot_history", "plot_total_norm"):
        assert callable(getattr(monitor.plots, name))


def test_monitor_never_imports_optional_packages():
    out = _run(
        "import sys, fastgradstats, fastgradstats.monitor\n"
        "import fastgradstats.monitor.plots\n"
        "bad = [m for m in ('matplotlib', 'wandb', 'tensorboard',"
        " 'lightning', 'transformers') if m in sys.modules]\n"
        "print(bad)\n"
    )
    assert out.strip() == "[]"


def test_the_old_plot_shim_is_gone():
    # one place for the plots: fastgradstats.monitor.plots (issue 17)
    with pytest.raises(ModuleNotFoundError):
        __import__("fastgradstats.plot")
