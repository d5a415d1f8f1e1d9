"""The column-mapped CSV reader (``data.format: csv``) on small CSVs of the VinBigData, SIIM and GBR layouts read
through ``configs/examples/``, plus the generic options; malformed rows are DataErrors naming their lines."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import DataConfig, load_config
from pipeline.data import DataError, load_dataset, summarize
from pipeline.data.dicom import write_dicom
from pipeline.data.readers.csv import fuse_annotators, parse_box_list
from pipeline.folds import make_folds

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
VIN_COLUMNS = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]


def write_png(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 80, 120)).save(path)
    return path


def example(name: str, root: Path, *overrides: str):
    return load_config(EXAMPLES / f"{name}.yaml", [f"data.root={root}", *overrides]).data


# ------------------------------------------------------------------------------------------- VinBigData


def vinbigdata(root: Path, rows: list[tuple]) -> Path:
    for image_id in {r[0] for r in rows}:
        write_dicom(root / "train" / f"{image_id}.dicom", np.full((48, 64), 7, np.uint16), bits_stored=12)
    pd.DataFrame(rows, columns=VIN_COLUMNS).to_csv(root / "train.csv", index=False)
    return root


VIN_ROWS = [
    ("img1", "Nodule/Mass", 8, "R9", "10", "10", "30", "30"),
    ("img1", "Nodule/Mass", 8, "R10", "12", "10", "32", "30"),
    ("img1", "Nodule/Mass", 8, "R11", "11", "10", "31", "30"),
    ("img1", "Cardiomegaly", 3, "R9", "40", "20", "60", "40"),
    ("img2", "No finding", 14, "R9", "", "", "", ""),
    ("img2", "No finding", 14, "R10", "", "", "", ""),
]


def test_vinbigdata_layout_annotators_kept_as_given(tmp_path):
    vinbigdata(tmp_path, VIN_ROWS)
    cfg = example("vinbigdata", tmp_path, "data.csv.fuse_annotators=false")
    table = load_dataset(cfg)
    assert table.images.image_id.tolist() == ["img1", "img2"]  # img2: "No finding" only, an empty image
    assert (table.images.width == 64).all() and (table.images.height == 48).all()  # from the DICOM header
    boxes = table.boxes
    assert len(boxes) == 4 and set(boxes.image_id) == {"img1"}
    assert boxes.annotator.tolist() == ["R9", "R10", "R11", "R9"]
    assert boxes.label.tolist() == [8, 8, 8, 3]  # data.classes in class_id order
    assert boxes[["x1", "y1", "x2", "y2"]].to_numpy().tolist()[1] == [12, 10, 32, 30]
    assert not table.report.repairs
    assert "annotators: 3 (boxes: R9 2, R10 1, R11 1)" in summarize(table)


def test_vinbigdata_example_fuses_the_radiologists_by_wbf(tmp_path):
    vinbigdata(tmp_path, VIN_ROWS)
    table = load_dataset(example("vinbigdata", tmp_path))  # the example sets fuse_annotators: true
    assert "annotator" not in table.boxes.columns
    boxes = table.boxes.sort_values("label").reset_index(drop=True)
    assert boxes.label.tolist() == [3, 8]  # three overlapping nodules -> one; the lone cardiomegaly box stays
    np.testing.assert_allclose(boxes.loc[1, ["x1", "y1", "x2", "y2"]].to_numpy(float), [11, 10, 31, 30], atol=1e-4)
    np.testing.assert_allclose(boxes.loc[0, ["x1", "y1", "x2", "y2"]].to_numpy(float), [40, 20, 60, 40], atol=1e-4)


def test_identical_boxes_of_two_annotators_are_both_kept_of_one_annotator_deduplicated(tmp_path):
    rows = [("img1", "Nodule/Mass", 8, "R1", "1", "2", "9", "9"),
            ("img1", "Nodule/Mass", 8, "R2", "1", "2", "9", "9"),
            ("img1", "Nodule/Mass", 8, "R2", "1", "2", "9", "9")]
    vinbigdata(tmp_path, rows)
    table = load_dataset(example("vinbigdata", tmp_path, "data.csv.fuse_annotators=false"))
    assert table.boxes.annotator.tolist() == ["R1", "R2"]
    assert [(r.kind, r.row) for r in table.report.repairs] == [("dropped_duplicate", "line 4")]


def test_vinbigdata_malformed_rows_are_named_by_line(tmp_path):
    bad_number = VIN_ROWS[:2] + [("img1", "Nodule/Mass", 8, "R11", "11", "abc", "31", "30")]
    vinbigdata(tmp_path, bad_number)
    with pytest.raises(DataError, match=r"line 4 y_min='abc'"):
        load_dataset(example("vinbigdata", tmp_path))
    vinbigdata(tmp_path, VIN_ROWS[:2] + [("img1", "Kidney stone", 3, "R9", "1", "1", "5", "5")])
    with pytest.raises(DataError, match=r"line 4: 'Kidney stone'"):
        load_dataset(example("vinbigdata", tmp_path))
    vinbigdata(tmp_path, VIN_ROWS[:1] + [("img1", "", 3, "R9", "1", "1", "5", "5")])
    with pytest.raises(DataError, match=r"empty label: line 3"):
        load_dataset(example("vinbigdata", tmp_path))


def test_empty_coordinates_are_counted_and_a_no_finding_box_is_dropped_and_counted(tmp_path):
    rows = VIN_ROWS[:1] + [("img1", "Nodule/Mass", 8, "R2", "", "", "", ""),
                           ("img2", "No finding", 14, "R9", "0", "0", "1", "1")]
    vinbigdata(tmp_path, rows)
    table = load_dataset(example("vinbigdata", tmp_path, "data.csv.fuse_annotators=false"))
    assert len(table.boxes) == 1
    assert sorted((r.kind, r.row) for r in table.report.repairs) == [
        ("dropped_empty_label_box", "line 4"), ("dropped_nan", "line 3")]


def test_missing_image_names_the_line_and_the_expected_file(tmp_path):
    vinbigdata(tmp_path, VIN_ROWS)
    (tmp_path / "train" / "img2.dicom").unlink()
    with pytest.raises(DataError, match=r"line 6 image 'img2': expected .*train/img2\.dicom"):
        load_dataset(example("vinbigdata", tmp_path))


def test_vinbigdata_test_split_from_the_folder_checked_against_the_sample_submission(tmp_path):
    vinbigdata(tmp_path, VIN_ROWS)
    for image_id in ("t1", "t2"):
        write_dicom(tmp_path / "test" / f"{image_id}.dicom", np.full((30, 20), 9, np.uint16))
    (tmp_path / "sample_submission.csv").write_text("image_id,PredictionString\nt1,14 1 0 0 1 1\nt2,14 1 0 0 1 1\n")
    test = load_dataset(example("vinbigdata", tmp_path), "test")
    assert test.images.image_id.tolist() == ["t1", "t2"] and len(test.boxes) == 0
    assert test.images.width.tolist() == [20, 20]
    (tmp_path / "sample_submission.csv").write_text("image_id,PredictionString\nt1,x\nt3,x\n")
    with pytest.raises(DataError, match=r"sample_submission.csv: 1 id\(s\) have no test image.*'t3'"):
        load_dataset(example("vinbigdata", tmp_path), "test")


# ------------------------------------------------------------------------------------------------ SIIM


SIIM_ROWS = [
    ("000a_image", "[{'x': 10.5, 'y': 4.25, 'width': 20, 'height': 12}, {'x': 40, 'y': 30, 'width': 8, 'height': 6}]",
     "opacity 1 10.5 4.25 30.5 16.25 opacity 1 40 30 48 36", "studyA"),
    ("000b_image", "", "none 1 0 0 1 1", "studyA"),
    ("000c_image", "[{'x': 1, 'y': 1, 'width': 5, 'height': 5}]", "opacity 1 1 1 6 6", "studyB"),
]


def siim(root: Path, rows: list[tuple] = SIIM_ROWS) -> Path:
    for image_id, _, _, study in rows:
        stem = image_id.removesuffix("_image")
        write_dicom(root / "train" / study / f"series{stem}" / f"{stem}.dcm", np.full((48, 64), 5, np.uint16))
    pd.DataFrame(rows, columns=["id", "boxes", "label", "StudyInstanceUID"]).to_csv(
        root / "train_image_level.csv", index=False)
    return root


def test_siim_layout_box_lists_study_groups_and_id_suffix(tmp_path):
    table = load_dataset(example("siim", siim(tmp_path)))
    images = table.images.set_index("image_id")
    assert list(images.index) == ["000a_image", "000b_image", "000c_image"]
    assert images.path.str.endswith("train/studyA/series000a/000a.dcm").iloc[0]
    assert images.group.tolist() == ["studyA", "studyA", "studyB"]
    a = table.boxes[table.boxes.image_id == "000a_image"]
    assert a[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[10.5, 4.25, 30.5, 16.25], [40, 30, 48, 36]]
    assert (table.boxes.label == 0).all() and table.classes == ["opacity"]
    folds = make_folds(table, k=2, seed=0, box_count_bins=[0, 1])
    by_image = folds.set_index("image_id").fold
    assert by_image["000a_image"] == by_image["000b_image"] != by_image["000c_image"]  # a study stays together


def test_siim_malformed_box_lists_are_named_by_line_and_element(tmp_path):
    rows = [SIIM_ROWS[0], ("000b_image", "[{'x': 1, 'y': 2}]", "x", "studyA")]
    with pytest.raises(DataError, match=r"line 3: boxes\[0\] lacks key\(s\) \['width', 'height'\]"):
        load_dataset(example("siim", siim(tmp_path, rows)))
    rows = [SIIM_ROWS[0], ("000b_image", "[{'x': 1, 'y': 2, 'width': 'wide', 'height': 3}]", "x", "studyA")]
    with pytest.raises(DataError, match=r"line 3: boxes\[0\] 'wide' is not a number"):
        load_dataset(example("siim", siim(tmp_path, rows)))
    rows = [("000a_image", "[{'x': 1, 'y'", "x", "studyA")]
    with pytest.raises(DataError, match=r"train_image_level.csv line 2: boxes: not a JSON or Python list"):
        load_dataset(example("siim", siim(tmp_path, rows)))


def test_box_list_cells_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    rows = [("000a_image", f"__import__('pathlib').Path({str(marker)!r}).touch()", "x", "studyA")]
    with pytest.raises(DataError, match="line 2"):
        load_dataset(example("siim", siim(tmp_path, rows)))
    assert not marker.exists()


def test_siim_id_without_the_suffix_and_ambiguous_glob_are_errors(tmp_path):
    siim(tmp_path)
    df = pd.read_csv(tmp_path / "train_image_level.csv", dtype=str, keep_default_na=False)
    df.loc[2, "id"] = "000c"
    df.to_csv(tmp_path / "train_image_level.csv", index=False)
    with pytest.raises(DataError, match=r"not ending in id_suffix '_image': line 4 id='000c'"):
        load_dataset(example("siim", tmp_path))
    siim(tmp_path)
    write_dicom(tmp_path / "train" / "studyB" / "other_series" / "000c.dcm", np.full((4, 4), 1, np.uint16))
    with pytest.raises(DataError, match=r"matches 2 files"):
        load_dataset(example("siim", tmp_path))


def test_siim_test_split_by_pattern_with_the_suffix_and_study_rows_ignored(tmp_path):
    siim(tmp_path)
    write_dicom(tmp_path / "test" / "s1" / "x" / "t1.dcm", np.full((8, 8), 1, np.uint16))
    write_dicom(tmp_path / "test" / "s2" / "y" / "t2.dcm", np.full((8, 8), 1, np.uint16))
    (tmp_path / "sample_submission.csv").write_text(
        "id,PredictionString\ns1_study,negative 1 0 0 1 1\nt1_image,none 1 0 0 1 1\nt2_image,none 1 0 0 1 1\n")
    test = load_dataset(example("siim", tmp_path), "test")
    assert sorted(test.images.image_id) == ["t1_image", "t2_image"]


# ------------------------------------------------------------------------------------------------- GBR


GBR_ROWS = [
    (0, 40258, 0, 0, "0-0", "[]"),
    (0, 40258, 1, 1, "0-1", "[{'x': 10, 'y': 5, 'width': 20, 'height': 10}]"),
    (1, 8399, 0, 0, "1-0",
     "[{'x': 50, 'y': 40, 'width': 30, 'height': 20}, {'x': 1, 'y': 1, 'width': 4, 'height': 4}]"),
    (2, 996, 7, 0, "2-7", "[]"),
]


def gbr(root: Path, rows: list[tuple] = GBR_ROWS) -> Path:
    for video, _, frame, *_ in rows:
        write_png(root / "train_images" / f"video_{video}" / f"{frame}.jpg")
    pd.DataFrame(rows, columns=["video_id", "sequence", "video_frame", "sequence_frame", "image_id",
                                "annotations"]).to_csv(root / "train.csv", index=False)
    return root


def test_gbr_layout_frames_found_by_other_columns_and_grouped_by_video(tmp_path):
    table = load_dataset(example("gbr", gbr(tmp_path)))
    images = table.images.set_index("image_id")
    assert images.loc["1-0", "path"].endswith("train_images/video_1/0.jpg")
    assert images.group.tolist() == ["0", "0", "1", "2"]
    boxes = table.boxes
    assert boxes.groupby("image_id").size().to_dict() == {"0-1": 1, "1-0": 2}
    # the second box of 1-0 sticks out of the 64x48 frame: clipped, counted, named by line and element
    assert [(r.kind, r.row) for r in table.report.repairs] == [("clipped", "line 4 annotations[0]")]
    folds = make_folds(table, k=3, seed=0, box_count_bins=[0, 1]).set_index("image_id").fold
    assert folds["0-0"] == folds["0-1"] and folds.nunique() == 3


def test_gbr_image_with_two_videos_names_its_lines(tmp_path):
    rows = GBR_ROWS + [(2, 996, 1, 1, "0-1", "[]")]  # 0-1 again, in another video: another file
    with pytest.raises(DataError, match=r"image '0-1' has rows that name different files .*line 3, line 6"):
        load_dataset(example("gbr", gbr(tmp_path, rows)))
    rows = GBR_ROWS + [(0, 40258, 1, 5, "0-1", "[]")]  # the same frame, its group column differing
    cfg = example("gbr", gbr(tmp_path, rows), "data.csv.group_column=sequence_frame")
    with pytest.raises(DataError, match=r"image '0-1' has several groups \['1', '5'\] \(line 3, line 6"):
        load_dataset(cfg)


def test_gbr_has_no_test_split(tmp_path):
    with pytest.raises(DataError, match="test_image_pattern is not set"):
        load_dataset(example("gbr", gbr(tmp_path)), "test")


# ------------------------------------------------------------------------------------------ generic options


def generic(root: Path, csv_text: str, **layout) -> DataConfig:
    write_png(root / "imgs" / "a.png", (100, 50))
    write_png(root / "imgs" / "b.png", (100, 50))
    (root / "train.csv").write_text(csv_text)
    return DataConfig(name="g", format="csv", root=root, csv={"image_pattern": "imgs/{id}.png", **layout})


def test_normalised_cxcywh_columns(tmp_path):
    cfg = generic(tmp_path, "name,cx,cy,w,h\na,0.5,0.5,0.2,0.4\nb,0.1,0.1,0.1,0.1\n", id_column="name",
                  box_columns=["cx", "cy", "w", "h"], box_format="cxcywh", normalised=True, fixed_class="thing")
    table = load_dataset(cfg)
    np.testing.assert_allclose(table.boxes[["x1", "y1", "x2", "y2"]].to_numpy(),
                               [[40, 15, 60, 35], [5, 2.5, 15, 7.5]])
    assert table.classes == ["thing"]


def test_bbox_strings_and_lists_of_number_lists(tmp_path):
    text = 'image_id,bbox\na,"[1, 2, 3, 4]"\nb,"[[5, 6, 7, 8], [10, 10, 20, 20]]"\n'
    table = load_dataset(generic(tmp_path, text, boxes_column="bbox", box_format="xywh", fixed_class="x"))
    assert table.boxes[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[1, 2, 4, 6], [5, 6, 12, 14],
                                                                          [10, 10, 30, 30]]
    assert parse_box_list("5 6 7 8", ["a", "b", "c", "d"]) == [(5, 6, 7, 8)]
    assert math.isnan(parse_box_list('[{"a": 1, "b": 2, "c": 3, "d": null}]', ["a", "b", "c", "d"])[0][3])
    assert parse_box_list("nan", ["a", "b", "c", "d"]) == []


def test_classes_from_the_label_column_sorted_without_empty_labels(tmp_path):
    text = "image_id,cls,x1,y1,x2,y2\na,zebra,1,1,5,5\na,ant,2,2,6,6\nb,nothing,,,,\n"
    cfg = generic(tmp_path, text, box_columns=["x1", "y1", "x2", "y2"], label_column="cls",
                  empty_labels=["nothing"])
    table = load_dataset(cfg)
    assert table.classes == ["ant", "zebra"] and table.boxes.label.tolist() == [1, 0]


def test_declared_sizes_are_checked_against_the_image(tmp_path):
    text = "image_id,w,h,x1,y1,x2,y2\na,100,50,1,1,5,5\nb,50,100,1,1,5,5\n"
    cfg = generic(tmp_path, text, box_columns=["x1", "y1", "x2", "y2"], fixed_class="x", width_column="w",
                  height_column="h")
    with pytest.raises(DataError, match=r"line 3: declares image b as 50x100 but .* is 100x50"):
        load_dataset(cfg)


def test_a_pattern_column_missing_from_the_csv_is_named(tmp_path):
    cfg = generic(tmp_path, "image_id,x1,y1,x2,y2\na,1,1,5,5\n", box_columns=["x1", "y1", "x2", "y2"],
                  fixed_class="x")
    cfg.csv.image_pattern = "imgs/{folder}/{id}.png"
    with pytest.raises(DataError, match=r"missing column\(s\) \['folder'\]"):
        load_dataset(cfg)
    cfg.csv.image_pattern = "imgs/{id.__class__}.png"  # no attribute or index look-ups in a pattern
    with pytest.raises(DataError, match=r"must be a plain column name"):
        load_dataset(cfg)
    cfg.csv.test_image_pattern = "hidden/{}.png"
    with pytest.raises(DataError, match=r"test_image_pattern: .*plain column name"):
        load_dataset(cfg, "test")


def test_layout_config_errors():
    base = {"name": "c", "format": "csv", "root": "."}
    with pytest.raises(ValueError, match="either box_columns"):
        DataConfig(**base, csv={"fixed_class": "x"})
    with pytest.raises(ValueError, match="either label_column"):
        DataConfig(**base, csv={"boxes_column": "b"})
    with pytest.raises(ValueError, match="four different names"):
        DataConfig(**base, csv={"box_columns": ["a", "b", "c"], "fixed_class": "x"})
    with pytest.raises(DataError, match="no data.csv section"):
        load_dataset(DataConfig(**base))


def test_fuse_annotators_without_an_annotator_column_fuses_per_image(tmp_path):
    text = "image_id,x1,y1,x2,y2\na,10,10,30,30\na,12,10,32,30\na,70,20,90,40\n"
    table = load_dataset(generic(tmp_path, text, box_columns=["x1", "y1", "x2", "y2"], fixed_class="x"))
    fused = fuse_annotators(table, iou_thr=0.5)
    assert len(fused.boxes) == 2 and fused.boxes.x1.min() == pytest.approx(11, abs=1e-4)


def test_hidden_test_labels_in_the_same_layout_and_a_source_column(tmp_path):
    for image_id in ("t1", "t2"):
        write_png(tmp_path / "hidden" / f"{image_id}.png", (100, 50))
    (tmp_path / "test_labels.csv").write_text("image_id,site,x1,y1,x2,y2\nt1,s1,1,1,5,5\nt2,s2,,,,\n")
    layout = {"image_pattern": "imgs/{id}.png", "box_columns": ["x1", "y1", "x2", "y2"], "fixed_class": "x",
              "source_column": "site"}
    cfg = generic(tmp_path, "image_id,site,x1,y1,x2,y2\na,s1,1,1,5,5\n", **layout)
    with pytest.raises(DataError, match="test_labels.csv exists but data.csv.test_image_pattern is not set"):
        load_dataset(cfg, "test")
    cfg.csv.test_image_pattern = "hidden/{id}.png"
    test = load_dataset(cfg, "test")
    assert test.images.source.tolist() == ["s1", "s2"] and len(test.boxes) == 1
    assert not test.report.repairs  # one class, four blank cells: t2 is listed without a box
    assert load_dataset(cfg).images.source.tolist() == ["s1"]
