"""Datasets: every supported annotation format read into the one canonical :class:`AnnotationTable`.

    table = load_dataset(cfg.data)            # the split that is cross-validated
    hidden = load_dataset(cfg.data, "test")   # the leaderboard split (with boxes where the dataset has them)

Formats (``data.format``; layouts and conventions in each reader's docstring, ``pipeline.data.readers``):
``gwd_csv`` (Kaggle Global Wheat CSV), ``coco`` (COCO JSON), ``voc`` (Pascal VOC XML), ``yolo`` (YOLO txt),
``csv`` (any competition CSV through the ``data.csv`` column mapping: VinBigData, SIIM, GBR). Images are JPEG, PNG,
... or DICOM (``pipeline.data.dicom``); ``pipeline.data.cache`` keeps them decoded and resized to the model input.
Bad input is a :class:`DataError` naming the file and row, or a repair counted in ``table.report``; never a
silent change. ``python -m pipeline.data check --config ...`` prints a summary and every repair.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Literal

import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.images import image_size, read_image, verify_image
from pipeline.data.readers import READERS
from pipeline.data.readers._common import read_text_file, resolve_ids
from pipeline.data.summary import summarize
from pipeline.data.table import AnnotationTable, DataError, RepairReport

log = logging.getLogger(__name__)

__all__ = [
    "AnnotationTable",
    "DataError",
    "RepairReport",
    "apply_groups",
    "image_size",
    "load_dataset",
    "read_image",
    "summarize",
    "verify_image",
]


def load_dataset(
    cfg: DataConfig, split: Literal["train", "test"] = "train", *, verify_images: bool = False
) -> AnnotationTable:
    """The ``split`` of the dataset ``cfg`` describes, validated.

    Every image's header is read (real size, EXIF orientation, truncated JPEG/PNG tails); ``verify_images``
    decodes every image fully instead (slow: the ``check --verify`` command). The synthetic dataset is generated
    first when ``cfg.synthetic`` is set and the files under ``cfg.root`` were not made with that config.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.synthetic is not None:
        from pipeline.data.synthetic import ensure_generated  # lazy: only the demo dataset needs it

        if ensure_generated(cfg.root, cfg.synthetic):
            log.info("generated the synthetic dataset under %s", cfg.root)
    if not cfg.root.is_dir():
        raise DataError(f"data.root {cfg.root} is not a folder (relative paths start at {Path.cwd()})")
    table = READERS[cfg.format](cfg, split, verify=verify_images)  # validated by the reader
    if cfg.groups_csv and split == "train":  # groups only steer folds, and folds only split the train split
        table = apply_groups(table, cfg.root / cfg.groups_csv)
        table.validate()
    return table


def apply_groups(table: AnnotationTable, path: Path) -> AnnotationTable:
    """Set ``images.group`` from a CSV ``image_id,group``; an id there that is not in the table is a DataError."""
    if not path.is_file():
        raise DataError(f"groups CSV not found: {path} (data.groups_csv)")
    text = read_text_file(path)  # UTF-8 or the encoding a byte-order mark declares, else a DataError
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)  # "NA" is an id, not a missing one
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if not {"image_id", "group"} <= set(df.columns):
        raise DataError(f"{path}: expected columns image_id,group; found {list(df.columns)}")
    df["image_id"] = resolve_ids(df.image_id, set(table.images.image_id))
    df["group"] = df.group.str.strip()
    lines = pd.Series(range(2, len(df) + 2), index=df.index)
    dup = df.image_id.duplicated(keep=False)
    conflicting = df[dup].groupby("image_id").group.nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        image_id = conflicting.index[0]
        where = ", ".join(map(str, lines[df.image_id == image_id]))
        raise DataError(f"{path}: image {image_id} has several groups (lines {where})")
    unknown = ~df.image_id.isin(set(table.images.image_id))
    if unknown.any():
        examples = [f"line {n}: {i!r}" for n, i in zip(lines[unknown].head(5), df.image_id[unknown].head(5))]
        raise DataError(
            f"{path}: {int(unknown.sum())} image id(s) are not in the train split: {'; '.join(examples)} "
            "(ids must match the dataset's image ids exactly; groups apply to the train split only)"
        )
    groups = df.drop_duplicates("image_id").set_index("image_id").group
    images = table.images.copy()
    images["group"] = images.image_id.map(groups).fillna("")
    ungrouped = int((images.group == "").sum())
    if ungrouped:
        log.warning("%s: %d of %d images have no group (group \"\")", path, ungrouped, len(images))
    return AnnotationTable(images, table.boxes, list(table.classes), table.report)
