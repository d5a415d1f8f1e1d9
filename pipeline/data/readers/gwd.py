"""Kaggle Global Wheat Detection layout: ``root/train.csv`` + ``root/train/<image_id>.<any extension>``.

CSV columns ``image_id,width,height,bbox[,source][,label]``, one row per box, ``bbox`` the string
``"[x, y, w, h]"`` in pixels. Images in the folder but not in the CSV are empty images (kept, real size, source
""). ``label`` (our extension, used by the embedded multi-class dataset) holds class names; without it every box is
class 0 of ``data.classes`` (default ``["wheat"]``). Declared width/height must match the real image.

Split "test": the images of ``test_images``; their boxes come from ``test_csv`` (same format: the hidden labels
for local leaderboard scoring) when that file exists, else there are none. Ids of ``sample_submission`` must all
be in the test folder. Rows are named ``line N``: the line in the CSV file (header = line 1).
"""
from __future__ import annotations

import csv
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DataConfig
from pipeline.data.readers._common import (
    ImageIndex,
    class_index,
    empty_declared,
    empty_raw_boxes,
    finish,
    read_text_file,
    require_dir,
    resolve_ids,
)
from pipeline.data.table import AnnotationTable, DataError, RepairReport

log = logging.getLogger(__name__)

REQUIRED = ["image_id", "width", "height", "bbox"]
DEFAULT_CLASSES = ["wheat"]
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"
# "[x, y, w, h]", brackets optional; "nan" parses (and is dropped as a NaN box later), "abc" or 3 numbers do not.
# RE2 syntax for pyarrow's extract_regex: ~5x faster than pandas' str.extract on GWD's 147k rows.
_BBOX = (
    rf"(?i)^\s*\[?\s*(?P<x>{_NUM})\s*,\s*(?P<y>{_NUM})\s*,\s*(?P<w>{_NUM})\s*,\s*(?P<h>{_NUM})\s*\]?\s*$"
)
_MAX_LISTED = 5


def _csv_text(path: Path) -> str:
    """The CSV's text in the encoding its byte-order mark declares (Excel writes UTF-8 with a BOM, or UTF-16),
    else UTF-8; DataError naming the file otherwise."""
    if not path.is_file():
        raise DataError(f"annotation CSV not found: {path} (working directory {Path.cwd()})")
    return read_text_file(path)


def _read_csv(path: Path, required: list[str] = REQUIRED, *, strip_ids: bool = True) -> pd.DataFrame:
    """The CSV as text cells (numbers are checked later, so a bad cell is reported by line rather than mis-typed;
    no cell is read as a missing value: an image called ``NA`` keeps its name), plus ``row`` and ``file``."""
    text = _csv_text(path)
    try:
        with warnings.catch_warnings():
            # a first row with more cells than the header: pandas would shift it into an index, or warn and cut it
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True,
                             index_col=False)
    except pd.errors.ParserWarning as exc:
        raise DataError(f"{path}: not a readable CSV (rows with more cells than the header: {exc})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {list(df.columns)}; "
            f"expected {','.join(required)}[,source][,label]"
        )
    if strip_ids:  # read_gwd matches ids to file names itself (resolve_ids): a name may end in a space
        df["image_id"] = df.image_id.str.strip()
    df["row"] = "line " + pd.Series(np.arange(len(df)) + 2, index=df.index).astype(str)
    df["file"] = str(path)
    return df


def _bad_rows(df: pd.DataFrame, mask: np.ndarray, path: Path, what: str, column: str) -> DataError:
    rows = df[mask].head(_MAX_LISTED)
    listed = "; ".join(f"{r} {column}={v!r}" for r, v in zip(rows.row, rows[column]))
    return DataError(f"{path}: {int(mask.sum())} row(s) with {what}: {listed}")


def _parse_boxes(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``bbox`` strings -> x1, y1, x2, y2 (one vectorised regex); DataError naming the lines of malformed ones."""
    text = pa.array(df.bbox, type=pa.large_string())
    if isinstance(text, pa.ChunkedArray):  # pandas' arrow-backed strings come chunked
        text = text.combine_chunks()
    parts = pc.extract_regex(text, _BBOX)
    malformed = parts.is_null().to_numpy(zero_copy_only=False)
    if malformed.any():
        raise _bad_rows(df, malformed, path, 'a malformed bbox (expected "[x, y, w, h]")', "bbox")
    xywh = np.stack([pc.cast(parts.field(k), pa.float64()).to_numpy(zero_copy_only=False) for k in "xywh"], 1)
    return pd.DataFrame(
        {
            "x1": xywh[:, 0],
            "y1": xywh[:, 1],
            "x2": xywh[:, 0] + xywh[:, 2],  # a negative w gives x2 < x1: dropped as inverted, never flipped
            "y2": xywh[:, 1] + xywh[:, 3],
        },
        index=df.index,
    )


def _declared(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    width = pd.to_numeric(df.width, errors="coerce")
    height = pd.to_numeric(df.height, errors="coerce")
    for name, values in (("width", width), ("height", height)):
        bad = (values.isna() | (values <= 0)).to_numpy()
        if bad.any():
            raise _bad_rows(df, bad, path, f"a {name} that is not a positive number", name)
    return pd.DataFrame(
        {"image_id": df.image_id, "width": width, "height": height, "file": df.file, "row": df.row}
    ).drop_duplicates(["image_id", "width", "height"])  # one check per distinct declaration is enough


def _sources(df: pd.DataFrame, path: Path) -> dict[str, str]:
    if "source" not in df.columns:
        return {}
    per_image = df.groupby("image_id", sort=False).source.agg(["nunique", "first"])
    mixed = per_image.index[per_image["nunique"] > 1]
    if len(mixed):
        rows = df[df.image_id == mixed[0]]
        raise DataError(
            f"{path}: image {mixed[0]} has several sources {sorted(set(rows.source))} "
            f"(lines {', '.join(rows.row.str.removeprefix('line ').head(_MAX_LISTED))}); one source per image"
        )
    return per_image["first"].str.strip().to_dict()


def label_names(cfg: DataConfig) -> list[str] | None:
    """Sorted names of the ``label`` column over the train and test CSVs (same list for both splits); None if no
    CSV has that column."""
    names: set[str] = set()
    found = False
    for name in (cfg.train_csv, cfg.test_csv):
        path = cfg.root / name if name else None
        if path is None or not path.is_file():
            continue
        # the header only (GWD's 147k rows need not be parsed twice); a byte-order mark is no part of the first
        # column's name, and a file _csv_text cannot decode is reported there
        try:
            header = [c.strip() for c in next(csv.reader(io.StringIO(_csv_text(path))), [])]
        except csv.Error:  # _read_csv says what is wrong with it
            header = []
        if "label" in header:
            found = True
            df = _read_csv(path)
            names |= set(df.label.str.strip()) - {""}  # empty labels are reported by read_gwd
    return sorted(names) if found and names else None  # a label column without names: the default class


def _classes(cfg: DataConfig) -> list[str]:
    if cfg.classes:
        return list(cfg.classes)
    names = label_names(cfg)
    if names is None:
        return list(DEFAULT_CLASSES)
    log.warning("data.classes not set: classes from the CSV label column, sorted: %s", names)
    return names


def _check_sample_submission(cfg: DataConfig, index: ImageIndex) -> None:
    if not cfg.sample_submission:
        return
    path = cfg.root / cfg.sample_submission
    if not path.is_file():
        return
    sample = _read_csv(path, required=["image_id"], strip_ids=False)
    missing = [i for i in resolve_ids(sample.image_id, set(index.by_stem)) if i not in index.by_stem]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} image id(s) have no image in {index.folder}: {missing[:_MAX_LISTED]} "
            f"(expected e.g. {index.folder / missing[0]}.jpg)"
        )


def read_gwd(cfg: DataConfig, split: str, *, verify: bool = False) -> AnnotationTable:
    if split == "train":
        folder, csv_path = cfg.root / cfg.train_images, cfg.root / cfg.train_csv
    else:
        if not cfg.test_images:
            raise DataError("data.test_images is not set: there is no test split for this dataset")
        folder = cfg.root / cfg.test_images
        csv_path = cfg.root / cfg.test_csv if cfg.test_csv and (cfg.root / cfg.test_csv).is_file() else None
    index = ImageIndex(require_dir(folder, "image"))
    index.check_unique_stems()
    if split == "test":
        _check_sample_submission(cfg, index)
    classes = _classes(cfg)
    images = pd.DataFrame(
        {"image_id": list(index.by_stem), "path": [str(p[0]) for p in index.by_stem.values()]}
    )
    report = RepairReport()
    if csv_path is None:
        images["source"] = ""
        return finish(images, empty_raw_boxes(), empty_declared(), classes, report,
                      skip_bad=cfg.skip_bad_images, verify=verify)

    df = _read_csv(csv_path, strip_ids=False)
    df["image_id"] = resolve_ids(df.image_id, set(index.by_stem))
    no_image = ~df.image_id.isin(list(index.by_stem)).to_numpy()
    if no_image.any():
        rows = df[no_image].drop_duplicates("image_id").head(_MAX_LISTED)
        listed = "; ".join(f"{r} image {i!r}: expected {folder / i}.jpg (or any image extension)"
                           for r, i in zip(rows.row, rows.image_id))
        raise DataError(f"{csv_path}: {int(no_image.sum())} row(s) name an image file that does not exist: {listed}")
    declared = _declared(df, csv_path)
    boxes = _parse_boxes(df, csv_path)
    if "label" in df.columns:
        names = df.label.str.strip()
        if (names == "").any():
            raise _bad_rows(df, (names == "").to_numpy(), csv_path, "an empty label", "label")
        labels = class_index(names, classes, df)
    else:
        if len(classes) > 1:
            log.warning("%s has no label column: every box is class 0 (%s) of %s", csv_path, classes[0], classes)
        labels = np.zeros(len(df), dtype=np.int64)
    boxes = boxes.assign(image_id=df.image_id, label=labels, file=df.file, row=df.row)
    sources = _sources(df, csv_path)
    images["source"] = [sources.get(i, "") for i in images.image_id]
    return finish(images, boxes, declared, classes, report, skip_bad=cfg.skip_bad_images, verify=verify)


def read_gwd_labels(path: str | Path, classes: list[str] | None = None) -> AnnotationTable:
    """Held-out labels in ``train.csv`` format without their images (local leaderboard scoring):
    ``image_id,bbox[,width,height][,source][,label]``. A row with an empty bbox (or ``[]``) lists an image without
    boxes; a box without area is dropped and counted in the table's report. Without ``classes``: the sorted names
    of the ``label`` column, else ``["wheat"]``. Bad rows are a DataError naming their lines."""
    path = Path(path)
    df = _read_csv(path, required=["image_id", "bbox"])
    has_label = "label" in df.columns
    if classes is None:
        classes = (sorted(set(df.label.str.strip()) - {""}) if has_label else []) or list(DEFAULT_CLASSES)
    rows = df[~df.bbox.str.strip().isin(["", "[]"])]
    names = rows.label.str.strip() if has_label else pd.Series(classes[0], index=rows.index, dtype=str)
    unknown = (~names.isin(classes)).to_numpy()
    if unknown.any():
        raise _bad_rows(rows.assign(label=names), unknown, path, f"a label not in the classes {list(classes)}", "label")
    boxes = _parse_boxes(rows, path).assign(image_id=rows.image_id, label=names.map(
        {name: i for i, name in enumerate(classes)}))
    has_area = ((boxes.x2 > boxes.x1) & (boxes.y2 > boxes.y1)).to_numpy()
    report = RepairReport()
    for line, bbox in zip(rows.row[~has_area], rows.bbox[~has_area]):  # counted and logged, never silent
        report.add("dropped_zero_area", str(path), line.removeprefix("line "), f"bbox {bbox!r} has no area")
    images = df.drop_duplicates("image_id").assign(path="", source="", group="")
    for col in ("width", "height"):
        images[col] = pd.to_numeric(images[col], errors="coerce").fillna(0) if col in images else 0
    return AnnotationTable(images[["image_id", "path", "width", "height", "source", "group"]],
                           boxes[has_area][["image_id", "x1", "y1", "x2", "y2", "label"]], list(classes), report)
