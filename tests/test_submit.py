"""The whole chain on a tiny dataset: folds → train → predict (TTA) → ensemble → submission → ledger."""
import json

import pandas as pd
import pytest

from conftest import EFFDET_TINY, FRCNN_TINY, write_config_dir
from pipeline import leaderboard, submit
from pipeline.config import load_config
from pipeline.layout import folds_path, predictions_path, read_folds
from pipeline.formats import validate_submission


pytestmark = pytest.mark.slow  # trains 2 families x 2 folds, then the whole chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data):
    root = write_config_dir(tmp_path_factory.mktemp("chain"), tiny_data,
                            {"frcnn": FRCNN_TINY, "effdet": EFFDET_TINY}, train={"epochs": 1})
    result = submit.run(root, [])
    return root, result


def test_chain_writes_a_valid_submission_and_ledger_row(chain, capsys):
    root, result = chain
    path = result["submission"]
    cfg = load_config(root / "ensemble.yaml")
    test_ids = sorted(p.stem for p in (cfg.data.root / "test").glob("*.jpg"))
    validate_submission(path, "label_conf_xyxy", cfg.data.root / "sample_submission.csv", n_classes=3)
    assert sorted(pd.read_csv(path).image_id) == test_ids
    meta = json.loads(open(str(path) + ".meta.json").read())
    assert meta["members"] == ["frcnn", "effdet"] and meta["cv"] == pytest.approx(result["oof"])
    # ensemble.nested auto: the tiny tuning is quick, so the stage scored it out of fold too
    assert meta["cv_nested"] == pytest.approx(result["nested_oof"])
    assert leaderboard.main(["show", "--dir", str(root / "submissions")]) == 0
    shown = capsys.readouterr().out
    assert "tiny-ens" in shown and f"{result['oof']:.4f}" in shown and f"{result['nested_oof']:.4f}" in shown
    ledger = pd.read_csv(root / "submissions" / "ledger.csv")
    assert ledger.public.notna().all(), "the tiny test split has labels: the chain records a local LB score"


def test_oof_predictions_come_only_from_the_fold_that_did_not_train_on_them(chain):
    root, _ = chain
    for member in ("frcnn", "effdet"):
        cfg = load_config(root / f"{member}.yaml")
        folds = read_folds(folds_path(cfg)).set_index("image_id").fold
        oof = pd.read_parquet(predictions_path(cfg, "oof"))
        assert (oof.image_id.map(folds) == oof.fold).all()
        assert set(oof.tta) <= {"none", "hflip"}
        test = pd.read_parquet(predictions_path(cfg, "test"))
        assert set(test.fold) == {0, 1}  # every fold model predicts the test images


def test_result_table_has_every_row(chain):
    _, result = chain
    rows = [r["row"] for r in result["table"]]
    for member in ("frcnn", "effdet"):
        assert f"{member}: mean single-fold model" in rows
        assert f"{member}: fold ensemble, no TTA" in rows
        assert f"{member}: fold ensemble, TTA none+hflip" in rows
    assert rows[-4:] == ["ensemble, ensemble-boxes defaults", "ensemble, WBF tuned on OOF",
                         "ensemble, tuned on OOF, mean of per-fold scores",
                         "ensemble, tuned on the other folds (nested), mean of per-fold scores"]
    # the per-fold rows have no test cell: on test the tuning on all OOF runs
    *scored, fold_mean, nested = result["table"]
    assert all(0.0 <= r["oof"] <= 1.0 and "test" in r for r in scored) and "test" not in nested | fold_mean
    # COCO mAP rows carry mAP50 beside it; the tuned row's OOF is the CV the ledger records
    assert all(0.0 <= r[f"{split} map50"] <= 1.0 for r in scored for split in ("oof", "test"))
    assert scored[-1]["oof"] == pytest.approx(result["oof"]) and nested["oof"] == pytest.approx(result["nested_oof"])
    assert fold_mean["oof"] == pytest.approx(result["oof_fold_mean"])


def test_rerun_resumes_finished_folds_instead_of_retraining(chain, capsys):
    root, _ = chain
    from pipeline import train

    train.run(load_config(root / "frcnn.yaml"), "all", resume=True)
    assert capsys.readouterr().out.count("nothing to do") == 2
