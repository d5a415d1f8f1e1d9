"""What every reader shares: finding images by stem, probing their real sizes, checking declared sizes, and
cleaning boxes against the image bounds (vectorised: GWD has 147k boxes).

A reader parses its annotation format into three frames and hands them to :func:`finish`:

- ``images``: ``image_id, path, source``, one row per image;
- ``boxes``: ``image_id, x1, y1, x2, y2, label, file, row`` in absolute pixels, not yet checked;
- ``declared``: ``image_id, width, height, file, row``: sizes the annotation file claims, any number per image.

``file``/``row`` say where a value came from, as the user would look it up (``line 17``, ``object[3]``,
``annotations[12]``), so that every error and every repair can name them.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.images import is_image_file, probe_image, verify_image
from pipeline.data.table import AnnotationTable, DataError, Repair, RepairReport
from pipeline.io import TextDecodeError, read_text

log = logging.getLogger(__name__)

RAW_BOX_COLUMNS = ["image_id", "x1", "y1", "x2", "y2", "label", "file", "row"]
DECLARED_COLUMNS = ["image_id", "width", "height", "file", "row"]
_MAX_LISTED = 5  # offending rows quoted in one error message


def empty_raw_boxes() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in RAW_BOX_COLUMNS})


def empty_declared() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in DECLARED_COLUMNS})


def read_text_file(path: Path) -> str:
    """A text annotation file (split list, label file, CSV) in the encoding its byte-order mark declares, else
    UTF-8; a DataError naming the file (and the line of the first byte that is not UTF-8) otherwise."""
    try:
        return read_text(path)
    except TextDecodeError as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} folder not found: {path} (working directory {Path.cwd()})")
    return path


def first_existing_dir(root: Path, names: list[str], what: str) -> Path:
    """The first of ``root/name`` that is a folder: the configured name first, then the usual alternatives."""
    tried = []
    for name in dict.fromkeys(names):  # ordered, deduplicated
        path = root / name
        if path.is_dir():
            if tried:
                log.info("%s folder: using %s (%s not found)", what, path, ", ".join(map(str, tried)))
            return path
        tried.append(path)
    raise DataError(f"{what} folder not found; tried {', '.join(map(str, tried))} (working directory {Path.cwd()})")


class ImageIndex:
    """The image files of one folder, looked up by exact name or by stem (any extension)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and is_image_file(entry):
                self.by_name[entry.name] = entry
                self.by_stem.setdefault(entry.stem, []).append(entry)

    def duplicate_stems(self) -> dict[str, list[Path]]:
        return {stem: paths for stem, paths in self.by_stem.items() if len(paths) > 1}

    def check_unique_stems(self) -> None:
        dups = self.duplicate_stems()
        if dups:
            listed = "; ".join(" and ".join(p.name for p in paths) for paths in list(dups.values())[:_MAX_LISTED])
            raise DataError(
                f"{self.folder}: {len(dups)} image ids have more than one file ({listed}); "
                "an image id must name exactly one file: remove or rename the extra copies"
            )

    def find(self, stem: str) -> Path | None:
        """The one file with this stem; DataError if several; None if none."""
        paths = self.by_stem.get(stem, [])
        if len(paths) > 1:
            raise DataError(f"{self.folder}: image id {stem!r} matches several files: {[p.name for p in paths]}")
        return paths[0] if paths else None


def resolve_ids(ids: pd.Series, known: set[str]) -> pd.Series:
    """Image ids as an annotation file writes them, matched to the dataset's ids (image file stems): an exact match
    first, then the id without surrounding spaces (a CSV cell ``"a "`` for ``a.jpg``), then the one stem equal to
    it once both are stripped (``a`` for ``"a .jpg"``). Stripping first would lose files whose names end in a
    space; an id matching nothing comes back stripped, for the error message."""
    ids = ids.astype(str)
    stripped = ids.str.strip()
    out = ids.where(ids.isin(known), stripped)
    unmatched = ~out.isin(known)
    if unmatched.any():
        by_stripped: dict[str, list[str]] = {}
        for stem in known:
            by_stripped.setdefault(stem.strip(), []).append(stem)
        unique = {k: v[0] for k, v in by_stripped.items() if len(v) == 1}
        out = out.where(~unmatched, stripped.map(unique).fillna(stripped))
    return out


def _probe(path: str, verify: bool) -> tuple[int, int] | DataError:
    try:
        return verify_image(path) if verify else probe_image(path)
    except DataError as exc:
        return exc


def probe_sizes(
    images: pd.DataFrame, report: RepairReport, *, skip_bad: bool, verify: bool
) -> tuple[pd.DataFrame, set[str]]:
    """Real (width, height) of every image; unreadable ones raise, or with ``skip_bad`` are counted and returned."""
    paths = images.path.tolist()
    if verify:  # full decodes: PIL releases the GIL while decoding, so threads use every core
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            results = list(pool.map(lambda p: _probe(p, True), paths))
    else:  # header reads are ~0.05 ms: a plain loop is faster than a pool
        results = [_probe(p, False) for p in paths]
    bad = {i: r for i, r in zip(images.image_id, results) if isinstance(r, DataError)}
    if bad and not skip_bad:
        first = list(bad.values())[:_MAX_LISTED]
        raise DataError(
            f"{len(bad)} unreadable image(s): " + "; ".join(map(str, first))
            + " (set data.skip_bad_images: true to skip and count them instead)"
        )
    for image_id, path, result in zip(images.image_id, images.path, results):
        if isinstance(result, DataError):
            report.add("skipped_image", path, "-", f"image {image_id} skipped: {result}")
    ok = [(i, r[0], r[1]) for i, r in zip(images.image_id, results) if not isinstance(r, DataError)]
    sizes = pd.DataFrame(ok, columns=["image_id", "width", "height"])
    return sizes, set(bad)


def check_declared_sizes(declared: pd.DataFrame, sizes: pd.DataFrame, paths: dict[str, str]) -> None:
    """DataError if an annotation file declares a size other than the image's real one (after EXIF)."""
    if declared.empty:
        return
    d = declared.merge(sizes, on="image_id", suffixes=("", "_real"))
    w = pd.to_numeric(d.width, errors="coerce").to_numpy(float)
    h = pd.to_numeric(d.height, errors="coerce").to_numpy(float)
    bad = d[(w != d.width_real.to_numpy(float)) | (h != d.height_real.to_numpy(float))]
    if bad.empty:
        return
    lines = []
    for r in bad.drop_duplicates("image_id").head(_MAX_LISTED).itertuples():
        hint = (
            "the declared size is the image's size BEFORE its EXIF rotation: the boxes were probably drawn on the "
            "unrotated pixels; strip the EXIF orientation tag (or rotate the boxes too)"
            if (float(r.width), float(r.height)) == (float(r.height_real), float(r.width_real))
            else "fix the declared width/height, or check that it is the right image file"
        )
        lines.append(
            f"{r.file} {r.row}: declares image {r.image_id} as {r.width}x{r.height} but {paths[r.image_id]} is "
            f"{r.width_real}x{r.height_real} (after EXIF orientation); {hint}"
        )
    n_images = bad.image_id.nunique()
    listed = "\n  ".join(lines)
    raise DataError(f"declared image size differs from the real image for {n_images} image(s):\n  {listed}")


def _fmt_box(x1: float, y1: float, x2: float, y2: float) -> str:
    return "[" + ", ".join(f"{v:g}" for v in (x1, y1, x2, y2)) + "]"


def _duplicates(b: pd.DataFrame, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the boxes among ``candidates`` identical to an earlier one -- same image, corners and label, as
    annotated, before any clipping --, and for each of those the position of the first such box)."""
    key = ["image_id", "x1", "y1", "x2", "y2", "label"] + (["annotator"] if "annotator" in b.columns else [])
    positions = np.flatnonzero(candidates)
    first = np.arange(len(b))
    frame = b.loc[candidates, key]
    if frame.duplicated().any():  # rare: the position of each first copy only then (a groupby costs twice as much)
        grouped = frame.assign(_pos=positions).groupby(key, sort=False, dropna=False)
        first[positions] = grouped["_pos"].transform("first").to_numpy()
    return first != np.arange(len(b)), first


def clean_boxes(boxes: pd.DataFrame, sizes: pd.DataFrame, report: RepairReport) -> pd.DataFrame:
    """Drop non-finite, inverted, zero-area, fully outside and duplicate boxes; clip the partly outside ones. All
    counted.

    Each box gets at most one verdict, checked in this order; the report lists them in file order. A duplicate is
    a box identical to an earlier one of its image (corners and label as annotated; and annotator, when the boxes
    have that column): the earlier one is kept.
    """
    if boxes.empty:
        return boxes.iloc[:0]
    b = boxes.merge(sizes, on="image_id", how="left", validate="many_to_one")
    x1, y1, x2, y2 = (b[c].to_numpy(np.float64) for c in ("x1", "y1", "x2", "y2"))
    width, height = b.width.to_numpy(np.float64), b.height.to_numpy(np.float64)
    nan = ~np.isfinite(np.stack([x1, y1, x2, y2])).all(axis=0)
    inverted = ~nan & ((x2 < x1) | (y2 < y1))
    zero = ~nan & ~inverted & ((x2 == x1) | (y2 == y1))
    outside = ~(nan | inverted | zero) & ((x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height))
    duplicate, first = _duplicates(b, ~(nan | inverted | zero | outside))
    keep = ~(nan | inverted | zero | outside | duplicate)
    clipped = keep & ((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height))
    cx1, cy1 = np.clip(x1, 0, width), np.clip(y1, 0, height)
    cx2, cy2 = np.clip(x2, 0, width), np.clip(y2, 0, height)

    verdicts = [
        (nan, "dropped_nan", "non-finite coordinate"),
        (inverted, "dropped_inverted", "x2 < x1 or y2 < y1"),
        (zero, "dropped_zero_area", "zero width or height"),
        (outside, "dropped_outside", "entirely outside the image"),
        (duplicate, "dropped_duplicate", "identical to an earlier box"),
        (clipped, "clipped", "partly outside the image, clipped to it"),
    ]
    flagged = np.flatnonzero(nan | inverted | zero | outside | duplicate | clipped)
    ids, files, rows = (b[c].to_numpy(object) for c in ("image_id", "file", "row"))
    for i in flagged:  # only the repaired boxes, usually few; plain arrays, as pandas indexing per row is slow
        kind, why = next((k, w) for mask, k, w in verdicts if mask[i])
        box = _fmt_box(x1[i], y1[i], x2[i], y2[i])
        detail = f"image {ids[i]} ({width[i]:g}x{height[i]:g}) box x1,y1,x2,y2 {box}: {why}"
        if kind == "clipped":
            detail += f" -> {_fmt_box(cx1[i], cy1[i], cx2[i], cy2[i])}"
        if kind == "dropped_duplicate":
            where = rows[first[i]] if files[first[i]] == files[i] else f"{files[first[i]]} {rows[first[i]]}"
            detail += f" ({where}, label {b.label.iat[i]})"
        report.add(kind, files[i], rows[i], detail)

    out = pd.DataFrame(
        {"image_id": b.image_id, "x1": cx1, "y1": cy1, "x2": cx2, "y2": cy2, "label": b.label}
    )
    if "annotator" in b.columns:  # two annotators' identical boxes are two opinions, not a duplicate
        out["annotator"] = b.annotator
    return out[keep].reset_index(drop=True)


# A repair that would remove most of a dataset's boxes is no repair: the annotations do not mean what the reader
# assumes (YOLO labels in pixels, xyxy read as xywh, labels of another image set). More than this share of the
# boxes dropped, among at least MASS_DROP_MIN_BOXES boxes -- or every box, however few -- is a DataError.
MASS_DROP_FRACTION = 0.5
MASS_DROP_MIN_BOXES = 20


def check_not_mostly_dropped(repairs: list[Repair], n_boxes: int, hint: str = "") -> None:
    """DataError when ``repairs`` (those of one cleaning of ``n_boxes`` boxes) drop most of them."""
    dropped = [r for r in repairs if r.kind.startswith("dropped_")]
    if not dropped or not (len(dropped) == n_boxes or (
            n_boxes >= MASS_DROP_MIN_BOXES and len(dropped) > MASS_DROP_FRACTION * n_boxes)):
        return
    kinds = ", ".join(f"{kind} {n}" for kind, n in Counter(r.kind for r in dropped).most_common())
    first = dropped[0]
    raise DataError(
        f"{len(dropped)} of {n_boxes} boxes ({len(dropped) / n_boxes:.0%}) would be dropped ({kinds}), e.g. "
        f"{first.file} {first.row}: {first.detail}. A repair that removes most of the boxes means the annotations "
        "are not what this reader expects: "
        + (hint or "check the coordinate convention (pixels or fractions of the image size; x, y, w, h or "
                   "x1, y1, x2, y2) and that the annotations belong to these images")
    )


def finish(
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    declared: pd.DataFrame,
    classes: list[str],
    report: RepairReport,
    *,
    skip_bad: bool,
    verify: bool,
    normalised: bool = False,
    drop_hint: str = "",
) -> AnnotationTable:
    """Probe the images, check declared sizes, clean the boxes: the canonical table, validated.

    ``normalised``: box coordinates are fractions of the image size (YOLO), scaled here by the real sizes.
    ``drop_hint``: what the reader suspects when most boxes would be dropped (see :func:`check_not_mostly_dropped`).
    """
    dup = images.image_id[images.image_id.duplicated()]
    if len(dup):
        raise DataError(f"duplicate image ids: {sorted(set(dup))[:_MAX_LISTED]}")
    dup_path = images.path[images.path.duplicated()]
    if len(dup_path):
        raise DataError(f"the same image file is used by several image ids: {sorted(set(dup_path))[:_MAX_LISTED]}")

    sizes, bad = probe_sizes(images, report, skip_bad=skip_bad, verify=verify)
    if bad:
        images = images[~images.image_id.isin(bad)]
        gone = boxes[boxes.image_id.isin(bad)]
        for r in gone.itertuples():
            report.add("dropped_bad_image_box", r.file, r.row, f"box of skipped image {r.image_id}")
        boxes = boxes[~boxes.image_id.isin(bad)]
        declared = declared[~declared.image_id.isin(bad)]

    check_declared_sizes(declared, sizes, dict(zip(images.image_id, images.path)))
    if normalised and len(boxes):
        wh = boxes[["image_id"]].merge(sizes, on="image_id", how="left")
        boxes = boxes.assign(
            x1=boxes.x1.to_numpy(np.float64) * wh.width.to_numpy(np.float64),
            x2=boxes.x2.to_numpy(np.float64) * wh.width.to_numpy(np.float64),
            y1=boxes.y1.to_numpy(np.float64) * wh.height.to_numpy(np.float64),
            y2=boxes.y2.to_numpy(np.float64) * wh.height.to_numpy(np.float64),
        )
    n_repairs, n_boxes = len(report.repairs), len(boxes)
    boxes = clean_boxes(boxes, sizes, report)
    check_not_mostly_dropped(report.repairs[n_repairs:], n_boxes, drop_hint)
    images = images.merge(sizes, on="image_id", how="left", validate="one_to_one")
    table = AnnotationTable(images, boxes, list(classes), report)
    table.validate()
    return table


def class_index(names: pd.Series, classes: list[str], where: pd.DataFrame) -> np.ndarray:
    """Class names -> indices into ``classes``; DataError naming file and row for a name not in the list."""
    lookup = {name: i for i, name in enumerate(classes)}
    idx = names.map(lookup)
    unknown = idx.isna().to_numpy()
    if unknown.any():
        rows = where[unknown].head(_MAX_LISTED)
        bad_names = names[unknown].head(_MAX_LISTED)
        listed = "; ".join(f"{f} {r}: {n!r}" for f, r, n in zip(rows.file, rows.row, bad_names))
        raise DataError(
            f"{int(unknown.sum())} box(es) have a class not in the class list {classes}: {listed} "
            "(add the name to data.classes, or fix the label)"
        )
    return idx.to_numpy(np.int64)
