"""YOLO txt (Ultralytics layout): ``root/images/<split>/<stem>.<ext>`` and ``root/labels/<split>/<stem>.txt``,
one ``cls cx cy w h`` line per box, normalised to [0, 1] by the image size.

- ``<split>`` is ``data.train_split`` (default ``train``) or ``data.test_split`` (default ``test``); the image
  folder is ``root/<data.images>`` if it exists, else ``root/images``; labels are under ``root/<data.labels>``.
- ``data.classes`` is required: ``cls`` indexes it (an index outside it is a DataError naming file and line).
- An image without a label file (or with an empty one) is an empty image; a label file without an image is a
  DataError naming both. ``classes.txt`` (written next to the labels by labelImg) is not a label file.
Rows are named ``line N`` of the label file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.readers._common import (
    RAW_BOX_COLUMNS,
    ImageIndex,
    empty_declared,
    finish,
    first_existing_dir,
    read_text_file,
    require_dir,
)
from pipeline.data.table import AnnotationTable, DataError, RepairReport

_NOT_LABELS = {"classes.txt"}
_MAX_NORMALISED = 2.0  # a normalised cx, cy, w or h above this is no box sticking out a little: it is pixels


def _parse_label_file(path: Path, image_id: str, n_classes: int) -> list[tuple]:
    rows = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 5:
            raise DataError(
                f"{path} line {n}: expected 'cls cx cy w h' (5 values), got {len(tokens)}: {line.strip()!r}"
                + (" (a segmentation polygon? only boxes are supported)" if len(tokens) > 5 else "")
            )
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise DataError(f"{path} line {n}: not numbers: {line.strip()!r}") from None
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < n_classes:
            raise DataError(
                f"{path} line {n}: class {tokens[0]!r} is not an index into data.classes (0..{n_classes - 1})"
            )
        rows.append((image_id, int(cls), *values[1:], str(path), f"line {n}"))
    return rows


def read_yolo(cfg: DataConfig, split: str, *, verify: bool = False) -> AnnotationTable:
    if not cfg.classes:
        raise DataError("data.classes is required for the yolo format (the label files hold class indices)")
    sub = (cfg.train_split or "train") if split == "train" else (cfg.test_split or "test")
    image_root = first_existing_dir(cfg.root, [cfg.images, "images"], "YOLO image")
    index = ImageIndex(require_dir(image_root / sub, "YOLO image"))
    index.check_unique_stems()
    label_dir = cfg.root / cfg.labels / sub
    label_files = sorted(p for p in label_dir.glob("*.txt") if p.name not in _NOT_LABELS) if label_dir.is_dir() else []

    orphans = [p for p in label_files if p.stem not in index.by_stem]
    if orphans:
        listed = "; ".join(f"{p} has no image {index.folder / p.stem}.<jpg|png|...>" for p in orphans[:5])
        raise DataError(f"{len(orphans)} label file(s) without an image: {listed}")

    rows = [r for p in label_files for r in _parse_label_file(p, p.stem, len(cfg.classes))]
    images = pd.DataFrame(
        {"image_id": list(index.by_stem), "path": [str(p[0]) for p in index.by_stem.values()], "source": ""}
    )
    report = RepairReport()
    if not rows:
        boxes = pd.DataFrame(columns=RAW_BOX_COLUMNS)
        return finish(images, boxes, empty_declared(), list(cfg.classes), report,
                      skip_bad=cfg.skip_bad_images, verify=verify)

    raw = pd.DataFrame(rows, columns=["image_id", "label", "cx", "cy", "w", "h", "file", "row"])
    cx, cy, w, h = (raw[c].to_numpy(np.float64) for c in ("cx", "cy", "w", "h"))
    # still normalised: finish() scales by each image's real size once it has probed them
    boxes = raw[["image_id", "label", "file", "row"]].assign(x1=cx - w / 2, y1=cy - h / 2, x2=cx + w / 2, y2=cy + h / 2)
    return finish(images, boxes[RAW_BOX_COLUMNS], empty_declared(), list(cfg.classes), report,
                  skip_bad=cfg.skip_bad_images, verify=verify, normalised=True, drop_hint=_drop_hint(raw))


def _drop_hint(raw: pd.DataFrame) -> str:
    """What most likely happened when most boxes fall outside their images: labels written in pixels."""
    values = raw[["cx", "cy", "w", "h"]].to_numpy(np.float64)
    finite = values[np.isfinite(values)]
    largest = float(finite.max()) if finite.size else 0.0
    if largest <= _MAX_NORMALISED:
        return ""
    share = float(np.mean((values > _MAX_NORMALISED).any(axis=1)))
    return (f"{share:.0%} of the label lines hold values above 1 (up to {largest:g}), but YOLO labels are "
            "fractions of the image size (0..1): these look like pixel coordinates; divide cx and w by the image "
            "width, cy and h by its height")
