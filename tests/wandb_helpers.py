"""W&B offline runs for the writer tests: a run fixture and the rows read back from disk."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import require_extra


def wandb_records(path):
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


def wandb_history(run_dir, timeout: float = 30.0) -> list[dict]:
    """History rows of an offline run; waits for the run's exit record, since W&B's
    service process may still be writing the file when ``run.finish()`` returns."""
    import time

    (path,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
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


def finish_run(run):
    run_dir = Path(run.dir).parent
    run.finish()
    return wandb_history(run_dir)
