"""Error-analysis report: per-image TP/FP/FN, per-threshold breakdown, worst-images picture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data.table import AnnotationTable
from pipeline.metrics import Scorer
from pipeline.report import (GT_COLOUR, PRED_COLOUR, per_image_scores, per_threshold_breakdown, rank_worst,
                             worst_images_png, write_ensemble_report)

W, H = 64, 48
LEGEND = 30
# image_id -> ground truth (x1, y1, x2, y2, label)
GT = {
    "perfect": [(10, 10, 30, 30, 0)],
    "miss": [(5, 5, 25, 25, 0)],
    "fp": [],
    "wrong_class": [(10, 10, 30, 30, 0)],
    "empty": [],
    "partial": [(0, 0, 20, 20, 0), (30, 0, 50, 20, 0)],
}
# (image_id, x1, y1, x2, y2, score, label)
PREDS = [
    ("perfect", 10, 10, 30, 30, 0.9, 0),
    ("fp", 5, 5, 20, 20, 0.8, 0),
    ("wrong_class", 10, 10, 30, 30, 0.9, 1),
    ("partial", 0, 0, 20, 20, 0.9, 0),
    ("partial", 30, 0, 42, 20, 0.7, 0),  # IoU 0.6 with the second box: a hit at 0.50 and 0.55 only (strict >)
    ("partial", 0, 30, 10, 40, 0.1, 0),  # low score: dropped by score_thr=0.3
    ("unlisted", 0, 0, 5, 5, 0.9, 0),  # not in the table: ignored
]


@pytest.fixture
def table(tmp_path: Path) -> AnnotationTable:
    for image_id in GT:
        Image.new("RGB", (W, H), (128, 128, 128)).save(tmp_path / f"{image_id}.png")
    images = pd.DataFrame({"image_id": list(GT), "path": [str(tmp_path / f"{i}.png") for i in GT],
                           "width": W, "height": H})
    boxes = pd.DataFrame([(i, *b) for i, bs in GT.items() for b in bs],
                         columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    return AnnotationTable(images, boxes, ["a", "b"])


@pytest.fixture
def preds() -> pd.DataFrame:
    return pd.DataFrame(PREDS, columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])


def test_per_image_hand_cases(table, preds):
    df = per_image_scores(table, preds, score_thr=0.3).set_index("image_id")
    assert list(df.columns) == ["n_gt", "n_pred", "tp50", "fp50", "fn50", "score"]
    expect = {  # n_gt, n_pred, tp50, fp50, fn50, score
        "perfect": (1, 1, 1, 0, 0, 1.0),
        "miss": (1, 0, 0, 0, 1, 0.0),
        "fp": (0, 1, 0, 1, 0, 0.0),
        "wrong_class": (1, 1, 0, 1, 1, 0.0),
        "empty": (0, 0, 0, 0, 0, 1.0),
        "partial": (2, 2, 2, 0, 0, (2 * 1.0 + 4 * (1 / 3)) / 6),
    }
    for image_id, (n_gt, n_pred, tp, fp, fn, score) in expect.items():
        row = df.loc[image_id]
        assert (row.n_gt, row.n_pred, row.tp50, row.fp50, row.fn50) == (n_gt, n_pred, tp, fp, fn), image_id
        assert row.score == pytest.approx(score), image_id


def test_score_thr_and_label_free_matching(table, preds):
    low = per_image_scores(table, preds, ["partial"], score_thr=0.0).iloc[0]
    assert (low.n_pred, low.tp50, low.fp50) == (3, 2, 1)
    agnostic = per_image_scores(table, preds.drop(columns="label"), ["wrong_class"]).iloc[0]
    assert (agnostic.tp50, agnostic.fp50, agnostic.fn50, agnostic.score) == (1, 0, 0, 1.0)


def test_single_class_score_equals_gwd_metric():
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(20)]

    def boxes(n: int) -> np.ndarray:
        xy = rng.uniform(0, 80, (n, 2))
        return np.hstack([xy, xy + rng.uniform(5, 20, (n, 2))]).round(1)

    gt = pd.DataFrame([(i, *b, 0) for i in ids for b in boxes(rng.integers(0, 6))],
                      columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    pr = pd.DataFrame([(i, *b, s, 0) for i in ids for b in boxes(rng.integers(0, 6)) for s in [rng.uniform()]],
                      columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])
    table = AnnotationTable(pd.DataFrame({"image_id": ids, "path": ids, "width": 100, "height": 100}), gt, ["x"])
    ours = per_image_scores(table, pr, score_thr=0.25).set_index("image_id").score
    metric = Scorer("gwd", table)(pr[pr.score >= 0.25]).per_image
    np.testing.assert_allclose(ours.loc[metric.index].to_numpy(), metric.to_numpy())


def test_class_aware_counts_equal_per_class_sums():
    rng = np.random.default_rng(1)
    ids = [f"i{k}" for k in range(10)]
    rows = [(i, x, y, x + rng.uniform(5, 15), y + rng.uniform(5, 15), int(rng.integers(0, 3)))
            for i in ids for x, y in rng.uniform(0, 40, (int(rng.integers(0, 8)), 2))]
    gt = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    pr = gt.assign(x1=gt.x1 + rng.uniform(-2, 2, len(gt)), score=rng.uniform(size=len(gt)),
                   label=np.where(rng.uniform(size=len(gt)) < 0.2, (gt.label + 1) % 3, gt.label))
    images = pd.DataFrame({"image_id": ids, "path": ids, "width": 100, "height": 100})
    table = AnnotationTable(images, gt, ["a", "b", "c"])
    both = per_image_scores(table, pr).set_index("image_id")[["tp50", "fp50", "fn50"]]
    per_class = sum(per_image_scores(AnnotationTable(images, gt[gt.label == c], ["a", "b", "c"]),
                                     pr[pr.label == c]).set_index("image_id")[["tp50", "fp50", "fn50"]]
                    for c in range(3))
    pd.testing.assert_frame_equal(both, per_class)


def test_breakdown_hand_case(table, preds):
    df = per_threshold_breakdown(table, preds, ["perfect", "partial"], score_thr=0.3).set_index("iou")
    assert list(df.index) == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75])
    at50, at60 = df.iloc[0], df.iloc[2]
    assert (at50.tp, at50.fp, at50.fn) == (3, 0, 0)
    assert (at50.precision, at50.recall, at50.ratio, at50.mean_image_score) == (1.0, 1.0, 1.0, 1.0)
    assert (at60.tp, at60.fp, at60.fn) == (2, 1, 1)
    assert at60.precision == pytest.approx(2 / 3) and at60.recall == pytest.approx(2 / 3)
    assert at60.ratio == pytest.approx(0.5) and at60.mean_image_score == pytest.approx((1 + 1 / 3) / 2)
    low = per_threshold_breakdown(table, preds, ["perfect", "partial"], score_thr=0.0).iloc[0]
    assert (low.tp, low.fp, low.precision) == (3, 1, 0.75)
    coco = per_threshold_breakdown(table, preds, score_thr=0.3, coco=True)
    assert len(coco) == 10 and coco.iou.iloc[-1] == pytest.approx(0.95)


def test_empty_denominators(table):
    no_preds = pd.DataFrame(columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])
    row = per_threshold_breakdown(table, no_preds, ["empty"]).iloc[0]
    assert (row.tp, row.fp, row.fn, row.precision, row.recall, row.ratio) == (0, 0, 0, 0.0, 0.0, 1.0)


def test_unknown_image_id_is_an_error(table, preds):
    with pytest.raises(ValueError, match="not in the annotation table"):
        per_image_scores(table, preds, ["nope"])


def test_worst_image_ranks_first(table, preds):
    ranked = rank_worst(per_image_scores(table, preds, score_thr=0.3))
    # score 0 for miss, fp and wrong_class; wrong_class has the most errors (1 FP + 1 FN)
    assert ranked.image_id.iloc[0] == "wrong_class"
    assert list(ranked.image_id.iloc[1:3]) == ["fp", "miss"]  # one error each: by image id
    assert ranked.image_id.iloc[-1] in ("empty", "perfect")


def _has(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((pixels.reshape(-1, 3) == colour).all(axis=1).any())


def test_worst_png_tiles_and_colours(table, preds, tmp_path):
    out = worst_images_png(table, preds, None, tmp_path / "out" / "worst.png", n=5, score_thr=0.3, tile=64)
    assert out.exists() and not list(out.parent.glob(".*.tmp"))
    arr = np.asarray(Image.open(out).convert("RGB"))
    assert arr.shape[:2] == (LEGEND + 2 * 64, 4 * 64)  # 5 tiles in 4 columns: 2 rows
    first = arr[LEGEND:LEGEND + 64, :64]  # wrong_class: GT and a prediction on the same box
    assert _has(first, GT_COLOUR) and _has(first, PRED_COLOUR)
    assert _has(arr[LEGEND:], GT_COLOUR) and _has(arr[LEGEND:], PRED_COLOUR)
    small = worst_images_png(table, preds, ["perfect", "miss"], tmp_path / "small.png", tile=64)
    assert Image.open(small).size == (2 * 64, LEGEND + 64)


def test_unreadable_image_gets_a_grey_tile(table, preds, tmp_path):
    Path(table.images.path[table.images.image_id == "miss"].iloc[0]).unlink()
    out = worst_images_png(table, preds, ["miss"], tmp_path / "w.png", tile=64)
    assert _has(np.asarray(Image.open(out).convert("RGB"))[LEGEND:], GT_COLOUR)


def test_write_ensemble_report(table, preds, tmp_path):
    result = write_ensemble_report(table, preds, list(GT), tmp_path / "rep", score_thr=0.3)
    for name in ("worst_oof.png", "per_threshold.csv", "per_image.csv"):
        assert (tmp_path / "rep" / name).exists(), name
    per_image = pd.read_csv(tmp_path / "rep" / "per_image.csv")
    assert per_image.image_id.iloc[0] == "wrong_class" and len(per_image) == len(GT)
    assert len(pd.read_csv(tmp_path / "rep" / "per_threshold.csv")) == 6
    assert (result["tp50"], result["fp50"], result["fn50"]) == (3, 2, 2)
    assert result["per_threshold"]["0.50"]["tp"] == 3 and result["n_images"] == len(GT)
    json.dumps(result)  # plain types only
