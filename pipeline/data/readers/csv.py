"""Column-mapped CSV (``data.format: csv``): a competition's own CSV read through the ``data.csv`` section
(:class:`pipeline.config.CsvLayout`), no conversion script.

Two shapes, one reader:

- one row per box: four box columns (``box_columns``) in ``box_format`` order (``xyxy``, ``xywh``, ``cxcywh``;
  pixels, or fractions of the image size with ``normalised``). Several rows per image, one per box; a row whose
  label is one of ``empty_labels`` (VinBigData's ``No finding``) lists the image without giving it a box (a box
  written on such a row is dropped and counted), as does a row of four blank cells under ``fixed_class``. Blank
  cells on a row with a class are a NaN box, dropped and counted.
- one row per image: ``boxes_column`` holds the image's boxes, a JSON or Python-literal list (``[{'x': 1, 'y': 2,
  'width': 3, 'height': 4}, ...]``, read with ``json`` and else ``ast.literal_eval``, never ``eval``) of dicts
  (their four ``box_keys``, by default ``x, y, width, height`` for xywh, ``x1, y1, x2, y2`` for xyxy,
  ``cx, cy, width, height`` for cxcywh) or of 4-number lists; or a single box as ``"[x, y, w, h]"`` / ``"x y w h"``.
  An empty cell or ``[]`` is an image without boxes.

Labels come from ``label_column`` (class names: ``data.classes`` in order, else the sorted names) or are
``fixed_class``. ``group_column`` (patient, study, video) becomes the table's ``group``, which folds never split;
``source_column`` its ``source``; both must be one value per image. ``annotator_column`` is kept per box (the boxes'
``annotator`` column: identical boxes of two annotators are both kept); ``fuse_annotators`` instead fuses each
image's boxes with weighted boxes fusion (one list per annotator, every box score 1, ``fuse_iou_thr``), the way the
VinBigData teams merged their three radiologists before training.

The image of a row is ``image_pattern`` with ``{id}`` (the id, less ``id_suffix``) and ``{<column>}`` filled in, under
``data.root``; a ``*`` in it globs and must match one file. Only the images the CSV lists are in the table.

Split "test": the rows of ``data.test_csv`` (same layout, hidden labels) when that file exists, with
``test_image_pattern``; otherwise every file ``test_image_pattern`` matches, its ``{id}`` (plus ``id_suffix``) the
image id. The ids of ``data.sample_submission`` (those ending in ``id_suffix`` when set) must all be found.

Rows are named ``line N`` (header = line 1) and a box of a list ``line N <column>[k]``.
"""
from __future__ import annotations

import ast
import io
import json
import logging
import math
import re
import string
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import CsvLayout, DataConfig
from pipeline.data.readers._common import (
    RAW_BOX_COLUMNS,
    class_index,
    empty_declared,
    finish,
    read_text_file,
)
from pipeline.data.table import AnnotationTable, DataError, RepairReport

log = logging.getLogger(__name__)

_MAX_LISTED = 5
DEFAULT_BOX_KEYS = {
    "xywh": ["x", "y", "width", "height"],
    "xyxy": ["x1", "y1", "x2", "y2"],
    "cxcywh": ["cx", "cy", "width", "height"],
}
_EMPTY_CELLS = {"", "[]", "nan", "none", "null"}  # an image without boxes (pandas writes NaN lists as "" or "nan")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"
_BBOX_STRING = re.compile(rf"(?i)^\s*[\[(]?\s*({_NUMBER})(?:\s*,\s*|\s+)({_NUMBER})(?:\s*,\s*|\s+)({_NUMBER})"
                          rf"(?:\s*,\s*|\s+)({_NUMBER})\s*[\])]?\s*$")


# ------------------------------------------------------------------------------------------ the CSV file


def read_csv_cells(path: Path, required: list[str]) -> pd.DataFrame:
    """The CSV as stripped text cells (no cell is a missing value: an image called ``NA`` keeps its name), plus
    ``row`` (``line N``) and ``file``; DataError naming the file for an unreadable one or missing columns."""
    if not path.is_file():
        raise DataError(f"annotation CSV not found: {path} (working directory {Path.cwd()})")
    text = read_text_file(path)  # UTF-8 or what a byte-order mark declares, else a DataError naming the line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # more cells than the header: never shifted
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning as exc:
        raise DataError(f"{path}: not a readable CSV (rows with more cells than the header: {exc})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in dict.fromkeys(required) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} named in data.csv; found {list(df.columns)}")
    for column in df.columns:
        df[column] = df[column].str.strip()
    df["row"] = "line " + pd.Series(np.arange(len(df)) + 2, index=df.index).astype(str)
    df["file"] = str(path)
    return df


def _bad_rows(df: pd.DataFrame, mask: np.ndarray, path: Path, what: str, column: str) -> DataError:
    rows = df[mask].head(_MAX_LISTED)
    listed = "; ".join(f"{r} {column}={v!r}" for r, v in zip(rows.row, rows[column]))
    return DataError(f"{path}: {int(mask.sum())} row(s) with {what}: {listed}")


def _required_columns(layout: CsvLayout, pattern: str | None) -> list[str]:
    named = [layout.id_column, layout.boxes_column, layout.label_column, layout.group_column,
             layout.source_column, layout.annotator_column, layout.width_column, layout.height_column]
    return [c for c in named if c] + list(layout.box_columns or []) + [
        f for f in pattern_fields(pattern or "") if f != "id"]


# ------------------------------------------------------------------------------------------ image files


def pattern_fields(pattern: str) -> list[str]:
    """The ``{field}`` names of an image pattern, in order; ValueError for a format spec or an empty field."""
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(pattern):
        if name is None:
            continue
        if not name or spec or conversion or not re.fullmatch(r"[^.\[\]]+", name):
            raise ValueError(f"image pattern {pattern!r}: {{{name}}} must be a plain column name or {{id}}")
        fields.append(name)
    return fields


def _file_ids(ids: pd.Series, layout: CsvLayout, df: pd.DataFrame, path: Path) -> pd.Series:
    """The ids as the file names write them: less ``id_suffix`` (SIIM's ``_image``)."""
    if not layout.id_suffix:
        return ids
    lacking = ~ids.str.endswith(layout.id_suffix).to_numpy()
    if lacking.any():
        raise _bad_rows(df, lacking, path, f"an id not ending in id_suffix {layout.id_suffix!r}", layout.id_column)
    return ids.str.slice(stop=-len(layout.id_suffix))


def _resolve(root: Path, relative: str) -> Path | None:
    """The one file ``relative`` names (a glob when it holds ``*``, ``?`` or ``[``); None when none; DataError
    when a glob matches several."""
    if not any(ch in relative for ch in "*?["):
        candidate = root / relative
        return candidate if candidate.is_file() else None
    matches = sorted(p for p in root.glob(relative) if p.is_file())
    if len(matches) > 1:
        shown = ", ".join(str(p) for p in matches[:_MAX_LISTED])
        raise DataError(f"image pattern {relative!r} matches {len(matches)} files under {root} ({shown}): it must "
                        "name exactly one")
    return matches[0] if matches else None


def image_paths(df: pd.DataFrame, layout: CsvLayout, pattern: str, root: Path, path: Path) -> pd.DataFrame:
    """``image_id, path`` of every image the CSV names, by the pattern; DataError naming the lines of an image
    missing, or of an id whose rows give different files."""
    fields = list(dict.fromkeys(pattern_fields(pattern)))
    # {id} is the id less its suffix, even when the id column itself is called "id" (SIIM)
    values = pd.DataFrame({f: _file_ids(df[layout.id_column], layout, df, path) if f == "id" else df[f]
                           for f in fields}, index=df.index)
    values["_image_id"], values["_row"] = df[layout.id_column], df.row
    distinct = values.drop_duplicates([c for c in values.columns if c != "_row"])
    conflicting = distinct._image_id.duplicated(keep=False).to_numpy()
    if conflicting.any():
        first = distinct[conflicting].iloc[0]._image_id
        lines = ", ".join(df.row[df[layout.id_column] == first].head(_MAX_LISTED))
        raise DataError(f"{path}: image {first!r} has rows that name different files by image_pattern {pattern!r} "
                        f"(fields {fields}; {lines}): one file per image")
    rows, missing = [], []
    for record in distinct.to_dict("records"):
        relative = pattern.format(**{f: record[f] for f in fields})
        found = _resolve(root, relative)
        if found is None:
            missing.append(f"{record['_row']} image {record['_image_id']!r}: expected {root / relative}")
        else:
            rows.append((record["_image_id"], str(found)))
    if missing:
        raise DataError(f"{path}: {len(missing)} image(s) not found by image_pattern {pattern!r}: "
                        + "; ".join(missing[:_MAX_LISTED]))
    return pd.DataFrame(rows, columns=["image_id", "path"])


def _pattern_regex(pattern: str) -> tuple[str, re.Pattern, dict[str, str]]:
    """(the glob of every file ``pattern`` can name, a regex reading its fields back from a path relative to the
    root, field name -> regex group name)."""
    glob, regex, groups = [], [], {}
    for literal, name, _, _ in string.Formatter().parse(pattern):
        glob.append(literal)
        regex.extend({"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch)) for ch in literal)
        if name is None:
            continue
        glob.append("*")
        if name in groups:  # the same field twice must be the same text twice
            regex.append(f"(?P={groups[name]})")
            continue
        groups[name] = f"g{len(groups)}"
        regex.append(f"(?P<{groups[name]}>[^/]+)")
    return "".join(glob), re.compile("".join(regex)), groups


def images_by_pattern(layout: CsvLayout, root: Path) -> pd.DataFrame:
    """``image_id, path`` of every file ``test_image_pattern`` matches, the id read from its ``{id}``."""
    pattern = layout.test_image_pattern
    if pattern is None:
        raise DataError("data.csv.test_image_pattern is not set: there is no test split for this dataset")
    try:
        fields = pattern_fields(pattern)
    except ValueError as exc:
        raise DataError(f"data.csv.test_image_pattern: {exc}") from None
    if "id" not in fields:
        raise DataError(f"data.csv.test_image_pattern {pattern!r} has no {{id}}: the test images' ids come from it")
    glob, regex, groups = _pattern_regex(pattern)
    id_group = groups["id"]
    rows = []
    for file in sorted(p for p in root.glob(glob) if p.is_file()):
        match = regex.fullmatch(file.relative_to(root).as_posix())
        if match:
            rows.append((match.group(id_group) + layout.id_suffix, str(file)))
    images = pd.DataFrame(rows, columns=["image_id", "path"])
    if images.empty:
        raise DataError(f"no test image matches data.csv.test_image_pattern {pattern!r} under {root}")
    dup = images.image_id[images.image_id.duplicated()]
    if len(dup):
        files = images.path[images.image_id == dup.iloc[0]].tolist()
        raise DataError(f"test images: id {dup.iloc[0]!r} names several files ({files}); ids must be unique")
    return images


# ------------------------------------------------------------------------------------------------ boxes


def _number(value: object) -> float:
    if value is None:
        return math.nan  # a null coordinate: dropped and counted later, as a NaN box
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _literal(text: str) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)  # Python literals (single quotes, tuples, None): data only, nothing runs
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        match = _BBOX_STRING.match(text)
        if match is None:
            raise ValueError("not a JSON or Python list of boxes, nor a bbox string of 4 numbers") from None
        return [float(v) for v in match.groups()]


def parse_box_list(text: str, keys: list[str]) -> list[tuple[float, float, float, float]]:
    """The boxes of one cell, each its four values in ``keys`` order; ValueError saying which element is wrong."""
    if text.strip().lower() in _EMPTY_CELLS:
        return []
    value = _literal(text)
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and len(value) == 4
                                   and all(v is None or isinstance(v, (int, float)) for v in value)):
        value = [value]  # a single box
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of boxes, got {type(value).__name__}")
    boxes = []
    for k, item in enumerate(value):
        try:
            if isinstance(item, dict):
                absent = [key for key in keys if key not in item]
                if absent:
                    raise ValueError(f"lacks key(s) {absent} (has {sorted(map(str, item))})")
                boxes.append(tuple(_number(item[key]) for key in keys))
            elif isinstance(item, (list, tuple)) and len(item) == 4:
                boxes.append(tuple(_number(v) for v in item))
            else:
                raise ValueError(f"{item!r} is neither a dict with {keys} nor 4 numbers")
        except ValueError as exc:
            raise ValueError(f"[{k}] {exc}") from None
    return boxes


def _to_xyxy(values: np.ndarray, box_format: str) -> np.ndarray:
    a, b, c, d = values.T
    if box_format == "xywh":
        return np.stack([a, b, a + c, b + d], 1)  # a negative w gives x2 < x1: dropped as inverted, never flipped
    if box_format == "cxcywh":
        return np.stack([a - c / 2, b - d / 2, a + c / 2, b + d / 2], 1)
    return values


def _column_boxes(df: pd.DataFrame, layout: CsvLayout, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(values (n, 4), the df position of each box, its row name) from the four box columns; an empty cell is a
    NaN coordinate (dropped and counted), any other non-number a DataError naming the lines."""
    columns = []
    for column in layout.box_columns or []:
        cells = df[column]
        values = pd.to_numeric(cells.where(cells != "", "nan"), errors="coerce")
        bad = (values.isna() & ~cells.str.lower().isin(["", "nan"])).to_numpy()
        if bad.any():
            raise _bad_rows(df, bad, path, "a box coordinate that is not a number", column)
        columns.append(values.to_numpy(np.float64))
    return np.stack(columns, 1) if len(df) else np.zeros((0, 4)), np.arange(len(df)), list(df.row)


def _list_boxes(df: pd.DataFrame, layout: CsvLayout, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The same, from the column holding each image's list of boxes."""
    column = layout.boxes_column
    keys = layout.box_keys or DEFAULT_BOX_KEYS[layout.box_format]
    values, positions, names = [], [], []
    for position, (cell, row) in enumerate(zip(df[column], df.row)):
        try:
            boxes = parse_box_list(cell, keys)
        except ValueError as exc:
            shown = cell if len(cell) <= 120 else cell[:117] + "..."
            raise DataError(f"{path} {row}: {column}{exc if str(exc).startswith('[') else ': ' + str(exc)} "
                            f"(cell {shown!r})") from None
        for k, box in enumerate(boxes):
            values.append(box)
            positions.append(position)
            names.append(f"{row} {column}[{k}]")
    return np.asarray(values, np.float64).reshape(-1, 4), np.asarray(positions, np.int64), names


def _labels(df: pd.DataFrame, layout: CsvLayout, path: Path) -> pd.Series:
    if layout.fixed_class is not None:
        return pd.Series(layout.fixed_class, index=df.index, dtype=object)
    names = df[layout.label_column]
    empty = (names == "").to_numpy()
    if empty.any():
        raise _bad_rows(df, empty, path, "an empty label", layout.label_column)
    return names


def raw_boxes(df: pd.DataFrame, layout: CsvLayout, classes: list[str], path: Path,
              report: RepairReport) -> pd.DataFrame:
    """Every box of the CSV as ``RAW_BOX_COLUMNS`` (+ ``annotator``), pixels or fractions as written, xyxy."""
    names = _labels(df, layout, path)
    is_empty = names.isin(layout.empty_labels).to_numpy()
    values, positions, rows = (_list_boxes if layout.boxes_column else _column_boxes)(df, layout, path)
    on_empty = is_empty[positions]
    for row, box, position in zip(np.asarray(rows, object)[on_empty], values[on_empty], positions[on_empty]):
        if np.isfinite(box).any():  # VinBigData's "No finding" rows leave the coordinates empty; these did not
            report.add("dropped_empty_label_box", path, row, f"box {box.tolist()} on a row labelled "
                       f"{names.iloc[position]!r}, an empty-image label (data.csv.empty_labels): no box kept")
    # one class for every box and four blank cells: the only way such a CSV can list an image without boxes
    blank = np.isnan(values).all(axis=1) if layout.fixed_class is not None and layout.box_columns else False
    keep = ~(on_empty | blank)
    positions, values = positions[keep], values[keep]
    rows_kept = [r for r, k in zip(rows, keep) if k]
    labels = class_index(names.iloc[positions].reset_index(drop=True), classes,
                         pd.DataFrame({"file": str(path), "row": rows_kept}))
    xyxy = _to_xyxy(values, layout.box_format)
    boxes = pd.DataFrame({"image_id": df[layout.id_column].to_numpy(object)[positions],
                          "x1": xyxy[:, 0], "y1": xyxy[:, 1], "x2": xyxy[:, 2], "y2": xyxy[:, 3],
                          "label": labels, "file": str(path), "row": rows_kept}, columns=RAW_BOX_COLUMNS)
    if layout.annotator_column:
        boxes["annotator"] = df[layout.annotator_column].to_numpy(object)[positions]
    return boxes


# ----------------------------------------------------------------------------------------- per image


def per_image(df: pd.DataFrame, column: str, id_column: str, path: Path, what: str) -> dict[str, str]:
    """image id -> the one value of ``column`` on its rows; DataError naming the lines of an image with several."""
    counts = df.groupby(id_column, sort=False)[column].nunique()
    mixed = counts.index[counts > 1]
    if len(mixed):
        rows = df[df[id_column] == mixed[0]]
        raise DataError(f"{path}: image {mixed[0]!r} has several {what}s {sorted(set(rows[column]))} "
                        f"({', '.join(rows.row.head(_MAX_LISTED))}; column {column!r}): one {what} per image")
    return df.drop_duplicates(id_column).set_index(id_column)[column].to_dict()


def _declared(df: pd.DataFrame, layout: CsvLayout, path: Path) -> pd.DataFrame:
    if not layout.width_column:
        return empty_declared()
    sizes = {}
    for key, column in (("width", layout.width_column), ("height", layout.height_column)):
        values = pd.to_numeric(df[column], errors="coerce")
        bad = (values.isna() | (values <= 0)).to_numpy()
        if bad.any():
            raise _bad_rows(df, bad, path, f"a {key} that is not a positive number", column)
        sizes[key] = values
    return pd.DataFrame({"image_id": df[layout.id_column], **sizes, "file": df.file, "row": df.row}
                        ).drop_duplicates(["image_id", "width", "height"])


# ------------------------------------------------------------------------------------------ the reader


def layout_of(cfg: DataConfig) -> CsvLayout:
    if cfg.csv is None:
        raise DataError("data.format is csv but the config has no data.csv section naming the columns "
                        "(see configs/examples/ for VinBigData, SIIM and GBR)")
    return cfg.csv


def csv_classes(cfg: DataConfig, layout: CsvLayout) -> list[str]:
    """``data.classes``, else ``[fixed_class]``, else the sorted label names of the train and test CSVs."""
    if cfg.classes:
        return list(cfg.classes)
    if layout.fixed_class is not None:
        return [layout.fixed_class]
    names: set[str] = set()
    for name in (cfg.train_csv, cfg.test_csv):
        path = cfg.root / name if name else None
        if path is not None and path.is_file():
            df = read_csv_cells(path, [layout.label_column])
            names |= set(df[layout.label_column]) - set(layout.empty_labels) - {""}
    classes = sorted(names)
    log.warning("data.classes not set: classes from the CSV column %r, sorted: %s", layout.label_column, classes)
    return classes


def _images_from_rows(df: pd.DataFrame, layout: CsvLayout, pattern: str, root: Path, path: Path) -> pd.DataFrame:
    images = image_paths(df, layout, pattern, root, path)
    for column, key, what in ((layout.group_column, "group", "group"), (layout.source_column, "source", "source")):
        mapping = per_image(df, column, layout.id_column, path, what) if column else {}
        images[key] = images.image_id.map(mapping).fillna("") if column else ""
    return images


def _check_sample_submission(cfg: DataConfig, layout: CsvLayout, ids: set[str]) -> None:
    path = cfg.root / cfg.sample_submission if cfg.sample_submission else None
    if path is None or not path.is_file():
        return
    header = read_csv_cells(path, [])
    if layout.id_column not in header.columns:
        log.warning("%s has no column %r: the test images are not checked against it", path, layout.id_column)
        return
    wanted = header[layout.id_column]
    if layout.id_suffix:  # SIIM's sample submission also lists studies ("_study"): other rows, other ids
        wanted = wanted[wanted.str.endswith(layout.id_suffix)]
    missing = sorted(set(wanted) - ids)
    if missing:
        raise DataError(f"{path}: {len(missing)} id(s) have no test image by data.csv.test_image_pattern "
                        f"{layout.test_image_pattern!r}: {missing[:_MAX_LISTED]}")


def read_csv_layout(cfg: DataConfig, split: str, *, verify: bool = False) -> AnnotationTable:
    layout = layout_of(cfg)
    classes = csv_classes(cfg, layout)
    report = RepairReport()
    if split == "train":
        csv_path, pattern = cfg.root / cfg.train_csv, layout.image_pattern
    elif cfg.test_csv and (cfg.root / cfg.test_csv).is_file():
        csv_path, pattern = cfg.root / cfg.test_csv, layout.test_image_pattern
        if pattern is None:
            raise DataError(f"{csv_path} exists but data.csv.test_image_pattern is not set: where are its images?")
    else:
        images = images_by_pattern(layout, cfg.root)
        _check_sample_submission(cfg, layout, set(images.image_id))
        return finish(images.assign(source=""), _empty_boxes(layout), empty_declared(), classes, report,
                      skip_bad=cfg.skip_bad_images, verify=verify)
    try:
        required = _required_columns(layout, pattern)
    except ValueError as exc:  # a {field} with a format spec or an index
        raise DataError(f"data.csv: {exc}") from None
    df = read_csv_cells(csv_path, required)
    images = _images_from_rows(df, layout, pattern, cfg.root, csv_path)
    boxes = raw_boxes(df, layout, classes, csv_path, report)
    table = finish(images, boxes, _declared(df, layout, csv_path), classes, report, skip_bad=cfg.skip_bad_images,
                   verify=verify, normalised=layout.normalised,
                   drop_hint=f"check data.csv.box_format ({layout.box_format}) and normalised ({layout.normalised})")
    if layout.fuse_annotators:
        table = fuse_annotators(table, layout.fuse_iou_thr)
    return table


def _empty_boxes(layout: CsvLayout) -> pd.DataFrame:
    columns = RAW_BOX_COLUMNS + (["annotator"] if layout.annotator_column else [])
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def fuse_annotators(table: AnnotationTable, iou_thr: float) -> AnnotationTable:
    """Each image's boxes fused by weighted boxes fusion, one list per annotator (one list without an annotator
    column), every box score 1: boxes several annotators drew become their average, a box one annotator drew
    alone stays. Class-aware, as WBF is. The ``annotator`` column goes: a fused box is no one's."""
    from pipeline.fusion import weighted_boxes_fusion  # the numba kernels load only when fusion is asked for

    boxes = table.boxes
    by_annotator = "annotator" in boxes.columns
    if boxes.empty:
        return AnnotationTable(table.images, boxes.drop(columns="annotator", errors="ignore"), table.classes,
                               table.report)
    # plain arrays sorted by image, then annotator (first-seen order): a pandas groupby per image costs ~5 ms
    image_code, image_ids = pd.factorize(boxes.image_id)
    annotator_code = pd.factorize(boxes.annotator)[0] if by_annotator else np.zeros(len(boxes), np.int64)
    order = np.lexsort((np.arange(len(boxes)), annotator_code, image_code))
    xyxy = boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)[order]
    labels, image_code, annotator_code = boxes.label.to_numpy()[order], image_code[order], annotator_code[order]
    sizes = table.images.set_index("image_id").loc[image_ids, ["width", "height"]].to_numpy(np.float64)
    starts = np.flatnonzero(np.r_[True, image_code[1:] != image_code[:-1]])
    fused = []
    for start, end in zip(starts, np.r_[starts[1:], len(order)]):
        scale = np.tile(sizes[image_code[start]], 2)
        sets = np.split(np.arange(start, end), np.flatnonzero(np.diff(annotator_code[start:end])) + 1)
        out, _, out_labels = weighted_boxes_fusion([xyxy[s] / scale for s in sets], [np.ones(len(s)) for s in sets],
                                                   [labels[s] for s in sets], iou_thr=iou_thr, skip_box_thr=0.0)
        fused.append((np.full(len(out), image_code[start]), np.minimum(out * scale, scale), out_labels))
    codes, corners, out_labels = (np.concatenate(part) for part in zip(*fused))
    # back to pixels above; the product may pass the image's edge by one ulp, hence the minimum
    out = pd.DataFrame({"image_id": image_ids[codes], "x1": corners[:, 0], "y1": corners[:, 1],
                        "x2": corners[:, 2], "y2": corners[:, 3], "label": out_labels.astype(np.int64)})
    log.info("fused %d boxes of %d images into %d by WBF (iou_thr %g, %s)", len(boxes), len(starts), len(out),
             iou_thr, "one list per annotator" if by_annotator else "no annotator column: one list per image")
    table = AnnotationTable(table.images, out, table.classes, table.report)
    table.validate()
    return table
