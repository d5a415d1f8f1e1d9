"""The canonical annotation table: the one representation every reader produces.

Contract (other stages read only this):
- ``images``: one row per image, columns ``image_id`` (str, unique), ``path`` (str, absolute or relative to the
  working directory), ``width``, ``height`` (int, pixels after EXIF orientation), ``source`` (str; "" if unknown),
  and ``group`` (str; "" if none: a patient / video id that must never cross folds).
  Images without boxes stay here: they are scored by competition metrics.
- ``boxes``: one row per box, columns ``image_id`` (str), ``x1, y1, x2, y2`` (float, absolute pixels in the original
  image, x2 > x1, y2 > y1, inside the image) and ``label`` (int, index into ``classes``).
  Optionally ``annotator`` (str) when the reader was told which annotator drew each box.
- ``classes``: the ordered class names.
- ``report``: every repair the reader made (clipped, dropped, skipped), with file and row, never silent.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.layout import BOX_COLUMNS, IMAGE_COLUMNS

log = logging.getLogger(__name__)


# Box columns a reader may add to BOX_COLUMNS: ``annotator`` (the csv reader's annotator_column), kept as given.
OPTIONAL_BOX_COLUMNS = ["annotator"]


class DataError(ValueError):
    """Bad input that cannot be repaired; the message names the file and the row or field."""


@dataclass(frozen=True)
class Repair:
    kind: str  # "clipped", "dropped_zero_area", "dropped_inverted", "dropped_nan", "skipped_image", ...
    file: str
    row: str  # row number, XML element or JSON index, as the user would look it up
    detail: str


@dataclass
class RepairReport:
    repairs: list[Repair] = field(default_factory=list)

    def add(self, kind: str, file: str, row: object, detail: str) -> None:
        repair = Repair(kind, str(file), str(row), detail)
        self.repairs.append(repair)
        log.warning("repair %s: %s row %s: %s", kind, file, row, detail)

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.repairs))

    def extend(self, other: "RepairReport") -> None:
        self.repairs.extend(other.repairs)


@dataclass
class AnnotationTable:
    images: pd.DataFrame
    boxes: pd.DataFrame
    classes: list[str]
    report: RepairReport = field(default_factory=RepairReport)

    def __post_init__(self) -> None:
        self.images = normalise_images(self.images)
        self.boxes = normalise_boxes(self.boxes)

    def subset(self, image_ids) -> "AnnotationTable":
        """The table restricted to ``image_ids`` (order of ``images`` kept)."""
        keep = set(image_ids)
        images = self.images[self.images.image_id.isin(keep)].reset_index(drop=True)
        boxes = self.boxes[self.boxes.image_id.isin(keep)].reset_index(drop=True)
        return AnnotationTable(images, boxes, list(self.classes), self.report)

    def boxes_by_image(self) -> dict[str, np.ndarray]:
        """image_id -> float array (N, 5) of x1, y1, x2, y2, label; every image present (empty arrays included)."""
        out = {i: np.zeros((0, 5), dtype=np.float64) for i in self.images.image_id}
        cols = ["x1", "y1", "x2", "y2", "label"]
        for image_id, group in self.boxes.groupby("image_id", sort=False):
            out[image_id] = group[cols].to_numpy(dtype=np.float64)
        return out

    def validate(self) -> None:
        """Raise DataError if the table breaks its own contract (ids, coordinates, labels)."""
        dup = self.images.image_id[self.images.image_id.duplicated()]
        if len(dup):
            raise DataError(f"duplicate image ids: {sorted(set(dup))[:5]}")
        unknown = set(self.boxes.image_id) - set(self.images.image_id)
        if unknown:
            raise DataError(f"boxes for images not in the images table: {sorted(unknown)[:5]}")
        b = self.boxes
        if len(b) and not ((b.x2 > b.x1).all() and (b.y2 > b.y1).all()):
            raise DataError("boxes with x2 <= x1 or y2 <= y1 in the canonical table")
        if len(b) and not b.label.between(0, len(self.classes) - 1).all():
            raise DataError("box labels outside the class list")


def normalise_images(images: pd.DataFrame) -> pd.DataFrame:
    images = images.copy()
    for col, default in (("source", ""), ("group", "")):
        if col not in images:
            images[col] = default
    images = images[IMAGE_COLUMNS]
    images["image_id"] = images["image_id"].astype(str)
    images["path"] = images["path"].astype(str)
    images["source"] = images["source"].fillna("").astype(str)
    images["group"] = images["group"].fillna("").astype(str)
    images["width"] = images["width"].astype(np.int64)
    images["height"] = images["height"].astype(np.int64)
    return images.reset_index(drop=True)


def normalise_boxes(boxes: pd.DataFrame) -> pd.DataFrame:
    extra = [c for c in OPTIONAL_BOX_COLUMNS if boxes is not None and c in boxes.columns]
    if boxes is None or len(boxes) == 0:
        empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in BOX_COLUMNS}).astype(
            {"image_id": str, "label": np.int64}
        )
        return empty.assign(**{c: pd.Series(dtype=str) for c in extra})
    boxes = boxes[BOX_COLUMNS + extra].copy()
    for c in extra:  # a table concatenated with one that lacks the column (pseudo-labels): "" there
        boxes[c] = boxes[c].fillna("").astype(str)
    boxes["image_id"] = boxes["image_id"].astype(str)
    for c in ("x1", "y1", "x2", "y2"):
        boxes[c] = boxes[c].astype(np.float64)
    boxes["label"] = boxes["label"].astype(np.int64)
    return boxes.reset_index(drop=True)
