"""Pseudo-label rounds: thresholds chosen on OOF, the image rule, and fold safety of the round-2 training sets."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import (ConfigError, DataConfig, ExperimentConfig, FoldsConfig, PseudoConfig, TrackingConfig,
                             TrainConfig, load_config)
from pipeline.data import AnnotationTable, DataError
from pipeline.layout import (ALL_FOLDS, PSEUDO_BOXES, PSEUDO_IMAGES, PSEUDO_META, folds_path, pseudo_dir,
                             write_folds_file)
from pipeline.pseudo import check_round, choose_thresholds, label_boxes, select
from pipeline.pseudo_labels import (PseudoLabelError, file_sha256, fold_training_set, pseudo_table_hash,
                                    read_pseudo_table, unlabelled_table, write_pseudo_table)

CLASSES = ["cell", "blob"]


def _png(path: Path, width: int = 40, height: int = 30) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 90, 90)).save(path)
    return str(path)


def _preds(rows: list[tuple]) -> pd.DataFrame:
    """(image_id, x1, y1, x2, y2, score, label) rows as a fused prediction table."""
    df = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])
    return df.assign(model="ens", fold=-1, tta="wbf")


# --------------------------------------------------------------------------------- thresholds chosen on OOF


def _hand_oof() -> tuple[AnnotationTable, pd.DataFrame]:
    """Five images, one object each, and eight fused boxes whose hits (H) and misses (M) by descending score are
    H H M H H M M H: precision of the boxes kept at each score is 1, 1, .67, .75, .8, .67, .57, .63."""
    images = pd.DataFrame({"image_id": [f"i{k}" for k in range(5)], "path": "-", "width": 100, "height": 100})
    gt = pd.DataFrame({"image_id": [f"i{k}" for k in range(5)], "x1": 10.0, "y1": 10.0, "x2": 50.0, "y2": 50.0,
                       "label": 0})
    hit, miss = (10, 10, 50, 50), (60, 60, 90, 90)
    plan = [("i0", hit, .95), ("i1", hit, .9), ("i0", miss, .8), ("i2", hit, .7), ("i3", hit, .6),
            ("i1", miss, .5), ("i2", miss, .4), ("i4", hit, .3)]
    return AnnotationTable(images, gt, CLASSES), _preds([(i, *box, s, 0) for i, box, s in plan])


@pytest.mark.parametrize("target, expected", [(0.9, 0.9), (0.8, 0.6), (0.75, 0.6), (0.6, 0.3), (1.0, 0.9)])
def test_label_threshold_is_the_lowest_score_whose_oof_precision_reaches_the_target(target, expected):
    table, oof = _hand_oof()
    t = choose_thresholds(table, oof, table.images.image_id.tolist(), target, min(target, 0.6))
    # precision is not monotone in the threshold: 0.8 and 0.5 fall below targets that 0.6 and 0.3 reach again
    assert t["label"] == pytest.approx(expected)
    assert t["oof_at_label"]["precision"] >= target
    assert t["likely"] <= t["label"]


def test_the_threshold_counts_a_box_of_the_wrong_class_as_a_miss():
    table, oof = _hand_oof()
    oof.loc[oof.score == 0.9, "label"] = 1  # the second hit now names the wrong class
    t = choose_thresholds(table, oof, table.images.image_id.tolist(), 0.9, 0.5)
    assert t["label"] == pytest.approx(0.95)


def test_no_threshold_reaching_the_target_is_a_clear_error():
    table, oof = _hand_oof()
    oof = oof[oof.score <= 0.8]  # the best box is now a miss: precision tops out at 2/3
    with pytest.raises(PseudoLabelError, match=r"reaches OOF precision 0.9 .*best is 0.667 at score 0.6000"):
        choose_thresholds(table, oof, table.images.image_id.tolist(), 0.9, 0.5)


# --------------------------------------------------------------------------------- the image rule


def test_images_are_kept_when_few_likely_boxes_fall_below_the_label_threshold():
    images = pd.DataFrame({"image_id": ["sure", "half_seen", "nothing", "only_doubt", "one_doubt"]})
    box = (1, 1, 5, 5)
    rows = ([("sure", *box, s, 0) for s in (.95, .92, .9, .1)]  # 3 labels; .1 is below the likely threshold
            + [("half_seen", *box, s, 0) for s in (.95, .6, .5, .5)]  # 1 label, 3 of 4 likely boxes uncertain
            + [("nothing", *box, .2, 0)]  # no likely box
            + [("only_doubt", *box, s, 0) for s in (.7, .6)]  # likely boxes, no label
            + [("one_doubt", *box, s, 0) for s in (.99, .98, .97, .6)])  # 1 of 4 uncertain: exactly at the limit
    fused = _preds(rows).assign(teacher_fold=ALL_FOLDS)
    out = select(fused, images, [ALL_FOLDS], label_thr=0.9, likely_thr=0.5, max_uncertain_fraction=0.25,
                 keep_empty=False).set_index("image_id")
    assert out.verdict.to_dict() == {"sure": "kept", "half_seen": "uncertain", "nothing": "empty",
                                     "only_doubt": "uncertain", "one_doubt": "kept"}
    assert out.loc["sure", ["n_likely", "n_label"]].tolist() == [3, 3]
    assert out.loc["half_seen", "uncertain"] == pytest.approx(0.75)
    kept_empty = select(fused, images, [ALL_FOLDS], 0.9, 0.5, 0.25, keep_empty=True).set_index("image_id")
    assert kept_empty.verdict["nothing"] == "kept" and kept_empty.verdict["only_doubt"] == "uncertain"


def test_every_teacher_fold_judges_every_image_even_one_it_predicted_nothing_on():
    images = pd.DataFrame({"image_id": ["a", "b"]})
    fused = _preds([("a", 1, 1, 5, 5, .95, 0)]).assign(teacher_fold=0)
    out = select(fused, images, [0, 1], 0.9, 0.5, 0.25, keep_empty=False)
    assert len(out) == 4 and out[(out.teacher_fold == 0) & (out.image_id == "a")].verdict.item() == "kept"
    assert (out[out.teacher_fold == 1].verdict == "empty").all()


def test_label_boxes_are_clipped_to_their_image_and_counted():
    images = pd.DataFrame({"image_id": ["a"], "width": [40], "height": [30]})
    fused = _preds([("a", -3, 2, 10, 12, .95, 0), ("a", 38, 5, 50, 9, .92, 1), ("a", 41, 1, 45, 9, .99, 0),
                    ("a", 1, 1, 5, 5, .5, 0)]).assign(teacher_fold=ALL_FOLDS)
    kept = pd.DataFrame({"teacher_fold": [ALL_FOLDS], "image_id": ["a"]})
    repairs: dict[str, int] = {}
    boxes = label_boxes(fused, kept, images, 0.9, repairs)
    assert repairs == {"clipped": 2, "dropped_no_area": 1}  # the box right of the image has nothing left
    assert boxes[["x1", "x2"]].values.tolist() == [[0.0, 10.0], [38.0, 40.0]]


# --------------------------------------------------------------------------------- fold safety of round 2


@pytest.fixture
def labelled(tmp_path) -> tuple[ExperimentConfig, AnnotationTable, pd.DataFrame]:
    """Six labelled images in two folds (a0-a2: fold 0, a3-a5: fold 1), a folds file, a config."""
    ids = [f"a{k}" for k in range(6)]
    images = pd.DataFrame({"image_id": ids, "path": [_png(tmp_path / "train" / f"{i}.png") for i in ids],
                           "width": 40, "height": 30})
    boxes = pd.DataFrame({"image_id": ids, "x1": 1.0, "y1": 1.0, "x2": 9.0, "y2": 9.0, "label": 0})
    cfg = ExperimentConfig(experiment="toy", runs_dir=tmp_path / "runs",
                           data=DataConfig(name="toy", format="gwd_csv", root=tmp_path),
                           folds=FoldsConfig(k=2, dir=tmp_path / "folds"), tracking=TrackingConfig(enabled=False))
    folds = pd.DataFrame({"image_id": ids, "fold": [0, 0, 0, 1, 1, 1]})
    write_folds_file(folds, folds_path(cfg))
    return cfg, AnnotationTable(images, boxes, CLASSES), folds


def _round(cfg: ExperimentConfig, root: Path, image_ids: list[str], teacher_folds: list[int], number: int = 1,
           paths: dict[str, str] | None = None, x1: float = 2.0) -> Path:
    """A round whose every (teacher fold, image) has one box at x1 + teacher fold: which teacher labelled a box
    can be read off its position."""
    paths = paths or {i: _png(root / "test" / f"{i}.png") for i in image_ids}
    images = pd.DataFrame([{"image_id": i, "path": paths[i], "width": 40, "height": 30, "source": "", "group": "",
                            "pseudo_round": number, "teacher_fold": f, "pseudo_split": "test"}
                           for f in teacher_folds for i in image_ids])
    boxes = images[["image_id", "teacher_fold"]].assign(
        x1=x1 + images.teacher_fold + 1, y1=2.0, x2=20.0, y2=20.0, label=1, score=0.95, pseudo_round=number)
    folder = pseudo_dir(cfg, number)
    write_pseudo_table(folder, images, boxes, {"round": number, "classes": CLASSES, "teacher": "fold",
                                               "folds_file": str(folds_path(cfg)),
                                               "folds_sha256": file_sha256(folds_path(cfg))})
    return folder


@pytest.mark.parametrize("teacher_folds", [[0, 1], [ALL_FOLDS]], ids=["fold_teachers", "ensemble_teacher"])
def test_no_validation_image_is_ever_in_a_training_set_pseudo_images_included(labelled, tmp_path, teacher_folds):
    cfg, table, folds = labelled
    _round(cfg, tmp_path, ["t0", "t1"], teacher_folds)
    cfg.train.pseudo = 1
    for fold in (0, 1):
        merged, train_ids, val_ids = fold_training_set(cfg, table, folds, fold)
        assert not set(train_ids) & set(val_ids)
        assert sorted(val_ids) == sorted(folds.image_id[folds.fold == fold])  # validation: real images only
        assert sorted(train_ids) == sorted([*folds.image_id[folds.fold != fold], "t0", "t1"])
        pseudo_boxes = merged.boxes[merged.boxes.image_id.isin(["t0", "t1"])]
        teacher = fold if teacher_folds != [ALL_FOLDS] else ALL_FOLDS
        assert (pseudo_boxes.x1 == 2.0 + teacher + 1).all() and len(pseudo_boxes) == 2  # its own teacher's labels
        real = [merged.boxes, table.boxes]
        assert [b[b.image_id.isin(val_ids)].values.tolist() for b in real] == [real[1][real[1].image_id.isin(
            val_ids)].values.tolist()] * 2  # the validation images keep their real labels, nothing added


def test_without_a_round_the_split_is_the_folds_file(labelled):
    cfg, table, folds = labelled
    merged, train_ids, val_ids = fold_training_set(cfg, table, folds, 1)
    assert merged is table and train_ids == ["a0", "a1", "a2"] and val_ids == ["a3", "a4", "a5"]
    assert pseudo_table_hash(cfg) is None


def test_a_round_holding_an_oof_image_is_refused_naming_it(labelled, tmp_path):
    cfg, table, folds = labelled
    _round(cfg, tmp_path, ["t0", "a4"], [0, 1], paths={"t0": _png(tmp_path / "t0.png"), "a4": table.images.path[4]})
    cfg.train.pseudo = 1
    with pytest.raises(PseudoLabelError, match=r"pseudo image 'a4' is in .*toy_k2_s42.csv.*validation image"):
        fold_training_set(cfg, table, folds, 0)


def test_a_labelled_file_under_another_id_is_refused(labelled, tmp_path):
    cfg, table, folds = labelled
    _round(cfg, tmp_path, ["renamed"], [0, 1], paths={"renamed": table.images.path[0]})
    cfg.train.pseudo = 1
    with pytest.raises(PseudoLabelError, match=r"'renamed' is the file .* of labelled training image 'a0'"):
        fold_training_set(cfg, table, folds, 1)


def test_a_labelled_image_outside_the_folds_file_is_refused(labelled, tmp_path):
    cfg, table, folds = labelled
    _round(cfg, tmp_path, ["a5"], [0, 1], paths={"a5": _png(tmp_path / "elsewhere" / "a5.png")})
    cfg.train.pseudo = 1
    with pytest.raises(PseudoLabelError, match="'a5' is an image of the labelled training split"):
        fold_training_set(cfg, table, folds[folds.image_id != "a5"], 0)


def test_a_changed_round_is_refused_and_its_hash_changes(labelled, tmp_path):
    cfg, table, folds = labelled
    folder = _round(cfg, tmp_path, ["t0"], [0, 1])
    cfg.train.pseudo = str(folder)  # a path works as well as a round number
    before = pseudo_table_hash(cfg)
    _round(cfg, tmp_path, ["t0"], [0, 1])  # made again, same labels: the same hash, a run may resume
    assert pseudo_table_hash(cfg) == before
    _round(cfg, tmp_path, ["t0"], [0, 1], x1=3.0)  # the same round made again with other labels
    after = pseudo_table_hash(cfg)
    assert before != after and len(after) == 64  # a training run resumed on it would be told
    boxes = pd.read_parquet(folder / PSEUDO_BOXES)
    boxes.assign(x2=boxes.x2 + 1).to_parquet(folder / PSEUDO_BOXES)  # edited by hand afterwards
    with pytest.raises(PseudoLabelError, match="boxes.parquet changed after the round was written"):
        fold_training_set(cfg, table, folds, 0)


def test_an_unfinished_round_is_refused(labelled, tmp_path):
    cfg, table, folds = labelled
    folder = _round(cfg, tmp_path, ["t0"], [0, 1])
    (folder / PSEUDO_META).unlink()
    cfg.train.pseudo = 1
    with pytest.raises(PseudoLabelError, match="meta.json not found; the round was not finished"):
        fold_training_set(cfg, table, folds, 0)
    cfg.train.pseudo = 7
    with pytest.raises(PseudoLabelError, match="round7.*run python -m pipeline.pseudo"):
        fold_training_set(cfg, table, folds, 0)


def test_fold_teachers_from_other_folds_are_refused(labelled, tmp_path):
    cfg, table, folds = labelled
    _round(cfg, tmp_path, ["t0"], [0, 1])
    cfg.train.pseudo = 1
    moved = folds.assign(fold=[0, 0, 1, 1, 1, 0])
    write_folds_file(moved, folds_path(cfg))
    with pytest.raises(PseudoLabelError, match="teacher fold K saw other images"):
        fold_training_set(cfg, table, moved, 0)


def test_a_box_outside_its_image_is_named_by_row(labelled, tmp_path):
    cfg, table, folds = labelled
    folder = _round(cfg, tmp_path, ["t0", "t1"], [0, 1])
    images = pd.read_parquet(folder / PSEUDO_IMAGES)
    boxes = pd.read_parquet(folder / PSEUDO_BOXES)
    boxes.loc[2, "x2"] = 41.0  # the image is 40 px wide
    meta = json.loads((folder / PSEUDO_META).read_text())
    write_pseudo_table(folder, images, boxes, {k: meta[k] for k in ("round", "classes", "teacher")})
    with pytest.raises(PseudoLabelError, match=r"boxes.parquet: 1 box\(es\) outside the image: row 2 \(image 't0'\)"):
        read_pseudo_table(folder)


def test_the_pseudo_images_must_exist(labelled, tmp_path):
    cfg, table, folds = labelled
    _round(cfg, tmp_path, ["t0"], [0, 1])
    os.remove(tmp_path / "test" / "t0.png")
    cfg.train.pseudo = 1
    with pytest.raises(PseudoLabelError, match="image file\\(s\\) not found, e.g. image 't0'"):
        fold_training_set(cfg, table, folds, 0)


# --------------------------------------------------------------------------------- rounds, sources, config


def test_a_round_is_made_from_members_of_the_round_before():
    check_round(1, {"a": {"round": 0, "teacher": None}, "b": {"round": 0, "teacher": None}}, "fold")
    check_round(2, {"a": {"round": 1, "teacher": "fold"}, "b": {"round": 0, "teacher": None}}, "fold")
    with pytest.raises(PseudoLabelError, match=r"--round 2: .*a: round 0.*the round they make is 1"):
        check_round(2, {"a": {"round": 0, "teacher": None}}, "fold")


def test_an_unlabelled_folder_becomes_an_image_table(tmp_path):
    _png(tmp_path / "extra" / "u1.png", 40, 30)
    _png(tmp_path / "extra" / "u2.jpg", 20, 10)
    (tmp_path / "extra" / "notes.txt").write_text("not an image")
    data = DataConfig(name="toy", format="gwd_csv", root=tmp_path, unlabelled="extra")
    table = unlabelled_table(data, CLASSES)
    assert table.images[["image_id", "width", "height"]].values.tolist() == [["u1", 40, 30], ["u2", 20, 10]]
    assert table.boxes.empty and table.classes == CLASSES
    (tmp_path / "extra" / "u3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="1 unreadable image.*u3.png"):
        unlabelled_table(data, CLASSES)
    skipped = unlabelled_table(data.model_copy(update={"skip_bad_images": True}), CLASSES)
    assert skipped.images.image_id.tolist() == ["u1", "u2"] and skipped.report.counts() == {"skipped_image": 1}
    _png(tmp_path / "extra" / "u1.jpg")
    with pytest.raises(DataError, match="several files for image id 'u1'"):
        unlabelled_table(data, CLASSES)
    with pytest.raises(PseudoLabelError, match="data.unlabelled names, under data.root; this config sets none"):
        unlabelled_table(data.model_copy(update={"unlabelled": None}), CLASSES)


def test_config_names_a_round_or_a_folder(tmp_path):
    assert TrainConfig(pseudo="2").pseudo == 2 and TrainConfig(pseudo="runs/x/pseudo/round1").pseudo.endswith("1")
    for bad in (0, True, ""):
        with pytest.raises(ValueError):
            TrainConfig(pseudo=bad)
    with pytest.raises(ValueError, match="likely_precision 0.95 is above precision_target 0.9"):
        PseudoConfig(likely_precision=0.95)
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: t, format: gwd_csv, root: .}\npseudo: {sources: [test, web]}\n")
    with pytest.raises(ConfigError, match="pseudo.sources.1"):
        load_config(path)


# --------------------------------------------------------------------------------- a tiny round end to end


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data):
    from conftest import FRCNN_TINY, write_config_dir
    from pipeline import submit

    root = write_config_dir(tmp_path_factory.mktemp("pseudo_chain"), tiny_data, {"frcnn": FRCNN_TINY},
                            train={"epochs": 1})
    submit.run(root, [])
    return root


# The tiny model trains for 2 steps: its OOF precision is far below any real target, so the end-to-end tests set
# the targets just above zero. They check the plumbing and the guarantees, not that a round helps.
LOW_TARGETS = ["--set", "pseudo.precision_target=0.000001", "--set", "pseudo.likely_precision=0.000001"]


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if a != "--set"]


@pytest.mark.slow
def test_round_one_end_to_end_from_the_command_line(chain, capsys):
    import mlflow

    from pipeline import pseudo

    ens = chain / "ensemble.yaml"
    assert pseudo.main(["--config", str(ens), "--round", "2", *LOW_TARGETS]) == 1
    assert "the round they make is 1" in capsys.readouterr().err
    assert pseudo.main(["--config", str(ens), "--round", "1", "--force", *LOW_TARGETS]) == 0
    cfg = load_config(ens, _overrides(LOW_TARGETS))
    folder = pseudo_dir(cfg, 1)
    table = read_pseudo_table(folder)
    meta = table.meta
    test_ids = {p.stem for p in (cfg.data.root / "test").glob("*.jpg")}
    assert meta["round"] == 1 and meta["source_ensemble"]["name"] == "tiny-ens" and meta["teacher"] == "fold"
    assert set(table.images.image_id) <= test_ids and set(table.images.pseudo_split) == {"test"}
    assert set(table.images.teacher_fold) == {0, 1} and (table.images.pseudo_round == 1).all()
    assert (table.boxes.score >= meta["thresholds"]["label"]).all() and len(table.boxes) == meta["n_boxes"]
    assert sum(c["kept"] for c in meta["counts"]) == len(table.images)
    assert pseudo.main(["--config", str(ens), "--round", "1", *LOW_TARGETS]) == 1  # no silent replacement
    assert "pass --force" in capsys.readouterr().err
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id],
                              "tags.`pipeline.stage` = 'pseudo'")
    assert runs and runs[0].data.tags["pipeline.pseudo_round"] == "1"
    assert runs[0].data.tags["pipeline.source_ensemble"] == "tiny-ens"
    assert runs[0].data.metrics["label_threshold"] == pytest.approx(meta["thresholds"]["label"])


@pytest.mark.slow
def test_the_teachers_fuse_exactly_as_the_ensemble_did(chain):
    from pipeline.layout import fused_path, read_predictions
    from pipeline.pseudo import fuse_members, member_predictions, read_ensemble_result
    from pipeline.data import load_dataset
    from pipeline.layout import read_folds

    cfg = load_config(chain / "ensemble.yaml")
    result, folds = read_ensemble_result(cfg), read_folds(folds_path(cfg))
    key = ["image_id", "x1", "y1", "x2", "y2", "score", "label"]

    def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
        a, b = (d[key].sort_values(key).reset_index(drop=True) for d in (a, b))
        pd.testing.assert_frame_equal(a, b, check_dtype=False)

    for split, teacher in (("oof", "fold"), ("test", "ensemble")):
        table = load_dataset(cfg.data, "train" if split == "oof" else "test")
        members = member_predictions(cfg, split, table, folds)
        fused = fuse_members(members, table.images, result["params"], cfg.ensemble.wbf_backend, teacher,
                             [0, 1], split)
        same(fused, read_predictions(fused_path(cfg, split)))  # fold teacher K = the fused OOF of fold K's models


@pytest.mark.slow
def test_round_two_training_sets_from_a_real_round(chain, tmp_path):
    import yaml

    from pipeline import pseudo
    from pipeline.data import load_dataset
    from pipeline.layout import predictions_path, read_folds
    from pipeline.train import make_loaders

    ens = chain / "ensemble.yaml"
    cfg = load_config(ens, _overrides(LOW_TARGETS))
    # an unlabelled folder: copies of the test images under new names, and the members' predictions of them
    # written as the predict stage would (the same boxes under the new ids), so both sources must agree
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for path in (cfg.data.root / "test").glob("*.jpg"):
        shutil.copy(path, unlabelled / f"u_{path.name}")
    member = cfg.load_sibling("frcnn.yaml")
    test_preds = pd.read_parquet(predictions_path(member, "test"))
    test_preds.assign(image_id="u_" + test_preds.image_id).to_parquet(predictions_path(member, "unlabelled"))
    sources = ["--set", f"data.unlabelled={unlabelled}", "--set", "pseudo.sources=[test, unlabelled]"]
    assert pseudo.main(["--config", str(ens), "--round", "1", "--force", *LOW_TARGETS, *sources]) == 0
    made = read_pseudo_table(pseudo_dir(cfg, 1))
    by_split = {s: made.boxes[made.boxes.image_id.isin(made.images.image_id[made.images.pseudo_split == s])]
                for s in ("test", "unlabelled")}
    renamed = by_split["unlabelled"].assign(image_id=by_split["unlabelled"].image_id.str[2:])
    cols = ["teacher_fold", "image_id", "x1", "y1", "x2", "y2", "label", "score"]
    pd.testing.assert_frame_equal(renamed[cols].sort_values(cols).reset_index(drop=True),
                                  by_split["test"][cols].sort_values(cols).reset_index(drop=True))

    round2 = chain / "frcnn_r1.yaml"
    round2.write_text(yaml.safe_dump({"base": "frcnn.yaml", "run": "frcnn_r1", "train": {"pseudo": 1}}))
    r2 = load_config(round2)
    table, folds = load_dataset(r2.data, "train"), read_folds(folds_path(r2))
    for fold in (0, 1):
        merged, train_ids, val_ids = fold_training_set(r2, table, folds, fold)
        pseudo_ids = set(made.images.image_id[made.images.teacher_fold == fold])
        assert pseudo_ids and pseudo_ids <= set(train_ids) and not set(train_ids) & set(val_ids)
        assert set(val_ids) == set(folds.image_id[folds.fold == fold])
        _, _, loader, _ = make_loaders(r2, merged, [i for i in train_ids if i in pseudo_ids], val_ids)
        images, targets, _ = next(iter(loader))  # pseudo images load and carry their boxes through augmentation
        assert len(images) == r2.train.batch_size and sum(len(t["boxes"]) for t in targets) > 0
    assert np.all(made.boxes.label.between(0, len(table.classes) - 1))


def test_the_teachers_fuse_only_the_views_the_ensemble_kept(tmp_path, tiny_data, caplog):
    from test_ensemble import views_config

    from pipeline.pseudo import member_predictions

    cfg = views_config(tmp_path, tiny_data, ["hflip"])
    with caplog.at_level("WARNING", logger="pipeline.layout"):
        ((name, preds, views),) = member_predictions(cfg, "test", None, None)
    assert name == "m" and views == ["hflip"] and list(preds.tta) == ["hflip"]
    assert "left out" not in caplog.text  # the entry left them out: nothing to warn of
    cfg = views_config(tmp_path / "b", tiny_data, ["rot90_2"])
    with pytest.raises(ConfigError, match=r"member m.yaml \(.*oof.parquet\): views \['rot90_2'\] were not"):
        member_predictions(cfg, "test", None, None)


def test_a_test_view_the_oof_predictions_lack_is_left_out_and_logged(tmp_path, tiny_data, caplog):
    from test_ensemble import views_config

    from pipeline.pseudo import member_predictions

    cfg = views_config(tmp_path, tiny_data, None, test_views=("none", "rot90_1", "hflip"))
    with caplog.at_level("WARNING", logger="pipeline.layout"):
        ((_, preds, views),) = member_predictions(cfg, "test", None, None)
    assert views == ["none", "hflip", "scale1.25"] and list(preds.tta) == ["none", "hflip"]
    assert "member m: predictions of views ['rot90_1'] that its OOF predictions lack are left out" in caplog.text
