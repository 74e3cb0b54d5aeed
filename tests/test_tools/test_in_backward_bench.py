"""``python -m benchmarks in-backward --quick``: both sides run on a tiny GPT-2 and agree.

No timing is asserted (CI machines are shared); the full run judges its targets. What is
checked: both monitors see the same gradients (bit-equal norms every round), the
in-backward side catches nothing up, and each reported ratio is the median of its rounds.
"""

from __future__ import annotations

import json
import statistics

import pytest

pytest.importorskip("transformers")

# both sides pin backend="torch" (the CPU's path): the routed Triton pass has nothing to add
pytestmark = pytest.mark.backend_independent


@pytest.mark.slow
@pytest.mark.parametrize("cpu_time", [False, True])
def test_quick_run_writes_agreeing_sides(tmp_path, capsys, cpu_time):
    import torch

    from benchmarks import in_backward

    threads = torch.get_num_threads()
    flags = ["--cpu-time"] if cpu_time else []
    assert in_backward.main(["--quick", "--out", str(tmp_path), *flags]) == 0
    assert torch.get_num_threads() == threads  # --cpu-time's one thread is undone
    [path] = tmp_path.glob("in-backward-cpu-*-cputime.json" if cpu_time else "*[0-9].json")
    result = json.loads(path.read_text())
    assert result["meta"]["clock"].startswith("thread_time" if cpu_time else "perf_counter")
    assert result["meta"]["cpu_threads"] == (1 if cpu_time else threads)
    assert result["tensors"] == 28  # 2 blocks x 12, wte, wpe, ln_f (lm_head is tied to wte)
    assert result["same_total_every_round"] is True
    assert result["catchup_tensors"] == 0 and result["buckets"] >= 1
    samples = result["samples"]
    assert len(samples) == result["rounds"] == 3
    for s in samples:
        assert s["step_after_ms"] > 0 and s["step_during_ms"] > 0
        assert s["after_backward"] == pytest.approx(s["step_during_ms"] / s["step_after_ms"])
    for key in ("after_backward", "backward_plus_step", "step_after_ms"):
        assert result["medians"][key] == statistics.median(s[key] for s in samples)
    assert "in-backward targets:" in capsys.readouterr().out


def test_bad_arguments_exit_with_usage(capsys):
    from benchmarks import in_backward

    with pytest.raises(SystemExit) as exc:
        in_backward.main(["--rounds", "0"])
    assert exc.value.code == 2
    assert "--rounds" in capsys.readouterr().err
