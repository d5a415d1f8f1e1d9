"""The predict stage's OOF report: each TTA view and their fusion scored as the ensemble table scores them."""
import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.metrics import Scorer
from pipeline.predict import report_oof
from test_ensemble import synthetic


def test_a_thresholded_metric_reports_each_view_at_its_best_threshold(capsys):
    table, good, _ = synthetic(12, seed=2)
    rng = np.random.default_rng(0)
    noise = good.assign(x1=good.x1 + 60, x2=good.x2 + 60, score=rng.uniform(0.05, 0.25, len(good)))
    preds = pd.concat([good, noise, good.assign(tta="hflip")], ignore_index=True)
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": 0})
    cfg = load_config("configs/demo/frcnn.yaml", ["metric=gwd", "ensemble.tune.score_thr=[0.3]"])
    scores = report_oof(cfg, table, folds, preds, ["none", "hflip"])
    out = capsys.readouterr().out
    gwd = Scorer("gwd", table)
    none = preds[preds.tta == "none"]
    assert scores["none"] == pytest.approx(gwd(none[none.score >= 0.3]).score) and scores["none"] > gwd(none).score
    assert "OOF gwd         none: " in out and "at score >= 0.3" in out and "tta_wbf" in scores
    coco = report_oof(load_config("configs/demo/frcnn.yaml"), table, folds, preds, ["none"])
    assert coco["none"] == pytest.approx(Scorer("coco_map", table)(none).score)
    assert "at score" not in capsys.readouterr().out  # AP ranks every box
