"""Writers against the real TensorBoard and W&B (offline) libraries, read back from disk."""

from __future__ import annotations

import pytest
import torch
from helpers import require_extra
from monitor_helpers import set_random_grads, tiny_model
from wandb_helpers import finish_run

from fastgradstats import GradMonitor

# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_read_back_from_the_event_file(tmp_path):
    require_extra("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_model(seed=1)
    monitor = GradMonitor(model, max_norm=1.0, prefix="train/")
    writer = monitor.log_tensorboard(log_dir=str(tmp_path))
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        set_random_grads(model, gen, scale=2.0)
        monitor.step()
        if step in (2, 5):
            monitor.flush()
    hist = monitor.history()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {key for t in range(len(hist)) for key in hist.row_dict(t)}
    assert expected <= tags and monitor.total_key in tags
    for key in (monitor.total_key, "train/grad_norm/0.weight", "train/grad_clip_coef"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == list(range(6))
        want = [hist.row_dict(t)[key] for t in range(6)]
        assert [s.value for s in scalars] == pytest.approx(want, rel=1e-6)  # float32 on disk
    writer.writer.close()


# ----------------------------------------------------------------------------- W&B


def test_wandb_keeps_every_user_row_logged_with_step(wandb_run):
    run = wandb_run
    model = tiny_model(seed=2)
    monitor = GradMonitor(model, max_norm=1.0)
    monitor.log_wandb(run)
    gen = torch.Generator().manual_seed(2)
    totals = {}
    for step in range(12):
        set_random_grads(model, gen, scale=2.0)
        monitor.step()
        run.log({"loss": float(step) + 0.5}, step=step)
        if step % 4 == 3:  # the monitor flushes every few steps, after the user's log
            flushed = monitor.flush()
            totals[step] = float(flushed.total_norm[-1])
    rows = finish_run(run)
    losses = {r["_step"]: r["loss"] for r in rows if "loss" in r}
    assert losses == {s: s + 0.5 for s in range(12)}  # all 12 user rows kept
    assert max(r["_step"] for r in rows) == 11  # the monitor never moved the step
    grad_rows = {r["_step"]: r for r in rows if monitor.total_key in r}
    assert sorted(grad_rows) == [3, 7, 11]
    for step, row in grad_rows.items():
        assert row["grad/step"] == step
        assert row[monitor.total_key] == pytest.approx(totals[step], rel=1e-6)
        assert "grad_norm/0.weight" in row and "grad_clip_coef" in row


def test_wandb_rows_all_gives_every_recorded_row_its_own_step(wandb_run):
    run = wandb_run
    model = tiny_model(seed=3)
    monitor = GradMonitor(model, prefix="g/")
    monitor.log_wandb(run, rows="all")
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        set_random_grads(model, gen)
        monitor.step()
        run.log({"loss": float(step)})  # no step=: W&B counts
        if step % 3 == 2:
            monitor.flush()
    want = monitor.history().total_norm.tolist()
    rows = finish_run(run)
    assert sorted(r["loss"] for r in rows if "loss" in r) == [float(s) for s in range(6)]
    grad = sorted((r["g/grad/step"], r[monitor.total_key]) for r in rows if "g/grad/step" in r)
    assert [s for s, _ in grad] == list(range(6))
    assert [v for _, v in grad] == pytest.approx(want, rel=1e-6)


def test_wandb_writer_arguments():
    from fastgradstats.monitor import WandbWriter

    class Run:
        def __init__(self):
            self.defined, self.logged = [], []

        def define_metric(self, name, step_metric=None):
            self.defined.append((name, step_metric))

        def log(self, row, step=None, commit=None):
            self.logged.append((row, step, commit))

    with pytest.raises(ValueError, match="rows"):
        WandbWriter(Run(), rows="some")
    run = Run()
    model = tiny_model()
    monitor = GradMonitor(model, key_style="lightning")
    monitor.log_wandb(run)
    assert ("grad_*", "grad/step") in run.defined
    set_random_grads(model, torch.Generator().manual_seed(4))
    monitor.step()
    monitor.flush()
    monitor.flush()  # nothing new: nothing logged
    assert len(run.logged) == 1
    row, step, commit = run.logged[0]
    assert step is None and commit is False and "grad_2.0_norm_total" in row
