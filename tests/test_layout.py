"""The file contracts: one module names every path and schema the stages share."""
import pandas as pd
import pytest

from conftest import tiny_config
from pipeline import layout
from pipeline.layout import (FoldsError, PREDICTION_COLUMNS, empty_predictions, fold_dir, folds_path, fused_path,
                             normalise_predictions, predictions_path, read_folds, read_predictions, run_dir,
                             write_folds_file, write_predictions)


def test_paths_follow_the_config(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data)
    assert folds_path(cfg) == tmp_path / "folds" / "demo_k2_s0.csv"
    assert run_dir(cfg) == tmp_path / "runs" / cfg.experiment / "tiny"
    assert fold_dir(cfg, 3) == run_dir(cfg) / "fold3"
    assert predictions_path(cfg, "oof") == run_dir(cfg) / "predictions" / "oof.parquet"
    assert fused_path(cfg, "test").parent == layout.ensemble_dir(cfg)
    assert fused_path(cfg, "test").name == "test_fused.parquet"


def test_folds_file_round_trip_and_errors(tmp_path):
    folds = pd.DataFrame({"image_id": ["a", "b", "c"], "fold": [0, 1, 0]})
    path = write_folds_file(folds, tmp_path / "f.csv")
    assert read_folds(path).equals(folds)
    with pytest.raises(FoldsError, match="not found"):
        read_folds(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("id,k\na,0\n")
    with pytest.raises(FoldsError, match="expected columns image_id,fold"):
        read_folds(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("image_id,fold\na,0\na,1\n")
    with pytest.raises(FoldsError, match="'a' appears twice"):
        read_folds(tmp_path / "dup.csv")


def test_prediction_table_keeps_its_schema(tmp_path):
    rows = pd.DataFrame({"image_id": [1, 2], "x1": [0, 1], "y1": [0, 1], "x2": [5, 6], "y2": [5, 7],
                         "score": [0.5, 0.9], "label": [0, 1], "model": "m", "fold": [0, 1], "tta": "none",
                         "extra": ["dropped", "dropped"]})
    path = write_predictions(rows, tmp_path / "p" / "oof.parquet")
    back = read_predictions(path)
    assert list(back.columns) == PREDICTION_COLUMNS
    assert back.image_id.tolist() == ["1", "2"] and back.x1.dtype == "float64" and back.label.dtype == "int64"
    assert list(empty_predictions().columns) == PREDICTION_COLUMNS and len(normalise_predictions(rows.iloc[:0])) == 0
    with pytest.raises(ValueError, match=r"lacks columns \['tta'\]"):
        normalise_predictions(rows.drop(columns="tta"))


NA_LIKE_IDS = ["NA", "nan", "NaN", "null", "None", "N/A", "#N/A", "n/a", "NULL", "-nan", "", "1.0", "007"]


def test_folds_ids_are_read_back_as_written(tmp_path):
    """Finding 2: ids pandas reads as missing values (``NA``, ``nan``, ``None``...) came back as NaN ("image nan
    appears twice"); ids that look like numbers must not become numbers either."""
    folds = pd.DataFrame({"image_id": NA_LIKE_IDS, "fold": [i % 3 for i in range(len(NA_LIKE_IDS))]})
    back = read_folds(write_folds_file(folds, tmp_path / "f.csv"))
    assert back.image_id.tolist() == NA_LIKE_IDS and back.fold.tolist() == folds.fold.tolist()
    assert back.fold.dtype == "int64"
    (tmp_path / "bad.csv").write_text("image_id,fold\na,0\nb,\n")
    with pytest.raises(FoldsError, match=r"bad\.csv line 3: fold '' is not an integer"):
        read_folds(tmp_path / "bad.csv")


def test_prediction_tables_keep_string_ids(tmp_path):
    rows = pd.DataFrame({"image_id": NA_LIKE_IDS, "x1": 0.0, "y1": 0.0, "x2": 5.0, "y2": 5.0, "score": 0.5,
                         "label": 0, "model": "m", "fold": 0, "tta": "none"})
    back = read_predictions(write_predictions(rows, tmp_path / "p.parquet"))
    assert back.image_id.tolist() == NA_LIKE_IDS


def test_rows_of_views_keeps_the_fused_views_and_logs_the_untuned_ones(caplog):
    from pipeline.layout import rows_of_views

    preds = pd.DataFrame({"tta": ["none", "hflip", "vflip", "none"], "score": [0.1, 0.2, 0.3, 0.4]})
    assert rows_of_views(preds, ["hflip", "none", "vflip"], "m") is preds  # nothing to leave out: no copy
    with caplog.at_level("WARNING", logger="pipeline.layout"):
        kept = rows_of_views(preds, ["none"], "m")  # left out by the member's entry: said by no one
        assert list(kept.score) == [0.1, 0.4] and list(kept.index) == [0, 1]
        assert caplog.text == ""
        rows_of_views(preds, ["none"], "m", tuned=["none", "hflip"])
    assert "member m: predictions of views ['vflip'] that its OOF predictions lack are left out" in caplog.text
