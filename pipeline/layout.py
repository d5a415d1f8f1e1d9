"""The file contracts between stages: every path, file name and table schema, in one place.

Stages talk only through these files, so this module is the whole interface between them:

1. the annotation table (``pipeline.data``): ``IMAGE_COLUMNS`` and ``BOX_COLUMNS``, produced by every reader;
2. the folds file ``folds/<dataset>_k<K>_s<seed>.csv``: ``image_id, fold`` (:func:`folds_path`, :func:`read_folds`);
3. the run directory of one model x fold, ``runs/<experiment>/<run>/fold<K>/`` (:func:`fold_dir`): the resolved
   ``config.yaml``, ``last.pt`` (and ``last.prev.pt``, the epoch before), ``best.pt``, ``metrics.jsonl``,
   ``curves.png`` and ``oof.parquet``;
4. the prediction table (``PREDICTION_COLUMNS``), one row per box in original-image pixels:
   ``runs/<experiment>/<run>/predictions/<split>.parquet`` per model (:func:`predictions_path`), and the fused
   tables of an ensemble, ``runs/<experiment>/ensembles/<name>/{oof,test}_fused.parquet`` (:func:`fused_path`)
   beside its ``result.json``;
5. a pseudo-label round, ``runs/<experiment>/pseudo/round<N>/`` (:func:`pseudo_dir`): an annotation table made
   from an ensemble's predictions on unlabelled images (``images.parquet``, ``boxes.parquet``: the annotation
   table's columns plus ``PSEUDO_IMAGE_EXTRA`` / ``PSEUDO_BOX_EXTRA``) and ``meta.json`` (its source ensemble,
   thresholds, counts and the files' SHA-256), written last: a round without it is incomplete.

The submission folder (files, ``.meta.json`` sidecars, ``ledger.csv``) is named by ``submission.dir`` in the
config; :mod:`pipeline.ledger` owns the ledger's columns.

Prediction table columns: ``image_id`` (str), ``x1, y1, x2, y2`` (float, original-image pixels), ``score`` (float in
[0, 1]), ``label`` (int, index into the dataset's classes), ``model`` (str, the member name), ``fold`` (int; -1
for a fused row that mixes folds), ``tta`` (str: the view name, e.g. "none", "hflip", "rot90_1", or the fusion method, e.g. "wbf",
for fused rows). Written as parquet, atomically. Images with no predicted boxes have no rows: the set of predicted
images is known from the annotation table / folds file, never from this table.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.io import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ annotation table

IMAGE_COLUMNS = ["image_id", "path", "width", "height", "source", "group"]
BOX_COLUMNS = ["image_id", "x1", "y1", "x2", "y2", "label"]

# ------------------------------------------------------------------------------------------------- folds

FOLDS_COLUMNS = ["image_id", "fold"]


class FoldsError(RuntimeError):
    """A folds file that is missing or malformed; the message names the file."""


def folds_path(cfg: ExperimentConfig) -> Path:
    return cfg.folds.dir / f"{cfg.data.name}_k{cfg.folds.k}_s{cfg.folds.seed}.csv"


def read_folds(path: str | Path) -> pd.DataFrame:
    """The folds file: ``image_id`` (str, exactly as written: an image called ``NA``, ``nan`` or ``None`` keeps its
    name) and ``fold`` (int); FoldsError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FoldsError(f"folds file not found: {path} (run `python -m pipeline.folds --config ...` first)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise FoldsError(f"{path}: not a readable folds CSV ({exc})") from None
    if list(df.columns[:2]) != FOLDS_COLUMNS:
        raise FoldsError(f"{path}: expected columns image_id,fold, got {list(df.columns)}")
    fold = pd.to_numeric(df.fold, errors="coerce")
    bad = fold.isna() | (fold != fold.round())
    if bad.any():
        line = int(bad.to_numpy().argmax()) + 2
        raise FoldsError(f"{path} line {line}: fold {df.fold[bad].iloc[0]!r} is not an integer")
    df["image_id"] = df.image_id.astype(str)
    df["fold"] = fold.astype(np.int64)
    if df.image_id.duplicated().any():
        raise FoldsError(f"{path}: image {df.image_id[df.image_id.duplicated()].iloc[0]!r} appears twice")
    return df


def write_folds_file(folds: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write_text(path, folds[FOLDS_COLUMNS].to_csv(index=False))


# ----------------------------------------------------------------------------------------- run directory

RESOLVED_CONFIG = "config.yaml"
LAST_CHECKPOINT = "last.pt"
LAST_PREVIOUS_CHECKPOINT = "last.prev.pt"  # the epoch before last.pt: what --resume uses when last.pt is damaged
BEST_CHECKPOINT = "best.pt"
EPOCH_LOG = "metrics.jsonl"
CURVES_PNG = "curves.png"
FOLD_OOF = "oof.parquet"


def run_dir(cfg: ExperimentConfig) -> Path:
    """Everything one model config writes: its folds' directories and its prediction tables."""
    return cfg.runs_dir / cfg.experiment / cfg.run


def fold_dir(cfg: ExperimentConfig, fold: int) -> Path:
    return run_dir(cfg) / f"fold{fold}"


# -------------------------------------------------------------------------------------- prediction table

PREDICTION_COLUMNS = ["image_id", "x1", "y1", "x2", "y2", "score", "label", "model", "fold", "tta"]
PREDICTION_DTYPES = {
    "image_id": str,
    "x1": np.float64,
    "y1": np.float64,
    "x2": np.float64,
    "y2": np.float64,
    "score": np.float64,
    "label": np.int64,
    "model": str,
    "fold": np.int64,
    "tta": str,
}
SPLITS = ("oof", "test")


def predictions_path(cfg: ExperimentConfig, split: str) -> Path:
    """One model's predictions of ``split``: every fold model x every TTA view."""
    return run_dir(cfg) / "predictions" / f"{split}.parquet"


def empty_predictions() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in PREDICTION_COLUMNS}).astype(PREDICTION_DTYPES)


def normalise_predictions(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    if len(df) == 0:
        return empty_predictions()
    return df[PREDICTION_COLUMNS].astype(PREDICTION_DTYPES).reset_index(drop=True)


def write_predictions(df: pd.DataFrame, path: str | Path) -> Path:
    df = normalise_predictions(df)
    with atomic_write(path, "wb") as f:
        df.to_parquet(f, index=False)
    return Path(path)


def read_predictions(path: str | Path) -> pd.DataFrame:
    return normalise_predictions(pd.read_parquet(path))


def rows_of_views(preds: pd.DataFrame, views: list[str], member: str, tuned=None) -> pd.DataFrame:
    """A member's rows of the TTA ``views`` it is fused with (``preds`` itself when it holds no other). Rows of a
    view outside ``tuned`` too (the views of its OOF predictions, when given), never tuned, are logged as they go."""
    inside = preds.tta.isin(views)
    if inside.all():
        return preds
    untuned = sorted(set(preds.tta[~inside].unique()) - set(tuned)) if tuned is not None else []
    if untuned:
        log.warning("member %s: predictions of views %s that its OOF predictions lack are left out (a view is "
                    "fused only where it was tuned)", member, untuned)
    return preds[inside].reset_index(drop=True)


# -------------------------------------------------------------------------------------------- ensembles

ENSEMBLE_RESULT = "result.json"
ENSEMBLE_REPORT = "report"


def ensemble_dir(cfg: ExperimentConfig) -> Path:
    return cfg.runs_dir / cfg.experiment / "ensembles" / cfg.ensemble.name


def fused_path(cfg: ExperimentConfig, split: str) -> Path:
    """The ensemble's fused predictions of ``split`` with the parameters tuned on OOF."""
    return ensemble_dir(cfg) / f"{split}_fused.parquet"


# ----------------------------------------------------------------------------------------- pseudo labels

PSEUDO_IMAGES = "images.parquet"
PSEUDO_BOXES = "boxes.parquet"
PSEUDO_META = "meta.json"
# pseudo_round: the round that made the row; teacher_fold: the fold whose models made the labels (a fold-K
# training set takes only rows of teacher fold K), -1 when the whole ensemble made them (every fold takes them);
# pseudo_split: where the image came from ("test", "unlabelled"); score: the fused confidence of the box
PSEUDO_IMAGE_EXTRA = ["pseudo_round", "teacher_fold", "pseudo_split"]
PSEUDO_BOX_EXTRA = ["score", "pseudo_round", "teacher_fold"]
PSEUDO_IMAGE_COLUMNS = IMAGE_COLUMNS + PSEUDO_IMAGE_EXTRA
PSEUDO_BOX_COLUMNS = BOX_COLUMNS + PSEUDO_BOX_EXTRA
ALL_FOLDS = -1  # teacher_fold of labels made by every fold's models together


def pseudo_dir(cfg: ExperimentConfig, round_number: int) -> Path:
    """Pseudo-label round ``round_number`` of the experiment: beside the runs, never inside the user's data."""
    return cfg.runs_dir / cfg.experiment / "pseudo" / f"round{round_number}"
