"""Crash safety of training (finding 8): a run killed anywhere and resumed with ``--resume`` ends exactly where an
uninterrupted run does -- same weights, same ``metrics.jsonl`` rows, same files and no stray temporary file.

Two tests, both slow (they train): one kills the training process from outside with SIGKILL at random points of
several epochs (seeded; ``PIPELINE_CRASH_SEED`` picks other points), one stops a run at the exact instants a
random kill rarely hits (between last.pt's rename and the epoch log's append; a damaged last.pt). The logic they
rely on has fast tests in tests/test_checkpoint.py.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch

from conftest import REPO, tiny_config, write_config
from pipeline import checkpoint, folds as folds_stage, train
from pipeline.layout import fold_dir, read_predictions

pytestmark = pytest.mark.slow

TIMING_KEYS = {"epoch_time_s", "train_images_per_s"}  # wall-clock figures: the only values allowed to differ
EPOCHS = 6


def epoch_rows(folder: Path) -> list[dict]:
    """metrics.jsonl's rows without their timing figures; every line must parse."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_same_run(straight: Path, resumed: Path) -> None:
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in straight.iterdir()), \
        "stray or missing files after the resume"
    assert epoch_rows(resumed) == epoch_rows(straight)
    for name in ("last.pt", "best.pt"):
        a, b = checkpoint.load(straight / name), checkpoint.load(resumed / name)
        assert a["epoch"] == b["epoch"], name
        for key in ("model", "ema") if name == "last.pt" else ("model",):
            for tensor_name, tensor in a[key].items():
                assert torch.equal(tensor, b[key][tensor_name]), f"{name}: {key}.{tensor_name} differs"
    pd.testing.assert_frame_equal(read_predictions(straight / "oof.parquet"), read_predictions(resumed / "oof.parquet"))


# --------------------------------------------------------------------------- SIGKILL from outside, at random


class TrainingProcess:
    """``python -m pipeline.train`` in a child process whose stdout lines are collected as they come."""

    def __init__(self, config: Path, resume: bool):
        args = [sys.executable, "-m", "pipeline.train", "--config", str(config), "--fold", "0"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args + (["--resume"] if resume else []), cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.epochs_done: list[int] = []
        self.new_line = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("{") and '"epoch"' in line:
                try:
                    self.epochs_done.append(json.loads(line)["epoch"])
                except json.JSONDecodeError:  # the line a kill cut short
                    pass
            self.new_line.set()

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float = 600) -> bool:
        """True once ``done()``; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return True
            if self.proc.poll() is not None:
                self.reader.join(5)
                return done()
            self.new_line.wait(0.05)
            self.new_line.clear()
        raise TimeoutError(f"not {what} within {timeout} s:\n{''.join(self.lines[-30:])}")

    def wait_for_epoch(self, epoch: int) -> bool:
        """True once this process has printed ``epoch``'s row or a later one."""
        return self.wait_until(lambda: any(e >= epoch for e in self.epochs_done), f"epoch {epoch}")

    def kill_after(self, delay: float) -> bool:
        """SIGKILL after ``delay`` seconds; False when the process had already ended by then."""
        try:
            self.proc.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.reader.join(5)
            return True

    def finish(self) -> str:
        self.proc.wait(timeout=900)
        self.reader.join(5)
        out = "".join(self.lines)
        assert self.proc.returncode == 0, out[-4000:]
        return out


def kill_plan(rng: random.Random, epoch_seconds: float) -> list[tuple[str, float]]:
    """When to kill each run, as (event, random delay after it). Events, not clock times: a loaded machine
    stretches start-up more than anything else. "start": the fold's config.yaml appears (the run is past
    start-up), so the kill lands in model building, the first epoch or the first checkpoint; "row": this process
    has trained an epoch, so the kill lands in a later one (training, validation, the checkpoint and log writes);
    "last": the last epoch's row is out, so the kill lands in the fold's finish (best model's OOF predictions,
    curves, the summary saved into last.pt)."""
    plan = [("start", rng.uniform(0.0, 2.0 * epoch_seconds))]
    plan += [("row", rng.uniform(0.0, 1.0 * epoch_seconds)) for _ in range(3)]
    plan.append(("last", rng.uniform(0.0, 2.0 * epoch_seconds)))
    return plan


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_data):
    seed = int(os.environ.get("PIPELINE_CRASH_SEED", "13"))
    rng = random.Random(seed)
    configs = {}
    for name in ("straight", "killed"):
        configs[name] = write_config(tmp_path / name, tiny_data, train={"epochs": EPOCHS}, tracking={"enabled": False})
        assert folds_stage.main(["--config", str(configs[name])]) == 0
    started = time.monotonic()
    straight = TrainingProcess(configs["straight"], resume=False)
    straight.wait_for_epoch(0)
    first_epoch_at = time.monotonic()
    straight.wait_for_epoch(EPOCHS - 1)
    epoch_seconds = (time.monotonic() - first_epoch_at) / (EPOCHS - 1)
    straight.finish()

    killed_dir = tmp_path / "killed/runs/demo/tiny/fold0"
    history, finished = [], False
    for event, delay in kill_plan(rng, epoch_seconds):
        run = TrainingProcess(configs["killed"], resume=True)  # --resume also starts a run that has no checkpoint
        reached = {"start": lambda: run.wait_until((killed_dir / "config.yaml").is_file, "started"),
                   "row": lambda: run.wait_until(lambda: len(run.epochs_done) > 0, "an epoch"),
                   "last": lambda: run.wait_for_epoch(EPOCHS - 1)}[event]()
        if reached and run.kill_after(delay):
            history.append(f"{event} + {delay:.2f} s: killed; epochs trained before it {run.epochs_done}")
            continue
        run.finish()
        history.append(f"{event} + {delay:.2f} s: the run had finished; epochs trained {run.epochs_done}")
        finished = True
        break
    if not finished:
        out = TrainingProcess(configs["killed"], resume=True).finish()
        history.append("final resume: " + next((line for line in out.splitlines() if "resum" in line), "?"))
    context = f"seed {seed} (PIPELINE_CRASH_SEED), {time.monotonic() - started:.0f} s:\n  " + "\n  ".join(history)
    print(context)  # where the kills landed: shown with pytest -s or -rP
    assert sum("killed" in h for h in history) >= 3, context
    assert_same_run(tmp_path / "straight/runs/demo/tiny/fold0", tmp_path / "killed/runs/demo/tiny/fold0")
    assert not [p for p in (tmp_path / "killed").rglob("*.tmp")], context


# --------------------------------------------------------------------------- the narrow windows, exactly


class Killed(BaseException):
    """Stands in for SIGKILL inside the process, at an exact instant: no handler swallows it, so the files left are
    those a kill there leaves (the temp files of a kill mid-write are covered in tests/test_checkpoint.py)."""


REAL_LOG_EPOCH = train.log_epoch


def die_before_logging(monkeypatch, epoch: int | None) -> None:
    """Stop the run after last.pt of ``epoch`` was renamed into place, before its metrics.jsonl row (None: don't)."""
    real = REAL_LOG_EPOCH

    def log_epoch(out, fold, row, tracker):
        if row["epoch"] == epoch:
            raise Killed(f"killed before logging epoch {epoch}")
        real(out, fold, row, tracker)

    monkeypatch.setattr(train, "log_epoch", log_epoch)


def mlflow_steps(cfg, metric: str) -> list[int]:
    """Steps of ``metric`` in the latest fold0 run of ``cfg.experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'fold0'",
                              order_by=["attribute.start_time DESC"])
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, metric))


def test_kills_between_checkpoint_and_log_and_a_damaged_last_pt(tmp_path, tiny_data, monkeypatch, capsys, caplog):
    straight = tiny_config(tmp_path / "straight", tiny_data, train={"epochs": 3}, experiment="crash-straight")
    folds_stage.run(straight)
    train.run(straight, "0", resume=False)
    cfg = tiny_config(tmp_path / "killed", tiny_data, train={"epochs": 3}, experiment="crash-killed")
    folds_stage.run(cfg)
    out = fold_dir(cfg, 0)

    # 1. killed after epoch 0's last.pt, before its row: the row is in neither metrics.jsonl nor MLflow
    die_before_logging(monkeypatch, 0)
    with pytest.raises(Killed):
        train.run(cfg, "0", resume=False)
    assert (out / "last.pt").is_file() and not (out / "metrics.jsonl").exists()

    # 2. resumed: epoch 0's row comes back (file and MLflow); killed again the same way after epoch 1's last.pt
    die_before_logging(monkeypatch, 1)
    with pytest.raises(Killed):
        train.run(cfg, "0", resume=True)
    assert [r["epoch"] for r in epoch_rows(out)] == [0]
    assert mlflow_steps(cfg, "lr") == [0]

    # 3. last.pt damaged (a bad copy, a full disk), a temp file half written: the resume goes back to
    #    last.prev.pt (epoch 0), says so, and ends like the uninterrupted run
    die_before_logging(monkeypatch, None)
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:1000])
    (out / ".last.pt.k9x2.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    train.run(cfg, "0", resume=True)
    assert "resuming after epoch 0" in capsys.readouterr().out
    assert "last.pt: not a readable checkpoint" in caplog.text and "last.prev.pt" in caplog.text
    assert_same_run(fold_dir(straight, 0), out)
    assert mlflow_steps(cfg, "lr") == [0, 1, 2]  # the resumed run's curve is whole
