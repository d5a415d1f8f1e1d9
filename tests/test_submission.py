"""The submission stage: the fused test table as a validated file, cut to what the metric reads."""
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.formats import keep_top_boxes
from pipeline.submission import boxes_per_image


def test_keep_top_boxes_keeps_the_most_confident_per_image():
    preds = pd.DataFrame({"image_id": ["a", "a", "a", "b"], "score": [0.2, 0.9, 0.5, 0.1], "x1": [0, 1, 2, 3]})
    kept = keep_top_boxes(preds, 2)
    assert kept.x1.tolist() == [1, 2, 3]  # a's two best in table order, and b's only box
    assert keep_top_boxes(preds, None) is preds


@pytest.mark.parametrize("metric, setting, expected", [("coco_map", "metric", 100), ("gwd", "metric", None),
                                                       ("gwd", 50, 50), ("coco_map", None, None)])
def test_boxes_per_image_follows_the_metric_unless_set(metric, setting, expected):
    cfg = load_config("configs/demo/ensemble.yaml", [f"metric={metric}",
                                                    f"submission.max_boxes_per_image={'null' if setting is None else setting}"])
    assert boxes_per_image(cfg) == expected


def test_the_stage_says_what_to_run_first(tmp_path, capsys):
    from pipeline import submission

    code = submission.main(["--config", "configs/demo/ensemble.yaml", "--set", f"runs_dir={tmp_path}"])
    assert code == 1 and "run python -m pipeline.ensemble" in capsys.readouterr().err
