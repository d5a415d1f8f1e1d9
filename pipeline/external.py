"""Models trained in other tools, on our folds: the folds out in their layouts, their predictions in as ours
(the import side is described above :func:`read_external`).

Out (``python -m pipeline.folds export --to yolo|coco DIR``), so a model trained elsewhere (Ultralytics, MMDetection,
detectron2) sees exactly our split:

- ``yolo``: ``DIR/images/<id><ext>`` (links to the original files; ``/`` in an id becomes ``__``),
  ``DIR/labels/<id>.txt`` (``cls cx cy w h``, normalised), and per fold ``DIR/fold<K>_train.txt`` /
  ``fold<K>_val.txt`` (image lists, relative to ``DIR``) and ``DIR/fold<K>.yaml`` (the dataset file a YOLO trainer
  reads: ``path`` -- ``DIR``, absolute --, ``train``, ``val``, ``names``), plus ``test.txt`` when the data has a
  test split. Ultralytics finds a label by swapping ``/images/`` for ``/labels/`` in the image path, and keeps one
  ``labels.cache`` per label folder, rebuilt whenever the image list differs: so the lists name each fold's own view,
  ``DIR/fold<K>/<train|val>/images/`` and ``labels/`` (relative links to ``DIR/images`` / ``DIR/labels``), and
  every fold's train and val set has its own cache -- folds trained in parallel from one export would otherwise
  rebuild one shared ``DIR/labels.cache`` in turn, and two writing it at once can fail (Ultralytics unlinks,
  saves and renames it without a lock).
- ``coco``: per fold ``DIR/fold<K>/train.json`` and ``DIR/fold<K>/val.json`` (COCO detection JSON, ``bbox`` xywh in
  pixels, ``category_id`` = class index + 1, ``file_name`` = the image path as the annotation table has it), plus
  ``DIR/test.json`` (images only). An image's integer ``id`` is its 1-based row in its split's annotation table,
  the same in every file: MMDetection and detectron2 write results with these ids, and the importer maps them
  back to our image ids (:func:`coco_image_ids`).

Images without boxes are listed (an empty label file / no annotations): they are part of the split.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.data.table import AnnotationTable
from pipeline.io import atomic_write_text
from pipeline.layout import normalise_predictions

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("yolo", "coco")


class ExternalError(ValueError):
    """Folds that cannot be exported, or external predictions that cannot be used; the message names the file and
    the row or image."""


def _link(source: Path, target: Path) -> None:
    """``target`` pointing at ``source`` (a symlink; a copy-free hard link where symlinks are not allowed)."""
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:
        os.link(source, target)


def _relative_link(source: Path, target: Path, relative: str) -> None:
    """``target`` pointing at ``source`` through ``relative`` (its path from ``target``'s folder), so that the folder
    holding both can move; a hard link where symlinks are not allowed."""
    if os.path.islink(target) and os.readlink(target) == relative:
        return
    if os.path.lexists(target):
        target.unlink()
    try:
        os.symlink(relative, target)
    except OSError:
        os.link(source, target)


def _yolo_lines(boxes: pd.DataFrame, width: int, height: int) -> str:
    cx = (boxes.x1 + boxes.x2) / 2 / width
    cy = (boxes.y1 + boxes.y2) / 2 / height
    w = (boxes.x2 - boxes.x1) / width
    h = (boxes.y2 - boxes.y1) / height
    rows = zip(boxes.label, cx, cy, w, h)
    return "".join(f"{int(c)} {a:.6f} {b:.6f} {d:.6f} {e:.6f}\n" for c, a, b, d, e in rows)


def yolo_stem(image_id: str) -> str:
    """The file name, less its extension, of an image in the YOLO layout: its id with path separators made ``__``
    (a YOLO tool names label and prediction files after the image file; the importer maps them back)."""
    return image_id.replace("/", "__").replace("\\", "__")


def yolo_stems(ids) -> dict[str, str]:
    """``{file stem: image id}`` of ``ids``; ``ExternalError`` when two ids would share a file."""
    stems: dict[str, str] = {}
    for image_id in ids:
        other = stems.setdefault(yolo_stem(image_id), image_id)
        if other != image_id:
            raise ExternalError(f"images {other!r} and {image_id!r} would share the YOLO file name "
                                f"{yolo_stem(image_id)!r}")
    return stems


def _yolo_images(table: AnnotationTable, out: Path, labels: bool = True) -> dict[str, str]:
    """Link every image into ``out/images`` and write its label file (``labels``; never a test split's: a local
    hidden split's labels must not leave for the other tool); returns image_id -> its file name there."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    by_image = dict(tuple(table.boxes.groupby("image_id", sort=False)))
    yolo_stems(table.images.image_id)
    names = {}
    for row in table.images.itertuples():
        source = Path(row.path)
        name = f"{yolo_stem(row.image_id)}{source.suffix.lower()}"
        _link(source, out / "images" / name)
        if labels:
            boxes = by_image.get(row.image_id, table.boxes.iloc[:0])
            atomic_write_text(out / "labels" / f"{yolo_stem(row.image_id)}.txt",
                              _yolo_lines(boxes, int(row.width), int(row.height)))
        names[row.image_id] = name
    return names


def _yolo_view(out: Path, view: Path, names: list[str]) -> None:
    """``view/images`` and ``view/labels``: relative links to the images ``names`` of ``out/images`` and to their
    labels (a link left there by an earlier export with other folds is removed)."""
    for kind, files in (("images", names), ("labels", [f"{Path(n).stem}.txt" for n in names])):
        folder = view / kind
        folder.mkdir(parents=True, exist_ok=True)
        for stale in set(os.listdir(folder)) - set(files):
            if os.path.islink(folder / stale):  # not a file a YOLO tool put there (Ultralytics' disk cache .npy)
                (folder / stale).unlink()
        up = os.path.relpath(out / kind, folder)  # the same for every file of the folder: computed once
        for name in files:
            _relative_link(out / kind / name, folder / name, f"{up}/{name}")


def export_yolo(train: AnnotationTable, folds: pd.DataFrame, out: Path,
                test: AnnotationTable | None = None) -> list[Path]:
    """The YOLO layout of every fold (see the module docstring); returns the dataset YAML files."""
    out = Path(out)
    names = _yolo_images(train, out)
    if test is not None and len(test.images):
        test_names = _yolo_images(test, out, labels=False)
        atomic_write_text(out / "test.txt", "".join(f"./images/{test_names[i]}\n" for i in test.images.image_id))
    written = []
    for fold in sorted(folds.fold.unique()):
        for part, ids in (("train", folds.image_id[folds.fold != fold]), ("val", folds.image_id[folds.fold == fold])):
            _yolo_view(out, out / f"fold{fold}" / part, [names[i] for i in ids])
            atomic_write_text(out / f"fold{fold}_{part}.txt",
                              "".join(f"./fold{fold}/{part}/images/{names[i]}\n" for i in ids))
        # an absolute `path`: Ultralytics resolves a relative one against its own datasets folder (8.0 / 8.1) or
        # the working directory (later versions), never against the YAML's folder; the lists inside are relative
        # to DIR, so a moved folder needs only this line edited
        spec = {"path": str(out.resolve()), "train": f"fold{fold}_train.txt", "val": f"fold{fold}_val.txt",
                "names": dict(enumerate(train.classes))}
        written.append(atomic_write_text(out / f"fold{fold}.yaml", yaml.safe_dump(spec, sort_keys=False)))
    return written


def coco_image_ids(table: AnnotationTable) -> dict[str, int]:
    """The integer COCO ``id`` of each image of ``table``: its 1-based row (stable across every file exported from
    the split, and recoverable from the table alone when a tool's results come back)."""
    return {image_id: k + 1 for k, image_id in enumerate(table.images.image_id)}


def _coco_json(table: AnnotationTable, image_ids, with_boxes: bool = True) -> str:
    """The COCO JSON of ``image_ids``; ``with_boxes=False``: the images only (a test split: its labels, when a
    local hidden split has them, must not leave for the other tool)."""
    images = table.images.set_index("image_id").loc[list(image_ids)]
    every = coco_image_ids(table)
    index = {image_id: every[image_id] for image_id in images.index}
    boxes = table.boxes[table.boxes.image_id.isin(index)] if with_boxes else table.boxes.iloc[:0]
    xywh = np.stack([boxes.x1, boxes.y1, boxes.x2 - boxes.x1, boxes.y2 - boxes.y1], axis=1) if len(boxes) else []
    annotations = [
        {"id": n + 1, "image_id": index[image_id], "category_id": int(label) + 1,
         "bbox": [round(float(v), 3) for v in box], "area": round(float(box[2] * box[3]), 3), "iscrowd": 0}
        for n, (image_id, label, box) in enumerate(zip(boxes.image_id, boxes.label, xywh))
    ]
    doc = {
        "images": [{"id": index[i], "file_name": str(r.path), "width": int(r.width), "height": int(r.height),
                    "image_id_str": i} for i, r in zip(images.index, images.itertuples())],
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(table.classes)],
    }
    return json.dumps(doc)


def export_coco(train: AnnotationTable, folds: pd.DataFrame, out: Path,
                test: AnnotationTable | None = None) -> list[Path]:
    """One train and one val COCO JSON per fold (see the module docstring); returns the files written."""
    out = Path(out)
    written = []
    for fold in sorted(folds.fold.unique()):
        for part, ids in (("train", folds.image_id[folds.fold != fold]), ("val", folds.image_id[folds.fold == fold])):
            written.append(atomic_write_text(out / f"fold{fold}" / f"{part}.json", _coco_json(train, ids)))
    if test is not None and len(test.images):
        test_doc = _coco_json(test, test.images.image_id, with_boxes=False)
        written.append(atomic_write_text(out / "test.json", test_doc))
    return written


EXPORTERS = {"yolo": export_yolo, "coco": export_coco}


# ------------------------------------------------------------------------------------------------ import
#
# An ensemble member may be a folder of another tool's predictions instead of a config:
#     ensemble.members: [{predictions: external/yolov8x, name: yolov8x, format: yolo_txt}]
# Layout of the folder (``<ext>``: ``.json``, ``.bbox.json`` or ``/coco_instances_results.json`` for coco_json,
# ``.parquet`` or ``.csv`` for table):
#     fold<K>.<ext> / fold<K>/         OOF: fold K's model on fold K's validation images only, one per fold
#     test.<ext> / test/               test: one model's predictions, or test_fold<K>.<ext> / test_fold<K>/ per fold
# Formats:
#     table      our prediction table's columns (image_id, x1, y1, x2, y2 in pixels, score, label as class index or
#                class name); optional tta column
#     coco_json  a COCO results list [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]; category_id is
#                the class index + 1 and an integer image_id the image's id in the files `folds export --to coco`
#                wrote (its 1-based row in the split's annotation table: what MMDetection and detectron2 write
#                back); a string image_id is our image id itself (or the YOLO export's file stem of it); an entry
#                with a "file_name" (Ultralytics' save_json, whose image_id is the file stem, an integer when it is
#                all digits) is mapped by that name's stem, as the YOLO export named the files. Without a file_name
#                (older Ultralytics versions) an integer image_id may be either reading: COCO_IMAGE_IDS
#     yolo_txt   one <image_id>.txt per image with "cls cx cy w h conf" lines, normalised (Ultralytics save_txt
#                with save_conf); cls is the class index

IMPORT_FORMATS = ("table", "coco_json", "yolo_txt")
# How a coco_json file's integer image_id (an entry without a file_name) names an image: "exported", the id
# `folds export --to coco` wrote (MMDetection, detectron2); "stem", the file's all-digit stem (Ultralytics' save_json
# before it wrote file_name: image "0042.jpg" is image_id 42); "auto", the one reading that names an image of the
# split for every entry, refused when both do and name different images (which one the tool meant is not in the
# file; the member's coco_image_id says it).
COCO_IMAGE_IDS = ("auto", "exported", "stem")
# A box past the image edge by at most this many pixels is the file's rounding, not a fault (Ultralytics' save_txt
# writes normalised coordinates with 6 decimals: on BCCD's 640 x 480 images a third of its boxes overshot, by at
# most 0.00032 px): clipped and counted at INFO level; a larger overhang is a clip worth a warning.
ROUNDING_PX = 0.01
# as the tools name their results, so that none needs renaming: MMDetection's CocoMetric writes
# <outfile_prefix>.bbox.json (outfile_prefix=DIR/fold<K>), detectron2's COCOEvaluator
# <output_dir>/coco_instances_results.json (output_dir=DIR/fold<K>)
_SUFFIXES = {"table": (".parquet", ".csv"), "coco_json": (".json", ".bbox.json", "/coco_instances_results.json"),
             "yolo_txt": ("",)}


def _source(folder: Path, stem: str, fmt: str) -> Path | None:
    for suffix in _SUFFIXES[fmt]:
        path = folder / f"{stem}{suffix}"
        if path.exists() and (path.is_dir() == (fmt == "yolo_txt")):
            return path
    return None


def _read_table(path: Path, classes: list[str]) -> pd.DataFrame:
    parquet = path.suffix == ".parquet"
    try:
        df = pd.read_parquet(path) if parquet else pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
    except (OSError, ValueError) as exc:  # pandas' EmptyDataError / ParserError and arrow's errors are among these
        raise ExternalError(f"{path}: not a readable {'parquet' if parquet else 'CSV'} file ({exc})") from None
    missing = [c for c in ("image_id", "x1", "y1", "x2", "y2", "score", "label") if c not in df.columns]
    if missing:
        only = str(df.columns[0]) if len(df.columns) == 1 else ""
        sep = next((c for c in ";\t|" if c in only), None)
        hint = f" -- the file looks separated by {sep!r}: write it with commas" if sep else ""
        raise ExternalError(f"{path}: missing column(s) {missing}; found {list(df.columns)}{hint}")
    df = df.assign(label=_class_indexes(df["label"], classes), image_id=df.image_id.astype(str),
                   row="row " + pd.Series(np.arange(2, len(df) + 2), index=df.index).astype(str))
    return df if "tta" in df.columns else df.assign(tta="none")


def _coco_image(path: Path, i: int, value: object, entry: dict, stems: dict[str, str]) -> str | int:
    """Entry ``i``'s image: its ``file_name``'s stem when it has one (Ultralytics' ``save_json``, whose ``image_id``
    is the stem, an integer when the stem is all digits); else a string ``image_id`` is our image id (or a YOLO file
    stem of one: ``stems``), an integer is returned as it is, for :func:`_integer_images` to read with the file's
    other integers."""
    if "file_name" in entry:
        image = stems.get(Path(str(entry["file_name"])).stem)
        if image is None:
            raise ExternalError(f"{path}: entry {i} has file_name {entry['file_name']!r}, which names no image of "
                                "this split (the files `folds export` wrote are named <image_id>.<ext>)")
        return image
    if isinstance(value, str):
        return stems.get(value, value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ExternalError(f"{path}: entry {i} has image_id {value!r}: expected the exported integer id or our image "
                        "id as a string")


def _digit_stems(ids: list[str]) -> dict[int, str]:
    """``{int(stem): image id}`` for the YOLO file stems of ``ids`` that are all digits (the integers Ultralytics
    writes for them); two stems of one number ("007", "7") name no image by it."""
    by_number: dict[int, str | None] = {}
    for image_id in ids:
        stem = yolo_stem(image_id)
        if stem.isascii() and stem.isdigit():
            number = int(stem)
            by_number[number] = image_id if number not in by_number else None
    return {number: image_id for number, image_id in by_number.items() if image_id is not None}


def _integer_images(path: Path, values: np.ndarray, entry: np.ndarray, ids: list[str], reading: str) -> np.ndarray:
    """The images that a file's integer ``image_id`` values (entries ``entry``) name, read as ``reading``
    (:data:`COCO_IMAGE_IDS`); an error names the first entry no reading can take, or the first that two readings
    put on different images."""
    exported_ok = (values >= 1) & (values <= len(ids))
    exported = np.asarray(ids, dtype=object)[np.where(exported_ok, values - 1, 0)] if len(ids) else values
    stems = _digit_stems(ids)
    by_stem = pd.Series(values).map(stems).to_numpy(dtype=object)
    stem_ok = pd.notna(by_stem)
    option = ("set the member's coco_image_id: exported (MMDetection or detectron2 results on the files "
              "`folds export --to coco` wrote) or stem (Ultralytics' save_json without file_name)")
    if reading == "stem" and not stem_ok.all():
        k = int(np.flatnonzero(~stem_ok)[0])
        raise ExternalError(f"{path}: entry {entry[k]} has image_id {values[k]}, which is no image's all-digit file "
                            "stem (coco_image_id: stem)")
    if reading == "stem" or (reading == "auto" and stem_ok.all() and not exported_ok.all()):
        if reading == "auto":
            log.info("%s: integer image_ids read as file stems (Ultralytics' save_json without file_name)", path)
        return by_stem
    if not exported_ok.all():
        k = int(np.flatnonzero(~exported_ok)[0])
        stem_hint = ("; they are all-digit file stems of this split's images: coco_image_id stem reads them so"
                     if stem_ok.all() else "; nor is each the all-digit file stem of one of this split's images "
                     "(Ultralytics' save_json without file_name)" if stems else "")
        raise ExternalError(f"{path}: entry {entry[k]} has image_id {values[k]}, which no exported image has: integer "
                            f"ids are the ids `folds export --to coco` wrote (1..{len(ids)} for this split){stem_hint}")
    if reading == "auto" and stem_ok.all() and (differ := np.flatnonzero(exported != by_stem)).size:
        k = int(differ[0])
        raise ExternalError(f"{path}: integer image_ids name different images read as exported ids or as file "
                            f"stems ({differ.size} entries, first entry {entry[k]}: image_id {values[k]} is "
                            f"{exported[k]!r} or {by_stem[k]!r}): {option}")
    return exported


def _class_indexes(labels: pd.Series, classes: list[str]) -> pd.Series:
    """A table's ``label`` column as class indexes: numbers (whole ones), or text -- a class name or the digits of
    an index; anything else becomes -1, which the checks report with its row."""
    if pd.api.types.is_numeric_dtype(labels) and not pd.api.types.is_bool_dtype(labels):
        values = labels.to_numpy(np.float64)
        whole = np.isfinite(values) & (values == np.round(values))
        return pd.Series(np.where(whole, values, -1).astype(np.int64), index=labels.index)
    names = {name: i for i, name in enumerate(classes)}
    text = labels.astype(str).str.strip()
    return text.map(lambda v: names.get(v, int(v) if v.isdigit() else -1)).astype(np.int64)


def _read_coco(path: Path, ids: list[str], reading: str = "auto") -> pd.DataFrame:
    """A COCO results list; ``ids``: the split's image ids in table order (exported integer ids index them from 1);
    ``reading``: how integer ids without a ``file_name`` name images (:data:`COCO_IMAGE_IDS`)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExternalError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list):
        raise ExternalError(f"{path}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]")
    df = _coco_frame_at_once(path, entries, ids, reading)
    return (df if df is not None else _coco_frame_by_entry(path, entries, ids, reading)).assign(tta="none")


def _coco_frame_at_once(path: Path, entries: list, ids: list[str], reading: str = "auto") -> pd.DataFrame | None:
    """The usual results list -- integer image and category ids (from 1), four numbers a box, numeric scores --
    read in whole columns (about a second for a million entries, without the loop per entry); None for anything
    else, which :func:`_coco_frame_by_entry` reads and names the first bad entry of."""
    named = bool(entries) and isinstance(entries[0], dict) and "file_name" in entries[0]  # Ultralytics' save_json
    try:
        frame = pd.DataFrame.from_records(entries, columns=["file_name" if named else "image_id", "category_id",
                                                            "bbox", "score"])
        box = np.array(frame["bbox"].tolist(), dtype=np.float64)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    category, score = frame["category_id"], frame["score"]
    types = pd.api.types
    if (not len(frame) or box.shape != (len(frame), 4) or not types.is_integer_dtype(category)
            or not types.is_numeric_dtype(score) or types.is_bool_dtype(score) or category.min() < 1):
        return None
    if named:
        try:  # the file names' stems, our ids as `folds export` named the files
            images = frame["file_name"].map(lambda f: Path(f).stem).map(yolo_stems(ids))
        except TypeError:
            return None
        if images.isna().any():
            return None
        image_ids = images.to_numpy(dtype=object)
    else:
        image = frame["image_id"]
        if not types.is_integer_dtype(image):
            return None
        image_ids = _integer_images(path, image.to_numpy(np.int64), np.arange(len(frame)), ids, reading)
    return pd.DataFrame({"image_id": image_ids, "x1": box[:, 0],
                         "y1": box[:, 1], "x2": box[:, 0] + box[:, 2], "y2": box[:, 1] + box[:, 3],
                         "score": score.to_numpy(np.float64), "label": category.to_numpy(np.int64) - 1,
                         "row": "entry " + pd.Series(np.arange(len(frame))).astype(str)})


def _coco_frame_by_entry(path: Path, entries: list, ids: list[str], reading: str = "auto") -> pd.DataFrame:
    """:func:`_coco_frame_at_once` for any results list, entry by entry: the first bad entry is an error naming it."""
    rows = []
    known = set(ids)
    stemmed = any(isinstance(e, dict) and ("file_name" in e or isinstance(e.get("image_id"), str)
                                           and e["image_id"] not in known) for e in entries)
    stems = yolo_stems(ids) if stemmed else {}
    for i, e in enumerate(entries):
        if isinstance(e, dict) and e.get("category_id") == 0:
            raise ExternalError(f"{path}: entry {i} has category_id 0: the exported files number the classes from 1 "
                                "(class index + 1), so the tool numbered them itself -- MMDetection without "
                                "test_evaluator.ann_file set to the exported JSON, or detectron2 without the "
                                "dataset registered from it (register_coco_instances), or YOLOv5's val.py "
                                "--save-json (classes from 0; for YOLO models use format yolo_txt)")
        try:
            x, y, w, h = (float(v) for v in e["bbox"])
            rows.append((_coco_image(path, i, e["image_id"], e, stems), x, y, x + w, y + h, float(e["score"]),
                         int(e["category_id"]) - 1, f"entry {i}"))
        except ExternalError:
            raise
        except (KeyError, TypeError, ValueError):
            raise ExternalError(f"{path}: entry {i} is not {{image_id, category_id, bbox: [x, y, w, h], score}}: "
                                f"{str(e)[:120]}") from None
    df = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "score", "label", "row"])
    numbered = np.array([isinstance(v, (int, np.integer)) for v in df.image_id], dtype=bool)
    if numbered.any():  # the file's integer ids are read together: which reading they take is the file's
        images = _integer_images(path, df.image_id[numbered].to_numpy(np.int64), np.flatnonzero(numbered), ids,
                                 reading)
        df["image_id"] = df.image_id.astype(object)
        df.loc[numbered, "image_id"] = images
    return df


def _yolo_files(folder: Path) -> list[Path]:
    """The ``.txt`` files of a yolo_txt folder. Label files one level down (``fold0/labels/*.txt``: Ultralytics'
    ``labels/`` folder moved *into* ``fold0/`` rather than renamed to it) are refused, naming the subfolder: read as
    it stood, the fold had no predictions and scored as a model that finds nothing."""
    nested = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.txt")))
    if nested:
        found = len(list(nested[0].glob("*.txt")))
        raise ExternalError(f"{nested[0]}: {found} label file(s) in a subfolder of {folder}, which are not read: the "
                            f"<image_id>.txt files go directly in {folder.name}/ (rename Ultralytics' labels/ folder "
                            f"to {folder.name}, do not move it into one)")
    return sorted(folder.glob("*.txt"))


def _read_yolo(folder: Path, sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    rows = []
    image_of = yolo_stems(sizes)
    for path in _yolo_files(folder):
        if path.stem not in image_of:
            raise ExternalError(f"{path}: image {path.stem!r} is not in the dataset")
        image_id = image_of[path.stem]
        width, height = sizes[image_id]
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ExternalError(f"{path}: not a text file ({exc})") from None
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                cls, cx, cy, w, h, conf = int(parts[0]), *map(float, parts[1:6])
            except ValueError:
                raise ExternalError(f"{path} line {n}: expected 'cls cx cy w h conf', got {line!r}") from None
            if len(parts) != 6:
                raise ExternalError(f"{path} line {n}: expected 6 values 'cls cx cy w h conf', got {len(parts)}")
            rows.append((image_id, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                         (cy + h / 2) * height, conf, cls, f"{path.name} line {n}"))
    df = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "score", "label", "row"])
    return df.assign(tta="none")


def read_external(path: Path, fmt: str, classes: list[str], sizes: dict[str, tuple[int, int]],
                  coco_image_id: str = "auto") -> pd.DataFrame:
    """One predictions file (or folder, for yolo_txt) as rows of the prediction table plus a ``row`` column.
    ``sizes``: ``{image_id: (width, height)}`` of the split, in its annotation table's order; ``coco_image_id``:
    coco_json's reading of integer image ids (:data:`COCO_IMAGE_IDS`)."""
    if coco_image_id not in COCO_IMAGE_IDS:
        raise ValueError(f"coco_image_id must be one of {COCO_IMAGE_IDS}, got {coco_image_id!r}")
    if fmt == "table":
        return _read_table(path, classes)
    return _read_coco(path, list(sizes), coco_image_id) if fmt == "coco_json" else _read_yolo(path, sizes)


def check_external(df: pd.DataFrame, source: Path, n_classes: int, sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """Numbers (text such as ``1,5`` is refused), finite, known images, known classes, scores in [0, 1]: else an
    error naming the row. Boxes are clipped to the image (counted and logged); boxes with no area left are dropped
    (counted)."""
    given = df[["x1", "y1", "x2", "y2", "score"]]
    numbers = given.apply(pd.to_numeric, errors="coerce").astype(float)  # text that reads as no number: NaN
    problems = [
        ((numbers.isna() & given.notna()).to_numpy().any(axis=1), "a coordinate or score that is not a number"),
        (~np.isfinite(numbers.to_numpy()).all(axis=1), "a coordinate or score that is not a finite number"),
        (~df.image_id.isin(list(sizes)).to_numpy(), "an image that is not in the dataset"),
        (~df.label.between(0, n_classes - 1).to_numpy(), f"a class outside 0..{n_classes - 1}"),
        (~numbers.score.between(0, 1).to_numpy(), "a score outside [0, 1]"),
    ]
    for bad, what in problems:
        if bad.any():
            first = df[bad].iloc[0]
            raise ExternalError(f"{source}: {int(bad.sum())} row(s) with {what}, first at {first.row} "
                                f"(image {first.image_id!r})")
    every = np.array(list(sizes.values()), dtype=np.float64).reshape(-1, 2)
    wh = every[pd.Index(list(sizes)).get_indexer(df.image_id)]  # each row's image size, every image known (above)
    given_boxes = numbers[["x1", "y1", "x2", "y2"]]
    clipped = given_boxes.clip(lower=0).clip(upper=np.tile(wh, 2), axis=None)
    shift = np.abs(clipped.to_numpy() - given_boxes.to_numpy()).max(axis=1)
    moved, rounding = int((shift > ROUNDING_PX).sum()), int(((shift > 0) & (shift <= ROUNDING_PX)).sum())
    df = df.assign(**{c: clipped[c] for c in ("x1", "y1", "x2", "y2")})
    empty = ((df.x2 <= df.x1) | (df.y2 <= df.y1)).to_numpy()
    if moved or empty.any():
        log.warning("%s: %d box(es) clipped to the image, %d without area dropped", source, moved, int(empty.sum()))
    if rounding:
        log.info("%s: %d box(es) past the image edge by at most %g px (the file's rounding) clipped", source, rounding,
                 ROUNDING_PX)
    return df[~empty]


def image_sizes(table: AnnotationTable) -> dict[str, tuple[int, int]]:
    """``{image_id: (width, height)}`` of a split, in its table's order (the order the COCO ids count)."""
    return {r.image_id: (int(r.width), int(r.height)) for r in table.images.itertuples()}


def _as_predictions(df: pd.DataFrame, name: str, fold: int) -> pd.DataFrame:
    return normalise_predictions(df.assign(model=name, fold=fold))


def load_external_oof(folder: Path, fmt: str, name: str, table: AnnotationTable, folds: pd.DataFrame,
                      coco_image_id: str = "auto") -> pd.DataFrame:
    """Every fold's file, checked: present, finite, and fold K's file predicts fold K's images only (any other
    image was in that model's training set: its score would not be out-of-fold)."""
    sizes = image_sizes(table)
    fold_of = folds.set_index("image_id").fold
    frames = []
    for fold in sorted(folds.fold.unique()):
        path = _source(folder, f"fold{fold}", fmt)
        if path is None:
            raise ExternalError(f"{folder}: no OOF predictions for fold {fold} (expected fold{fold}"
                                f"{_SUFFIXES[fmt][0] or '/'}); every fold of {len(fold_of)} images must be present")
        df = check_external(read_external(path, fmt, table.classes, sizes, coco_image_id), path,
                            len(table.classes), sizes)
        _check_coverage(df, path, f"fold {fold}'s", int((fold_of == fold).sum()))
        elsewhere = df[df.image_id.map(fold_of).fillna(-1).astype(int) != fold]
        if len(elsewhere):
            first = elsewhere.iloc[0]
            where = (f"fold {int(fold_of[first.image_id])}" if first.image_id in fold_of.index
                     else "no fold (not in the folds file)")
            raise ExternalError(f"{path}: {elsewhere.image_id.nunique()} image(s) outside fold {fold}, first "
                                f"{first.image_id!r} ({first.row}) in {where}: a fold's file may predict only its "
                                "own validation images")
        frames.append(_as_predictions(df, name, fold))
    return normalise_predictions(pd.concat(frames, ignore_index=True))


def load_external_test(folder: Path, fmt: str, name: str, table: AnnotationTable,
                       folds: pd.DataFrame, coco_image_id: str = "auto") -> pd.DataFrame | None:
    """``test`` (one model; fold 0) or ``test_fold<K>`` for every fold; None when the folder has neither."""
    sizes = image_sizes(table)
    single = _source(folder, "test", fmt)
    per_fold = {k: _source(folder, f"test_fold{k}", fmt) for k in sorted(folds.fold.unique())}
    if single is not None:
        sources = {0: single}
    elif all(per_fold.values()):
        sources = per_fold
    elif any(per_fold.values()):
        missing = [k for k, p in per_fold.items() if p is None]
        raise ExternalError(f"{folder}: test predictions for some folds only (missing test_fold{missing[0]})")
    else:
        return None
    frames = []
    for k, path in sources.items():
        df = check_external(read_external(path, fmt, table.classes, sizes, coco_image_id), path,
                            len(table.classes), sizes)
        _check_coverage(df, path, "the test split's", len(sizes))
        frames.append(_as_predictions(df, name, k))
    return normalise_predictions(pd.concat(frames, ignore_index=True))


def _check_coverage(df: pd.DataFrame, path: Path, which: str, n_images: int) -> None:
    """A file with no box for any of its images is refused (a misplaced or empty export, which would score as a
    model that finds nothing); one that predicts under half of them is a warning, counted."""
    predicted = df.image_id.nunique()
    if n_images and not predicted:
        raise ExternalError(f"{path}: no predictions for any of {which} {n_images} images (an empty file or folder; "
                            "predict with a low confidence threshold, e.g. conf=0.001)")
    if predicted < n_images / 2:
        log.warning("%s: predictions for %d of %s %d images only", path, predicted, which, n_images)
