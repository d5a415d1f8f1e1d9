"""Submission files: writers, readers and a validator for the formats Kaggle detection competitions use.

Formats (``submission.format`` in the config):

- ``gwd`` (Global Wheat Detection): CSV ``image_id,PredictionString``; the string is space-separated
  ``conf x y w h`` groups, ``x, y`` the top-left corner and ``w, h`` the size in original-image pixels.
- ``label_conf_xyxy`` (VinBigData, SIIM style): CSV ``image_id,PredictionString`` with ``label conf x1 y1 x2 y2``
  groups. ``label`` is the 0-based class index by default (VinBigData's class ids); ``label_style="name"``
  writes the class name instead (SIIM's "opacity").
- ``coco_json``: a COCO results list ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``, one
  entry per line; ``category_id`` = class index + 1 (COCO ids start at 1).

Number formats (the written precision; reading back gives the input to this precision):

- confidences: 4 decimals (``0.9731``);
- coordinates: integers for the CSV formats, 2 decimals for ``coco_json`` (``coord_decimals`` overrides). The
  corners are rounded (halves to even) and ``w = round(x2) - round(x1)``, so each corner moves at most half a
  unit; GWD and VinBigData ground truths are whole pixels, and integers are what every Kaggle scorer parses.
  A box that rounds to zero width or height is dropped (and logged): the validator rejects ``w <= 0``.
- groups sorted by descending confidence (ties keep table order); an image without boxes gets an empty string
  (CSV) or no entry (COCO results have no empty images).
- rows follow ``image_ids`` order; the header is the sample submission's when one is given (e.g. SIIM's ``id``).
- ``coco_json`` image ids: the sample's own values (int or str) when a sample (a COCO JSON with ``images``) is
  given; otherwise an id that is a plain decimal integer (``"17"``) is written as the number 17, matching the
  COCO reader's ``str(images[i].id)``, and any other id as a string.

Row numbers in errors are file line numbers (the header is line 1); for COCO results, the line where the entry
starts. With ``image_sizes``, the writer clips boxes to the image and the validator allows ``BOX_TOLERANCE`` px.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.io import atomic_write
from pipeline.predictions import PREDICTION_COLUMNS, normalise_predictions

log = logging.getLogger(__name__)

Format = Literal["gwd", "label_conf_xyxy", "coco_json"]
LabelStyle = Literal["index", "name"]
FORMATS: tuple[str, ...] = ("gwd", "label_conf_xyxy", "coco_json")
CSV_HEADER = ["image_id", "PredictionString"]
GROUP_LENGTH = {"gwd": 5, "label_conf_xyxy": 6}
COORD_DECIMALS = {"gwd": 0, "label_conf_xyxy": 0, "coco_json": 2}
SCORE_DECIMALS = 4
BOX_TOLERANCE = 1.0  # px a box may pass the image edge in validation (rounding, a clamp at S on resize)
_NEEDED = ["image_id", "x1", "y1", "x2", "y2", "score", "label"]


class SubmissionError(ValueError):
    """A submission that must not be uploaded; the message names the file, the first bad row and its image id."""


@dataclass(frozen=True)
class _Box:
    """One parsed group, in x1, y1, x2, y2 form whatever the format."""

    where: str  # "line 3 (image_id 'a1'), group 2 ('0.9 1 2 3 4')": how a user finds it in the file
    image_id: str
    label: int
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown submission format {fmt!r}; known: {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------------- writing


def _check_table(preds: pd.DataFrame, image_ids: Sequence[str], fmt: str, n_classes: int) -> pd.DataFrame:
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
    labels = table.label.to_numpy()
    if fmt == "gwd" and (labels != 0).any():
        raise SubmissionError(f"the gwd format has no label field, but {(labels != 0).sum()} boxes have label != 0")
    outside = sorted(set(labels[(labels < 0) | (labels >= n_classes)].tolist()))
    if outside:
        raise SubmissionError(f"labels outside 0..{n_classes - 1}: {outside[:5]}")
    return table


def _clip(table: pd.DataFrame, image_sizes: Mapping[str, tuple[int, int]] | None) -> pd.DataFrame:
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
    """Corners rounded to the written precision, degenerate boxes dropped, rows by image then descending score."""
    out = table.copy()
    for col in ("x1", "y1", "x2", "y2"):
        out[col] = np.round(out[col].to_numpy(dtype=np.float64), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    degenerate = (out.x2 <= out.x1) | (out.y2 <= out.y1)
    if degenerate.any():
        log.warning("dropped %d box(es) with no width or height at %d decimal(s)", degenerate.sum(), decimals)
        out = out[~degenerate]
    out["_order"] = np.arange(len(out))
    return out.sort_values(["score", "_order"], ascending=[False, True], kind="stable")


def _fmt(value: float, decimals: int) -> str:
    return f"{value + 0.0:.{decimals}f}"


def _group(row: Any, fmt: str, decimals: int, classes: Sequence[str], label_style: str) -> str:
    conf = _fmt(row.score, SCORE_DECIMALS)
    if fmt == "gwd":
        w, h = row.x2 - row.x1, row.y2 - row.y1
        return " ".join([conf] + [_fmt(v, decimals) for v in (row.x1, row.y1, w, h)])
    label = classes[row.label] if label_style == "name" else str(int(row.label))
    return " ".join([label, conf] + [_fmt(v, decimals) for v in (row.x1, row.y1, row.x2, row.y2)])


def _csv_text(table: pd.DataFrame, image_ids: Sequence[str], header: list[str], fmt: str, decimals: int,
              classes: Sequence[str], label_style: str) -> str:
    strings = {i: " ".join(_group(r, fmt, decimals, classes, label_style) for r in g.itertuples())
               for i, g in table.groupby("image_id", sort=False)}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([i, strings.get(i, "")] for i in image_ids)
    return buffer.getvalue()


def _coco_id(image_id: str, typed_ids: Mapping[str, Any] | None) -> Any:
    if typed_ids is not None and image_id in typed_ids:  # an id the sample lacks fails validation below
        return typed_ids[image_id]
    try:
        return int(image_id) if str(int(image_id)) == image_id else image_id
    except ValueError:
        return image_id


def _coco_text(table: pd.DataFrame, image_ids: Sequence[str], decimals: int,
               typed_ids: Mapping[str, Any] | None) -> str:
    rank = {i: k for k, i in enumerate(image_ids)}
    table = table.assign(_rank=table.image_id.map(rank)).sort_values("_rank", kind="stable")
    entries = [
        json.dumps({
            "image_id": _coco_id(r.image_id, typed_ids),
            "category_id": int(r.label) + 1,
            "bbox": [round(r.x1, decimals), round(r.y1, decimals),
                     round(r.x2 - r.x1, decimals), round(r.y2 - r.y1, decimals)],
            "score": round(float(r.score), SCORE_DECIMALS),
        }, allow_nan=False)
        for r in table.itertuples()
    ]
    return "[\n" + ",\n".join(entries) + "\n]\n" if entries else "[]\n"


def write_submission(preds: pd.DataFrame, image_ids: Sequence[str], path: str | Path, format: Format,
                     classes: Sequence[str], sample_submission: str | Path | None = None,
                     image_sizes: Mapping[str, tuple[int, int]] | None = None, *,
                     label_style: LabelStyle = "index", coord_decimals: int | None = None) -> Path:
    """Write ``preds`` (a prediction table in original-image pixels) for every id of ``image_ids`` to ``path``.

    The file is written to a temporary name beside ``path``, validated there (see :func:`validate_submission`)
    and only then renamed to ``path``: a submission that fails validation never appears at ``path``.
    """
    _check_format(format)
    path = Path(path)
    image_ids = [str(i) for i in image_ids]
    decimals = COORD_DECIMALS[format] if coord_decimals is None else coord_decimals
    table = _rounded(_clip(_check_table(preds, image_ids, format, len(classes)), image_sizes), decimals)
    if format == "coco_json":
        typed = _coco_sample_ids(Path(sample_submission)) if sample_submission else None
        text = _coco_text(table, image_ids, decimals, typed)
    else:
        header = _csv_sample(Path(sample_submission))[0] if sample_submission else CSV_HEADER
        text = _csv_text(table, image_ids, header, format, decimals, classes, label_style)
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex}.unvalidated"
    try:
        with atomic_write(staging, "w", encoding="utf-8") as f:
            f.write(text)
        _validate(staging, format, sample_submission, image_sizes, len(classes), image_ids=image_ids,
                  classes=classes, label_style=label_style, name=str(path))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    log.info("wrote %s (%d images, %d boxes)", path, len(image_ids), len(table))
    return path


def submission_path(directory: str | Path, ensemble_name: str, now: datetime | None = None,
                    format: Format = "gwd") -> Path:
    """``<directory>/<YYYYmmdd-HHMMSS>_<ensemble>.csv`` (``.json`` for coco_json), the time in UTC; a name
    already taken gets ``_2``, ``_3``... so an earlier submission (and its ledger hash) is never overwritten."""
    _check_format(format)
    now = now or datetime.now(timezone.utc)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", ensemble_name).strip("-.") or "ensemble"
    suffix = ".json" if format == "coco_json" else ".csv"
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


# ----------------------------------------------------------------------------------------------- parsing


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{name}: not UTF-8 text (byte {exc.start})") from None


def _csv_sample(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """The sample submission's header and (line, image id) rows."""
    rows = list(_csv_records(_read_text(path, str(path))))
    if not rows or len(rows[0][1]) != 2:
        raise SubmissionError(f"{path}: sample submission must have a 2-column header (id, PredictionString)")
    return rows[0][1], [(line, fields[0]) for line, fields in rows[1:] if fields]


def _coco_sample_ids(path: Path) -> dict[str, Any]:
    """str(id) -> id of the ``images`` of a COCO JSON used as the sample for coco_json."""
    try:
        data = json.loads(_read_text(path, str(path)))
        return {str(img["id"]): img["id"] for img in data["images"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SubmissionError(f"{path}: a coco_json sample must be a COCO JSON with images[].id ({exc})") from None


def _csv_records(text: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    for fields in reader:
        yield start, fields
        start = reader.line_num + 1  # a quoted field may span lines: report where the record starts


def _number(token: str, where: str) -> float:
    try:
        if "_" in token:  # Python's float() takes "1_000"; the scorers' parsers do not
            raise ValueError(token)
        value = float(token)
    except ValueError:
        raise SubmissionError(f"{where}: {token!r} is not a number") from None
    if not math.isfinite(value):
        raise SubmissionError(f"{where}: {token!r} is not a finite number")
    return value


def _label(token: str, where: str, classes: Sequence[str] | None, label_style: str) -> int:
    if label_style == "name":
        if classes is None or token not in classes:
            raise SubmissionError(f"{where}: label {token!r} is not a class name ({list(classes or [])})")
        return list(classes).index(token)
    if not re.fullmatch(r"[+-]?\d+", token):
        raise SubmissionError(f"{where}: label {token!r} is not an integer class index")
    return int(token)


def _csv_boxes(text: str, fmt: str, name: str, header: list[str], classes: Sequence[str] | None,
               label_style: str) -> Iterator[tuple[int, str, str, list[_Box]]]:
    """(line, row description, image id, boxes) per data row; structural errors raise at the first bad row."""
    records = _csv_records(text)
    first = next(records, None)
    if first is None or first[1] != header:
        found = ",".join(first[1]) if first else "an empty file"
        raise SubmissionError(f"{name}: line 1: header must be exactly {','.join(header)!r}, found {found!r}")
    size = GROUP_LENGTH[fmt]
    for line, fields in records:
        if len(fields) != 2:
            row = f"{name}: line {line}" + (f" (image_id {fields[0]!r})" if fields else "")
            raise SubmissionError(f"{row}: expected 2 fields ({','.join(header)}), got {len(fields)}: "
                                  f"{','.join(fields)!r}")
        image_id, tokens = fields[0], fields[1].split()
        row = f"{name}: line {line} (image_id {image_id!r})"
        if len(tokens) % size:
            layout = "conf x y w h" if fmt == "gwd" else "label conf x1 y1 x2 y2"
            raise SubmissionError(f"{row}: {len(tokens)} values is not a whole number of {size}-value groups "
                                  f"({layout})")
        boxes = []
        for g in range(len(tokens) // size):
            group = tokens[g * size:(g + 1) * size]
            where = f"{row}, group {g + 1} ({' '.join(group)!r})"
            if fmt == "gwd":
                conf, x, y, w, h = (_number(t, where) for t in group)
                boxes.append(_Box(where, image_id, 0, conf, x, y, x + w, y + h))
            else:
                label = _label(group[0], where, classes, label_style)
                conf, x1, y1, x2, y2 = (_number(t, where) for t in group[1:])
                boxes.append(_Box(where, image_id, label, conf, x1, y1, x2, y2))
        yield line, row, image_id, boxes


def _json_entries(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """(line where it starts, value) for each element of a top-level JSON list."""
    decoder, pos, line = json.JSONDecoder(), 0, 1

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def advance(to: int) -> None:
        nonlocal pos, line
        line += text.count("\n", pos, to)
        pos = to

    def fail(i: int, what: str) -> SubmissionError:
        advance(i)
        return SubmissionError(f"{name}: line {line}: {what}")

    i = skip(0)
    if i == len(text) or text[i] != "[":
        raise fail(i, "a COCO results file must be a JSON list of detections")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        i = skip(i + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, f"invalid JSON: {exc.msg}") from None
            advance(i)
            yield line, value
            i = skip(end)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
            elif i < len(text) and text[i] == "]":
                i = skip(i + 1)
                break
            else:
                raise fail(i, "expected ',' or ']' after a list entry")
    if i != len(text):
        raise fail(i, "unexpected text after the JSON list")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coco_boxes(text: str, name: str) -> Iterator[tuple[int, str, str, list[_Box]]]:
    keys = {"image_id", "category_id", "bbox", "score"}
    for n, (line, entry) in enumerate(_json_entries(text, name)):
        row = f"{name}: line {line} (entry {n + 1})"
        if not isinstance(entry, dict) or set(entry) != keys:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise SubmissionError(f"{row}: an entry must have exactly the keys {sorted(keys)}, found {found}")
        image_id = entry["image_id"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise SubmissionError(f"{row}: image_id {image_id!r} is neither an integer nor a string")
        where = f"{name}: line {line} (entry {n + 1}, image_id {str(image_id)!r})"
        category, bbox, score = entry["category_id"], entry["bbox"], entry["score"]
        if not isinstance(category, int) or isinstance(category, bool):
            raise SubmissionError(f"{where}: category_id {category!r} is not an integer")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise SubmissionError(f"{where}: bbox must be 4 numbers [x, y, w, h], found {bbox!r}")
        if not _is_number(score) or not all(math.isfinite(v) for v in [*bbox, score]):
            raise SubmissionError(f"{where}: bbox and score must be finite numbers, found {bbox!r}, {score!r}")
        x, y, w, h = (float(v) for v in bbox)
        yield line, where, str(image_id), [_Box(where, str(image_id), category - 1, float(score), x, y, x + w, y + h)]


def _boxes(path: Path, fmt: str, name: str, header: list[str], classes: Sequence[str] | None,
           label_style: str) -> Iterator[tuple[int, str, str, list[_Box]]]:
    text = _read_text(path, name)
    if fmt == "coco_json":
        return _coco_boxes(text, name)
    return _csv_boxes(text, fmt, name, header, classes, label_style)


def read_submission(path: str | Path, format: Format, classes: Sequence[str], *,
                    label_style: LabelStyle = "index") -> pd.DataFrame:
    """A submission file back as a prediction table (model "submission", fold -1, tta "none"), for scoring a
    submission locally against held-out labels. Raises SubmissionError on a file it cannot parse."""
    _check_format(format)
    path = Path(path)
    header = CSV_HEADER
    if format != "coco_json":  # take the file's own header if it has the right shape (e.g. SIIM's "id")
        first = next(_csv_records(_read_text(path, str(path))), None)
        header = first[1] if first and len(first[1]) == 2 and first[1][1] == "PredictionString" else CSV_HEADER
    rows = [(b.image_id, b.x1, b.y1, b.x2, b.y2, b.score, b.label, "submission", -1, "none")
            for _, _, _, boxes in _boxes(path, format, str(path), header, classes, label_style) for b in boxes]
    return normalise_predictions(pd.DataFrame(rows, columns=PREDICTION_COLUMNS))


# -------------------------------------------------------------------------------------------- validation


def _check_box(box: _Box, fmt: str, n_classes: int, size: tuple[int, int] | None, tolerance: float) -> None:
    if not 0.0 <= box.score <= 1.0:
        raise SubmissionError(f"{box.where}: confidence {box.score:g} is outside [0, 1]")
    if fmt != "gwd" and not 0 <= box.label < n_classes:
        shown = box.label + 1 if fmt == "coco_json" else box.label
        first = 1 if fmt == "coco_json" else 0
        raise SubmissionError(f"{box.where}: {'category_id' if fmt == 'coco_json' else 'label'} {shown} is outside "
                              f"{first}..{n_classes - 1 + first}")
    if not (box.x2 > box.x1 and box.y2 > box.y1):
        raise SubmissionError(f"{box.where}: the box has no area (width {box.x2 - box.x1:g}, "
                              f"height {box.y2 - box.y1:g})")
    width, height = size if size is not None else (math.inf, math.inf)
    if box.x1 < -tolerance or box.y1 < -tolerance or box.x2 > width + tolerance or box.y2 > height + tolerance:
        raise SubmissionError(f"{box.where}: box x1={box.x1:g} y1={box.y1:g} x2={box.x2:g} y2={box.y2:g} is "
                              f"outside the {width:g}x{height:g} image (tolerance {tolerance:g} px)")


def _expected_ids(fmt: str, sample: Path | None, image_ids: Sequence[str] | None) -> tuple[list[str], list[str] | None]:
    """The CSV header and the ids the file must cover (None: not checked)."""
    if sample is None:
        return CSV_HEADER, None if image_ids is None else [str(i) for i in image_ids]
    if fmt == "coco_json":
        return CSV_HEADER, list(_coco_sample_ids(sample))
    header, rows = _csv_sample(sample)
    ids = [i for _, i in rows]
    seen: set[str] = set()
    for line, i in rows:
        if i in seen:
            raise SubmissionError(f"{sample}: line {line}: the sample submission repeats image_id {i!r}")
        seen.add(i)
    return header, ids


def _validate(path: Path, fmt: str, sample_submission: str | Path | None,
              image_sizes: Mapping[str, tuple[int, int]] | None, n_classes: int, *,
              image_ids: Sequence[str] | None, classes: Sequence[str] | None, label_style: str,
              name: str, tolerance: float = BOX_TOLERANCE) -> None:
    sample = Path(sample_submission) if sample_submission else None
    header, expected = _expected_ids(fmt, sample, image_ids)
    source = f"the sample submission {sample}" if sample else "the test images"
    allowed = set(expected) if expected is not None else None
    seen: dict[str, int] = {}
    for line, row, image_id, boxes in _boxes(path, fmt, name, header, classes, label_style):
        if allowed is not None and image_id not in allowed:
            raise SubmissionError(f"{row}: image id is not in {source}")
        if fmt != "coco_json":  # COCO results list an image once per box, or not at all
            if image_id in seen:
                raise SubmissionError(f"{row}: image id repeated (first on line {seen[image_id]})")
            seen[image_id] = line
        if image_sizes is not None and boxes and image_id not in image_sizes:
            raise ValueError(f"image_sizes has no entry for image id {image_id!r}")
        for box in boxes:
            _check_box(box, fmt, n_classes, image_sizes[image_id] if image_sizes is not None else None, tolerance)
    if expected is not None and fmt != "coco_json":
        missing = [i for i in expected if i not in seen]
        if missing:
            raise SubmissionError(f"{name}: {len(missing)} image id(s) of {source} have no row, "
                                  f"e.g. {missing[:5]}")


def validate_submission(path: str | Path, format: Format, sample_submission: str | Path | None = None,
                        image_sizes: Mapping[str, tuple[int, int]] | None = None,
                        n_classes: int | None = None, *, image_ids: Sequence[str] | None = None,
                        classes: Sequence[str] | None = None, label_style: LabelStyle = "index",
                        tolerance: float = BOX_TOLERANCE) -> None:
    """Raise SubmissionError naming the first bad row (file line and image id) of the submission at ``path``.

    Checked: the header is exact (the sample's, else ``image_id,PredictionString``); every id of the sample (or
    of ``image_ids`` when there is no sample) has exactly one row and no other id appears (coco_json: ids are
    known ones, an image may have no entry); numbers parse and are finite; groups have the format's length;
    labels are integers in ``0..n_classes-1`` (category_id ``1..n_classes``; names of ``classes`` with
    ``label_style="name"``); ``n_classes`` defaults to ``len(classes)``, and to 1 for gwd; confidences are in
    [0, 1]; w and h > 0; boxes lie inside their image to ``tolerance`` px when ``image_sizes``
    (image_id -> (width, height)) is given.
    """
    _check_format(format)
    if label_style == "name" and classes is None:
        raise ValueError("label_style='name' needs the class names (classes=...)")
    if n_classes is None:
        if classes is None and format != "gwd":
            raise ValueError(f"validating {format} labels needs n_classes or classes")
        n_classes = 1 if classes is None else len(classes)
    _validate(Path(path), format, sample_submission, image_sizes, n_classes, image_ids=image_ids,
              classes=classes, label_style=label_style, name=str(path), tolerance=tolerance)
