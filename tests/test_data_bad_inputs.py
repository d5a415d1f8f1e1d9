"""Bad input: every case is a clear DataError naming the file (and row), or a repair counted in the report with
its file and row, never a silent change. Each test writes its own small files into tmp_path."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from pipeline.config import DataConfig
from pipeline.data import DataError, load_dataset, read_image
from pipeline.data.images import image_size, probe_image, verify_image
from pipeline.data.readers._common import clean_boxes
from pipeline.data.table import RepairReport

GWD_COLUMNS = ["image_id", "width", "height", "bbox", "source"]


def noisy(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_image(path: Path, size: tuple[int, int] = (64, 48), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noisy(size).save(path, fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG"))
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def gwd(root: Path, rows: list[tuple], images=("a.jpg",), size=(64, 48), **kw) -> DataConfig:
    for name in images:
        write_image(root / "train" / name, size)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=GWD_COLUMNS[: len(rows[0])] if rows else GWD_COLUMNS).to_csv(
        root / "train.csv", index=False
    )
    return DataConfig(name="t", format="gwd_csv", root=root, **kw)


def voc(root: Path, objects: str, filename: str = "i1.jpg", size=(64, 48), image: bool = True) -> DataConfig:
    if image:
        write_image(root / "JPEGImages" / "i1.jpg", size)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    declared = "<size><width>64</width><height>48</height></size>"
    xml = f"<annotation><filename>{filename}</filename>{declared}{objects}</annotation>"
    (root / "Annotations" / "i1.xml").write_text(xml)
    return DataConfig(name="t", format="voc", root=root)


def voc_object(name: str, x1, y1, x2, y2) -> str:
    return (f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox></object>")


def coco(root: Path, images: list[dict], anns: list[dict], cats=({"id": 1, "name": "a"},), **kw) -> DataConfig:
    for img in images:
        if not (root / "images" / img["file_name"]).exists():
            write_image(root / "images" / img["file_name"])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": list(cats)})
    )
    return DataConfig(name="t", format="coco", root=root, **kw)


def yolo(root: Path, labels: dict[str, str], images=("a.jpg",)) -> DataConfig:
    for name in images:
        write_image(root / "images" / "train" / name, (100, 50))
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    return DataConfig(name="t", format="yolo", root=root, classes=["x", "y"])


# --------------------------------------------------------------------------------------------- images


def test_truncated_and_corrupt_images_raise_naming_the_file(tmp_path):
    for path in (truncate(write_image(tmp_path / "t.jpg")), truncate(write_image(tmp_path / "t.png"))):
        with pytest.raises(DataError, match=re.escape(str(path))):
            read_image(path)
        with pytest.raises(DataError, match=re.escape(str(path))):
            probe_image(path)  # header alone looks fine: the tail check catches the cut
        assert image_size(path) == (64, 48)  # header only, by design
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"\x00not an image at all" * 50)
    for fn in (read_image, image_size, verify_image):
        with pytest.raises(DataError, match=r"g\.jpg.*not a readable image"):
            fn(garbage)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.jpg")


def test_truncated_image_in_dataset_raises_or_is_skipped_and_counted(tmp_path):
    rows = [("a", 64, 48, "[1, 1, 5, 5]", "s"), ("a", 64, 48, "[2, 2, 5, 5]", "s"), ("b", 64, 48, "[1, 1, 5, 5]", "s")]
    c = gwd(tmp_path, rows, images=("a.jpg", "b.jpg", "c.jpg"))
    truncate(tmp_path / "train" / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg.*skip_bad_images"):
        load_dataset(c)
    table = load_dataset(c.model_copy(update={"skip_bad_images": True}))
    assert table.images.image_id.tolist() == ["b", "c"] and table.boxes.image_id.tolist() == ["b"]
    assert table.report.counts() == {"skipped_image": 1, "dropped_bad_image_box": 2}
    assert [r.row for r in table.report.repairs[1:]] == ["line 2", "line 3"]


def test_png_named_jpg_grayscale_rgba_palette_16bit_become_rgb(tmp_path):
    png_as_jpg = write_image(tmp_path / "p.jpg", fmt="PNG")
    assert read_image(png_as_jpg).shape == (48, 64, 3)
    Image.new("L", (4, 3), 77).save(tmp_path / "l.png")
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.save(tmp_path / "p.png")
    Image.fromarray(np.full((3, 4), 51400, np.uint16)).save(tmp_path / "g16.png")
    expected = {"l.png": [77, 77, 77], "rgba.png": [10, 20, 30], "p.png": [200, 0, 0], "g16.png": [200, 200, 200]}
    for name, rgb in expected.items():
        pixels = read_image(tmp_path / name)
        assert pixels.shape == (3, 4, 3) and pixels.dtype == np.uint8, name
        assert pixels[1, 1].tolist() == rgb, name
    # and through a reader: the PNG named .jpg is found by stem and read by content
    c = gwd(tmp_path / "d", [("p", 64, 48, "[1, 1, 5, 5]", "s")], images=())
    write_image(tmp_path / "d" / "train" / "p.jpg", fmt="PNG")
    assert len(load_dataset(c).boxes) == 1


def exif_rotated_jpeg(path: Path, size=(40, 20), orientation: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    noisy(size).save(path, "JPEG", exif=exif.tobytes())
    return path


def test_exif_orientation_applied_and_declared_size_checked(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "train" / "a.jpg")  # stored 40x20, displayed 20x40
    assert image_size(path) == (20, 40) and read_image(path).shape == (40, 20, 3)
    assert verify_image(path) == (20, 40)
    pd.DataFrame([("a", 40, 20, "[1, 1, 5, 5]", "s")], columns=GWD_COLUMNS).to_csv(tmp_path / "train.csv", index=False)
    c = DataConfig(name="t", format="gwd_csv", root=tmp_path)
    with pytest.raises(DataError, match=r"train\.csv line 2: declares image a as 40x20 .* is 20x40.*EXIF"):
        load_dataset(c)
    pd.DataFrame([("a", 20, 40, "[1, 1, 5, 5]", "s")], columns=GWD_COLUMNS).to_csv(tmp_path / "train.csv", index=False)
    assert load_dataset(c).images[["width", "height"]].values.tolist() == [[20, 40]]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_exif_orientation_matches_pil_exif_transpose(tmp_path, fmt):
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        exif = Image.Exif()
        exif[0x0112] = orientation
        options = {"quality": 100} if fmt == "JPEG" else {}
        noisy((6, 4), seed=orientation).save(path, fmt, exif=exif.tobytes(), **options)
        with Image.open(path) as img:
            expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        assert np.array_equal(read_image(path), expected), (fmt, orientation)
        assert image_size(path) == (expected.shape[1], expected.shape[0]), (fmt, orientation)


def test_declared_size_mismatch_names_file_and_row(tmp_path):
    c = gwd(tmp_path / "g", [("a", 64, 48, "[1, 1, 5, 5]", "s"), ("a", 64, 50, "[1, 1, 5, 5]", "s")])
    with pytest.raises(DataError, match=r"train\.csv line 3: declares image a as 64x50 but .*a\.jpg is 64x48"):
        load_dataset(c)
    c = voc(tmp_path / "v", voc_object("a", 1, 1, 5, 5), size=(60, 48))
    with pytest.raises(DataError, match=r"i1\.xml size: declares image i1 as 64x48 .* is 60x48"):
        load_dataset(c)
    c = coco(tmp_path / "c", [{"id": 1, "file_name": "x.jpg", "width": 32, "height": 48}], [])
    with pytest.raises(DataError, match=r"train\.json images\[0\]: declares image 1 as 32x48"):
        load_dataset(c)


# --------------------------------------------------------------------------------------------- missing files


def test_missing_image_names_annotation_and_expected_path(tmp_path):
    c = gwd(tmp_path / "g", [("a", 64, 48, "[1, 1, 5, 5]", "s"), ("zz", 64, 48, "[1, 1, 5, 5]", "s")])
    with pytest.raises(DataError, match=r"train\.csv: 1 row.*line 3 image 'zz': expected .*train/zz\.jpg"):
        load_dataset(c)
    c = voc(tmp_path / "v", "", filename="other.jpg", image=False)
    (tmp_path / "v" / "JPEGImages").mkdir()
    with pytest.raises(DataError, match=r"i1\.xml: image file not found: expected .*JPEGImages/other\.jpg"):
        load_dataset(c)
    c = coco(tmp_path / "c", [{"id": 1, "file_name": "x.jpg"}], [])
    (tmp_path / "c" / "images" / "x.jpg").unlink()
    with pytest.raises(DataError, match=r"train\.json: images\[0\] \(id 1\): image file 'x\.jpg' not found"):
        load_dataset(c)
    c = yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.1 0.1\n", "b": "0 0.5 0.5 0.1 0.1\n"})
    with pytest.raises(DataError, match=r"labels/train/b\.txt has no image .*images/train/b\."):
        load_dataset(c)
    c = voc(tmp_path / "s", "")
    (tmp_path / "s" / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "s" / "ImageSets" / "Main" / "tv.txt").write_text("i1\ni9\n")
    with pytest.raises(DataError, match=r"tv\.txt: 1 id.*'i9': expected .*Annotations/i9\.xml"):
        load_dataset(c.model_copy(update={"train_split": "tv"}))


# --------------------------------------------------------------------------------------------- box repairs


def test_box_repairs_are_counted_with_file_and_row(tmp_path):
    rows = [
        ("a", 64, 48, "[-5, 10, 20, 20]", "s"),  # partly outside: clipped
        ("a", 64, 48, "[10, 10, 0, 5]", "s"),  # zero width
        ("a", 64, 48, "[10, 10, -5, 5]", "s"),  # inverted
        ("a", 64, 48, "[nan, 1, 2, 3]", "s"),  # NaN
        ("a", 64, 48, "[100, 100, 5, 5]", "s"),  # entirely outside
        ("a", 64, 48, "[1, 1, 2, 2]", "s"),  # fine
    ]
    table = load_dataset(gwd(tmp_path, rows))
    kinds = [(r.kind, r.row) for r in table.report.repairs]
    assert kinds == [("clipped", "line 2"), ("dropped_zero_area", "line 3"), ("dropped_inverted", "line 4"),
                     ("dropped_nan", "line 5"), ("dropped_outside", "line 6")]
    assert all(r.file.endswith("train.csv") for r in table.report.repairs)
    assert "-> [0, 10, 15, 30]" in table.report.repairs[0].detail
    assert table.boxes[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[0, 10, 15, 30], [1, 1, 3, 3]]
    table.validate()


def test_box_repairs_in_voc_coco_and_yolo(tmp_path):
    c = voc(tmp_path / "v", voc_object("a", 1, 1, 5, 5) + voc_object("a", 9, 1, 5, 5) + voc_object("a", "nan", 1, 2, 2))
    table = load_dataset(c)
    assert [(r.kind, r.row) for r in table.report.repairs] == [("dropped_inverted", "object[2]"),
                                                               ("dropped_nan", "object[3]")]
    anns = [{"image_id": 1, "category_id": 1, "bbox": [60, 40, 10, 10]}, {"image_id": 1, "category_id": 1,
                                                                          "bbox": [1, 1, None, 3]}]
    table = load_dataset(coco(tmp_path / "c", [{"id": 1, "file_name": "x.jpg"}], anns))
    assert [(r.kind, r.row) for r in table.report.repairs] == [("clipped", "annotations[0]"),
                                                               ("dropped_nan", "annotations[1]")]
    table = load_dataset(yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n1 1.5 1.5 0.2 0.2\n0 0.5 0.5 0 0.1\n"}))
    assert [(r.kind, r.row) for r in table.report.repairs] == [("dropped_outside", "line 2"),
                                                               ("dropped_zero_area", "line 3")]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(*[st.one_of(st.floats(-50, 150), st.just(float("nan")))] * 4), max_size=30))
def test_clean_boxes_property(raw):
    """Whatever comes in: every kept box is valid and inside the image, and every other box is in the report."""
    boxes = pd.DataFrame(
        [("a", *b, 0, "f.csv", f"line {i + 2}") for i, b in enumerate(raw)],
        columns=["image_id", "x1", "y1", "x2", "y2", "label", "file", "row"],
    )
    report = RepairReport()
    out = clean_boxes(boxes, pd.DataFrame({"image_id": ["a"], "width": [100], "height": [80]}), report)
    dropped = sum(1 for r in report.repairs if r.kind.startswith("dropped"))
    assert len(out) + dropped == len(raw)
    assert ((out.x2 > out.x1) & (out.y2 > out.y1)).all()
    assert ((out.x1 >= 0) & (out.y1 >= 0) & (out.x2 <= 100) & (out.y2 <= 80)).all()
    assert all(r.file == "f.csv" and r.row.startswith("line ") for r in report.repairs)


# --------------------------------------------------------------------------------------------- classes, duplicates


def test_class_not_in_configured_list(tmp_path):
    rows = [("a", 64, 48, "[1, 1, 5, 5]", "s", "cat"), ("a", 64, 48, "[1, 1, 5, 5]", "s", "cow")]
    write_image(tmp_path / "g" / "train" / "a.jpg")
    pd.DataFrame(rows, columns=GWD_COLUMNS + ["label"]).to_csv(tmp_path / "g" / "train.csv", index=False)
    c = DataConfig(name="t", format="gwd_csv", root=tmp_path / "g", classes=["cat", "dog"])
    with pytest.raises(DataError, match=r"train\.csv line 3: 'cow'"):
        load_dataset(c)
    pd.DataFrame([rows[0], rows[1][:5] + ("",)], columns=GWD_COLUMNS + ["label"]).to_csv(
        tmp_path / "g" / "train.csv", index=False
    )
    with pytest.raises(DataError, match=r"train\.csv: 1 row\(s\) with an empty label: line 3"):
        load_dataset(c.model_copy(update={"classes": None}))
    c = voc(tmp_path / "v", voc_object("cat", 1, 1, 5, 5) + voc_object("cow", 1, 1, 5, 5))
    with pytest.raises(DataError, match=r"i1\.xml object\[2\]: 'cow'"):
        load_dataset(c.model_copy(update={"classes": ["cat"]}))
    c = coco(tmp_path / "c", [{"id": 1, "file_name": "x.jpg"}], [], cats=[{"id": 1, "name": "cow"}], classes=["cat"])
    with pytest.raises(DataError, match=r"categories \[\(1, 'cow'\)\] are not in the class list"):
        load_dataset(c)
    ann = {"image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}
    c = coco(tmp_path / "c2", [{"id": 1, "file_name": "x.jpg"}], [ann])
    with pytest.raises(DataError, match=r"annotations\[0\]: category_id 9 is not in categories"):
        load_dataset(c)
    with pytest.raises(DataError, match=r"a\.txt line 1: class '2' is not an index"):
        load_dataset(yolo(tmp_path / "y", {"a": "2 0.5 0.5 0.1 0.1\n"}))


def test_duplicate_image_ids(tmp_path):
    c = gwd(tmp_path / "g", [("a", 64, 48, "[1, 1, 5, 5]", "s")], images=("a.jpg", "a.png"))
    with pytest.raises(DataError, match=r"a\.jpg and a\.png"):
        load_dataset(c)
    images = [{"id": 1, "file_name": "x.jpg"}, {"id": 1, "file_name": "y.jpg"}]
    with pytest.raises(DataError, match=r"images\[1\]: duplicate image id '1'"):
        load_dataset(coco(tmp_path / "c", images, []))
    images = [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "x.jpg"}]
    with pytest.raises(DataError, match=r"images\[1\]: file 'x\.jpg' is also images\[0\]"):
        load_dataset(coco(tmp_path / "c2", images, []))
    cats = [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]
    with pytest.raises(DataError, match=r"categories\[1\]: duplicate category id 1"):
        load_dataset(coco(tmp_path / "c3", [{"id": 1, "file_name": "x.jpg"}], [], cats=cats))
    with pytest.raises(DataError, match=r"a\.jpg and a\.png"):
        load_dataset(yolo(tmp_path / "y", {}, images=("a.jpg", "a.png")))


# --------------------------------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(
    "bbox, pattern",
    [("[1, 2, 3]", r"line 2 bbox='\[1, 2, 3\]'"), ("abc", r"line 2 bbox='abc'"), ("", r"line 2 bbox=''")],
)
def test_malformed_bbox_names_file_and_line(tmp_path, bbox, pattern):
    c = gwd(tmp_path, [("a", 64, 48, bbox, "s")])
    with pytest.raises(DataError, match=r"train\.csv: 1 row\(s\) with a malformed bbox.*" + pattern):
        load_dataset(c)


def test_malformed_csv_columns_and_numbers(tmp_path):
    write_image(tmp_path / "train" / "a.jpg")
    c = DataConfig(name="t", format="gwd_csv", root=tmp_path)
    pd.DataFrame({"image_id": ["a"], "box": ["[1, 1, 2, 2]"]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) \['width', 'height', 'bbox'\]"):
        load_dataset(c)
    bad_width = pd.DataFrame([("a", "wide", 48, "[1, 1, 2, 2]", "s")], columns=GWD_COLUMNS)
    bad_width.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train\.csv: 1 row\(s\) with a width that is not a positive number: line 2"):
        load_dataset(c)
    (tmp_path / "train.csv").write_text('image_id,width,height,bbox,source\na,64,48,"[1, 1, 2, 2]",s,extra,cells\n')
    with pytest.raises(DataError, match=r"train\.csv: not a readable CSV"):
        load_dataset(c)
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(DataError, match=r"train\.csv: not a readable CSV"):
        load_dataset(c)
    pd.DataFrame([("a", 64, 48, "[1, 1, 2, 2]", "s1"), ("a", 64, 48, "[1, 1, 2, 2]", "s2")],
                 columns=GWD_COLUMNS).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"image a has several sources .*lines 2, 3"):
        load_dataset(c)


def test_malformed_xml_and_voc_fields(tmp_path):
    c = voc(tmp_path / "a", "<object><name>a</name>")  # unclosed
    with pytest.raises(DataError, match=r"i1\.xml: malformed XML at line 1 column \d+"):
        load_dataset(c)
    c = voc(tmp_path / "b", voc_object("a", 1, 1, "five", 5))
    with pytest.raises(DataError, match=r"i1\.xml object\[1\]/bndbox/xmax: not a number: 'five'"):
        load_dataset(c)
    c = voc(tmp_path / "c", "<object><name>a</name></object>")
    with pytest.raises(DataError, match=r"i1\.xml object\[1\] \(a\): missing <bndbox>"):
        load_dataset(c)


def test_malformed_json_and_coco_fields(tmp_path):
    c = coco(tmp_path / "a", [{"id": 1, "file_name": "x.jpg"}], [])
    (tmp_path / "a" / "annotations" / "train.json").write_text('{"images": [\n  {"id": 1,,}]}')
    with pytest.raises(DataError, match=r"train\.json: not valid JSON at line 2 column"):
        load_dataset(c)
    (tmp_path / "a" / "annotations" / "train.json").write_text('{"images": {}, "categories": []}')
    with pytest.raises(DataError, match=r"train\.json: field 'images' must be a list"):
        load_dataset(c)
    for bbox in ([1, 2, 3], "1,2,3,4", [1, 2, "x", 4]):
        c = coco(tmp_path / "b", [{"id": 1, "file_name": "x.jpg"}], [{"image_id": 1, "category_id": 1, "bbox": bbox}])
        with pytest.raises(DataError, match=r"annotations\[0\]\.bbox must be \[x, y, w, h\] numbers"):
            load_dataset(c)
    ann = {"image_id": 7, "category_id": 1, "bbox": [1, 1, 2, 2]}
    c = coco(tmp_path / "c", [{"id": 1, "file_name": "x.jpg"}], [ann])
    with pytest.raises(DataError, match=r"annotations\[0\]: image_id 7 is not in images"):
        load_dataset(c)
    c = coco(tmp_path / "d", [{"file_name": "x.jpg"}], [])
    with pytest.raises(DataError, match=r"images\[0\] lacks field 'id'"):
        load_dataset(c)


def test_malformed_yolo_lines(tmp_path):
    with pytest.raises(DataError, match=r"a\.txt line 2: expected 'cls cx cy w h' \(5 values\), got 3"):
        load_dataset(yolo(tmp_path / "a", {"a": "0 0.5 0.5 0.1 0.1\n0 0.5 0.5\n"}))
    with pytest.raises(DataError, match=r"a\.txt line 1: not numbers"):
        load_dataset(yolo(tmp_path / "b", {"a": "0 0.5 x 0.1 0.1\n"}))


def test_groups_csv_problems(tmp_path):
    c = voc(tmp_path, voc_object("a", 1, 1, 5, 5))
    c = c.model_copy(update={"groups_csv": "groups.csv"})
    with pytest.raises(DataError, match="groups CSV not found"):
        load_dataset(c)
    pd.DataFrame({"image_id": ["i1", "i1"], "group": ["p1", "p2"]}).to_csv(tmp_path / "groups.csv", index=False)
    with pytest.raises(DataError, match=r"image i1 has several groups \(lines 2, 3\)"):
        load_dataset(c)
    pd.DataFrame({"id": ["i1"], "group": ["p1"]}).to_csv(tmp_path / "groups.csv", index=False)
    with pytest.raises(DataError, match="expected columns image_id,group"):
        load_dataset(c)


# --------------------------------------------------------------------------------------------- encodings


def test_text_files_not_in_utf8_name_the_file_and_line(tmp_path):
    """Finding 1: a VOC split list or YOLO label file in Latin-1 ended in a UnicodeDecodeError traceback."""
    c = voc(tmp_path / "v", voc_object("a", 1, 1, 5, 5))
    split = tmp_path / "v" / "ImageSets" / "Main" / "tv.txt"
    split.parent.mkdir(parents=True)
    split.write_bytes("i1\n# épis\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"tv\.txt: not UTF-8 text \(line 2, byte 5"):
        load_dataset(c.model_copy(update={"train_split": "tv"}))
    split.write_bytes("i1\n".encode("utf-16"))  # a BOM declares the encoding: read in it
    assert load_dataset(c.model_copy(update={"train_split": "tv"})).images.image_id.tolist() == ["i1"]
    c = yolo(tmp_path / "y", {"a": ""})
    label = "0 0.5 0.5 0.1 0.1\n0 0,5 0,5 0,1 0,1 é\n".encode("cp1252")
    (tmp_path / "y" / "labels" / "train" / "a.txt").write_bytes(label)
    with pytest.raises(DataError, match=r"labels/train/a\.txt: not UTF-8 text \(line 2"):
        load_dataset(c)
    c = gwd(tmp_path / "g", [("a", 64, 48, "[1, 1, 5, 5]", "blé")])
    (tmp_path / "g" / "train.csv").write_bytes((tmp_path / "g" / "train.csv").read_text().encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.csv: not UTF-8 text \(line 2"):
        load_dataset(c)
    c = voc(tmp_path / "x", voc_object("épi", 1, 1, 5, 5))
    xml = tmp_path / "x" / "Annotations" / "i1.xml"
    xml.write_bytes(xml.read_text().encode("latin-1"))
    with pytest.raises(DataError, match=r"i1\.xml: malformed XML .*not UTF-8 and the XML declaration names no enc"):
        load_dataset(c)
    xml.write_bytes(b'<?xml version="1.0" encoding="ISO-8859-1"?>' + xml.read_bytes())  # declared: read in it
    assert load_dataset(c).classes == ["épi"]


# --------------------------------------------------------------------------------------------- corrupt pixels


def corrupt_scan(path: Path) -> Path:
    """Overwrite the middle of a JPEG's entropy-coded data: every marker intact, the pixels garbage."""
    data = bytearray(path.read_bytes())
    start, end = data.find(b"\xff\xda"), data.rfind(b"\xff\xd9")
    middle = (start + end) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


def test_jpeg_with_corrupt_scan_data_is_an_error_like_a_truncated_one(tmp_path):
    """Finding 4: libjpeg warns "Corrupt JPEG data" and PIL ignores it: garbage pixels, ``repairs: none`` even with
    --verify. The decoder's report is now an error (or, with skip_bad_images, a counted skip)."""
    path = corrupt_scan(write_image(tmp_path / "train" / "a.jpg", (64, 48)))
    with Image.open(path) as img:
        img.load()  # PIL alone decodes it without complaint: the case this test is about
    assert image_size(path) == (64, 48) and probe_image(path) == (64, 48)  # header and tail are intact
    for fn in (read_image, verify_image):
        with pytest.raises(DataError, match=r"a\.jpg: corrupt or truncated image \(libjpeg: Corrupt JPEG data"):
            fn(path)
    c = gwd(tmp_path, [("a", 64, 48, "[1, 1, 5, 5]", "s"), ("b", 64, 48, "[1, 1, 5, 5]", "s")], images=("b.jpg",))
    assert len(load_dataset(c).images) == 2  # without --verify the header read cannot see it
    with pytest.raises(DataError, match=r"1 unreadable image.*a\.jpg: corrupt"):
        load_dataset(c, verify_images=True)
    table = load_dataset(c.model_copy(update={"skip_bad_images": True}), verify_images=True)
    assert table.images.image_id.tolist() == ["b"]
    assert table.report.counts() == {"skipped_image": 1, "dropped_bad_image_box": 1}


def test_jpeg_pixels_are_pils_for_every_layout(tmp_path):
    """The strict decoder is libjpeg-turbo as in PIL: same pixels for every subsampling, progressive, grayscale;
    CMYK goes through PIL's conversion."""
    for n, (mode, options) in enumerate([("RGB", {}), ("RGB", {"subsampling": 0}), ("RGB", {"subsampling": 1}),
                                         ("RGB", {"progressive": True, "quality": 40}), ("L", {}), ("CMYK", {})]):
        path = tmp_path / f"{n}.jpg"
        noisy((37, 23), seed=n).convert(mode).save(path, "JPEG", **options)
        with Image.open(path) as img:
            assert np.array_equal(read_image(path), np.asarray(img.convert("RGB"))), (mode, options)


# --------------------------------------------------------------------------------------------- repairs too big


def test_yolo_labels_in_pixels_are_an_error_that_says_so(tmp_path):
    """Finding 5: pixel coordinates in YOLO labels dropped every box as outside, exit 0: a dataset of nothing."""
    labels = {"a": "0 50 25 20 10\n1 30 20 8 8\n", "b": "0 70 30 10 10\n"}
    c = yolo(tmp_path, labels, images=("a.jpg", "b.jpg"))
    with pytest.raises(DataError, match=r"3 of 3 boxes \(100%\) would be dropped \(dropped_outside 3\).*a\.txt "
                                        r"line 1.*up to 70\).*look like pixel coordinates"):
        load_dataset(c)


def test_a_repair_that_drops_most_boxes_is_an_error_and_a_few_stay_repairs(tmp_path):
    rows = [("a", 64, 48, f"[{x}, 1, 5, 5]", "s") for x in range(100, 115)]  # 15 outside the 64 px image...
    rows += [("a", 64, 48, f"[{x}, 1, 5, 5]", "s") for x in range(1, 11)]  # ...of 25 boxes
    with pytest.raises(DataError, match=r"15 of 25 boxes \(60%\) would be dropped.*train\.csv line 2.*coordinate "
                                        r"convention"):
        load_dataset(gwd(tmp_path / "most", rows))
    table = load_dataset(gwd(tmp_path / "some", rows[5:]))  # 10 of 20: half is not most
    assert table.report.counts() == {"dropped_outside": 10} and len(table.boxes) == 10


def test_identical_duplicate_boxes_are_dropped_and_counted(tmp_path):
    """Finding 10: identical boxes were kept twice silently."""
    rows = [("a", 64, 48, "[1, 1, 5, 5]", "s"), ("a", 64, 48, "[2, 2, 5, 5]", "s"), ("a", 64, 48, "[1, 1, 5, 5]", "s"),
            ("b", 64, 48, "[1, 1, 5, 5]", "s"), ("a", 64, 48, "[1.0, 1, 5, 5.0]", "s")]
    table = load_dataset(gwd(tmp_path / "g", rows, images=("a.jpg", "b.jpg")))
    dups = [r for r in table.report.repairs if r.kind == "dropped_duplicate"]
    assert [(r.row, r.file.endswith("train.csv")) for r in dups] == [("line 4", True), ("line 6", True)]
    assert "identical to an earlier box (line 2, label 0)" in dups[0].detail
    assert len(table.boxes) == 3  # a twice is once; b's identical box is another image's
    c = voc(tmp_path / "v", voc_object("a", 1, 1, 5, 5) + voc_object("b", 1, 1, 5, 5) + voc_object("a", 1, 1, 5, 5))
    table = load_dataset(c)  # another class at the same place is another object
    assert [(r.kind, r.row) for r in table.report.repairs] == [("dropped_duplicate", "object[3]")]
    assert len(table.boxes) == 2


# --------------------------------------------------------------------------------------------- parsers: properties


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=8))
def test_bbox_string_parser_gives_boxes_or_a_data_error(bboxes):
    """Any bbox cell: four floats per row, or a DataError naming the file -- never another exception."""
    from pipeline.data.readers.gwd import _parse_boxes

    df = pd.DataFrame({"bbox": pd.Series(bboxes, dtype=str), "row": [f"line {i + 2}" for i in range(len(bboxes))]})
    try:
        out = _parse_boxes(df, Path("f.csv"))
    except DataError as exc:
        assert "f.csv" in str(exc) and "malformed bbox" in str(exc)
        return
    assert out.shape == (len(bboxes), 4) and out.dtypes.eq(np.float64).all()


csv_like = st.one_of(
    st.binary(max_size=300),
    st.lists(st.lists(st.one_of(st.text(max_size=12), st.sampled_from(['"', ",", "\n", "[1, 2, 3, 4]", "NA", "64"])),
                      max_size=7), max_size=6).map(lambda rows: "\n".join(",".join(r) for r in rows).encode()),
    st.text(max_size=200).map(lambda t: ("image_id,width,height,bbox,label\n" + t).encode("utf-8")),
)


@settings(max_examples=100, deadline=None)
@given(csv_like)
def test_csv_parser_gives_a_table_or_a_data_error(tmp_path_factory, data):
    """Any bytes as train.csv, a held-out labels CSV or a groups CSV: a table or a DataError naming the file."""
    from pipeline.data.readers.gwd import _read_csv, read_gwd_labels

    root = tmp_path_factory.mktemp("csv")
    write_image(root / "train" / "a.jpg")
    (root / "train.csv").write_bytes(data)
    for load in (lambda: _read_csv(root / "train.csv"), lambda: read_gwd_labels(root / "train.csv"),
                 lambda: load_dataset(DataConfig(name="t", format="gwd_csv", root=root)),
                 lambda: load_dataset(DataConfig(name="t", format="gwd_csv", root=root, groups_csv="train.csv"))):
        try:
            load()
        except DataError as exc:
            assert "train.csv" in str(exc)
