"""The submission stage: the fused test table as a validated file, cut to what the metric reads."""
from pathlib import Path

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


# ------------------------------------------------------------------------------------ pseudo-label round


def fused_ensemble(tmp_path, tiny_data, pseudo_rounds=None, members=("frcnn", "effdet")):
    """An ensemble that has 'run': its fused test table (one box per test image) and a hand-written result.json,
    with ``pseudo_rounds`` when given (as pipeline.ensemble records them), without when None (an older one)."""
    import json

    from conftest import EFFDET_TINY, FRCNN_TINY, write_config_dir
    from pipeline.data import load_dataset
    from pipeline.io import atomic_write_text
    from pipeline.layout import ENSEMBLE_RESULT, ensemble_dir, fused_path, write_predictions

    root = write_config_dir(tmp_path / "configs", tiny_data, {"frcnn": FRCNN_TINY, "effdet": EFFDET_TINY},
                            tracking={"enabled": False})
    cfg = load_config(root / "ensemble.yaml")
    ids = load_dataset(cfg.data, "test").images.image_id.tolist()
    write_predictions(pd.DataFrame({"image_id": ids, "x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0, "score": 0.8,
                                    "label": 0, "model": "wbf", "fold": -1, "tta": "wbf"}),
                      fused_path(cfg, "test"))
    result = {"ensemble": cfg.ensemble.name, "members": list(members), "oof": 0.5, "test_labelled": True}
    if pseudo_rounds is not None:
        result["pseudo_rounds"] = pseudo_rounds
    atomic_write_text(ensemble_dir(cfg) / ENSEMBLE_RESULT, json.dumps(result))
    return cfg


def ledger_row(cfg):
    from pipeline import ledger

    (row,) = ledger.load_ledger(cfg.submission.dir)
    return row


def test_the_ledger_row_records_the_highest_pseudo_round(tmp_path, tiny_data, monkeypatch, capsys):
    import json

    from pipeline import leaderboard, submission

    round_dir = tmp_path / "elsewhere" / "teacher-run"  # a path: the round is in its meta.json, not its name
    round_dir.mkdir(parents=True)
    (round_dir / "meta.json").write_text(json.dumps({"round": 3, "classes": [], "files": {}, "content_hash": "x"}))
    monkeypatch.chdir(tmp_path)
    cfg = fused_ensemble(tmp_path, tiny_data, {"frcnn": 2, "effdet": str(round_dir.relative_to(tmp_path))})
    path = Path(submission.run(cfg)["submission"])
    row = ledger_row(cfg)
    assert (row["pseudo_round"], row["pseudo_members"]) == ("3", "frcnn=2;effdet=3")
    sidecar = json.loads((path.parent / (path.name + ".meta.json")).read_text())
    assert sidecar["pseudo_round"] == "3" and sidecar["pseudo_rounds"]["frcnn"] == 2
    capsys.readouterr()
    assert leaderboard.main(["show", "--dir", str(cfg.submission.dir)]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["submission", "date", "members", "round"] and line.split()[3] == "3"


@pytest.mark.parametrize("rounds, expected, members", [
    ({"frcnn": None, "effdet": 0}, "0", "frcnn=0;effdet=0"),  # no member on pseudo-labels
    ({"frcnn": "runs/x/pseudo/round2"}, "?", "frcnn=2;effdet=?"),  # folder gone: its name says 2; effdet unknown
    (None, "", ""),  # a result.json from before rounds were recorded: unknown, not "0"
])
def test_pseudo_round_without_rounds_or_with_unknown_ones(tmp_path, tiny_data, monkeypatch, rounds, expected,
                                                         members):
    from pipeline import submission

    monkeypatch.chdir(tmp_path)  # the round's path is relative to the working directory, and not there
    cfg = fused_ensemble(tmp_path, tiny_data, rounds)
    submission.run(cfg)
    assert (ledger_row(cfg)["pseudo_round"], ledger_row(cfg)["pseudo_members"]) == (expected, members)


def test_a_malformed_pseudo_round_names_the_file_and_member(tmp_path, tiny_data, capsys):
    from pipeline import submission

    cfg = fused_ensemble(tmp_path, tiny_data, {"frcnn": [1, 2], "effdet": 0})
    assert submission.main(["--config", str(cfg.source)]) == 1
    err = capsys.readouterr().err
    assert "result.json: pseudo_rounds['frcnn']: expected a round number" in err
