"""Pascal VOC: one XML per image in ``root/<data.annotations>`` (else ``Annotations``/``annotations``), images in
``root/<data.images>`` (else ``JPEGImages``/``images``), optional split lists ``root/ImageSets/Main/<split>.txt``.

- Split "train": the ids of ``train_split`` if set, else every XML minus the ``test_split`` ids. Split "test": the
  ids of ``test_split`` WITH their boxes (the hidden labels for local leaderboard scoring).
- The image is the XML's ``filename`` element in the image folder, falling back to its stem and then to the XML's
  stem with any extension. The image id is the XML's stem (the id the split files use).
- Classes: ``data.classes`` if given (a name not in it is a DataError naming file and object), else the sorted
  unique names over every XML in the folder (so both splits get the same indices).
- Coordinate convention: ``xmin..ymax`` are taken as given, in pixels: x1 = xmin, x2 = xmax (no ``-1`` for VOC's
  1-based inclusive corners), as most Kaggle code and torchvision's VOC loaders do; the half-pixel difference is
  far below annotation noise, and BCCD's ``xmax = 640`` on a 640-wide image is then exactly the right border.
- ``difficult`` objects are kept as ordinary boxes and counted in the report (``kept_difficult``).
- A declared ``size`` must match the real image, unless absent or 0 (labelImg often writes 0).
Rows are named ``object[k]`` (1-based, as in XPath) or ``size``.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path, PureWindowsPath

import pandas as pd

from pipeline.config import DataConfig
from pipeline.data.readers._common import (
    RAW_BOX_COLUMNS,
    ImageIndex,
    class_index,
    empty_declared,
    finish,
    first_existing_dir,
    read_text_file,
)
from pipeline.data.table import AnnotationTable, DataError, RepairReport

_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def split_ids(root: Path, split: str) -> list[str]:
    """Ids listed in ``root/ImageSets/Main/<split>.txt`` (first token per line: per-class lists work too)."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"split file not found: {path} (from data.train_split / data.test_split = {split!r})")
    ids, seen = [], {}
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] in seen:
            raise DataError(f"{path} line {n}: id {tokens[0]!r} already listed at line {seen[tokens[0]]}")
        seen[tokens[0]] = n
        ids.append(tokens[0])
    return ids


def _parse(path: Path) -> ET.Element:
    """The XML's root; its declared encoding is honoured (``<?xml ... encoding="ISO-8859-1"?>``), UTF-8 without."""
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise DataError(f"{path}: malformed XML at line {line} column {col}: {exc}{_encoding_hint(path)}") from None


def _encoding_hint(path: Path) -> str:
    data = path.read_bytes()
    if b"encoding=" in data[:200]:
        return ""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f" (byte {exc.start} is not UTF-8 and the XML declaration names no encoding: save the file as UTF-8 "
                'or declare its encoding, e.g. <?xml version="1.0" encoding="ISO-8859-1"?>)')
    return ""


def _number(text: str | None, path: Path, where: str) -> float:
    if text is None or not text.strip():
        raise DataError(f"{path} {where}: missing value")
    try:
        return float(text)  # "nan" parses: dropped and counted later, like any NaN box
    except ValueError:
        raise DataError(f"{path} {where}: not a number: {text!r}") from None


def _objects(xml: ET.Element, path: Path) -> list[tuple[str, float, float, float, float, bool, str]]:
    out = []
    for k, obj in enumerate(xml.findall("object"), 1):  # direct children: nested <part>s are not boxes
        where = f"object[{k}]"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{path} {where}: missing <name>")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path} {where} ({name}): missing <bndbox>")
        x1, y1, x2, y2 = (_number(box.findtext(c), path, f"{where}/bndbox/{c}") for c in _CORNERS)
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        out.append((name, x1, y1, x2, y2, difficult, where))
    return out


def _declared_size(xml: ET.Element, path: Path) -> tuple[int, int] | None:
    size = xml.find("size")
    if size is None:
        return None
    w, h = (size.findtext(k) for k in ("width", "height"))
    if not (w and w.strip()) or not (h and h.strip()):
        return None
    width, height = _number(w, path, "size/width"), _number(h, path, "size/height")
    return None if width == 0 or height == 0 else (int(width), int(height))


def _find_image(index: ImageIndex, filename: str, xml_stem: str) -> Path | None:
    if filename:
        name = PureWindowsPath(filename.strip()).name  # handles "C:\\...\\x.jpg" and "dir/x.jpg" alike
        if name in index.by_name:
            return index.by_name[name]
        found = index.find(Path(name).stem)  # right stem, other extension (e.g. re-encoded images)
        if found is not None:
            return found
    return index.find(xml_stem)


def _split(cfg: DataConfig, split: str, xmls: dict[str, Path]) -> tuple[list[str], Path | None]:
    """(ids, split file) of the requested split."""
    if split == "test":
        if not cfg.test_split:
            raise DataError("data.test_split is not set: there is no test split for this dataset")
        return split_ids(cfg.root, cfg.test_split), cfg.root / "ImageSets/Main" / f"{cfg.test_split}.txt"
    if cfg.train_split:
        return split_ids(cfg.root, cfg.train_split), cfg.root / "ImageSets/Main" / f"{cfg.train_split}.txt"
    held_out = set(split_ids(cfg.root, cfg.test_split)) if cfg.test_split else set()
    return [i for i in sorted(xmls) if i not in held_out], None


def read_voc(cfg: DataConfig, split: str, *, verify: bool = False) -> AnnotationTable:
    ann_dir = first_existing_dir(cfg.root, [cfg.annotations, "Annotations", "annotations"], "VOC annotation")
    img_dir = first_existing_dir(cfg.root, [cfg.images, "JPEGImages", "images"], "VOC image")
    xmls = {p.stem: p for p in sorted(ann_dir.iterdir()) if p.suffix.lower() == ".xml" and p.is_file()}
    ids, split_file = _split(cfg, split, xmls)
    missing = [i for i in ids if i not in xmls]
    if missing:
        raise DataError(
            f"{split_file}: {len(missing)} id(s) have no annotation file, e.g. {missing[0]!r}: "
            f"expected {ann_dir / missing[0]}.xml"
        )
    # Without data.classes the names come from every XML, so that train and test get the same indices.
    parsed = {i: _parse(xmls[i]) for i in (ids if cfg.classes else sorted(xmls))}
    objects = {i: _objects(xml, xmls[i]) for i, xml in parsed.items()}
    classes = list(cfg.classes) if cfg.classes else sorted({o[0] for objs in objects.values() for o in objs})

    index = ImageIndex(img_dir)
    report = RepairReport()
    image_rows, box_rows, declared_rows = [], [], []
    for image_id in ids:
        xml, path = parsed[image_id], xmls[image_id]
        filename = (xml.findtext("filename") or "").strip()
        image = _find_image(index, filename, image_id)
        if image is None:
            raise DataError(
                f"{path}: image file not found: expected {img_dir / (filename or image_id + '.jpg')} "
                f"(or {image_id} with any image extension)"
            )
        image_rows.append((image_id, str(image), ""))
        size = _declared_size(xml, path)
        if size is not None:
            declared_rows.append((image_id, size[0], size[1], str(path), "size"))
        for name, x1, y1, x2, y2, difficult, where in objects[image_id]:
            if difficult:
                report.add("kept_difficult", path, where, f"{name} marked difficult, kept as an ordinary box")
            box_rows.append((image_id, x1, y1, x2, y2, name, str(path), where))

    images = pd.DataFrame(image_rows, columns=["image_id", "path", "source"])
    boxes = pd.DataFrame(box_rows, columns=RAW_BOX_COLUMNS)
    if len(boxes):
        boxes["label"] = class_index(boxes.label, classes, boxes)
    declared = pd.DataFrame(declared_rows, columns=empty_declared().columns) if declared_rows else empty_declared()
    return finish(images, boxes, declared, classes, report, skip_bad=cfg.skip_bad_images, verify=verify)
