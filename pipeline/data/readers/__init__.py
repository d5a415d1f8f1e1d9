"""One reader per annotation format, each ``(cfg, split, *, verify) -> AnnotationTable``; see each module's
docstring for its layout and conventions, and ``_common`` for the checks and repairs they share."""
from __future__ import annotations

from typing import Callable

from pipeline.data.readers.coco import read_coco
from pipeline.data.readers.csv import read_csv_layout
from pipeline.data.readers.gwd import read_gwd
from pipeline.data.readers.voc import read_voc
from pipeline.data.readers.yolo import read_yolo
from pipeline.data.table import AnnotationTable

Reader = Callable[..., AnnotationTable]

READERS: dict[str, Reader] = {
    "gwd_csv": read_gwd, "coco": read_coco, "voc": read_voc, "yolo": read_yolo, "csv": read_csv_layout,
}

__all__ = ["READERS", "read_coco", "read_csv_layout", "read_gwd", "read_voc", "read_yolo"]
