"""Checkpoints, and what resuming after a kill needs.

- Every checkpoint is written atomically (temp file + rename): a killed process never leaves half a file under
  the checkpoint's name, only a ``.<name>.<random>.tmp`` that :func:`remove_stray_temp_files` clears on resume.
- ``save(..., keep_previous=True)`` first keeps the current file as ``<stem>.prev<suffix>`` (``last.pt`` ->
  ``last.prev.pt``): a ``last.pt`` damaged later (a full disk, a bad copy) still leaves the state one epoch
  earlier, and :func:`load_for_resume` falls back to it with a message saying so.
- The training checkpoint carries the epoch log's rows (``epoch_rows``); :func:`restore_epoch_log` makes
  ``metrics.jsonl`` hold exactly those rows on resume, so a kill between the checkpoint's rename and the log's
  append loses no row, and a row written after the checkpoint is never doubled.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.io import TEMP_SUFFIX, atomic_write, atomic_write_text, stray_temp_files

log = logging.getLogger(__name__)

PREVIOUS_INFIX = ".prev"  # last.pt -> last.prev.pt
RESUME_KEYS = ("model", "optimizer", "epoch", "global_step")  # a training checkpoint has at least these


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def previous_path(path: str | Path) -> Path:
    """Where :func:`save` keeps the previous version of ``path``: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_INFIX}{path.suffix}")


def _replace_with_copy_of(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s content, atomically: a hard link renamed over it (no bytes copied), or a
    copy where the file system has no hard links."""
    link = target.with_name(f".{target.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        os.link(source, link)
        os.replace(link, target)
    except OSError:
        with open(source, "rb") as src, atomic_write(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    finally:
        # rename() does nothing when both names are already links to one file (target was linked from source
        # before): the temporary name is then still there
        with contextlib.suppress(FileNotFoundError):
            link.unlink()


def save(state: dict, path: str | Path, *, keep_previous: bool = False) -> Path:
    """Write ``state`` to ``path`` atomically; ``keep_previous``: keep the file it replaces as
    :func:`previous_path`. ``path`` is whole at every instant (the old file until the rename, then the new)."""
    path = Path(path)
    if keep_previous and path.is_file():
        _replace_with_copy_of(path, previous_path(path))
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint's state; :class:`CheckpointError` naming the file when it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # Our own checkpoints hold numpy RNG state and plain Python objects: trusted files, full unpickling.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... on a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt "
                              f"({path.stat().st_size} bytes; {type(exc).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict of states)")
    return state


def _load_training_state(path: Path) -> dict:
    state = load(path)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (lacks {missing})")
    return state


def has_checkpoint(path: str | Path) -> bool:
    """True when ``path`` or its previous version exists: a run was started there."""
    return Path(path).is_file() or previous_path(path).is_file()


def load_for_resume(path: str | Path, *, repair: bool = True) -> dict:
    """The training state at ``path`` (``last.pt``) or, when that file is unreadable, at its previous version,
    with a warning naming both. ``repair``: put the previous version in place of the unreadable file, so that the
    next :func:`save` does not keep the damaged one as "previous" (one process only: DDP's rank 0).
    CheckpointError, saying what to do, when neither can be read."""
    path = Path(path)
    previous = previous_path(path)
    try:
        return _load_training_state(path)
    except CheckpointError as exc:
        problem = str(exc)
    if not previous.is_file():
        raise CheckpointError(f"{problem}; there is no previous checkpoint {previous.name} to resume from: delete "
                              f"{path.parent} to train this fold again")
    try:
        state = _load_training_state(previous)
    except CheckpointError as exc:
        raise CheckpointError(f"{problem}; the previous checkpoint is unusable too ({exc}): delete {path.parent} "
                              "to train this fold again") from None
    log.warning("%s; resuming from the previous checkpoint %s (after epoch %s)", problem, previous, state["epoch"])
    if repair:
        _replace_with_copy_of(previous, path)
    return state


def remove_stray_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (see :func:`pipeline.io.atomic_write`).
    Only for a folder no other process is writing to: a training fold's own directory, on resume."""
    removed = []
    for path in stray_temp_files(folder):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
            log.info("removed %s, left by a process killed while writing", path)
    return removed


# ------------------------------------------------------------------------------------------ the epoch log


def read_epoch_log(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines epoch log; a line that does not parse (cut by a kill) ends it."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(row, dict):
            rows.append(row)
    return rows


def epoch_log_text(rows: Sequence[Mapping]) -> str:
    return "".join(json.dumps(dict(row)) + "\n" for row in rows)


def restore_epoch_log(path: str | Path, state: Mapping | None) -> list[dict]:
    """Make the epoch log at ``path`` hold exactly the rows of the run as of ``state`` (the checkpoint resumed
    from; None: a run starting afresh) and return them.

    The rows come from the checkpoint's ``epoch_rows``; a checkpoint written before it carried them keeps the
    log's rows up to its epoch. Rows after the checkpoint's epoch (their epoch will run again) are dropped, rows
    the log lacks (a kill between the checkpoint's rename and the log's append) are written back.
    """
    path = Path(path)
    if state is None:
        rows: list[dict] = []
    elif state.get("epoch_rows") is not None:
        rows = [dict(r) for r in state["epoch_rows"]]
    else:
        rows = [r for r in read_epoch_log(path) if isinstance(r.get("epoch"), int) and r["epoch"] <= state["epoch"]]
    text = epoch_log_text(rows)
    current = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    if current is not None and current != text:
        lost = len(rows) - sum(1 for r in read_epoch_log(path) if r in rows)
        log.warning("%s: rewritten to the %d row(s) of the checkpoint%s", path, len(rows),
                    f" ({lost} row(s) it lacked written back)" if lost > 0 else "")
    if current != text and (current is not None or rows):
        atomic_write_text(path, text)
    return rows


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
