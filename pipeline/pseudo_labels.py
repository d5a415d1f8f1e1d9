"""Pseudo-label rounds as data: write and read a round, refuse one that could leak, give a fold its training set.

A round (``runs/<experiment>/pseudo/round<N>/``, :func:`pipeline.layout.pseudo_dir`) is an annotation table made
by :mod:`pipeline.pseudo` from an ensemble's predictions on images nobody labelled (the test split, an
``unlabelled:`` folder). A member config that says ``train.pseudo: <round or folder>`` trains on it:

    from pipeline.pseudo_labels import fold_training_set
    table, train_ids, val_ids = fold_training_set(cfg, table, folds, fold)

Fold K's training set is every labelled image outside fold K plus the round's images labelled by teacher fold K
(or by the whole ensemble, ``teacher_fold == -1``); its validation set is fold K's labelled images, nothing else,
so its OOF predictions stay out-of-fold. A round holding any image of the folds file, or of the labelled training
split (by id or by file), is refused: such an image would be a validation image of some fold.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.data import AnnotationTable, DataError, image_size
from pipeline.data.images import is_image_file
from pipeline.data.table import RepairReport
from pipeline.io import atomic_write, atomic_write_text
from pipeline.layout import (ALL_FOLDS, BOX_COLUMNS, IMAGE_COLUMNS, PSEUDO_BOX_COLUMNS, PSEUDO_BOXES,
                             PSEUDO_IMAGE_COLUMNS, PSEUDO_IMAGES, PSEUDO_META, folds_path, pseudo_dir)

if TYPE_CHECKING:
    from pipeline.config import DataConfig, ExperimentConfig

log = logging.getLogger(__name__)

_LISTED = 5  # offending images quoted in one error message


class PseudoLabelError(ValueError):
    """A pseudo-label round that cannot be made or used; the message names the file and the image."""


@dataclass
class PseudoTable:
    folder: Path
    images: pd.DataFrame  # PSEUDO_IMAGE_COLUMNS
    boxes: pd.DataFrame  # PSEUDO_BOX_COLUMNS
    meta: dict[str, Any]

    @property
    def round(self) -> int:
        return int(self.meta["round"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])


# ------------------------------------------------------------------------------------------- hashing


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(file_hashes: dict[str, str]) -> str:
    """One hash for a round's tables: the SHA-256 of their names and SHA-256s, in name order."""
    text = "\n".join(f"{name} {file_hashes[name]}" for name in sorted(file_hashes))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------- write / read


def _write_parquet(df: pd.DataFrame, path: Path) -> dict[str, Any]:
    with atomic_write(path, "wb") as f:
        df.to_parquet(f, index=False)
    return {"sha256": file_sha256(path), "rows": int(len(df))}


def write_pseudo_table(folder: Path, images: pd.DataFrame, boxes: pd.DataFrame, meta: dict[str, Any]) -> Path:
    """The round's two tables, then ``meta.json`` (with the tables' SHA-256 and their ``content_hash``) last, each
    atomically: a reader finding ``meta.json`` finds the tables it describes, and a table changed afterwards no
    longer matches it. Returns the meta path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {PSEUDO_IMAGES: _write_parquet(images[PSEUDO_IMAGE_COLUMNS].reset_index(drop=True), folder / PSEUDO_IMAGES),
             PSEUDO_BOXES: _write_parquet(boxes[PSEUDO_BOX_COLUMNS].reset_index(drop=True), folder / PSEUDO_BOXES)}
    meta = {**meta, "files": files, "content_hash": content_hash({k: v["sha256"] for k, v in files.items()})}
    return atomic_write_text(folder / PSEUDO_META, json.dumps(meta, indent=2, default=str))


def resolve_pseudo_dir(cfg: ExperimentConfig) -> Path | None:
    """The round folder ``cfg.train.pseudo`` names: a round number of ``cfg``'s experiment, or a path (relative to
    the working directory, like ``data.root``) of the folder or of a file in it. None when unset."""
    spec = cfg.train.pseudo
    if spec is None:
        return None
    if isinstance(spec, int):
        return pseudo_dir(cfg, spec)
    path = Path(spec)
    return path.parent if path.suffix in (".json", ".parquet") else path


def read_pseudo_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / PSEUDO_META
    if not meta_path.is_file():
        hint = ("the round was not finished (meta.json is written last)" if folder.is_dir()
                else "no such folder: run python -m pipeline.pseudo --config <ensemble.yaml> --round N first")
        raise PseudoLabelError(f"pseudo-label round {folder}: {meta_path.name} not found; {hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PseudoLabelError(f"{meta_path}: not readable JSON ({exc})") from None
    missing = [k for k in ("round", "classes", "files", "content_hash") if k not in meta]
    if missing:
        raise PseudoLabelError(f"{meta_path}: lacks {missing}: not a pseudo-label round written by pipeline.pseudo")
    return meta


def read_pseudo_table(folder: str | Path) -> PseudoTable:
    """A round, checked: complete, unchanged since written (SHA-256), and within the annotation table's contract."""
    folder = Path(folder)
    meta = read_pseudo_meta(folder)
    frames = {}
    for name in (PSEUDO_IMAGES, PSEUDO_BOXES):
        path = folder / name
        if not path.is_file():
            raise PseudoLabelError(f"{path} not found, though {folder / PSEUDO_META} lists it")
        recorded = (meta["files"].get(name) or {}).get("sha256")
        if file_sha256(path) != recorded:
            raise PseudoLabelError(f"{path} changed after the round was written (its SHA-256 is not the one in "
                                   f"{PSEUDO_META}): make the round again with python -m pipeline.pseudo --force")
        frames[name] = pd.read_parquet(path)
    images, boxes = frames[PSEUDO_IMAGES], frames[PSEUDO_BOXES]
    for name, df, columns in ((PSEUDO_IMAGES, images, PSEUDO_IMAGE_COLUMNS), (PSEUDO_BOXES, boxes, PSEUDO_BOX_COLUMNS)):
        lacking = [c for c in columns if c not in df.columns]
        if lacking:
            raise PseudoLabelError(f"{folder / name}: lacks columns {lacking}")
    images = images.astype({"image_id": str, "path": str, "teacher_fold": np.int64})
    boxes = boxes.astype({"image_id": str, "teacher_fold": np.int64, "label": np.int64})
    check_pseudo_rows(folder, images, boxes, len(meta["classes"]))
    return PseudoTable(folder, images, boxes, meta)


def _rows(mask: pd.Series | np.ndarray, df: pd.DataFrame, what: str) -> str:
    rows = np.flatnonzero(np.asarray(mask))[:_LISTED]
    return "; ".join(f"row {r} (image {df.image_id.iat[r]!r}): {what}" for r in rows)


def check_pseudo_rows(folder: Path, images: pd.DataFrame, boxes: pd.DataFrame, n_classes: int) -> None:
    """PseudoLabelError naming the file and rows of anything outside the contract."""
    dup = images.duplicated(["teacher_fold", "image_id"])
    if dup.any():
        raise PseudoLabelError(f"{folder / PSEUDO_IMAGES}: " + _rows(dup, images, "listed twice for its teacher fold"))
    known = pd.MultiIndex.from_frame(images[["teacher_fold", "image_id"]])
    orphan = ~pd.MultiIndex.from_frame(boxes[["teacher_fold", "image_id"]]).isin(known)
    if orphan.any():
        raise PseudoLabelError(f"{folder / PSEUDO_BOXES}: " + _rows(orphan, boxes, "not in images.parquet"))
    size = boxes[["teacher_fold", "image_id"]].merge(images[["teacher_fold", "image_id", "width", "height"]],
                                                      on=["teacher_fold", "image_id"], how="left")
    xy = boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    checks = [
        (~np.isfinite(xy).all(axis=1), "non-finite coordinate"),
        ((xy[:, 2] <= xy[:, 0]) | (xy[:, 3] <= xy[:, 1]), "x2 <= x1 or y2 <= y1"),
        ((xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 2] > size.width.to_numpy()) | (xy[:, 3] > size.height.to_numpy()),
         "outside the image"),
        (~boxes.label.between(0, n_classes - 1).to_numpy(), f"label outside 0..{n_classes - 1}"),
    ]
    for bad, what in checks:
        if bad.any():
            raise PseudoLabelError(f"{folder / PSEUDO_BOXES}: {int(bad.sum())} box(es) {what}: "
                                   + _rows(bad, boxes, what))


# ------------------------------------------------------------------------------------------- fold safety


def check_no_labelled_images(images: pd.DataFrame, table: AnnotationTable, folds: pd.DataFrame, where: str,
                             folds_file: str | Path = "the folds file") -> None:
    """PseudoLabelError naming the image when a pseudo image is a labelled one: an image of the folds file (some
    fold's validation image), or of the labelled training split, by id or by file."""
    in_folds = sorted(set(images.image_id) & set(folds.image_id))
    if in_folds:
        raise PseudoLabelError(
            f"{where}: pseudo image {in_folds[0]!r} is in {folds_file} ({len(in_folds)} such image(s): "
            f"{in_folds[:_LISTED]}): it is the validation image of one fold, so training any other fold on it "
            "leaks, and its pseudo-labels come from models scored on it. Make pseudo-labels from the test split "
            "or an unlabelled folder only")
    in_table = sorted(set(images.image_id) & set(table.images.image_id))
    if in_table:
        raise PseudoLabelError(f"{where}: pseudo image {in_table[0]!r} is an image of the labelled training split "
                               f"({len(in_table)} such image(s): {in_table[:_LISTED]}); its real labels exist")
    labelled_files = {Path(p).resolve(): i for p, i in zip(table.images.path, table.images.image_id)}
    for image_id, path in zip(images.image_id, images.path):
        same = labelled_files.get(Path(path).resolve())
        if same is not None:
            raise PseudoLabelError(f"{where}: pseudo image {image_id!r} is the file {path} of labelled training "
                                   f"image {same!r} under another id: it would be a validation image of one fold")


def _check_same_folds(cfg: ExperimentConfig, pseudo: PseudoTable, folds: pd.DataFrame) -> None:
    """Labels of teacher fold K are safe for fold K only if K means the same images: the same folds file."""
    teacher_folds = set(pseudo.images.teacher_fold) - {ALL_FOLDS}
    if not teacher_folds:
        return
    path = folds_path(cfg)
    recorded = pseudo.meta.get("folds_sha256")
    if recorded is not None and path.is_file() and file_sha256(path) != recorded:
        raise PseudoLabelError(f"{pseudo.folder}: made with fold teachers on folds file {pseudo.meta.get('folds_file')}"
                               f", but this run's folds file {path} differs: teacher fold K saw other images than "
                               "this fold K's training set; make the round again from these folds")
    if teacher_folds != set(folds.fold):
        raise PseudoLabelError(f"{pseudo.folder}: teacher folds {sorted(teacher_folds)} but the folds file has folds "
                               f"{sorted(set(folds.fold))}")


def pseudo_table_hash(cfg: ExperimentConfig) -> str | None:
    """The content hash of the round ``cfg.train.pseudo`` names (None when unset): part of a training run's resume
    fingerprint, so that a run is never resumed on a round whose labels changed."""
    folder = resolve_pseudo_dir(cfg)
    return None if folder is None else read_pseudo_table(folder).content_hash


def fold_training_set(cfg: ExperimentConfig, table: AnnotationTable, folds: pd.DataFrame,
                      fold: int) -> tuple[AnnotationTable, list[str], list[str]]:
    """(``table`` plus fold ``fold``'s pseudo images, the training ids, the validation ids) for one fold.

    Without ``train.pseudo`` the table is returned as is, with the folds file's split. The validation ids are
    always the fold's labelled images only; a pseudo image is never one of them (checked, not assumed)."""
    val_ids = folds.image_id[folds.fold == fold].tolist()
    train_ids = folds.image_id[folds.fold != fold].tolist()
    folder = resolve_pseudo_dir(cfg)
    if folder is None:
        return table, train_ids, val_ids
    pseudo = read_pseudo_table(folder)
    if list(pseudo.meta["classes"]) != list(table.classes):
        raise PseudoLabelError(f"{folder}: classes {pseudo.meta['classes']} differ from the dataset's {table.classes}")
    check_no_labelled_images(pseudo.images, table, folds, str(folder), folds_path(cfg))
    _check_same_folds(cfg, pseudo, folds)
    mine = pseudo.images.teacher_fold.isin([fold, ALL_FOLDS])
    images = pseudo.images[mine]
    if images.image_id.duplicated().any():
        twice = images.image_id[images.image_id.duplicated()].iloc[0]
        raise PseudoLabelError(f"{folder}: image {twice!r} is labelled both by teacher fold {fold} and by the whole "
                               "ensemble: a round has one teacher per image and fold")
    absent = [(i, p) for i, p in zip(images.image_id, images.path) if not Path(p).is_file()]
    if absent:
        raise PseudoLabelError(f"{folder / PSEUDO_IMAGES}: {len(absent)} image file(s) not found, e.g. image "
                               f"{absent[0][0]!r} at {absent[0][1]} (paths are relative to the working directory)")
    keys = pd.MultiIndex.from_frame(images[["teacher_fold", "image_id"]])
    boxes = pseudo.boxes[pd.MultiIndex.from_frame(pseudo.boxes[["teacher_fold", "image_id"]]).isin(keys)]
    merged = AnnotationTable(pd.concat([table.images, images[IMAGE_COLUMNS]], ignore_index=True),
                             pd.concat([table.boxes, boxes[BOX_COLUMNS]], ignore_index=True),
                             list(table.classes), table.report)
    merged.validate()
    train_ids = train_ids + images.image_id.tolist()
    leaked = set(train_ids) & set(val_ids)
    if leaked:  # unreachable after the checks above; kept as the guarantee this function exists for
        raise PseudoLabelError(f"fold {fold}: validation image(s) {sorted(leaked)[:_LISTED]} in the training set")
    log.info("fold %d: %d pseudo-labelled images (%d boxes) of round %d from %s added to training", fold,
             len(images), len(boxes), pseudo.round, folder)
    return merged, train_ids, val_ids


# ------------------------------------------------------------------------------------------- unlabelled images


def unlabelled_table(data: DataConfig, classes: list[str]) -> AnnotationTable:
    """The images of ``data.unlabelled`` (a folder under ``data.root``) as an annotation table without boxes: id =
    the file's stem, size read from the header (after EXIF). An unreadable image is a DataError naming it, or with
    ``data.skip_bad_images`` a counted repair."""
    if not data.unlabelled:
        raise PseudoLabelError("the 'unlabelled' split (--split unlabelled, or in pseudo.sources) is the image folder "
                               "data.unlabelled names, under data.root; this config sets none")
    folder = data.root / data.unlabelled
    if not folder.is_dir():
        raise DataError(f"data.unlabelled folder not found: {folder} (working directory {Path.cwd()})")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    stems = pd.Series([p.stem for p in files], dtype=str)
    if stems.duplicated().any():
        twice = stems[stems.duplicated()].iloc[0]
        raise DataError(f"{folder}: several files for image id {twice!r}: "
                        f"{[p.name for p in files if p.stem == twice]}; an image id must name one file")
    report, rows, bad = RepairReport(), [], []
    for path in files:
        try:
            rows.append((path.stem, str(path), *image_size(path)))
        except DataError as exc:
            bad.append(exc)
            report.add("skipped_image", str(path), "-", f"unlabelled image {path.stem} skipped: {exc}")
    if bad and not data.skip_bad_images:
        raise DataError(f"{len(bad)} unreadable image(s) in {folder}: {'; '.join(map(str, bad[:_LISTED]))} "
                        "(set data.skip_bad_images: true to skip and count them instead)")
    if not rows:
        raise DataError(f"data.unlabelled folder {folder} holds no readable image")
    images = pd.DataFrame(rows, columns=["image_id", "path", "width", "height"]).assign(source="", group="")
    return AnnotationTable(images, pd.DataFrame(columns=BOX_COLUMNS), list(classes), report)
