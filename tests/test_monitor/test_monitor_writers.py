"""Writers against the real TensorBoard and W&B (offline) libraries, read back from disk."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import require_extra
from monitor_helpers import set_random_grads, tiny_model

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


def _wandb_records(path):
    """The records of an offline ``.wandb`` file: a 7-byte header, then LevelDB-log
    framing (32 KiB blocks; 7-byte chunk headers: crc32, length, type) around protobuf
    ``Record`` messages, as W&B's transaction log stores them."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        else:  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(run_dir, timeout: float = 30.0) -> list[dict]:
    """History rows of an offline run; waits for the run's exit record, since W&B's
    service process may still be writing the file when ``run.finish()`` returns."""
    import time

    (path,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, "the offline run file never got its exit record"
        time.sleep(0.1)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


@pytest.fixture
def wandb_run(tmp_path, monkeypatch):
    wandb = require_extra("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(
        project="fastgradstats-test",
        dir=str(tmp_path),
        mode="offline",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    yield run
    run.finish()


def _finish(run):
    run_dir = Path(run.dir).parent
    run.finish()
    return _wandb_history(run_dir)


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
    rows = _finish(run)
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
    rows = _finish(run)
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
