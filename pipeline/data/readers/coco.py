"""COCO JSON: ``images`` (id, file_name[, width, height]), ``annotations`` (image_id, category_id, bbox as
``[x, y, w, h]`` pixels[, iscrowd]) and ``categories`` (id, name).

- ``image_id`` in the table is ``str(images[i].id)``, so a COCO-JSON submission maps back to the integer id.
- ``file_name`` is looked up under ``root/<data.images>``, ``root/images``, ``root`` and the JSON's own folder,
  in that order (COCO exports disagree on where images live).
- Classes are the category names ordered by category id, or ``data.classes`` when given (every category name
  must then be in it). Images without annotations are kept; ``iscrowd`` annotations are dropped and counted.
- Declared width/height (when present) must match the real image. Rows are named ``images[i]`` /
  ``annotations[i]``: the index in the JSON array.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.readers._common import RAW_BOX_COLUMNS, empty_declared, finish, read_text_file
from pipeline.data.table import AnnotationTable, DataError, RepairReport


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"COCO JSON not found: {path} (working directory {Path.cwd()})")
    try:
        data = json.loads(read_text_file(path))  # UTF-8, or the encoding a byte-order mark declares
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be an object with images, annotations, categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: field {key!r} must be a list (got {type(data.get(key)).__name__})")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: field 'annotations' must be a list")
    return data


def _field(item: object, key: str, path: Path, where: str, types: tuple[type, ...]) -> object:
    if not isinstance(item, dict) or key not in item:
        raise DataError(f"{path}: {where} lacks field {key!r}")
    value = item[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{path}: {where}.{key} has type {type(value).__name__}: {value!r}")
    return value


def _classes(data: dict, path: Path, cfg: DataConfig) -> tuple[list[str], dict[int, int]]:
    """(class names, category id -> label index)."""
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        cid = _field(cat, "id", path, f"categories[{i}]", (int,))
        name = str(_field(cat, "name", path, f"categories[{i}]", (str,))).strip()
        if cid in cats:
            raise DataError(f"{path}: categories[{i}]: duplicate category id {cid}")
        if name in cats.values():
            raise DataError(f"{path}: categories[{i}]: duplicate category name {name!r}")
        cats[cid] = name
    classes = list(cfg.classes) if cfg.classes else [cats[c] for c in sorted(cats)]
    unknown = [(c, n) for c, n in cats.items() if n not in classes]
    if unknown:
        raise DataError(
            f"{path}: categories {unknown} are not in the class list {classes} (add them to data.classes)"
        )
    return classes, {cid: classes.index(name) for cid, name in cats.items()}


def _image_path(file_name: str, candidates: list[Path]) -> Path | None:
    for folder in candidates:
        path = folder / file_name
        if path.is_file():
            return path
    return None


def _images(data: dict, path: Path, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    folders = list(dict.fromkeys([cfg.root / cfg.images, cfg.root / "images", cfg.root, path.parent]))
    rows, declared, seen, files = [], [], {}, {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = str(_field(img, "id", path, where, (int, str)))  # str: 1 and "1" are the same id
        file_name = str(_field(img, "file_name", path, where, (str,)))
        if image_id in seen:
            raise DataError(f"{path}: {where}: duplicate image id {image_id!r} (also images[{seen[image_id]}])")
        if file_name in files:
            raise DataError(f"{path}: {where}: file {file_name!r} is also images[{files[file_name]}]")
        seen[image_id], files[file_name] = i, i
        image_path = _image_path(file_name, folders)
        if image_path is None:
            raise DataError(
                f"{path}: {where} (id {image_id}): image file {file_name!r} not found; "
                f"expected {folders[0] / file_name} (also tried {', '.join(str(f) for f in folders[1:])})"
            )
        rows.append((image_id, str(image_path), str(img.get("source", "") or "")))
        if img.get("width") and img.get("height"):  # optional in COCO: absent or 0 means "not declared"
            declared.append((image_id, img["width"], img["height"], str(path), where))
    images = pd.DataFrame(rows, columns=["image_id", "path", "source"])
    declared_df = pd.DataFrame(declared, columns=empty_declared().columns) if declared else empty_declared()
    return images, declared_df


def _number(value: object) -> float:
    """A bbox coordinate; null counts as NaN (dropped and counted later), anything else non-numeric is malformed."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return float(value)


def _boxes(data: dict, path: Path, cat_label: dict[int, int], ids: set[str], report: RepairReport) -> pd.DataFrame:
    rows = []
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"annotations[{i}]"
        image_id = str(_field(ann, "image_id", path, where, (int, str)))
        if image_id not in ids:
            raise DataError(f"{path}: {where}: image_id {image_id} is not in images")
        cid = _field(ann, "category_id", path, where, (int,))
        if cid not in cat_label:
            raise DataError(f"{path}: {where}: category_id {cid} is not in categories (class not in the list)")
        bbox = ann.get("bbox")
        try:
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise TypeError(bbox)
            x, y, w, h = (_number(v) for v in bbox)
        except TypeError:
            raise DataError(f"{path}: {where}.bbox must be [x, y, w, h] numbers, got {bbox!r}") from None
        if ann.get("iscrowd"):
            report.add("dropped_crowd", path, where, f"iscrowd annotation of image {image_id} dropped")
            continue
        rows.append((image_id, x, y, x + w, y + h, cat_label[cid], str(path), where))
    return pd.DataFrame(rows, columns=RAW_BOX_COLUMNS) if rows else pd.DataFrame(columns=RAW_BOX_COLUMNS)


def read_coco(cfg: DataConfig, split: str, *, verify: bool = False) -> AnnotationTable:
    name = cfg.train_json if split == "train" else cfg.test_json
    if not name:
        raise DataError("data.test_json is not set: there is no test split for this dataset")
    path = cfg.root / name
    data = _load_json(path)
    classes, cat_label = _classes(data, path, cfg)
    images, declared = _images(data, path, cfg)
    report = RepairReport()
    boxes = _boxes(data, path, cat_label, set(images.image_id), report)
    boxes = boxes.astype({c: np.float64 for c in ("x1", "y1", "x2", "y2")})
    return finish(images, boxes, declared, classes, report, skip_bad=cfg.skip_bad_images, verify=verify)
