"""The four readers on small well-formed datasets written into tmp_path, the groups CSV, the synthetic dataset,
the ``check`` command, and the real BCCD data when it is present."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.config import DataConfig, SyntheticConfig
from pipeline.data import AnnotationTable, DataError, load_dataset, read_image, summarize
from pipeline.data.__main__ import main

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"  # beside the checkout, read in place


def write_image(path: Path, size: tuple[int, int] = (64, 48), colour=(90, 120, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def gwd_dataset(root: Path, rows: list[tuple], images: dict[str, tuple[int, int]], **columns) -> Path:
    for name, size in images.items():
        write_image(root / "train" / name, size)
    df = pd.DataFrame(rows, columns=["image_id", "width", "height", "bbox", "source", *columns.get("extra", [])])
    df.to_csv(root / "train.csv", index=False)
    return root


def cfg(root: Path, fmt: str = "gwd_csv", **kw) -> DataConfig:
    return DataConfig(name="t", format=fmt, root=root, **kw)


# --------------------------------------------------------------------------------------------- GWD CSV


def test_gwd_boxes_empty_images_and_sources(tmp_path):
    rows = [
        ("a", 64, 48, "[1.0, 2.0, 10.0, 20.0]", "usask_1"),
        ("a", 64, 48, "[30, 5, 4, 4]", "usask_1"),
        ("b", 64, 48, "[0, 0, 64, 48]", "arvalis_2"),
    ]
    gwd_dataset(tmp_path, rows, {"a.jpg": (64, 48), "b.png": (64, 48), "c.jpg": (64, 48)})
    table = load_dataset(cfg(tmp_path))
    assert isinstance(table, AnnotationTable) and table.classes == ["wheat"]
    images = table.images.set_index("image_id")
    assert list(images.index) == ["a", "b", "c"]
    assert images.loc["c", "source"] == "" and images.loc["a", "source"] == "usask_1"
    assert images.loc["b", "path"].endswith("b.png") and (images.width == 64).all()
    a = table.boxes[table.boxes.image_id == "a"]
    assert a[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[1, 2, 11, 22], [30, 5, 34, 9]]
    assert (table.boxes.label == 0).all() and not table.report.repairs
    assert table.boxes_by_image()["c"].shape == (0, 5)


def test_gwd_label_column_with_and_without_configured_classes(tmp_path):
    rows = [("a", 64, 48, "[1, 2, 10, 20]", "s", "ring"), ("a", 64, 48, "[3, 2, 10, 20]", "s", "disc")]
    gwd_dataset(tmp_path, rows, {"a.jpg": (64, 48)}, extra=["label"])
    table = load_dataset(cfg(tmp_path, classes=["disc", "square", "ring"]))
    assert table.classes == ["disc", "square", "ring"] and table.boxes.label.tolist() == [2, 0]
    table = load_dataset(cfg(tmp_path))  # sorted names found in the CSV
    assert table.classes == ["disc", "ring"] and table.boxes.label.tolist() == [1, 0]


def test_gwd_test_split_folder_hidden_labels_and_sample_submission(tmp_path):
    gwd_dataset(tmp_path, [("a", 64, 48, "[1, 2, 10, 20]", "s")], {"a.jpg": (64, 48)})
    write_image(tmp_path / "test" / "t1.jpg")
    write_image(tmp_path / "test" / "t2.jpg")
    pd.DataFrame({"image_id": ["t1", "t2"], "PredictionString": ""}).to_csv(tmp_path / "sample_submission.csv")
    table = load_dataset(cfg(tmp_path), "test")
    assert sorted(table.images.image_id) == ["t1", "t2"] and table.boxes.empty
    pd.DataFrame([("t2", 64, 48, "[5, 5, 10, 10]", "s")], columns=["image_id", "width", "height", "bbox", "source"]
                 ).to_csv(tmp_path / "test_labels.csv", index=False)
    table = load_dataset(cfg(tmp_path), "test")
    assert table.boxes.image_id.tolist() == ["t2"] and len(table.images) == 2
    pd.DataFrame({"image_id": ["t1", "t3"]}).to_csv(tmp_path / "sample_submission.csv")
    with pytest.raises(DataError, match="t3"):
        load_dataset(cfg(tmp_path), "test")


def test_gwd_many_boxes_load_every_box(tmp_path):
    """50k boxes over 200 images: every box is kept or counted (how fast: benchmarks/data_load.py)."""
    rng = np.random.default_rng(0)
    n_images, n_boxes = 200, 50_000
    for i in range(n_images):
        write_image(tmp_path / "train" / f"img{i}.png", (256, 256))
    ids = rng.integers(0, n_images, n_boxes)
    xy = rng.uniform(0, 200, (n_boxes, 2)).round(1)
    wh = rng.uniform(1, 50, (n_boxes, 2)).round(1)
    bbox = [f"[{x}, {y}, {w}, {h}]" for (x, y), (w, h) in zip(xy, wh)]
    pd.DataFrame({"image_id": [f"img{i}" for i in ids], "width": 256, "height": 256, "bbox": bbox,
                  "source": "s"}).to_csv(tmp_path / "train.csv", index=False)
    table = load_dataset(cfg(tmp_path))
    assert len(table.boxes) + table.report.counts().get("dropped_outside", 0) == n_boxes


# --------------------------------------------------------------------------------------------- COCO


def coco_dataset(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    for img in images:
        write_image(root / "images" / img["file_name"], (img.get("width") or 64, img.get("height") or 48))
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_classes_by_id_empty_images_and_crowd(tmp_path):
    images = [{"id": 1, "file_name": "x.jpg", "width": 64, "height": 48}, {"id": 2, "file_name": "y.jpg"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 20]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5]},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1},
    ]
    coco_dataset(tmp_path, images, anns, [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}])
    table = load_dataset(cfg(tmp_path, "coco", images="images"))
    assert table.classes == ["cat", "dog"]  # ordered by category id
    assert table.images.image_id.tolist() == ["1", "2"] and table.images.width.tolist() == [64, 64]
    assert table.boxes.label.tolist() == [1, 0]
    assert table.boxes.iloc[0][["x1", "y1", "x2", "y2"]].tolist() == [1, 2, 11, 22]
    assert table.report.counts() == {"dropped_crowd": 1}
    assert table.report.repairs[0].row == "annotations[2]"
    table = load_dataset(cfg(tmp_path, "coco", images="images", classes=["dog", "cat", "bird"]))
    assert table.classes == ["dog", "cat", "bird"] and table.boxes.label.tolist() == [0, 1]


def test_coco_test_json(tmp_path):
    coco_dataset(tmp_path, [{"id": 1, "file_name": "x.jpg"}], [], [{"id": 1, "name": "a"}])
    (tmp_path / "annotations" / "test.json").write_text(
        json.dumps({"images": [{"id": 5, "file_name": "x.jpg"}], "categories": [{"id": 1, "name": "a"}]})
    )
    with pytest.raises(DataError, match="test_json"):
        load_dataset(cfg(tmp_path, "coco"), "test")
    table = load_dataset(cfg(tmp_path, "coco", test_json="annotations/test.json"), "test")
    assert table.images.image_id.tolist() == ["5"] and table.boxes.empty


# --------------------------------------------------------------------------------------------- VOC


def voc_xml(filename: str, objects: list[tuple], size=(64, 48), difficult: set[int] = frozenset()) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(k in difficult)}</difficult><bndbox><xmin>{a}</xmin>"
        f"<ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for k, (n, a, b, c, d) in enumerate(objects)
    )
    sz = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>{filename}</filename>{sz}{objs}</annotation>"


def voc_dataset(root: Path, items: dict[str, list[tuple]], splits: dict[str, list[str]] | None = None) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for stem, objects in items.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", objects))
    for name, ids in (splits or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_splits_classes_and_coordinates(tmp_path):
    items = {"i1": [("dog", 1, 2, 30, 40), ("cat", 0, 0, 64, 48)], "i2": [("cat", 5, 5, 9, 9)], "i3": []}
    voc_dataset(tmp_path, items, {"trainval": ["i1", "i3"], "test": ["i2"]})
    train = load_dataset(cfg(tmp_path, "voc", train_split="trainval", test_split="test"))
    assert train.classes == ["cat", "dog"]  # sorted names over every XML
    assert train.images.image_id.tolist() == ["i1", "i3"]
    assert train.boxes[["x1", "y1", "x2", "y2", "label"]].to_numpy().tolist() == [[1, 2, 30, 40, 1], [0, 0, 64, 48, 0]]
    test = load_dataset(cfg(tmp_path, "voc", train_split="trainval", test_split="test"), "test")
    assert test.images.image_id.tolist() == ["i2"] and len(test.boxes) == 1  # hidden labels kept
    # no train_split: every XML except the test ids
    rest = load_dataset(cfg(tmp_path, "voc", test_split="test", classes=["dog", "cat"]))
    assert rest.images.image_id.tolist() == ["i1", "i3"] and rest.boxes.label.tolist() == [0, 1]
    with pytest.raises(DataError, match="test_split"):
        load_dataset(cfg(tmp_path, "voc"), "test")


def test_voc_difficult_kept_and_counted_filename_fallback(tmp_path):
    (tmp_path / "annotations").mkdir()
    write_image(tmp_path / "images" / "pic.png")
    xml = voc_xml("pic.jpg", [("a", 1, 1, 5, 5), ("a", 2, 2, 9, 9)], difficult={1})  # filename says .jpg
    (tmp_path / "annotations" / "pic.xml").write_text(xml)
    table = load_dataset(cfg(tmp_path, "voc"))  # configured folders absent: images/ and annotations/ found
    assert table.images.path[0].endswith("pic.png") and len(table.boxes) == 2
    assert table.report.counts() == {"kept_difficult": 1} and table.report.repairs[0].row == "object[2]"


# --------------------------------------------------------------------------------------------- YOLO


def test_yolo_normalised_boxes_and_empty_images(tmp_path):
    write_image(tmp_path / "images" / "train" / "a.jpg", (100, 50))
    write_image(tmp_path / "images" / "train" / "b.png", (100, 50))
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.1 0.1\n")
    (tmp_path / "labels" / "train" / "classes.txt").write_text("x\ny\n")  # labelImg's class list: not labels
    table = load_dataset(cfg(tmp_path, "yolo", classes=["x", "y"]))
    assert table.images.image_id.tolist() == ["a", "b"]
    assert np.allclose(table.boxes[["x1", "y1", "x2", "y2"]].to_numpy(), [[40, 15, 60, 35], [5, 2.5, 15, 7.5]])
    assert table.boxes.label.tolist() == [1, 0]
    with pytest.raises(DataError, match="classes is required"):
        load_dataset(cfg(tmp_path, "yolo"))
    write_image(tmp_path / "images" / "test" / "t.jpg")
    assert load_dataset(cfg(tmp_path, "yolo", classes=["x", "y"]), "test").images.image_id.tolist() == ["t"]


# --------------------------------------------------------------------------------------------- shared


def test_groups_csv(tmp_path):
    voc_dataset(tmp_path, {"i1": [("a", 1, 1, 5, 5)], "i2": [], "i3": []})
    pd.DataFrame({"image_id": ["i1", "i2"], "group": ["p1", "p1"]}).to_csv(tmp_path / "groups.csv", index=False)
    table = load_dataset(cfg(tmp_path, "voc", groups_csv="groups.csv"))
    assert table.images.group.tolist() == ["p1", "p1", ""]
    pd.DataFrame({"image_id": ["i1", "zz"], "group": ["p1", "p2"]}).to_csv(tmp_path / "groups.csv", index=False)
    with pytest.raises(DataError, match=r"groups.csv.*line 3: 'zz'"):
        load_dataset(cfg(tmp_path, "voc", groups_csv="groups.csv"))


def test_synthetic_dataset_is_generated_and_read(tmp_path):
    synthetic = SyntheticConfig(seed=1, n_train=6, n_test=3, image_size=64, max_objects=6)
    c = cfg(tmp_path / "demo", classes=synthetic.classes, synthetic=synthetic)
    train, test = load_dataset(c), load_dataset(c, "test")
    assert len(train.images) == 6 and len(test.images) == 3
    assert train.classes == synthetic.classes and set(train.images.source) - {""}


def test_read_image_returns_writable_rgb(tmp_path):
    pixels = read_image(write_image(tmp_path / "a.png", (7, 5), (1, 2, 3)))
    assert pixels.shape == (5, 7, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable
    assert pixels[0, 0].tolist() == [1, 2, 3]


# --------------------------------------------------------------------------------------------- check CLI


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "t", **data}}))
    return path


def test_check_prints_summary_and_repairs(tmp_path, capsys):
    voc_dataset(tmp_path / "d", {"i1": [("a", 1, 1, 5, 5), ("a", 3, 3, 3, 9)], "i2": []})
    config = write_config(tmp_path, {"format": "voc", "root": str(tmp_path / "d")})
    assert main(["check", "--config", str(config), "--verify"]) == 0
    out = capsys.readouterr().out
    for text in ("2 images (1 empty), 1 boxes, 1 classes", "most common: 64x48 (2)", "dropped_zero_area        1",
                 "i1.xml object[2]"):
        assert text in out, out


def test_check_bad_input_exits_1_without_traceback(tmp_path, capsys):
    voc_dataset(tmp_path / "d", {"i1": [("a", 1, 1, 5, 5)]})
    config = write_config(tmp_path, {"format": "voc", "root": str(tmp_path / "d")})
    assert main(["check", "--config", str(config), "--set", "data.classes=[b]"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "i1.xml object[1]: 'a'" in err and "Traceback" not in err


def test_summarize_empty_table():
    table = AnnotationTable(pd.DataFrame(columns=["image_id", "path", "width", "height"]), None, ["a"])
    assert "0 images (0 empty), 0 boxes, 1 classes" in summarize(table)


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not BCCD.is_dir(), reason="BCCD data not present")
def test_bccd_real_data(capsys):
    c = DataConfig(name="bccd", format="voc", root=BCCD, images="images", annotations="Annotations",
                   train_split="trainval", test_split="test", classes=["RBC", "WBC", "Platelets"])
    train = load_dataset(c)
    test = load_dataset(c, "test")
    assert (len(train.images), len(test.images)) == (292, 72)
    assert not set(train.images.image_id) & set(test.images.image_id)
    assert train.report.counts() == {"dropped_zero_area": 2}
    assert {r.file.rsplit("/", 1)[-1] for r in train.report.repairs} == {"BloodImage_00338.xml", "BloodImage_00343.xml"}
    assert len(train.boxes) + len(test.boxes) == 4888 - 2
    assert (train.images.width == 640).all() and (train.images.height == 480).all()


def test_gwd_labels_without_images(tmp_path):
    from pipeline.data.readers.gwd import read_gwd_labels

    path = tmp_path / "labels.csv"
    path.write_text('image_id,bbox,label\na,"[1, 2, 3, 4]",wheat\nb,,\nc,"[5, 5, 0, 4]",wheat\nc,"[0, 0, 2, 2]",wheat\n')
    table = read_gwd_labels(path)
    assert table.classes == ["wheat"] and sorted(table.images.image_id) == ["a", "b", "c"]
    assert table.boxes[["x1", "y1", "x2", "y2"]].values.tolist() == [[1, 2, 4, 6], [0, 0, 2, 2]]
    assert table.report.counts() == {"dropped_zero_area": 1}  # counted, never silent
    path.write_text('image_id,bbox,label\na,"[1, 2, 3, 4]",barley\n')
    with pytest.raises(DataError, match=r"line 2 label='barley'"):
        read_gwd_labels(path, ["wheat"])


# --------------------------------------------------------------------------------------------- ids and encodings


def test_bom_csv_whose_first_column_is_label_loads_its_classes(tmp_path):
    """Finding 3: with a UTF-8 BOM before ``label`` and data.classes unset, the class list fell back to ["wheat"]
    and every box failed "class not in the class list"; the same file without the BOM loaded."""
    write_image(tmp_path / "train" / "a.jpg")
    text = 'label,image_id,width,height,bbox\ncat,a,64,48,"[1, 1, 5, 5]"\ndog,a,64,48,"[9, 9, 5, 5]"\n'
    for encoding in ("utf-8-sig", "utf-16"):  # Excel's "CSV UTF-8" and "Unicode text"
        (tmp_path / "train.csv").write_bytes(text.encode(encoding))
        table = load_dataset(cfg(tmp_path))
        assert table.classes == ["cat", "dog"] and table.boxes.label.tolist() == [0, 1], encoding


def test_a_file_name_ending_in_a_space_keeps_its_id(tmp_path):
    """Finding 6: ``"a .jpg"`` is image ``"a "``; stripping the CSV's id reported it missing."""
    write_image(tmp_path / "train" / "a .jpg")
    write_image(tmp_path / "train" / "b.jpg")
    (tmp_path / "train.csv").write_text('image_id,width,height,bbox\na ,64,48,"[1, 1, 5, 5]"\n'
                                        'b ,64,48,"[2, 2, 5, 5]"\n')  # "b " is b.jpg with a stray space
    table = load_dataset(cfg(tmp_path))
    assert sorted(table.images.image_id) == ["a ", "b"] and sorted(table.boxes.image_id) == ["a ", "b"]
    (tmp_path / "train.csv").write_text('image_id,width,height,bbox\na,64,48,"[1, 1, 5, 5]"\n')
    assert load_dataset(cfg(tmp_path)).boxes.image_id.tolist() == ["a "]  # the one file that fits once stripped
    pd.DataFrame({"image_id": ["a ", "b"], "group": ["p", "q"]}).to_csv(tmp_path / "groups.csv", index=False)
    table = load_dataset(cfg(tmp_path, groups_csv="groups.csv"))
    assert dict(zip(table.images.image_id, table.images.group)) == {"a ": "p", "b": "q"}


NA_LIKE_IDS = ["NA", "nan", "NaN", "null", "None", "N/A", "#N/A", "-nan", "n/a", "NULL"]


def test_ids_pandas_would_read_as_missing_stay_names_from_data_check_to_folds(tmp_path, capsys):
    """Finding 2: ``data check`` passed, the folds file was written, and every later stage read the ids back as
    NaN ("image nan appears twice"). Every reader keeps them, and so does the folds file."""
    from pipeline.layout import read_folds, write_folds_file

    rows = [(i, 64, 48, "[1, 1, 5, 5]", "s") for i in NA_LIKE_IDS]
    gwd_dataset(tmp_path / "g", rows, {f"{i.replace('/', '_')}.jpg": (64, 48) for i in NA_LIKE_IDS if "/" not in i})
    with pytest.raises(DataError, match=r"line 7 image 'N/A'"):  # a name no file can have: missing, not NaN
        load_dataset(cfg(tmp_path / "g"))
    gwd_dataset(tmp_path / "h", [r for r in rows if "/" not in r[0]],
                {f"{i}.jpg": (64, 48) for i in NA_LIKE_IDS if "/" not in i})
    table = load_dataset(cfg(tmp_path / "h"))
    names = [i for i in NA_LIKE_IDS if "/" not in i]
    assert sorted(table.images.image_id) == sorted(names) and sorted(table.boxes.image_id) == sorted(names)
    config = write_config(tmp_path, {"format": "gwd_csv", "root": str(tmp_path / "h")})
    assert main(["check", "--config", str(config)]) == 0
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": range(len(names))})
    back = read_folds(write_folds_file(folds, tmp_path / "folds.csv"))
    assert back.image_id.tolist() == table.images.image_id.tolist()
