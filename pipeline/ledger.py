"""The submission ledger: which file was submitted, made by which ensemble, with what CV, and what it scored.

A library (no command line: :mod:`pipeline.leaderboard` is the stage that shows, records, scores and syncs).
The files, all in the submissions folder (``submission.dir``, default ``submissions/``):

- ``<file>.meta.json``, the sidecar of each submission file (:func:`write_sidecar`): file, created, experiment,
  ensemble, members, pseudo_round (the highest pseudo-label round any member trained on, as text: "0" none, "?"
  unknown), pseudo_members (``member=round`` per member), cv (the ensemble's tuned OOF score), cv_nested (its
  tuning scored out of fold, a mean of per-fold scores, when the ensemble stage ran it: ``ensemble.nested``),
  metric, format, content_hash, config, mlflow_run_id (the run that made the predictions);
- ``ledger.csv``: one row per submission file, columns :data:`LEDGER_COLUMNS`, every cell text (lists joined by
  ``;``, missing values empty). A plain CSV that works without MLflow and diffs well; written atomically under a
  lock file, so two stages never lose each other's rows. A sidecar without a row (a ``submissions/`` folder copied
  from a Kaggle notebook) reads as a row as well. ``kaggle_ref`` and ``kaggle_competition``: the Kaggle submission
  the file was sent as (``leaderboard submit``) or whose scores the row holds (``leaderboard sync``).

A file is identified by its name, or by the sha256 of its bytes (:func:`pipeline.formats.content_hash`) or a
prefix of it. The same facts go to MLflow as "submission" runs (see :func:`pipeline.tracking.log_submission`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.formats import content_hash
from pipeline.io import TextDecodeError, atomic_write_text, read_text

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.csv"
META_SUFFIX = ".meta.json"
DEFAULT_DIR = Path("submissions")
LEDGER_COLUMNS = [
    "file", "created", "experiment", "ensemble", "members", "pseudo_round", "pseudo_members", "cv", "cv_nested",
    "metric", "format", "content_hash", "config", "mlflow_run_id", "source_run_id", "tracking_uri", "public",
    "private", "lb_source", "lb_updated", "kaggle_ref", "kaggle_competition",
]
# what the leaderboard sets (scores, and the Kaggle submission they belong to): kept when the same bytes are
# registered again
LB_COLUMNS = ["public", "private", "lb_source", "lb_updated", "kaggle_ref", "kaggle_competition"]
_META_COLUMNS = ["created", "experiment", "ensemble", "members", "pseudo_round", "pseudo_members", "cv", "cv_nested",
                 "metric", "format", "content_hash", "config"]
_MIN_HASH_PREFIX = 6  # shorter prefixes match too much to name one submission


class LedgerError(RuntimeError):
    """A ledger or sidecar file that cannot be read, or a submission it does not list: the user's to fix."""


# ------------------------------------------------------------------------------------------------ cells


def cell_text(value: Any) -> str:
    """A value as a ledger cell: None and non-finite numbers empty, lists joined by ``;``."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)


def cell_number(value: Any) -> float | None:
    """A ledger cell (or any value) as a finite float, or None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ------------------------------------------------------------------------------------------------ files


def ledger_path(ledger_dir: str | Path = DEFAULT_DIR) -> Path:
    return Path(ledger_dir) / LEDGER_NAME


def sidecar_path(submission: str | Path) -> Path:
    """``<submission>.meta.json``, beside the submission file."""
    submission = Path(submission)
    return submission.with_name(submission.name + META_SUFFIX)


def write_sidecar(meta: Mapping[str, Any]) -> Path:
    """Write ``meta`` (see the module docstring) as the sidecar of ``meta["file"]``, atomically."""
    if not meta.get("file"):
        raise ValueError("submission meta has no 'file'")
    return atomic_write_text(sidecar_path(str(meta["file"])), json.dumps(dict(meta), indent=2))


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """A sidecar's content; ``file`` defaults to the sidecar's name without ``.meta.json``."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: not a readable submission sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise LedgerError(f"{path}: expected a JSON object")
    meta.setdefault("file", path.name.removesuffix(META_SUFFIX))
    return meta


def _row_from_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    row = {c: "" for c in LEDGER_COLUMNS}
    for key in _META_COLUMNS:
        row[key] = cell_text(meta.get(key))
    row["file"] = Path(str(meta["file"])).name
    row["source_run_id"] = cell_text(meta.get("mlflow_run_id"))
    return row


def _read_ledger_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    try:  # every cell stays text ("NA" is a name, not a missing value); a BOM (a spreadsheet's save) is dropped
        text = read_text(path)
    except TextDecodeError as exc:
        raise LedgerError(str(exc)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None:
            return []
        if "file" not in reader.fieldnames:
            raise LedgerError(f"{path}: not a ledger (no 'file' column; found {reader.fieldnames})")
        # columns added in later versions read as empty, unknown columns are kept
        return [{c: row.get(c) or "" for c in LEDGER_COLUMNS} | {k: v or "" for k, v in row.items()
                                                                   if k not in LEDGER_COLUMNS and k}
                for row in reader]
    except csv.Error as exc:
        raise LedgerError(f"{path}: not a readable CSV (line {reader.line_num}: {exc})") from None


def load_ledger(ledger_dir: str | Path = DEFAULT_DIR) -> list[dict[str, str]]:
    """The ledger rows (oldest first), plus a row for every ``*.meta.json`` sidecar the CSV does not list yet."""
    ledger_dir = Path(ledger_dir)
    rows = _read_ledger_csv(ledger_path(ledger_dir))
    known = {r["file"] for r in rows}
    for sidecar in sorted(ledger_dir.glob(f"*{META_SUFFIX}")):
        try:
            row = _row_from_meta(read_sidecar(sidecar))
        except LedgerError as exc:
            log.warning("skipped: %s", exc)
            continue
        if row["file"] not in known:
            log.info("ledger: added %s from its sidecar", row["file"])
            rows.append(row)
            known.add(row["file"])
    return rows


def save_ledger(rows: Sequence[Mapping[str, str]], ledger_dir: str | Path = DEFAULT_DIR) -> Path:
    """Write the ledger atomically (a reader never sees half a file). Hold :func:`ledger_lock` around the
    load-change-save, or another writer's rows may be lost."""
    extra = sorted({k for r in rows for k in r} - set(LEDGER_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LEDGER_COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in LEDGER_COLUMNS + extra})
    return atomic_write_text(ledger_path(ledger_dir), buffer.getvalue())


def ledger_lock(ledger_dir: str | Path = DEFAULT_DIR) -> contextlib.AbstractContextManager[None]:
    """Held while reading, changing and saving the ledger: two stages may write it at once."""
    return tracking.file_lock(Path(ledger_dir) / ".ledger.lock")


# ------------------------------------------------------------------------------------------------ rows


def register_submission(meta: Mapping[str, Any], tracking_cfg: TrackingConfig | None = None, *,
                        experiment: str | None = None, ledger_dir: str | Path | None = None) -> dict[str, str]:
    """Add a submission to the ledger (``<ledger_dir>/ledger.csv``) and log its MLflow "submission" run.

    ``meta``: the sidecar's content (see the module docstring). ``ledger_dir``: default the folder of
    ``meta["file"]`` when it has one, else ``submissions/``. Registering a file again updates its row; its
    leaderboard scores are kept unless the content changed. Never fails on MLflow: see :mod:`pipeline.tracking`.
    """
    if not meta.get("file"):
        raise ValueError("submission meta has no 'file'")
    if ledger_dir is None:
        parent = Path(str(meta["file"])).parent
        ledger_dir = parent if parent != Path(".") else DEFAULT_DIR
    ledger_dir = Path(ledger_dir)
    experiment = experiment or str(meta.get("experiment") or "submissions")
    row = _row_from_meta(meta) | {"experiment": experiment}
    run_id = tracking.log_submission(meta, tracking_cfg, experiment=experiment, fallback_dir=ledger_dir)
    row["mlflow_run_id"] = run_id or ""
    row["tracking_uri"] = tracking.safe_uri(tracking.resolve_uri(tracking_cfg)) if run_id else ""
    with ledger_lock(ledger_dir):
        rows = load_ledger(ledger_dir)
        old = next((r for r in rows if r["file"] == row["file"]), None)
        if old is None:
            rows.append(row)
        else:
            if old["content_hash"] == row["content_hash"]:  # same content: its LB scores still hold
                row |= {k: old[k] for k in LB_COLUMNS}
            old.clear()
            old.update(row)
        save_ledger(rows, ledger_dir)
    return row


def _hash_of(path: Path) -> str | None:
    try:
        return content_hash(path)
    except OSError:  # a file we cannot read just does not match by hash
        return None


def find_rows(rows: Sequence[Mapping[str, str]], ident: str) -> list[int]:
    """Indices of the rows ``ident`` names: a file name or path, a content hash or a hash prefix (>= 6 chars), or
    a file (path) whose content some row has. Several rows only when a hash names several registered copies."""
    name = Path(ident).name
    by_name = [i for i, r in enumerate(rows) if r["file"] == name]
    if by_name:
        return by_name
    key = ident.strip().lower()
    prefix_ok = len(key) >= _MIN_HASH_PREFIX
    by_hash = [i for i, r in enumerate(rows)
               if r["content_hash"] and (r["content_hash"].lower() == key
                                         or (prefix_ok and r["content_hash"].lower().startswith(key)))]
    if by_hash:
        return by_hash
    path = Path(ident)
    digest = _hash_of(path) if path.is_file() else None
    if digest:
        return [i for i, r in enumerate(rows) if r["content_hash"] == digest]
    return []


def set_scores(rows: list[dict[str, str]], index: int, *, public: float | None = None,
               private: float | None = None, source: str, ref: str = "") -> dict[str, str]:
    """Set the leaderboard cells of ``rows[index]`` (a score given as None keeps the old one); ``source`` says
    where the scores came from ("manual", "kaggle", "local:<labels>"), ``ref`` the Kaggle submission."""
    row = rows[index]
    if public is not None:
        row["public"] = cell_text(float(public))
    if private is not None:
        row["private"] = cell_text(float(private))
    row["lb_source"], row["lb_updated"] = source, datetime.now(timezone.utc).isoformat(timespec="seconds")
    if ref:
        row["kaggle_ref"] = ref
    return row



def set_kaggle_submission(rows: list[dict[str, str]], index: int, *, ref: str, competition: str) -> dict[str, str]:
    """Record that ``rows[index]`` was sent to Kaggle ``competition`` as submission ``ref`` ("" when Kaggle did not
    say): ``leaderboard sync`` then finds its scores by that ref."""
    row = rows[index]
    row["kaggle_ref"], row["kaggle_competition"] = ref, competition
    return row
