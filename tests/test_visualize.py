"""The picture commands: `cam` (a fold model on its own OOF image) and `predictions` (the fused test boxes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import FRCNN_TINY, write_config_dir
from pipeline.config import load_config
from pipeline.data import load_dataset
from pipeline.layout import ensemble_dir, fold_dir, folds_path, fused_path, write_folds_file, write_predictions
from pipeline.visualize import PALETTE, check_oof_image, main, pick_detection

FOLDS = pd.DataFrame({"image_id": ["a", "b", "c"], "fold": [0, 1, 1]})


def test_an_image_is_explained_only_by_the_model_that_did_not_train_on_it():
    check_oof_image(FOLDS, 1, "b", Path("folds.csv"))  # b is fold 1's validation image: fine
    with pytest.raises(ValueError, match="fold 0's validation set, so fold 1's model trained on it.*--fold 0"):
        check_oof_image(FOLDS, 1, "a", Path("folds.csv"))
    with pytest.raises(ValueError, match="not in folds.csv: not a cross-validated training image"):
        check_oof_image(FOLDS, 0, "test_image", Path("folds.csv"))
    with pytest.raises(ValueError, match="fold 5 is not in folds.csv"):
        check_oof_image(FOLDS, 5, "a", Path("folds.csv"))


def test_pick_detection():
    found = {"scores": np.array([0.9, 0.8, 0.5]), "labels": np.array([1, 0, 0])}
    classes = ["cat", "dog"]
    assert pick_detection(found, None, None, classes) == 0
    assert pick_detection(found, 2, None, classes) == 2
    assert pick_detection(found, None, "cat", classes) == 1  # the best of its class
    with pytest.raises(ValueError, match="has 3 detections"):
        pick_detection(found, 3, None, classes)
    with pytest.raises(ValueError, match="unknown class 'bird'; the classes: cat, dog"):
        pick_detection(found, None, "bird", classes)
    with pytest.raises(ValueError, match="no detection of class 'dog'"):
        pick_detection({"scores": np.array([0.9]), "labels": np.array([0])}, None, "dog", classes)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, tiny_data) -> Path:
    root = write_config_dir(tmp_path_factory.mktemp("visualize"), tiny_data, {"frcnn": FRCNN_TINY})
    cfg = load_config(root / "ensemble.yaml")
    ids = sorted(load_dataset(cfg.data, "train").images.image_id)
    write_folds_file(pd.DataFrame({"image_id": ids, "fold": [i % 2 for i in range(len(ids))]}), folds_path(cfg))
    return root


def test_predictions_draws_the_fused_test_boxes(config_dir, capsys):
    cfg = load_config(config_dir / "ensemble.yaml")
    test = load_dataset(cfg.data, "test")
    boxes = test.boxes.assign(score=0.9, model="tiny-ens", fold=-1, tta="wbf")
    low = boxes.assign(score=0.1, label=0)  # under --score-thr: not drawn
    write_predictions(pd.concat([boxes, low]), fused_path(cfg, "test"))
    assert main(["predictions", "--config", str(config_dir / "ensemble.yaml"), "--split", "test", "--n", "4"]) == 0
    out = ensemble_dir(cfg) / "test_predictions.png"
    assert f"wrote {out}" in capsys.readouterr().out
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (30 + 320, 4 * 320, 3)  # a legend band over one row of 4 tiles
    for label in sorted(set(test.boxes.label)):  # every class drawn has its colour in the picture
        assert (pixels[30:].reshape(-1, 3) == PALETTE[label]).all(axis=1).any(), label
    assert main(["predictions", "--config", str(config_dir / "frcnn.yaml")]) == 1
    assert "not an ensemble config" in capsys.readouterr().err


@pytest.mark.slow
def test_cam_command_explains_a_fold_models_detection_on_its_own_oof_image(config_dir, capsys):
    import torch

    from pipeline import checkpoint
    from pipeline.models import create_model

    cfg = load_config(config_dir / "frcnn.yaml")
    torch.manual_seed(0)
    checkpoint.save({"model": create_model(cfg.model, 3).state_dict()}, fold_dir(cfg, 1) / "best.pt")
    ids = sorted(load_dataset(cfg.data, "train").images.image_id)
    mine, other = ids[1], ids[0]  # fold 1 holds the odd positions
    out = config_dir / "cam.png"
    for method in ("gradcam", "eigencam"):
        assert main(["cam", "--config", str(config_dir / "frcnn.yaml"), "--fold", "1", "--image", mine,
                     "--method", method, "--box", "1", "--out", str(out)]) == 0, capsys.readouterr().err
        picture = np.asarray(Image.open(out).convert("RGB"))
        assert picture.shape[1] == 2 * picture.shape[0]  # the image with its boxes | the heat map over it
    assert main(["cam", "--config", str(config_dir / "frcnn.yaml"), "--fold", "1", "--image", other]) == 1
    assert "model trained on it" in capsys.readouterr().err
    assert main(["cam", "--config", str(config_dir / "frcnn.yaml"), "--fold", "0", "--image", other]) == 1
    assert "best.pt not found" in capsys.readouterr().err
