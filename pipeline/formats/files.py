"""Writing, reading back and validating a submission file in any registered format.

Number formats (the written precision; reading back gives the input to this precision):

- confidences: 4 decimals (``0.9731``);
- coordinates: the format's ``coord_decimals`` (integers for the CSV formats, 2 decimals for ``coco_json``;
  ``coord_decimals`` overrides). The corners are rounded (halves to even), so each corner moves at most half a
  unit. A box that rounds to zero width or height is dropped (and logged): the validator rejects ``w <= 0``.
- boxes of an image by descending confidence (ties keep table order); rows follow ``image_ids`` order.

Row numbers in errors are file line numbers (the header is line 1); for COCO results, the line where the entry
starts. With ``image_sizes``, the writer clips boxes to the image and the validator allows ``BOX_TOLERANCE`` px.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.formats.base import (
    BOX_TOLERANCE,
    EncodeOptions,
    LabelStyle,
    ParsedBox,
    Sample,
    SubmissionError,
    SubmissionFormat,
    get_format,
    read_text,
)
from pipeline.io import atomic_write
from pipeline.layout import PREDICTION_COLUMNS, normalise_predictions

log = logging.getLogger(__name__)

_NEEDED = ["image_id", "x1", "y1", "x2", "y2", "score", "label"]


# ----------------------------------------------------------------------------------------------- writing


def _checked_table(preds: pd.DataFrame, image_ids: Sequence[str], fmt: SubmissionFormat,
                   n_classes: int) -> pd.DataFrame:
    missing = [c for c in _NEEDED if c not in preds.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    ids = [str(i) for i in image_ids]
    repeated = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(repeated):
        raise SubmissionError(f"image_ids repeat {sorted(set(repeated))[:5]}: each image gets exactly one row")
    table = preds[_NEEDED].astype({"image_id": str}).reset_index(drop=True)
    unknown = sorted(set(table.image_id) - set(ids))
    if unknown:
        raise SubmissionError(f"{len(unknown)} predicted image id(s) are not test images, e.g. {unknown[:5]}")
    values = table[["x1", "y1", "x2", "y2", "score"]].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        row = table.iloc[bad[0]]
        raise SubmissionError(f"prediction row {bad[0]} (image_id {row.image_id!r}) has a non-finite value: "
                              f"{row.to_dict()}")
    fmt.check_labels(table)
    labels = table.label.to_numpy()
    outside = sorted(set(labels[(labels < 0) | (labels >= n_classes)].tolist()))
    if outside:
        raise SubmissionError(f"labels outside 0..{n_classes - 1}: {outside[:5]}")
    return table


def _clipped(table: pd.DataFrame, image_sizes: Mapping[str, tuple[int, int]] | None) -> pd.DataFrame:
    if image_sizes is None or table.empty:
        return table
    absent = sorted(set(table.image_id) - set(image_sizes))
    if absent:
        raise ValueError(f"image_sizes has no entry for {len(absent)} predicted image(s), e.g. {absent[:5]}")
    width = table.image_id.map(lambda i: image_sizes[i][0]).to_numpy(dtype=np.float64)
    height = table.image_id.map(lambda i: image_sizes[i][1]).to_numpy(dtype=np.float64)
    clipped = table.copy()
    for col, limit in (("x1", width), ("x2", width), ("y1", height), ("y2", height)):
        clipped[col] = np.clip(table[col].to_numpy(dtype=np.float64), 0.0, limit)
    moved = (np.abs(clipped[["x1", "y1", "x2", "y2"]].to_numpy() - table[["x1", "y1", "x2", "y2"]].to_numpy())
             > BOX_TOLERANCE).any(axis=1)
    if moved.any():  # more than rounding: worth a look at the inverse resize upstream
        log.warning("clipped %d box(es) by more than %.0f px to their image", moved.sum(), BOX_TOLERANCE)
    return clipped


def _rounded(table: pd.DataFrame, decimals: int) -> pd.DataFrame:
    """Corners rounded to the written precision, degenerate boxes dropped, rows by descending score."""
    out = table.copy()
    for col in ("x1", "y1", "x2", "y2"):
        out[col] = np.round(out[col].to_numpy(dtype=np.float64), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    degenerate = (out.x2 <= out.x1) | (out.y2 <= out.y1)
    if degenerate.any():
        log.warning("dropped %d box(es) with no width or height at %d decimal(s)", degenerate.sum(), decimals)
        out = out[~degenerate]
    out["_order"] = np.arange(len(out))
    return out.sort_values(["score", "_order"], ascending=[False, True], kind="stable")


def write_submission(preds: pd.DataFrame, image_ids: Sequence[str], path: str | Path, format: str,
                     classes: Sequence[str], sample_submission: str | Path | None = None,
                     image_sizes: Mapping[str, tuple[int, int]] | None = None, *,
                     label_style: LabelStyle = "index", coord_decimals: int | None = None) -> Path:
    """Write ``preds`` (a prediction table in original-image pixels) for every id of ``image_ids`` to ``path``.

    The file is written to a temporary name beside ``path``, validated there (see :func:`validate_submission`)
    and only then renamed to ``path``: a submission that fails validation never appears at ``path``.
    """
    fmt = get_format(format)
    path = Path(path)
    image_ids = [str(i) for i in image_ids]
    options = EncodeOptions(fmt.coord_decimals if coord_decimals is None else coord_decimals, classes, label_style)
    table = _rounded(_clipped(_checked_table(preds, image_ids, fmt, len(classes)), image_sizes),
                     options.coord_decimals)
    sample = fmt.read_sample(Path(sample_submission)) if sample_submission else None
    text = fmt.encode(table, image_ids, options, sample)
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex}.unvalidated"
    try:
        with atomic_write(staging, "w", encoding="utf-8") as f:
            f.write(text)
        _validate(staging, fmt, sample, image_sizes, len(classes), image_ids=image_ids, classes=classes,
                  label_style=label_style, name=str(path))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    log.info("wrote %s (%d images, %d boxes)", path, len(image_ids), len(table))
    return path


def submission_path(directory: str | Path, ensemble_name: str, now: datetime | None = None,
                    format: str = "gwd") -> Path:
    """``<directory>/<YYYYmmdd-HHMMSS>_<ensemble><format's suffix>``, the time in UTC; a name already taken gets
    ``_2``, ``_3``... so an earlier submission (and its ledger hash) is never overwritten."""
    suffix = get_format(format).suffix
    now = now or datetime.now(timezone.utc)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", ensemble_name).strip("-.") or "ensemble"
    stem = f"{now:%Y%m%d-%H%M%S}_{name}"
    path, n = Path(directory) / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = Path(directory) / f"{stem}_{n}{suffix}"
    return path


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes, as hex: the ledger's key for "this exact file was submitted"."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- reading


def read_submission(path: str | Path, format: str, classes: Sequence[str], *,
                    label_style: LabelStyle = "index") -> pd.DataFrame:
    """A submission file back as a prediction table (model "submission", fold -1, tta "none"), for scoring a
    submission locally against held-out labels. Raises SubmissionError on a file it cannot parse."""
    fmt = get_format(format)
    path = Path(path)
    records = fmt.parse_own_layout(read_text(path, str(path)), name=str(path), classes=classes,
                                   label_style=label_style)
    rows = [(b.image_id, b.x1, b.y1, b.x2, b.y2, b.score, b.label, "submission", -1, "none")
            for record in records for b in record.boxes]
    return normalise_predictions(pd.DataFrame(rows, columns=PREDICTION_COLUMNS))


# -------------------------------------------------------------------------------------------- validation


def _check_box(box: ParsedBox, fmt: SubmissionFormat, n_classes: int, size: tuple[int, int] | None,
               tolerance: float) -> None:
    if not 0.0 <= box.score <= 1.0:
        raise SubmissionError(f"{box.where}: confidence {box.score:g} is outside [0, 1]")
    fmt.check_label(box, n_classes)
    if not (box.x2 > box.x1 and box.y2 > box.y1):
        raise SubmissionError(f"{box.where}: the box has no area (width {box.x2 - box.x1:g}, "
                              f"height {box.y2 - box.y1:g})")
    width, height = size if size is not None else (math.inf, math.inf)
    if box.x1 < -tolerance or box.y1 < -tolerance or box.x2 > width + tolerance or box.y2 > height + tolerance:
        raise SubmissionError(f"{box.where}: box x1={box.x1:g} y1={box.y1:g} x2={box.x2:g} y2={box.y2:g} is "
                              f"outside the {width:g}x{height:g} image (tolerance {tolerance:g} px)")


def _validate(path: Path, fmt: SubmissionFormat, sample: Sample | None,
              image_sizes: Mapping[str, tuple[int, int]] | None, n_classes: int, *,
              image_ids: Sequence[str] | None, classes: Sequence[str] | None, label_style: LabelStyle,
              name: str, tolerance: float = BOX_TOLERANCE) -> None:
    if sample is not None:
        expected: list[str] | None = sample.ids
        source = f"the sample submission {sample.path}"
    else:
        expected = None if image_ids is None else [str(i) for i in image_ids]
        source = "the test images"
    allowed = set(expected) if expected is not None else None
    seen: dict[str, int] = {}
    records = fmt.parse(read_text(path, name), name=name, sample=sample, classes=classes, label_style=label_style)
    for record in records:
        if allowed is not None and record.image_id not in allowed:
            raise SubmissionError(f"{record.where}: image id is not in {source}")
        if fmt.one_row_per_image:
            if record.image_id in seen:
                raise SubmissionError(f"{record.where}: image id repeated (first on line {seen[record.image_id]})")
            seen[record.image_id] = record.line
        if image_sizes is not None and record.boxes and record.image_id not in image_sizes:
            raise ValueError(f"image_sizes has no entry for image id {record.image_id!r}")
        size = image_sizes[record.image_id] if image_sizes is not None and record.boxes else None
        for box in record.boxes:
            _check_box(box, fmt, n_classes, size, tolerance)
    if expected is not None and fmt.one_row_per_image:
        missing = [i for i in expected if i not in seen]
        if missing:
            raise SubmissionError(f"{name}: {len(missing)} image id(s) of {source} have no row, "
                                  f"e.g. {missing[:5]}")


def validate_submission(path: str | Path, format: str, sample_submission: str | Path | None = None,
                        image_sizes: Mapping[str, tuple[int, int]] | None = None,
                        n_classes: int | None = None, *, image_ids: Sequence[str] | None = None,
                        classes: Sequence[str] | None = None, label_style: LabelStyle = "index",
                        tolerance: float = BOX_TOLERANCE) -> None:
    """Raise SubmissionError naming the first bad row (file line and image id) of the submission at ``path``.

    Checked: the layout the sample fixes (a CSV header: the sample's, else ``image_id,PredictionString``); every
    id of the sample (or of ``image_ids`` when there is no sample) has exactly one row and no other id appears
    (coco_json: ids are known ones, an image may have no entry); numbers parse and are finite; groups have the
    format's length; labels are integers in ``0..n_classes-1`` (category_id ``1..n_classes``; names of
    ``classes`` with ``label_style="name"``); ``n_classes`` defaults to ``len(classes)``, and to 1 for a format
    without labels (gwd); confidences are in [0, 1]; w and h > 0; boxes lie inside their image to ``tolerance``
    px when ``image_sizes`` (image_id -> (width, height)) is given.
    """
    fmt = get_format(format)
    if label_style == "name" and classes is None:
        raise ValueError("label_style='name' needs the class names (classes=...)")
    if n_classes is None:
        if classes is None and fmt.has_labels:
            raise ValueError(f"validating {format} labels needs n_classes or classes")
        n_classes = 1 if classes is None else len(classes)
    sample = fmt.read_sample(Path(sample_submission)) if sample_submission else None
    _validate(Path(path), fmt, sample, image_sizes, n_classes, image_ids=image_ids, classes=classes,
              label_style=label_style, name=str(path), tolerance=tolerance)


def keep_top_boxes(preds: pd.DataFrame, k: int | None) -> pd.DataFrame:
    """The ``k`` most confident boxes of each image (ties keep table order); all when ``k`` is None. Per image,
    so cutting a table in chunks of images gives the cut of the whole table."""
    if k is None or len(preds) == 0:
        return preds
    ranked = preds.sort_values("score", ascending=False, kind="stable")
    return ranked.groupby("image_id", sort=False).head(k).sort_index()
