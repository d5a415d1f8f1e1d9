"""pipeline.checkpoint: atomic checkpoints, one previous version kept, clear errors on damaged files, and the epoch
log restored from the checkpoint on resume (the fast tests of finding 8; tests/test_crash_resume.py kills real
training runs)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import CheckpointError


def state(epoch: int, **extra) -> dict:
    return {"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}, "epoch": epoch, "global_step": 2 * epoch,
            **extra}


def test_save_keeps_the_previous_version(tmp_path):
    last = tmp_path / "last.pt"
    checkpoint.save(state(0), last, keep_previous=True)
    assert not checkpoint.previous_path(last).exists()  # nothing to keep yet
    checkpoint.save(state(1), last, keep_previous=True)
    checkpoint.save(state(2), last, keep_previous=True)
    assert checkpoint.previous_path(last).name == "last.prev.pt"
    assert checkpoint.load(last)["epoch"] == 2 and checkpoint.load(tmp_path / "last.prev.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]  # no temp file left
    checkpoint.save(state(9), tmp_path / "best.pt")
    assert not (tmp_path / "best.prev.pt").exists()  # only when asked


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not_a_dict"])
def test_a_damaged_checkpoint_is_a_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "best.pt"
    checkpoint.save(state(3), path)
    data = path.read_bytes()
    if damage == "not_a_dict":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00junk" * 40}[damage])
    pattern = "not a checkpoint" if damage == "not_a_dict" else "not a readable checkpoint, truncated or corrupt"
    with pytest.raises(CheckpointError, match=rf"best\.pt: {pattern}"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nothing\.pt"):
        checkpoint.load(tmp_path / "nothing.pt")


def test_resume_falls_back_to_the_previous_checkpoint_and_repairs_last(tmp_path, caplog):
    """Finding 8: a truncated last.pt with --resume was a traceback; now the run goes on from last.prev.pt."""
    last = tmp_path / "last.pt"
    for epoch in range(3):
        checkpoint.save(state(epoch), last, keep_previous=True)
    last.write_bytes(last.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        resumed = checkpoint.load_for_resume(last)
    assert resumed["epoch"] == 1
    assert "last.pt: not a readable checkpoint" in caplog.text
    assert "resuming from the previous checkpoint" in caplog.text
    # the damaged file is replaced, so the next save keeps a good "previous"
    assert checkpoint.load(last)["epoch"] == 1
    checkpoint.save(state(2), last, keep_previous=True)
    assert checkpoint.load(checkpoint.previous_path(last))["epoch"] == 1
    # last.pt and last.prev.pt were one file (linked by the repair): keeping it as "previous" leaves no temp name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_resume_without_a_usable_checkpoint_says_what_to_do(tmp_path):
    last = tmp_path / "fold0" / "last.pt"
    checkpoint.save(state(0), last, keep_previous=True)
    last.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.pt: not a readable checkpoint.*no previous checkpoint "
                                              r"last\.prev\.pt.*delete .*fold0"):
        checkpoint.load_for_resume(last)
    checkpoint.save(state(0), last, keep_previous=True)
    checkpoint.save(state(1), last, keep_previous=True)
    last.write_bytes(b"x")
    checkpoint.previous_path(last).write_bytes(b"y")
    with pytest.raises(CheckpointError, match=r"the previous checkpoint is unusable too"):
        checkpoint.load_for_resume(last)
    torch.save({"weights": 1}, last)  # a dict, but not a training checkpoint
    with pytest.raises(CheckpointError, match=r"last\.pt: not a training checkpoint \(lacks \['model'"):
        checkpoint.load_for_resume(last, repair=False)


def test_has_checkpoint_sees_either_version(tmp_path):
    last = tmp_path / "last.pt"
    assert not checkpoint.has_checkpoint(last)
    checkpoint.save(state(0), checkpoint.previous_path(last))
    assert checkpoint.has_checkpoint(last)
    assert checkpoint.load_for_resume(last)["epoch"] == 0  # last.pt gone: the previous one still resumes


def test_stray_temp_files_are_removed(tmp_path):
    """Finding 8: a partial .last.pt.*.tmp of a kill mid-write stayed after a successful resume."""
    for name in (".last.pt.k2j4.tmp", ".metrics.jsonl.x.tmp", "last.pt", "notes.tmp", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    removed = checkpoint.remove_stray_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [".last.pt.k2j4.tmp", ".metrics.jsonl.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "last.pt", "notes.tmp"]


ROWS = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_score": 0.1 * e + 0.0123456789} for e in range(3)]


def log_text(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_a_row_lost_between_checkpoint_and_log_is_written_back(tmp_path):
    """Finding 8: a kill between the rename of last.pt and the append to metrics.jsonl lost that epoch's row."""
    log = tmp_path / "metrics.jsonl"
    log.write_text(log_text(ROWS[:2]))  # epoch 2's checkpoint was renamed into place, its row never appended
    rows = checkpoint.restore_epoch_log(log, state(2, epoch_rows=ROWS))
    assert rows == ROWS and log.read_text() == log_text(ROWS)


@pytest.mark.parametrize("on_disk", [
    log_text(ROWS[:2]) + '{"epoch": 2, "train_lo',  # a kill in the middle of the append
    log_text(ROWS) + log_text(ROWS[2:]),  # a row twice
    log_text(ROWS + [{"epoch": 3, "train_loss": 9.0}]),  # a row of an epoch the checkpoint does not hold
    "",
])
def test_the_log_is_made_exactly_the_checkpoint_rows(tmp_path, on_disk):
    log = tmp_path / "metrics.jsonl"
    log.write_text(on_disk)
    checkpoint.restore_epoch_log(log, state(2, epoch_rows=ROWS))
    assert log.read_text() == log_text(ROWS)


def test_an_old_checkpoint_without_rows_keeps_the_log_up_to_its_epoch(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(log_text(ROWS) + '{"epoch": 3, "tra')
    assert checkpoint.restore_epoch_log(log, state(1)) == ROWS[:2]
    assert log.read_text() == log_text(ROWS[:2])


def test_a_fresh_start_empties_a_stale_log_and_creates_none(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert checkpoint.restore_epoch_log(log, None) == [] and not log.exists()
    log.write_text(log_text(ROWS))
    assert checkpoint.restore_epoch_log(log, None) == [] and log.read_text() == ""


def test_an_unchanged_log_is_not_rewritten(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(log_text(ROWS))
    os.utime(log, (1, 1))
    checkpoint.restore_epoch_log(log, state(2, epoch_rows=ROWS))
    assert log.stat().st_mtime == 1
