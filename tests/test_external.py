"""Our folds in other tools' layouts: a model trained elsewhere sees exactly our split."""
import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_config
from pipeline import folds as folds_stage
from pipeline.data import load_dataset
from pipeline.layout import folds_path, read_folds


@pytest.fixture(scope="module")
def made_split(tmp_path_factory, tiny_data):
    """The tiny dataset's config, table and folds, made once: the folds stage and the reading take 0.1 s a test."""
    cfg = tiny_config(tmp_path_factory.mktemp("split"), tiny_data, tracking={"enabled": False})
    folds_stage.run(cfg)
    return cfg, load_dataset(cfg.data, "train"), read_folds(folds_path(cfg))


@pytest.fixture
def split(made_split):
    """A copy for each test: whatever a test or the code under test changes in them stays in that test."""
    return copy.deepcopy(made_split)


def test_yolo_export_has_one_dataset_per_fold_and_normalised_labels(split, tmp_path):
    cfg, table, folds = split
    out = tmp_path / "yolo"
    assert folds_stage.main(["export", "--config", str(cfg.source), "--to", "yolo", str(out)]) == 0
    for k in sorted(folds.fold.unique()):
        spec = yaml.safe_load((out / f"fold{k}.yaml").read_text())
        assert spec["names"] == dict(enumerate(table.classes))
        root = Path(spec["path"])  # absolute: a YOLO trainer finds the lists from any working directory
        assert root.is_absolute() and root == out.resolve()
        train = (root / spec["train"]).read_text().split()
        val = (root / spec["val"]).read_text().split()
        stem = lambda p: p.rsplit("/", 1)[1].rsplit(".", 1)[0]  # noqa: E731
        assert sorted(map(stem, val)) == sorted(folds.image_id[folds.fold == k])
        assert not set(map(stem, train)) & set(map(stem, val)) and len(train) + len(val) == len(folds)
        assert all((out / p).exists() for p in train + val)  # linked images resolve
    image = table.images.iloc[0]
    box = table.boxes[table.boxes.image_id == image.image_id].iloc[0]
    first = (out / "labels" / f"{image.image_id}.txt").read_text().splitlines()[0].split()
    assert int(first[0]) == box.label
    assert float(first[1]) == pytest.approx((box.x1 + box.x2) / 2 / image.width, abs=1e-6)
    assert float(first[3]) == pytest.approx((box.x2 - box.x1) / image.width, abs=1e-6)
    test = load_dataset(cfg.data, "test")
    assert len((out / "test.txt").read_text().split()) == len(test.images)
    assert len(test.boxes) and not any((out / "labels" / f"{i}.txt").exists() for i in test.images.image_id)


def ultralytics_label_files(listed: list[str], root: Path) -> list[Path]:
    """Where Ultralytics looks for the labels of the images a list names (``./`` is the list's folder; the last
    ``/images/`` of an image path becomes ``/labels/``, the suffix ``.txt``: ``img2label_paths``)."""
    paths = [str(root / p[2:]) if p.startswith("./") else p for p in listed]
    return [Path("/labels/".join(p.rsplit("/images/", 1)).rsplit(".", 1)[0] + ".txt") for p in paths]


def test_each_folds_train_and_val_sets_have_their_own_label_folder_and_survive_a_move(split, tmp_path):
    # Ultralytics keeps one labels.cache per label folder (the first label file's folder + ".cache") and rebuilds it
    # whenever the image list differs: one shared labels/ folder made every fold's train and val set rebuild the same
    # file in turn, and folds started together could collide writing it (unlink, save, rename, no lock)
    cfg, table, folds = split
    out = tmp_path / "yolo"
    export_yolo(table, folds, out)
    moved = tmp_path / "moved"
    out.rename(moved)  # the links are relative: a moved folder keeps working (only the YAML's `path` names it)
    caches = set()
    for k in sorted(folds.fold.unique()):
        for part, ids in (("train", folds.image_id[folds.fold != k]), ("val", folds.image_id[folds.fold == k])):
            listed = (moved / f"fold{k}_{part}.txt").read_text().split()
            labels = ultralytics_label_files(listed, moved)
            assert sorted(p.stem for p in labels) == sorted(ids)
            assert all((moved / p[2:]).is_file() for p in listed)  # the image, through two links
            assert all(p.read_text() == (moved / "labels" / p.name).read_text() for p in labels)
            caches.add(labels[0].parent.with_suffix(".cache"))
    assert len(caches) == 2 * folds.fold.nunique()
    # exporting again with other folds leaves no link of the old ones in a fold's view
    moved.rename(out)
    other = folds.assign(fold=(folds.fold + 1) % folds.fold.nunique())
    export_yolo(table, other, out)
    val0 = sorted(p.stem for p in (out / "fold0" / "val" / "labels").iterdir())
    assert val0 == sorted(other.image_id[other.fold == 0])


def test_coco_export_keeps_every_box_of_each_fold(split, tmp_path):
    cfg, table, folds = split
    out = tmp_path / "coco"
    folds_stage.export(cfg, "coco", out)
    for k in sorted(folds.fold.unique()):
        for part, ids in (("train", folds.image_id[folds.fold != k]), ("val", folds.image_id[folds.fold == k])):
            doc = json.loads((out / f"fold{k}" / f"{part}.json").read_text())
            assert sorted(i["image_id_str"] for i in doc["images"]) == sorted(ids)
            assert len(doc["annotations"]) == int(table.boxes.image_id.isin(set(ids)).sum())
            assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
    doc = json.loads((out / f"fold0" / "val.json").read_text())
    ann = doc["annotations"][0]
    image = next(i for i in doc["images"] if i["id"] == ann["image_id"])
    boxes = table.boxes[table.boxes.image_id == image["image_id_str"]]
    x, y, w, h = ann["bbox"]
    assert ((boxes.x1 - x).abs() < 1e-3).any() and ((boxes.x2 - (x + w)).abs() < 1e-3).any()
    test = json.loads((out / "test.json").read_text())  # the images only: a local hidden split keeps its labels
    assert len(test["images"]) == len(load_dataset(cfg.data, "test").images) and test["annotations"] == []


def test_export_needs_the_folds_file(tmp_path, tiny_data, capsys):
    cfg = tiny_config(tmp_path, tiny_data, tracking={"enabled": False})
    assert folds_stage.main(["export", "--config", str(cfg.source), "--to", "coco", str(tmp_path / "o")]) == 1
    assert "folds file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ import

from pipeline.config import ConfigError, MemberConfig, load_config  # noqa: E402
from pipeline.ensemble import Member, tune  # noqa: E402
from pipeline.external import (ExternalError, coco_image_ids, export_yolo, load_external_oof,  # noqa: E402
                               load_external_test, yolo_stem)
from pipeline.metrics import Scorer  # noqa: E402


def fake_predictions(table, folds, seed=0):
    """A 'model trained elsewhere': each fold's GT boxes jittered, plus a false positive per image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fold_of = folds.set_index("image_id").fold
    rows = []
    for b in table.boxes.itertuples():
        j = rng.normal(0, 1.0, 4)
        rows.append((b.image_id, max(0, b.x1 + j[0]), max(0, b.y1 + j[1]), b.x2 + j[2], b.y2 + j[3],
                     round(float(rng.uniform(0.5, 0.95)), 4), int(b.label)))
    for image in table.images.itertuples():
        rows.append((image.image_id, 5.0, 5.0, 25.0, 30.0, 0.3, 0))
    df = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])
    df[["x2", "y2"]] = df[["x2", "y2"]].clip(upper=128)
    return df.assign(fold=df.image_id.map(fold_of), model="ext", tta="none")


def write_member(preds, folder, fmt, table, test=None, test_table=None):
    """``preds`` (of ``table``'s images) and ``test`` (of ``test_table``'s) as another tool writes them: COCO results
    with the integer image ids of our COCO export, as MMDetection and detectron2 write them back."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {f"fold{k}": (p, table) for k, p in preds.groupby("fold")}
    if test is not None:
        parts["test"] = (test, test_table)
    for stem, (part, split_table) in parts.items():
        sizes = {r.image_id: (r.width, r.height) for r in split_table.images.itertuples()}
        if fmt == "table":
            part.drop(columns=["fold", "model"]).to_csv(folder / f"{stem}.csv", index=False)
        elif fmt == "coco_json":
            ids = coco_image_ids(split_table)
            entries = [{"image_id": ids[r.image_id], "category_id": int(r.label) + 1, "score": r.score,
                        "bbox": [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1]} for r in part.itertuples()]
            (folder / f"{stem}.json").write_text(json.dumps(entries))
        else:
            (folder / stem).mkdir(exist_ok=True)
            for image_id, rows in part.groupby("image_id"):
                w, h = sizes[image_id]
                lines = [f"{r.label} {(r.x1 + r.x2) / 2 / w:.8f} {(r.y1 + r.y2) / 2 / h:.8f} "
                         f"{(r.x2 - r.x1) / w:.8f} {(r.y2 - r.y1) / h:.8f} {r.score}" for r in rows.itertuples()]
                # named after the exported image file, as Ultralytics names it
                (folder / stem / f"{yolo_stem(image_id)}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["table", "coco_json", "yolo_txt"])
def test_an_external_member_ensembles_like_the_same_native_member(split, tmp_path, fmt):
    cfg, table, folds = split
    native = fake_predictions(table, folds)
    write_member(native, tmp_path / fmt, fmt, table)
    imported = load_external_oof(tmp_path / fmt, fmt, "ext", table, folds)
    key = ["fold", "image_id", "score", "x1"]
    a, b = native.sort_values(key).reset_index(drop=True), imported.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) and (a.image_id == b.image_id).all() and (a.label == b.label).all()
    assert abs(a[["x1", "y1", "x2", "y2"]].to_numpy() - b[["x1", "y1", "x2", "y2"]].to_numpy()).max() < 1e-4
    scorer = Scorer(cfg.metric, table, folds.image_id.tolist())
    ens_cfg = load_config(cfg.source, ["ensemble.tune.weight_steps=1"])
    ens_cfg.ensemble.members = [MemberConfig(predictions="x", name="ext")]
    params_a, score_a, _ = tune([Member("ext", ens_cfg, native, None, ["none"])], table.images, scorer, ens_cfg)
    params_b, score_b, _ = tune([Member("ext", ens_cfg, imported, None, ["none"])], table.images, scorer, ens_cfg)
    assert params_a == params_b and score_b == pytest.approx(score_a, abs=1e-6)


def test_external_files_that_would_leak_or_lie_are_refused(split, tmp_path):
    cfg, table, folds = split
    preds = fake_predictions(table, folds)
    other = folds.image_id[folds.fold == 1].iloc[0]
    leak = pd.concat([preds, preds[preds.image_id == other].assign(fold=0)])
    write_member(leak, tmp_path / "leak", "table", table)
    with pytest.raises(ExternalError, match=rf"fold0.csv: .*{other!r}.*in fold 1"):
        load_external_oof(tmp_path / "leak", "table", "ext", table, folds)
    write_member(preds[preds.fold == 0], tmp_path / "half", "coco_json", table)
    with pytest.raises(ExternalError, match="no OOF predictions for fold 1"):
        load_external_oof(tmp_path / "half", "coco_json", "ext", table, folds)
    bad = preds.copy()
    bad.loc[bad.index[3], "score"] = 1.5
    write_member(bad, tmp_path / "score", "table", table)
    with pytest.raises(ExternalError, match=r"score outside \[0, 1\], first at row"):
        load_external_oof(tmp_path / "score", "table", "ext", table, folds)
    write_member(preds, tmp_path / "yolo", "yolo_txt", table)
    (tmp_path / "yolo" / "fold0" / f"{folds.image_id[folds.fold == 0].iloc[0]}.txt").write_text("0 0.5 0.5 x 0.1 0.9\n")
    with pytest.raises(ExternalError, match=r"\.txt line 1: expected 'cls cx cy w h conf'"):
        load_external_oof(tmp_path / "yolo", "yolo_txt", "ext", table, folds)


def test_external_test_predictions_single_or_per_fold(split, tmp_path):
    cfg, table, folds = split
    test_table = load_dataset(cfg.data, "test")
    preds = fake_predictions(table, folds)
    test = fake_predictions(test_table, pd.DataFrame({"image_id": test_table.images.image_id, "fold": 0}))
    write_member(preds, tmp_path / "m", "coco_json", table, test=test, test_table=test_table)
    got = load_external_test(tmp_path / "m", "coco_json", "ext", test_table, folds)
    assert len(got) == len(test) and set(got.fold) == {0} and set(got.model) == {"ext"}
    key = ["image_id", "score", "x1"]
    assert (got.sort_values(key).image_id.to_numpy() == test.sort_values(key).image_id.to_numpy()).all()
    assert load_external_test(tmp_path / "none", "coco_json", "ext", test_table, folds) is None


def test_coco_results_name_images_by_the_ids_of_our_coco_export(split, tmp_path):
    """What MMDetection / detectron2 write back: each result's integer image_id is the id of the image in the JSON
    it read (our export); it maps back to our image, the same in every fold's file; a string is our id itself."""
    cfg, table, folds = split
    folds_stage.export(cfg, "coco", tmp_path / "coco")
    preds = fake_predictions(table, folds)
    out = tmp_path / "mmdet"
    out.mkdir()
    for k, part in preds.groupby("fold"):
        images = json.loads((tmp_path / "coco" / f"fold{k}" / "val.json").read_text())["images"]
        id_of = {i["image_id_str"]: i["id"] for i in images}
        train_ids = {i["image_id_str"]: i["id"] for i in
                     json.loads((tmp_path / "coco" / f"fold{k}" / "train.json").read_text())["images"]}
        assert set(id_of.values()).isdisjoint(train_ids.values())  # one id per image across the split's files
        entries = [{"image_id": id_of[r.image_id], "category_id": int(r.label) + 1, "score": r.score,
                    "bbox": [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1]} for r in part.itertuples()]
        if k == 0:  # a result naming our image id as a string is taken as it is
            entries[0]["image_id"] = part.image_id.iloc[0]
        # fold 0 as MMDetection's CocoMetric names it (outfile_prefix=<folder>/fold0), fold 1 as detectron2's
        # COCOEvaluator (output_dir=<folder>/fold1)
        name = {0: "fold0.bbox.json", 1: "fold1/coco_instances_results.json"}.get(k, f"fold{k}.json")
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(json.dumps(entries))
    got = load_external_oof(out, "coco_json", "ext", table, folds)
    key = ["fold", "image_id", "score", "x1"]
    assert (got.sort_values(key).image_id.to_numpy() == preds.sort_values(key).image_id.to_numpy()).all()
    fold0 = json.loads((out / "fold0.bbox.json").read_text())
    for key, bad, match in (
            ("image_id", len(table.images) + 1, rf"fold0.bbox.json: entry 2 has image_id {len(table.images) + 1}, "
                                                rf"which no exported image has.*1..{len(table.images)}"),
            ("image_id", 0, "entry 2 has image_id 0"), ("image_id", 2.0, r"entry 2 has image_id 2.0: expected the"),
            ("image_id", True, "entry 2 has image_id True"),
            ("category_id", 0, r"entry 2 has category_id 0: the exported files number the classes from 1")):
        (out / "fold0.bbox.json").write_text(json.dumps(fold0[:2] + [{**fold0[2], key: bad}] + fold0[3:]))
        with pytest.raises(ExternalError, match=match):
            load_external_oof(out, "coco_json", "ext", table, folds)


def test_a_member_is_a_config_or_a_predictions_folder():
    with pytest.raises(ValueError, match="either `config`"):
        MemberConfig(config="a.yaml", predictions="dir", name="x")
    with pytest.raises(ValueError, match="needs a `name`"):
        MemberConfig(predictions="dir")
    assert MemberConfig(predictions="dir", name="yolo", format="yolo_txt").config is None
    assert MemberConfig(predictions="dir", name="yolo", format="coco_json", coco_image_id="stem").coco_image_id == "stem"
    with pytest.raises(ValueError, match="coco_image_id 'stem' reads coco_json predictions only; this member's are "
                                         "yolo_txt"):
        MemberConfig(predictions="dir", name="yolo", format="yolo_txt", coco_image_id="stem")
    with pytest.raises(ValueError, match="this member's are a config of ours"):
        MemberConfig(config="a.yaml", coco_image_id="exported")
    from typing import get_args

    from pipeline.external import COCO_IMAGE_IDS

    assert get_args(MemberConfig.model_fields["coco_image_id"].annotation) == COCO_IMAGE_IDS


BAD_CONTENT = [  # (format, change to fold 0's rows -- a table -- or entries -- COCO results --, expected message)
    ("table", lambda df: df.drop(columns=["score"]), r"missing column\(s\) \['score'\]"),
    ("table", lambda df: df.assign(x1=[float("inf")] + list(df.x1[1:])),
     r"1 row\(s\) with a coordinate or score that is not a finite number, first at row 2"),
    ("table", lambda df: df.assign(label=["no such class"] + list(df.label[1:].astype(str))),
     r"1 row\(s\) with a class outside 0\.\.2, first at row 2"),
    ("table", lambda df: df.assign(image_id=["nope"] + list(df.image_id[1:])),
     r"1 row\(s\) with an image that is not in the dataset, first at row 2 \(image 'nope'\)"),
    ("table", lambda df: df.assign(x1=["1,5"] + list(df.x1[1:].astype(str))),
     r"1 row\(s\) with a coordinate or score that is not a number, first at row 2"),
    ("coco_json", lambda entries: "[{", r"not valid JSON"),
    ("coco_json", lambda entries: json.dumps({"annotations": entries}), r"expected a COCO results list"),
    ("coco_json", lambda entries: json.dumps([{k: v for k, v in entries[0].items() if k != "bbox"}] + entries[1:]),
     r"entry 0 is not \{image_id, category_id, bbox"),
    ("coco_json", lambda entries: json.dumps([{**entries[0], "category_id": 9}] + entries[1:]),
     r"1 row\(s\) with a class outside 0\.\.2, first at entry 0"),
    ("coco_json", lambda entries: json.dumps([{**entries[0], "score": -0.1}] + entries[1:]),
     r"1 row\(s\) with a score outside \[0, 1\], first at entry 0"),
]


BAD_FILES = [  # (format, file of fold 0 written as these bytes, expected message after the file name)
    ("table", "fold0.csv", b"", r"not a readable CSV file \(No columns to parse"),
    ("table", "fold0.parquet", b"PAR1 not parquet", r"not a readable parquet file"),
    ("table", "fold0.csv", b"image_id;x1;y1;x2;y2;score;label\na;1;1;5;5;0.5;0\n",
     r"missing column\(s\).* -- the file looks separated by ';': write it with commas"),
    ("coco_json", "fold0.json", "[]".encode("utf-16"), r"not valid JSON"),
    ("yolo_txt", "fold0/FIRST.txt", b"\xff\xfe0 0.5 0.5 0.1 0.1 0.9", r"not a text file"),
]


@pytest.mark.parametrize("fmt, name, data, message", BAD_FILES)
def test_a_file_that_cannot_be_read_is_refused_naming_it(split, tmp_path, fmt, name, data, message):
    cfg, table, folds = split
    write_member(fake_predictions(table, folds), tmp_path / "m", fmt, table)
    (tmp_path / "m" / "fold0.csv").unlink(missing_ok=True)
    path = tmp_path / "m" / name.replace("FIRST", folds.image_id[folds.fold == 0].iloc[0])
    path.write_bytes(data)
    with pytest.raises(ExternalError, match=rf"{path.name}: {message}"):
        load_external_oof(tmp_path / "m", fmt, "ext", table, folds)


@pytest.mark.parametrize("fmt, change, message", BAD_CONTENT)
def test_a_bad_row_or_entry_is_refused_naming_the_file_and_where(split, tmp_path, fmt, change, message):
    cfg, table, folds = split
    write_member(fake_predictions(table, folds), tmp_path / "m", fmt, table)
    path = tmp_path / "m" / ("fold0.csv" if fmt == "table" else "fold0.json")
    if fmt == "table":
        change(pd.read_csv(path, dtype={"image_id": str})).to_csv(path, index=False)
    else:
        path.write_text(change(json.loads(path.read_text())))
    with pytest.raises(ExternalError, match=rf"{path.name}: " + message):
        load_external_oof(tmp_path / "m", fmt, "ext", table, folds)


BAD_YOLO = [  # (new first line of an image's file -- None: a file for an image not in the dataset --, message)
    (None, r"nope\.txt: image 'nope' is not in the dataset"),
    ("0 0.5 0.5 0.1 0.1", r"\.txt line 1: expected 'cls cx cy w h conf', got '0 0\.5 0\.5 0\.1 0\.1'"),
    ("0 0.5 0.5 0.1 0.1 0.9 3", r"\.txt line 1: expected 6 values 'cls cx cy w h conf', got 7"),
    ("7 0.5 0.5 0.1 0.1 0.9", r"a class outside 0\.\.2, first at \S+\.txt line 1"),
    ("0 0.5 nan 0.1 0.1 0.9", r"not a finite number, first at \S+\.txt line 1"),
]


@pytest.mark.parametrize("line, message", BAD_YOLO)
def test_a_bad_yolo_file_is_refused_naming_file_and_line(split, tmp_path, line, message):
    cfg, table, folds = split
    write_member(fake_predictions(table, folds), tmp_path / "m", "yolo_txt", table)
    if line is None:
        (tmp_path / "m" / "fold0" / "nope.txt").write_text("0 0.5 0.5 0.1 0.1 0.9\n")
    else:
        path = tmp_path / "m" / "fold0" / f"{folds.image_id[folds.fold == 0].iloc[0]}.txt"
        path.write_text(line + "\n" + path.read_text())
    with pytest.raises(ExternalError, match=message):
        load_external_oof(tmp_path / "m", "yolo_txt", "ext", table, folds)


def test_boxes_outside_the_image_are_clipped_and_counted_not_lost_silently(split, tmp_path, caplog):
    cfg, table, folds = split
    preds = fake_predictions(table, folds)
    image = folds.image_id[folds.fold == 0].iloc[0]
    width, height = table.images.set_index("image_id").loc[image, ["width", "height"]]
    extra = pd.DataFrame([(image, -5.0, 10.0, 20.0, height + 7.0, 0.8, 1),  # overhangs: clipped
                          (image, width + 1.0, 2.0, width + 9.0, 9.0, 0.7, 0)],  # wholly outside: no area left
                         columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"]).assign(fold=0, model="ext",
                                                                                                 tta="none")
    write_member(pd.concat([preds, extra], ignore_index=True), tmp_path / "m", "table", table)
    with caplog.at_level("WARNING", logger="pipeline.external"):
        got = load_external_oof(tmp_path / "m", "table", "ext", table, folds)
    assert "fold0.csv: 2 box(es) clipped to the image, 1 without area dropped" in caplog.text
    assert len(got) == len(preds) + 1
    clipped = got[(got.image_id == image) & (got.score == 0.8)]
    assert clipped[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[0.0, 10.0, 20.0, float(height)]]


def test_a_table_may_name_classes_or_give_their_indexes_as_numbers_or_text(split, tmp_path):
    cfg, table, folds = split
    native = fake_predictions(table, folds)
    for variant, labels in (("names", native.label.map(dict(enumerate(table.classes)))),
                            ("floats", native.label.astype(float)), ("digits", native.label.astype(str))):
        write_member(native.assign(label=labels), tmp_path / variant, "table", table)
        got = load_external_oof(tmp_path / variant, "table", "ext", table, folds)
        key = ["fold", "image_id", "score", "x1"]
        assert (got.sort_values(key).label.to_numpy() == native.sort_values(key).label.to_numpy()).all(), variant
    write_member(native.assign(label=native.label + 0.5), tmp_path / "halves", "table", table)
    with pytest.raises(ExternalError, match=r"fold0\.csv: \d+ row\(s\) with a class outside 0\.\.2, first at row 2"):
        load_external_oof(tmp_path / "halves", "table", "ext", table, folds)


@pytest.mark.slow
def test_the_ensemble_stage_fuses_an_external_member_with_one_of_ours(tmp_path, tiny_data, monkeypatch):
    """The whole path a user takes: a predictions folder named in ensemble.yaml (relative to the working
    directory, as data.root), tuned and fused with a member of ours, its name in the table, test fused too."""
    from conftest import FRCNN_TINY, write_config_dir
    from pipeline import ensemble as ensemble_stage
    from pipeline.layout import ENSEMBLE_RESULT, ensemble_dir, predictions_path, write_predictions

    folder = write_config_dir(tmp_path / "configs", tiny_data, {"m": FRCNN_TINY}, tracking={"enabled": False})
    tree = yaml.safe_load((folder / "ensemble.yaml").read_text())
    tree["ensemble"]["members"] = [{"config": "m.yaml"},
                                   {"predictions": "external/yolo", "name": "yolo", "format": "yolo_txt"}]
    (folder / "ensemble.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(folder / "ensemble.yaml")
    folds_stage.run(cfg)
    table, test_table = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "test")
    folds = read_folds(folds_path(cfg))
    test_folds = pd.DataFrame({"image_id": test_table.images.image_id, "fold": 0})
    ours = cfg.load_sibling("m.yaml")
    write_predictions(fake_predictions(table, folds, seed=1).assign(model="m"), predictions_path(ours, "oof"))
    write_predictions(fake_predictions(test_table, test_folds, seed=1).assign(model="m"),
                      predictions_path(ours, "test"))
    monkeypatch.chdir(tmp_path)  # the folder is found from here, not from the config's folder
    write_member(fake_predictions(table, folds, seed=2), tmp_path / "external" / "yolo", "yolo_txt", table,
                 test=fake_predictions(test_table, test_folds, seed=2), test_table=test_table)
    reads = []
    monkeypatch.setattr("pipeline.ensemble.load_external_oof", lambda *a: reads.append(a) or load_external_oof(*a))
    monkeypatch.setattr("pipeline.report.load_external_oof", lambda *a: reads.append(a) or load_external_oof(*a))
    assert ensemble_stage.main(["--config", str(folder / "ensemble.yaml"), "--set", "ensemble.method=nms",
                                "--set", "ensemble.nested=true"]) == 0
    assert len(reads) == 1  # the error-analysis page takes the member as the stage read it: its files read once
    assert reads[0][1:] == ("yolo_txt", "yolo") + reads[0][3:5] + ("auto",)  # the member's coco_image_id passed on
    result = json.loads((ensemble_dir(cfg) / ENSEMBLE_RESULT).read_text())
    rows = {r["row"]: r for r in result["table"]}
    nested = rows["ensemble, tuned on the other folds (nested), mean of per-fold scores"]
    assert nested["oof"] == result["nested_oof"] > 0 and "test" not in nested
    assert rows["ensemble, tuned on OOF, mean of per-fold scores"]["oof"] == result["oof_fold_mean"] > 0
    assert result["members"] == ["m", "yolo"] and "test_fused" in result
    # NMS keeps one box's own score: test's fold models are fused per member first, as recorded for the bundle
    wbf = {"iou_thr": 0.55, "skip_box_thr": 0.0, "conf_type": "avg"}  # each member's predict.tta_* (defaults)
    assert result["method"] == "nms" and result["params"]["fold_fusion"] == {"m": wbf, "yolo": wbf}
    assert any(r["row"].startswith("yolo") for r in result["table"])  # the member scored alone, like ours
    fused = pd.read_parquet(result["test_fused"])
    assert len(fused) and set(fused.image_id) <= set(test_table.images.image_id)
    assert (ensemble_dir(cfg) / "report" / "index.html").is_file()  # the error analysis reads the member too
    from pipeline import submission as submission_stage

    assert submission_stage.main(["--config", str(folder / "ensemble.yaml")]) == 0
    written = [f.name for f in (tmp_path / "configs" / "submissions").glob("*.csv") if f.name != "ledger.csv"]
    assert len(written) == 1, written
    from pipeline import pseudo
    from pipeline.layout import pseudo_dir
    from pipeline.pseudo_labels import read_pseudo_table

    low = ["--set", "pseudo.precision_target=0.000001", "--set", "pseudo.likely_precision=0.000001"]
    ens = str(folder / "ensemble.yaml")
    assert pseudo.main(["--config", ens, "--round", "1", "--set", "pseudo.teacher=ensemble", *low]) == 0
    labels = read_pseudo_table(pseudo_dir(load_config(folder / "ensemble.yaml"), 1))
    assert len(labels.boxes) and set(labels.images.image_id) <= set(test_table.images.image_id)
    # a fold teacher needs each fold's model on the test images: one test file from the tool is refused, naming it
    assert pseudo.main(["--config", ens, "--round", "1", "--force", "--set", "pseudo.teacher=fold", *low]) == 1
    monkeypatch.chdir(folder)  # from elsewhere the relative folder is not found: the error says where it looked
    assert ensemble_stage.main(["--config", str(folder / "ensemble.yaml")]) == 1


def test_image_ids_with_path_separators_get_flat_yolo_file_names_that_map_back(split, tmp_path):
    from pipeline.data.table import AnnotationTable

    cfg, table, folds = split
    nested_id = {i: f"site{k % 2}/{i}" for k, i in enumerate(table.images.image_id)}
    nested = AnnotationTable(table.images.assign(image_id=table.images.image_id.map(nested_id)),
                             table.boxes.assign(image_id=table.boxes.image_id.map(nested_id)), list(table.classes))
    nested_folds = folds.assign(image_id=folds.image_id.map(nested_id))
    export_yolo(nested, nested_folds, tmp_path / "yolo")
    first = nested.images.image_id.iloc[0]
    assert (tmp_path / "yolo" / "labels" / f"{first.replace('/', '__')}.txt").is_file()
    assert f"/images/{first.replace('/', '__')}." in (tmp_path / "yolo" / "fold0_train.txt").read_text() + (
        tmp_path / "yolo" / "fold0_val.txt").read_text()
    preds = fake_predictions(nested, nested_folds)
    write_member(preds, tmp_path / "m", "yolo_txt", nested)
    got = load_external_oof(tmp_path / "m", "yolo_txt", "ext", nested, nested_folds)
    assert sorted(set(got.image_id)) == sorted(set(preds.image_id))
    two = nested.images.iloc[:2].assign(image_id=["a/b", "a__b"])  # two ids, one file name
    clash = AnnotationTable(two, nested.boxes.iloc[:0], list(table.classes))
    with pytest.raises(ExternalError, match=r"images 'a/b' and 'a__b' would share the YOLO file name 'a__b'"):
        export_yolo(clash, pd.DataFrame({"image_id": ["a/b", "a__b"], "fold": [0, 1]}), tmp_path / "clash")


def test_coco_results_read_in_columns_equal_those_read_entry_by_entry(split, tmp_path):
    from pipeline.external import _coco_frame_at_once, _coco_frame_by_entry

    cfg, table, folds = split
    ids = list(table.images.image_id)
    preds = fake_predictions(table, folds)
    entries = [{"image_id": ids.index(r.image_id) + 1, "category_id": int(r.label) + 1, "score": r.score,
                "bbox": [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1]} for r in preds.itertuples()]
    path = tmp_path / "f.json"
    at_once = _coco_frame_at_once(path, entries, ids)
    assert at_once is not None
    pd.testing.assert_frame_equal(at_once, _coco_frame_by_entry(path, entries, ids), check_dtype=False)
    # anything unusual is left to the entry-by-entry reading, which names the entry
    for odd in ({**entries[1], "image_id": ids[0]}, {**entries[1], "category_id": 0}, {**entries[1], "bbox": [1, 2]},
                {**entries[1], "score": "0.5"}, {"image_id": 1}):
        assert _coco_frame_at_once(path, entries[:1] + [odd] + entries[2:], ids) is None, odd
    # an integer id no image has is named by either reading alike
    unknown = entries[:1] + [{**entries[1], "image_id": len(ids) + 1}] + entries[2:]
    for read in (_coco_frame_at_once, _coco_frame_by_entry):
        with pytest.raises(ExternalError, match=rf"f.json: entry 1 has image_id {len(ids) + 1}, which no exported"):
            read(path, unknown, ids)


def ultralytics_json(preds, table, file_name=True):
    """``preds`` as Ultralytics 8's ``val save_json=True`` writes them: ``image_id`` the file stem (an integer when
    the stem is all digits), ``file_name`` the exported image file (not written by older versions), classes from 1,
    rounded as it rounds."""
    ext = {r.image_id: Path(r.path).suffix.lower() for r in table.images.itertuples()}
    entries = []
    for r in preds.itertuples():
        stem = yolo_stem(r.image_id)
        entries.append({"image_id": int(stem) if stem.isnumeric() else stem, "category_id": int(r.label) + 1,
                        "score": round(r.score, 5),
                        "bbox": [round(v, 3) for v in (r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1)]})
        if file_name:
            entries[-1]["file_name"] = f"{stem}{ext[r.image_id]}"
    return entries


def renamed_split(table, folds, rename):
    """``table`` and ``folds`` with every image id ``rename(k, image_id)`` (``k``: its row)."""
    from pipeline.data.table import AnnotationTable

    renamed = {i: rename(k, i) for k, i in enumerate(table.images.image_id)}
    odd = AnnotationTable(table.images.assign(image_id=table.images.image_id.map(renamed)),
                          table.boxes.assign(image_id=table.boxes.image_id.map(renamed)), list(table.classes))
    return odd, folds.assign(image_id=folds.image_id.map(renamed))


def _same_images(preds, got):
    key = ["image_id", "score", "x1"]
    a, b = preds.sort_values(key).reset_index(drop=True), got.sort_values(key).reset_index(drop=True)
    return len(a) == len(b) and (a.image_id == b.image_id).all() and (a.label == b.label).all()


def test_older_ultralytics_json_without_file_names_maps_digit_stems_or_asks_which_reading(split, tmp_path):
    """Older Ultralytics versions write no file_name: an all-digit stem is an integer image_id, which may also be
    read as an id of our COCO export. The reading that names an image for every entry is taken; where both do and
    disagree the file is refused, naming the member's coco_image_id, which then decides."""
    from pipeline.external import _digit_stems

    cfg, table, folds = split
    n = len(table.images)

    def write(odd, odd_folds, folder):
        preds = fake_predictions(odd, odd_folds)
        folder.mkdir()
        for k, part in preds.groupby("fold"):
            (folder / f"fold{k}.json").write_text(json.dumps(ultralytics_json(part, odd, file_name=False)))
        return preds

    # stems past the exported ids (and stems of ids with a path separator): only the stem reading names them all
    odd, odd_folds = renamed_split(table, folds, lambda k, i: f"{1000 + k}" if k % 2 else f"site/{i}")
    preds = write(odd, odd_folds, tmp_path / "past")
    assert _same_images(preds, load_external_oof(tmp_path / "past", "coco_json", "ext", odd, odd_folds))
    assert _same_images(preds, load_external_oof(tmp_path / "past", "coco_json", "ext", odd, odd_folds, "stem"))
    with pytest.raises(ExternalError, match=r"fold0.json: entry \d+ has image_id 10\d\d, which no exported image "
                                            r"has.*they are all-digit file stems.*coco_image_id stem reads them"):
        load_external_oof(tmp_path / "past", "coco_json", "ext", odd, odd_folds, "exported")

    # the stems 1..n in another order than the table's: both readings name an image for every entry
    odd, odd_folds = renamed_split(table, folds, lambda k, i: str(n - k))
    preds = write(odd, odd_folds, tmp_path / "both")
    with pytest.raises(ExternalError, match=r"fold0.json: integer image_ids name different images read as exported "
                                            r"ids or as file stems .*set the member's coco_image_id"):
        load_external_oof(tmp_path / "both", "coco_json", "ext", odd, odd_folds)
    assert _same_images(preds, load_external_oof(tmp_path / "both", "coco_json", "ext", odd, odd_folds, "stem"))
    with pytest.raises(ExternalError, match=r"image\(s\) outside fold 0"):  # read as exported ids: other images
        load_external_oof(tmp_path / "both", "coco_json", "ext", odd, odd_folds, "exported")

    # the stem reading names only what an all-digit stem names: a number two stems share names no image
    assert _digit_stems(["007", "7", "12", "a/3", "x"]) == {12: "12"}
    entries = ultralytics_json(preds[preds.image_id == str(n)], odd, file_name=False)
    entries[1]["image_id"] = n + 5
    with pytest.raises(ExternalError, match=rf"f.json: entry 1 has image_id {n + 5}, which is no image's all-digit"):
        _read_coco_entries(tmp_path / "f.json", entries, list(odd.images.image_id), "stem")


def test_ultralytics_save_json_maps_images_by_file_name_numeric_and_nested_ids_too(split, tmp_path):
    from pipeline.data.table import AnnotationTable
    from pipeline.external import _coco_frame_at_once, _coco_frame_by_entry

    cfg, table, folds = split
    # ids Ultralytics writes as integers ("0007" -> 7: not the exported COCO id 7) and ids with a path separator
    renamed = {i: (f"{k:04d}" if k % 2 else f"site/{i}") for k, i in enumerate(table.images.image_id)}
    odd = AnnotationTable(table.images.assign(image_id=table.images.image_id.map(renamed)),
                          table.boxes.assign(image_id=table.boxes.image_id.map(renamed)), list(table.classes))
    odd_folds = folds.assign(image_id=folds.image_id.map(renamed))
    preds = fake_predictions(odd, odd_folds)
    for k, part in preds.groupby("fold"):
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / f"fold{k}.json").write_text(json.dumps(ultralytics_json(part, odd)))
    got = load_external_oof(tmp_path / "m", "coco_json", "ext", odd, odd_folds)
    key = ["image_id", "score", "x1"]
    a, b = preds.sort_values(key).reset_index(drop=True), got.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) and (a.image_id == b.image_id).all() and (a.label == b.label).all()
    assert abs(a[["x1", "y1", "x2", "y2"]].to_numpy() - b[["x1", "y1", "x2", "y2"]].to_numpy()).max() < 2e-3
    entries, ids = ultralytics_json(preds, odd), list(odd.images.image_id)
    pd.testing.assert_frame_equal(_coco_frame_at_once(tmp_path / "f.json", entries, ids),
                                  _coco_frame_by_entry(tmp_path / "f.json", entries, ids), check_dtype=False)
    stray = entries[:3] + [{**entries[3], "file_name": "elsewhere.jpg"}]
    with pytest.raises(ExternalError, match=r"f.json: entry 3 has file_name 'elsewhere.jpg', which names no image"):
        _read_coco_entries(tmp_path / "f.json", stray, ids)


def _read_coco_entries(path, entries, ids, reading="auto"):
    from pipeline.external import _read_coco

    path.write_text(json.dumps(entries))
    return _read_coco(path, ids, reading)


def test_label_files_moved_into_a_subfolder_of_the_fold_are_refused_naming_it(split, tmp_path):
    # the README's old "move labels/ to fold0/" done as `mv .../labels external/m/fold0/` into an existing folder:
    # read as it stood, fold 0 had no predictions and the member scored as a model that finds nothing, unsaid
    cfg, table, folds = split
    write_member(fake_predictions(table, folds), tmp_path / "m", "yolo_txt", table)
    fold0 = tmp_path / "m" / "fold0"
    (fold0 / "labels").mkdir()
    for f in fold0.glob("*.txt"):
        f.rename(fold0 / "labels" / f.name)
    with pytest.raises(ExternalError, match=r"fold0/labels: \d+ label file\(s\) in a subfolder of .*rename "
                                            r"Ultralytics' labels/ folder to fold0"):
        load_external_oof(tmp_path / "m", "yolo_txt", "ext", table, folds)


@pytest.mark.parametrize("fmt", ["yolo_txt", "coco_json"])
def test_a_fold_without_any_prediction_is_refused_and_a_sparse_one_counted(split, tmp_path, fmt, caplog):
    cfg, table, folds = split
    preds = fake_predictions(table, folds)
    write_member(preds, tmp_path / "m", fmt, table)
    if fmt == "yolo_txt":
        for f in (tmp_path / "m" / "fold1").glob("*.txt"):
            f.unlink()
    else:
        (tmp_path / "m" / "fold1.json").write_text("[]")
    n1 = int((folds.fold == 1).sum())
    with pytest.raises(ExternalError, match=rf"fold1(\.json)?: no predictions for any of fold 1's {n1} images"):
        load_external_oof(tmp_path / "m", fmt, "ext", table, folds)
    keep = folds.image_id[folds.fold == 1].iloc[:1]  # one image of the fold predicted: kept, and said
    write_member(preds[(preds.fold != 1) | preds.image_id.isin(keep)], tmp_path / "sparse", fmt, table)
    with caplog.at_level("WARNING", logger="pipeline.external"):
        got = load_external_oof(tmp_path / "sparse", fmt, "ext", table, folds)
    assert f"predictions for 1 of fold 1's {n1} images only" in caplog.text
    assert set(got.image_id[got.fold == 1]) == set(keep)


def test_a_sub_pixel_overshoot_is_the_files_rounding_clipped_without_a_warning(split, tmp_path, caplog):
    cfg, table, folds = split
    preds = fake_predictions(table, folds)
    image = folds.image_id[folds.fold == 0].iloc[0]
    width = float(table.images.set_index("image_id").loc[image, "width"])
    edge = pd.DataFrame([(image, 10.0, 10.0, width + 0.0003, 40.0, 0.8, 1)],  # 6-decimal rounding at the edge
                        columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"]).assign(fold=0, model="ext",
                                                                                               tta="none")
    write_member(pd.concat([preds, edge], ignore_index=True), tmp_path / "m", "table", table)
    with caplog.at_level("INFO", logger="pipeline.external"):
        got = load_external_oof(tmp_path / "m", "table", "ext", table, folds)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "fold0.csv: 1 box(es) past the image edge by at most 0.01 px (the file's rounding) clipped" in caplog.text
    assert got[(got.image_id == image) & (got.score == 0.8)].x2.tolist() == [width]
