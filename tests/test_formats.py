"""Submission formats: round trips, empty images, one test per malformed-row rule, atomic writes that never leave
an invalid file, and a new format as one registered object."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.layout import PREDICTION_COLUMNS
from pipeline.formats import (
    FORMATS,
    SubmissionError,
    content_hash,
    read_submission,
    submission_path,
    validate_submission,
    write_submission,
)
from pipeline.formats import ParsedBox, ParsedRow, Sample, SubmissionFormat, format_names, register_format
from pipeline.formats.base import SCORE_DECIMALS, format_number, parse_number
from pipeline.formats.prediction_string import PredictionStringFormat, parse_label

CLASSES = ["a", "b", "c"]
IDS = ["img0", "img1", "img2", "img3"]
SIZES = {"img0": (1024, 1024), "img1": (640, 480), "img2": (300, 200), "img3": (50, 60)}


def preds_frame(rows: list[tuple]) -> pd.DataFrame:
    """rows: (image_id, x1, y1, x2, y2, score, label)."""
    full = [(*r, "m", 0, "wbf") for r in rows]
    return pd.DataFrame(full, columns=PREDICTION_COLUMNS)


@st.composite
def tables(draw, fmt: str) -> pd.DataFrame:
    rows = []
    for image_id in draw(st.lists(st.sampled_from(IDS), max_size=12)):
        w, h = SIZES[image_id]
        x1, y1 = draw(st.floats(0, w - 2)), draw(st.floats(0, h - 2))
        x2, y2 = draw(st.floats(x1 + 2, w)), draw(st.floats(y1 + 2, h))
        label = 0 if fmt == "gwd" else draw(st.integers(0, len(CLASSES) - 1))
        rows.append((image_id, x1, y1, x2, y2, draw(st.floats(0, 1)), label))
    return preds_frame(rows)


def _key(df: pd.DataFrame) -> pd.DataFrame:
    # sort on values rounded past the written precision, so float noise of x + w cannot reorder rows
    cols = ["score", "x1", "y1", "x2", "y2"]
    keys = df[cols].round(6).rename(columns=lambda c: f"_{c}")
    order = pd.concat([df, keys], axis=1).sort_values(["image_id", *keys.columns, "label"], kind="stable").index
    return df.loc[order].reset_index(drop=True)


# ---------------------------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None)
@given(st.data())
@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_write_then_read_gives_the_input_to_the_written_precision(fmt, data):
    preds = data.draw(tables(fmt))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_submission(preds, IDS, Path(tmp) / "sub", fmt, CLASSES, image_sizes=SIZES)
        back = read_submission(path, fmt, CLASSES)
    decimals = 2 if fmt == "coco_json" else 0
    expected = preds.assign(model="submission", fold=-1, tta="none", score=[float(f"{v:.4f}") for v in preds.score])
    for c in ("x1", "y1", "x2", "y2"):
        expected[c] = np.round(expected[c], decimals)
    pd.testing.assert_frame_equal(_key(back), _key(expected), check_dtype=False, rtol=0, atol=1e-9)
    for _, group in back.groupby("image_id", sort=False):  # groups come by descending confidence
        assert (np.diff(group.score.to_numpy()) <= 0).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact_on_the_written_grid(fmt, tmp_path):
    labels = [0, 0, 0] if fmt == "gwd" else [2, 0, 1]
    preds = preds_frame([
        ("img0", 10.0, 20.0, 110.0, 220.0, 0.25, labels[0]),
        ("img0", 0.0, 0.0, 1024.0, 1024.0, 0.9375, labels[1]),
        ("img2", 3.0, 4.0, 5.0, 6.0, 1.0, labels[2]),
    ])
    path = write_submission(preds, IDS, tmp_path / "s", fmt, CLASSES, image_sizes=SIZES)
    back = read_submission(path, fmt, CLASSES)
    expected = preds.assign(model="submission", fold=-1, tta="none")
    pd.testing.assert_frame_equal(_key(back), _key(expected), check_dtype=False)


def test_gwd_file_format(tmp_path):
    preds = preds_frame([("img1", 10.4, 20.6, 30.5, 40.2, 0.5, 0), ("img1", 1, 2, 11, 12, 0.87654, 0)])
    path = write_submission(preds, IDS, tmp_path / "s.csv", "gwd", ["wheat"], image_sizes=SIZES)
    assert path.read_text().splitlines() == [
        "image_id,PredictionString",
        "img0,",  # no boxes: an empty string
        "img1,0.8765 1 2 10 10 0.5000 10 21 20 19",  # by confidence; corners rounded, then w = x2 - x1
        "img2,",
        "img3,",
    ]


def test_label_conf_xyxy_index_and_name_labels(tmp_path):
    preds = preds_frame([("img2", 1, 2, 3, 4, 0.5, 2)])
    by_index = write_submission(preds, IDS, tmp_path / "i.csv", "label_conf_xyxy", CLASSES)
    assert "img2,2 0.5000 1 2 3 4" in by_index.read_text().splitlines()
    by_name = write_submission(preds, IDS, tmp_path / "n.csv", "label_conf_xyxy", CLASSES, label_style="name")
    assert "img2,c 0.5000 1 2 3 4" in by_name.read_text().splitlines()
    assert read_submission(by_name, "label_conf_xyxy", CLASSES, label_style="name").label.tolist() == [2]


def test_coco_json_ids_categories_and_empty_images(tmp_path):
    preds = preds_frame([("17", 1.234, 2, 3.5, 4, 0.123456, 0), ("a7", 1, 2, 3, 4, 0.5, 2)])
    ids = ["17", "a7", "007", "empty"]
    path = write_submission(preds, ids, tmp_path / "r.json", "coco_json", CLASSES)
    entries = json.loads(path.read_text())
    assert entries == [
        {"image_id": 17, "category_id": 1, "bbox": [1.23, 2.0, 2.27, 2.0], "score": 0.1235},
        {"image_id": "a7", "category_id": 3, "bbox": [1.0, 2.0, 2.0, 2.0], "score": 0.5},
    ]
    empty = write_submission(preds.iloc[:0], ids, tmp_path / "e.json", "coco_json", CLASSES)
    assert json.loads(empty.read_text()) == [] and read_submission(empty, "coco_json", CLASSES).empty


def test_coco_json_ids_follow_the_sample(tmp_path):
    sample = tmp_path / "test.json"
    sample.write_text(json.dumps({"images": [{"id": "17", "file_name": "x.jpg"}, {"id": 5, "file_name": "y.jpg"}]}))
    preds = preds_frame([("17", 1, 2, 3, 4, 0.5, 0), ("5", 1, 2, 3, 4, 0.5, 0)])
    path = write_submission(preds, ["17", "5"], tmp_path / "r.json", "coco_json", CLASSES, sample_submission=sample)
    assert [e["image_id"] for e in json.loads(path.read_text())] == ["17", 5]


@pytest.mark.parametrize("fmt", ["gwd", "label_conf_xyxy"])
def test_every_image_gets_one_row_even_without_boxes(fmt, tmp_path):
    path = write_submission(preds_frame([]), IDS, tmp_path / "s.csv", fmt, CLASSES)
    assert path.read_text() == "image_id,PredictionString\n" + "".join(f"{i},\n" for i in IDS)
    assert read_submission(path, fmt, CLASSES).empty


def test_sample_header_and_row_order(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("id,PredictionString\nimg3,none 1 0 0 1 1\nimg0,\nimg1,\nimg2,\n")
    path = write_submission(preds_frame([]), IDS, tmp_path / "s.csv", "label_conf_xyxy", CLASSES,
                            sample_submission=sample)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,PredictionString" and [l.split(",")[0] for l in lines[1:]] == IDS
    assert read_submission(path, "label_conf_xyxy", CLASSES).empty


def test_writer_clips_to_the_image_and_drops_boxes_rounded_to_nothing(tmp_path):
    preds = preds_frame([("img3", -3.0, 5, 70, 61.4, 0.5, 0), ("img3", 4.6, 5, 5.4, 9, 0.4, 0)])
    path = write_submission(preds, IDS, tmp_path / "s.csv", "gwd", ["wheat"], image_sizes=SIZES)
    assert "img3,0.5000 0 5 50 55" in path.read_text().splitlines()  # 5.4 and 4.6 both round to 5: dropped


@pytest.mark.parametrize("preds, ids, match", [
    (preds_frame([("other", 1, 2, 3, 4, 0.5, 0)]), IDS, "not test images"),
    (preds_frame([("img0", np.nan, 2, 3, 4, 0.5, 0)]), IDS, "img0.*non-finite"),
    (preds_frame([("img0", 1, 2, 3, 4, np.inf, 0)]), IDS, "non-finite"),
    (preds_frame([("img0", 1, 2, 3, 4, 0.5, 1)]), IDS, "no label field"),
    (preds_frame([]), ["a", "b", "a"], "repeat"),
])
def test_bad_tables_are_refused_before_writing(preds, ids, match, tmp_path):
    with pytest.raises(SubmissionError, match=match):
        write_submission(preds, ids, tmp_path / "s.csv", "gwd", ["wheat"])
    assert list(tmp_path.iterdir()) == []


def test_a_failing_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("image_id,PredictionString\nimg0,\nimg1,\n")  # img2, img3 are not in the sample
    target = tmp_path / "sub.csv"
    with pytest.raises(SubmissionError, match=r"line 4 \(image_id 'img2'\).*not in the sample"):
        write_submission(preds_frame([]), IDS, target, "gwd", ["wheat"], sample_submission=sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.csv"]
    target.write_text("old")
    with pytest.raises(SubmissionError):
        write_submission(preds_frame([]), IDS, target, "gwd", ["wheat"], sample_submission=sample)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["sample.csv", "sub.csv"]
    # a score outside [0, 1] is only caught by the validator: the same guarantee holds
    with pytest.raises(SubmissionError, match=r"line 2 \(image_id 'img0'\).*confidence 1.5"):
        write_submission(preds_frame([("img0", 1, 2, 3, 4, 1.5, 0)]), IDS, tmp_path / "new.csv", "gwd", ["wheat"])
    assert not (tmp_path / "new.csv").exists()


# --------------------------------------------------------------------------------------- validation

GOOD = "img0,0.9 1 2 3 4"


def _csv(tmp_path: Path, *rows: str, header: str = "image_id,PredictionString") -> Path:
    path = tmp_path / "sub.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _validate(path: Path, fmt: str = "gwd", **kwargs) -> None:
    kwargs.setdefault("image_ids", ["img0", "img1"])
    kwargs.setdefault("image_sizes", SIZES)
    validate_submission(path, fmt, None, kwargs.pop("image_sizes"), kwargs.pop("n_classes", 3), **kwargs)


def test_valid_files_pass(tmp_path):
    _validate(_csv(tmp_path, GOOD, "img1,"))
    _validate(_csv(tmp_path, "img1,", "img0,0.5 -0.9 0 1024.9 1024 1 0.5 1 1 2"))  # within 1 px of the edges
    _validate(_csv(tmp_path, "img0,2 0.5 1 2 3 4", "img1,"), "label_conf_xyxy")


GWD_BAD = [
    # (second data row, what the message must say); the bad row is always line 3 with image_id 'img1'
    ("img1,0.5 1 2 3", r"4 values is not a whole number of 5-value groups"),
    ("img1,0.5 1 2 3 4 0.4", r"6 values"),
    ("img1,0.5 1 abc 3 4", r"group 1 .*'abc' is not a number"),
    ("img1,0.5 1 nan 3 4", r"'nan' is not a finite number"),
    ("img1,0.5 1 2 inf 4", r"'inf' is not a finite number"),
    ("img1,0.5 1 2 1_0 4", r"'1_0' is not a number"),
    ("img1,0.5 1 2 0 4", r"no area \(width 0"),
    ("img1,0.5 1 2 3 4 0.4 1 2 3 -4", r"group 2 .*no area"),
    ("img1,1.5 1 2 3 4", r"confidence 1.5 is outside \[0, 1\]"),
    ("img1,-0.1 1 2 3 4", r"confidence -0.1"),
    ("img1,0.5 630 2 12 4", r"outside the 640x480 image"),
    ("img1,0.5 1 470 3 12", r"outside the 640x480 image"),
    ("img1,0.5 -1.5 2 3 4", r"outside the 640x480 image"),
    ("img1,0.5 1 2 3 4,extra", r"expected 2 fields"),
    ("img0,0.5 1 2 3 4", r"image id repeated \(first on line 2\)"),
    ("img9,", r"image id is not in the test images"),
]


@pytest.mark.parametrize("row, problem", GWD_BAD)
def test_gwd_malformed_rows_are_named(row, problem, tmp_path):
    path = _csv(tmp_path, GOOD, row, "img1,")
    image_id = row.split(",")[0]
    with pytest.raises(SubmissionError, match=rf"sub.csv: line 3 \(image_id '{image_id}'\).*{problem}"):
        _validate(path)


LABEL_BAD = [
    ("img1,3 0.5 1 2 3 4", r"label 3 is outside 0..2"),
    ("img1,-1 0.5 1 2 3 4", r"label -1 is outside"),
    ("img1,1.0 0.5 1 2 3 4", r"label '1.0' is not an integer class index"),
    ("img1,b 0.5 1 2 3 4", r"label 'b' is not an integer"),
    ("img1,1 0.5 3 2 3 4", r"no area \(width 0"),
    ("img1,1 0.5 1 4 3 2", r"no area .*height -2"),
    ("img1,1 0.5 1 2 3", r"5 values is not a whole number of 6-value groups"),
    ("img1,1 0.5 1 2 641.5 4", r"outside the 640x480 image"),
]


@pytest.mark.parametrize("row, problem", LABEL_BAD)
def test_label_conf_xyxy_malformed_rows_are_named(row, problem, tmp_path):
    path = _csv(tmp_path, "img0,2 0.5 1 2 3 4", row)
    with pytest.raises(SubmissionError, match=rf"line 3 \(image_id 'img1'\).*{problem}"):
        _validate(path, "label_conf_xyxy")


def test_label_names_must_be_known(tmp_path):
    path = _csv(tmp_path, "img0,c 0.5 1 2 3 4", "img1,d 0.5 1 2 3 4")
    with pytest.raises(SubmissionError, match=r"line 3 \(image_id 'img1'\).*label 'd' is not a class name"):
        _validate(path, "label_conf_xyxy", classes=CLASSES, label_style="name")


@pytest.mark.parametrize("header", ["image_id,PredictionStrings", "ImageId,PredictionString",
                                    "image_id,PredictionString,extra", "\ufeffimage_id,PredictionString"])
def test_header_must_be_exact(header, tmp_path):
    with pytest.raises(SubmissionError, match="line 1: header must be exactly 'image_id,PredictionString'"):
        _validate(_csv(tmp_path, GOOD, "img1,", header=header))


def test_missing_ids_and_blank_lines(tmp_path):
    with pytest.raises(SubmissionError, match=r"1 image id\(s\) of the test images have no row, e.g. \['img1'\]"):
        _validate(_csv(tmp_path, GOOD))
    with pytest.raises(SubmissionError, match=r"line 3: expected 2 fields .* got 0"):
        _validate(_csv(tmp_path, GOOD, "", "img1,"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SubmissionError, match="line 1: header"):
        _validate(tmp_path / "empty.csv")


def test_sample_submission_sets_the_ids_and_header(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("id,PredictionString\nimg1,\nimg0,\n")
    path = _csv(tmp_path, "img0,", "img1,", header="id,PredictionString")
    validate_submission(path, "gwd", sample, None, 1)
    validate_submission(path, "gwd", sample, None, 1, image_ids=["other"])  # the sample wins
    with pytest.raises(SubmissionError, match="header must be exactly 'id,PredictionString'"):
        validate_submission(_csv(tmp_path, "img0,", "img1,"), "gwd", sample, None, 1)
    sample.write_text("id,PredictionString\nimg1,\nimg1,\n")
    with pytest.raises(SubmissionError, match=r"sample.csv: line 3: the sample submission repeats image_id 'img1'"):
        validate_submission(path, "gwd", sample, None, 1)


def _json(tmp_path: Path, entries: list, raw: str | None = None) -> Path:
    path = tmp_path / "sub.json"
    path.write_text(raw if raw is not None else "[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    return path


OK_ENTRY = {"image_id": "img0", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}
COCO_BAD = [
    ({"image_id": "img1", "category_id": 1, "bbox": [1, 2, 3, 4]}, r"exactly the keys"),
    ({**OK_ENTRY, "image_id": "img1", "area": 12}, r"exactly the keys"),
    ({**OK_ENTRY, "image_id": "img1", "category_id": 0}, r"image_id 'img1'.*category_id 0 is outside 1..3"),
    ({**OK_ENTRY, "image_id": "img1", "category_id": 4}, r"category_id 4 is outside 1..3"),
    ({**OK_ENTRY, "image_id": "img1", "category_id": 1.0}, r"category_id 1.0 is not an integer"),
    ({**OK_ENTRY, "image_id": "img1", "bbox": [1, 2, 3]}, r"bbox must be 4 numbers"),
    ({**OK_ENTRY, "image_id": "img1", "bbox": [1, 2, "3", 4]}, r"bbox must be 4 numbers"),
    ({**OK_ENTRY, "image_id": "img1", "bbox": [1, 2, 0, 4]}, r"no area"),
    ({**OK_ENTRY, "image_id": "img1", "bbox": [1, 2, 3, 480]}, r"outside the 640x480 image"),
    ({**OK_ENTRY, "image_id": "img1", "score": "0.5"}, r"finite numbers"),
    ({**OK_ENTRY, "image_id": "img1", "score": 2}, r"confidence 2 is outside"),
    ({**OK_ENTRY, "image_id": "img9"}, r"image id is not in the test images"),
    ({**OK_ENTRY, "image_id": None}, r"neither an integer nor a string"),
]


@pytest.mark.parametrize("entry, problem", COCO_BAD)
def test_coco_json_malformed_entries_are_named(entry, problem, tmp_path):
    path = _json(tmp_path, [OK_ENTRY, entry])
    with pytest.raises(SubmissionError, match=rf"sub.json: line 3 \(entry 2.*{problem}"):
        _validate(path, "coco_json")


def test_coco_json_syntax_errors_name_the_line(tmp_path):
    nan_entry = json.dumps(OK_ENTRY).replace('"score": 0.5', '"score": NaN')
    with pytest.raises(SubmissionError, match=r"line 3 \(entry 2, image_id 'img0'\).*finite"):
        _validate(_json(tmp_path, [], raw=f"[\n{json.dumps(OK_ENTRY)},\n{nan_entry}\n]"), "coco_json")
    with pytest.raises(SubmissionError, match=r"line 3: invalid JSON"):
        _validate(_json(tmp_path, [], raw=f'[\n{json.dumps(OK_ENTRY)},\n{{"image_id": }}\n]'), "coco_json")
    with pytest.raises(SubmissionError, match=r"line 3: expected ',' or ']'"):
        _validate(_json(tmp_path, [], raw=f"[\n{json.dumps(OK_ENTRY)}\n{json.dumps(OK_ENTRY)}]"), "coco_json")
    with pytest.raises(SubmissionError, match=r"line 1: a COCO results file must be a JSON list"):
        _validate(_json(tmp_path, [], raw=json.dumps(OK_ENTRY)), "coco_json")
    with pytest.raises(SubmissionError, match=r"line 4: unexpected text after the JSON list"):
        _validate(_json(tmp_path, [], raw="[\n]\n\n]"), "coco_json")
    _validate(_json(tmp_path, [OK_ENTRY, OK_ENTRY]), "coco_json")  # an image may have many entries, or none


# ------------------------------------------------------------------------------------ naming, hashing


def test_submission_path_names_by_time_and_ensemble(tmp_path):
    now = datetime(2024, 1, 2, 3, 4, 5)
    assert submission_path(tmp_path, "wheat ens/v2", now) == tmp_path / "20240102-030405_wheat-ens-v2.csv"
    assert submission_path(tmp_path, "e", now, format="coco_json").name == "20240102-030405_e.json"
    (tmp_path / "20240102-030405_e.csv").write_text("")
    assert submission_path(tmp_path, "e", now).name == "20240102-030405_e_2.csv"
    assert submission_path(tmp_path, "e").name.endswith("_e.csv")


def test_content_hash_is_the_sha256_of_the_bytes(tmp_path):
    path = write_submission(preds_frame([("img0", 1, 2, 3, 4, 0.5, 0)]), IDS, tmp_path / "s.csv", "gwd", ["w"])
    assert content_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    other = write_submission(preds_frame([]), IDS, tmp_path / "t.csv", "gwd", ["w"])
    assert content_hash(other) != content_hash(path)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown submission format 'csv'"):
        write_submission(preds_frame([]), IDS, tmp_path / "s.csv", "csv", CLASSES)


def test_label_formats_need_the_class_count(tmp_path):
    path = _csv(tmp_path, "img0,2 0.5 1 2 3 4", "img1,")
    with pytest.raises(ValueError, match="needs n_classes or classes"):
        validate_submission(path, "label_conf_xyxy", None, None)
    validate_submission(path, "label_conf_xyxy", None, None, classes=CLASSES)
    with pytest.raises(SubmissionError, match="label 2 is outside 0..1"):
        validate_submission(path, "label_conf_xyxy", None, None, 2)


def test_coco_json_id_missing_from_the_sample_is_a_submission_error(tmp_path):
    sample = tmp_path / "test.json"
    sample.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}]}))
    preds = preds_frame([("2", 1, 2, 3, 4, 0.5, 0)])
    with pytest.raises(SubmissionError, match=r"line 2 \(entry 1, image_id '2'\): image id is not in the sample"):
        write_submission(preds, ["1", "2"], tmp_path / "r.json", "coco_json", CLASSES, sample_submission=sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.json"]


def test_coco_json_ids_must_have_the_samples_type(tmp_path):
    """Finding 7: ``"1"`` where the sample has ``1`` was accepted, and pycocotools then rejected the file."""
    sample = tmp_path / "test.json"
    sample.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}, {"id": "a7", "file_name": "y.jpg"}]}))
    entry = {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}
    path = _json(tmp_path, [entry, {**entry, "image_id": "a7"}])
    validate_submission(path, "coco_json", sample, None, 3)  # the sample's own types pass
    path = _json(tmp_path, [entry, {**entry, "image_id": "1"}])
    with pytest.raises(SubmissionError, match=r"line 3 \(entry 2, image_id '1'\): image_id '1' is a string where the "
                                              r"sample .*test\.json has the integer 1"):
        validate_submission(path, "coco_json", sample, None, 3)
    sample.write_text(json.dumps({"images": [{"id": 1}, {"id": "1"}]}))
    with pytest.raises(SubmissionError, match=r"test\.json: images\[1\]\.id '1' repeats the id 1"):
        validate_submission(path, "coco_json", sample, None, 3)


# ------------------------------------------------------------------------------ a new format is one entry


class LabelConfXywh(PredictionStringFormat):
    """A PredictionString format as a competition might define it: ``label conf x y w h`` groups."""

    name, group_length, group_layout = "toy_label_conf_xywh", 6, "label conf x y w h"

    def encode_group(self, box, options):
        values = (box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1)
        return " ".join([str(int(box.label)), format_number(box.score, SCORE_DECIMALS)]
                        + [format_number(v, options.coord_decimals) for v in values])

    def parse_group(self, tokens, where, image_id, classes, label_style):
        label = parse_label(tokens[0], where, classes, label_style)
        conf, x, y, w, h = (parse_number(t, where) for t in tokens[1:])
        return ParsedBox(where, image_id, label, conf, x, y, x + w, y + h)


class TabSeparatedBoxes(SubmissionFormat):
    """Not a PredictionString: a header, then one line per box ``image_id<TAB>label<TAB>score<TAB>x1 y1 x2 y2``;
    an image without boxes has no line. The sample lists the test image ids, one per line."""

    name, suffix, coord_decimals, one_row_per_image = "toy_tsv", ".tsv", 1, False
    HEADER = "image_id\tlabel\tscore\tx1 y1 x2 y2"

    def encode(self, table, image_ids, options, sample):
        rank = {i: k for k, i in enumerate(image_ids)}
        table = table.assign(_rank=table.image_id.map(rank)).sort_values("_rank", kind="stable")
        lines = [f"{b.image_id}\t{int(b.label)}\t{format_number(b.score, SCORE_DECIMALS)}\t"
                 + " ".join(format_number(v, options.coord_decimals) for v in (b.x1, b.y1, b.x2, b.y2))
                 for b in table.itertuples()]
        return "\n".join([self.HEADER, *lines]) + "\n"

    def parse(self, text, *, name, sample, classes, label_style):
        lines = text.splitlines()
        if not lines or lines[0] != self.HEADER:
            raise SubmissionError(f"{name}: line 1: header must be exactly {self.HEADER!r}")
        for line, content in enumerate(lines[1:], start=2):
            fields = content.split("\t")
            where = f"{name}: line {line} (image_id {fields[0]!r})"
            if len(fields) != 4 or len(fields[3].split()) != 4:
                raise SubmissionError(f"{where}: expected image_id, label, score and 4 coordinates")
            label = parse_label(fields[1], where, classes, label_style)
            score, x1, y1, x2, y2 = (parse_number(t, where) for t in [fields[2], *fields[3].split()])
            yield ParsedRow(line, where, fields[0], [ParsedBox(where, fields[0], label, score, x1, y1, x2, y2)])

    def read_sample(self, path):
        return Sample(path, path.read_text().split())


@pytest.fixture(params=[LabelConfXywh, TabSeparatedBoxes])
def toy_format(request):
    """A format registered for one test only: the registry is left as it was."""
    fmt = register_format(request.param())
    yield fmt
    del FORMATS[fmt.name]


def test_a_new_format_is_one_registered_object(toy_format, tmp_path):
    name = toy_format.name
    assert name in format_names() and format_names()[:3] == ("gwd", "label_conf_xyxy", "coco_json")
    now = datetime(2024, 1, 2, 3, 4, 5)
    path = submission_path(tmp_path, "ens", now, format=name)
    assert path.name == f"20240102-030405_ens{toy_format.suffix}"
    preds = preds_frame([("img2", 1.04, 2, 30.5, 40, 0.5, 2), ("img0", 10, 20, 110, 220, 0.93756, 0),
                         ("img2", 3, 4, 5, 6, 0.75, 1)])
    write_submission(preds, IDS, path, name, CLASSES, image_sizes=SIZES)
    text = path.read_text()
    if isinstance(toy_format, TabSeparatedBoxes):
        assert text.splitlines()[1:] == ["img0\t0\t0.9376\t10.0 20.0 110.0 220.0",
                                         "img2\t1\t0.7500\t3.0 4.0 5.0 6.0", "img2\t2\t0.5000\t1.0 2.0 30.5 40.0"]
    else:
        assert text.splitlines() == ["image_id,PredictionString", "img0,0 0.9376 10 20 100 200", "img1,",
                                     "img2,1 0.7500 3 4 2 2 2 0.5000 1 2 29 38", "img3,"]
    validate_submission(path, name, image_ids=IDS, image_sizes=SIZES, classes=CLASSES)
    back = read_submission(path, name, CLASSES)
    assert back.image_id.tolist() == ["img0", "img2", "img2"] and back.label.tolist() == [0, 1, 2]
    # the generic checks hold for the new format without a line of its own: here a confidence outside [0, 1]
    bad = preds_frame([("img1", 1, 2, 3, 4, 1.5, 0)])
    with pytest.raises(SubmissionError, match=r"line \d \(image_id 'img1'\).*confidence 1.5 is outside"):
        write_submission(bad, IDS, tmp_path / f"bad{toy_format.suffix}", name, CLASSES)
    # the sample, read by the format, fixes the ids for the generic validator: img1 is not in it
    sample = tmp_path / "sample"
    sample.write_text("img0\nimg2\n" if isinstance(toy_format, TabSeparatedBoxes)
                      else "image_id,PredictionString\nimg0,\nimg2,\n")
    with pytest.raises(SubmissionError, match=r"image_id 'img\d'.*not in the sample submission"):
        write_submission(preds_frame([("img1", 1, 2, 3, 4, 0.5, 0)]), IDS, tmp_path / "s", name, CLASSES,
                         sample_submission=sample)


def test_format_names_are_unique_and_suffixes_dotted():
    with pytest.raises(ValueError, match="'gwd' is already registered"):
        register_format(FORMATS["gwd"])
    bad = LabelConfXywh()
    bad.suffix = "csv"
    with pytest.raises(ValueError, match="must start with '.'"):
        register_format(bad)
    assert "toy_label_conf_xywh" not in FORMATS

    class Nameless(SubmissionFormat):
        suffix, coord_decimals = ".txt", 0
        encode, parse, read_sample = TabSeparatedBoxes.encode, TabSeparatedBoxes.parse, TabSeparatedBoxes.read_sample

    with pytest.raises(TypeError, match="does not say its name"):
        register_format(Nameless())


def test_formats_do_not_import_the_config():
    # the config derives submission.format from format_names(): an import back would be a cycle
    code = "import sys, pipeline.formats; sys.exit('pipeline.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
