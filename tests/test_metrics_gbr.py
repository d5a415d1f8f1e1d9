"""The Great Barrier Reef metric: hand-computed cases, a plain-Python reference, one pass for every threshold."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.metrics import evaluate, get_metric
from pipeline.metrics.gbr import IOU_THRESHOLDS, f2_by_score_threshold, f2_counts
from pipeline.metrics.gwd import pack
from test_metrics import make_gt, make_preds, ref_true_positives


def ref_f2(gts: list, preds: list, scores: list) -> float:
    """Plain Python: per image the stable descending-score greedy matching (best free GT with IoU > t), counts
    summed over the dataset, F2 = 5 TP / (5 TP + 4 FN + FP) per threshold, mean over the thresholds."""
    values = []
    for t in [0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80]:
        tp = sum(ref_true_positives(g, p, s, t) for g, p, s in zip(gts, preds, scores))
        fp, fn = sum(len(p) for p in preds) - tp, sum(len(g) for g in gts) - tp
        denominator = 5 * tp + 4 * fn + fp
        values.append(1.0 if denominator == 0 else 5 * tp / denominator)
    return sum(values) / len(values)


def score(gts: list, preds: list, scores: list | None = None, score_thresholds=(-np.inf,)) -> list[float]:
    scores = [[1.0] * len(p) for p in preds] if scores is None else scores
    order = [np.argsort(-np.asarray(s, float), kind="stable") for s in scores]
    gt_boxes, gt_offsets = pack([np.array(g, float).reshape(-1, 4) for g in gts])
    pr_boxes, pr_offsets = pack([np.array(p, float).reshape(-1, 4)[o] for p, o in zip(preds, order)])
    pr_scores = np.concatenate([np.asarray(s, float)[o] for s, o in zip(scores, order)] or [np.zeros(0)])
    return f2_by_score_threshold(gt_boxes, gt_offsets, pr_boxes, pr_scores, pr_offsets,
                                 np.array(score_thresholds, float)).tolist()


def test_the_thresholds_are_the_literal_decimals_from_030_to_080():
    assert IOU_THRESHOLDS.tolist() == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]


def test_a_half_overlapping_box_is_a_hit_below_iou_050_only_strictly():
    # IoU exactly 0.5: a hit at 0.30..0.45 (4 thresholds), a miss (one FP and one FN) at 0.50..0.80 (7)
    assert score([[[0, 0, 10, 10]]], [[[0, 0, 10, 5]]]) == [pytest.approx(4 / 11, abs=1e-15)]


def test_counts_are_summed_over_the_dataset_not_averaged_per_image():
    # image a: found; image b: three starfish missed. Dataset F2 = 5 / (5 + 4 * 3) at every threshold, where a mean
    # of per-image F2 would give (1 + 0) / 2
    gts = [[[0, 0, 10, 10]], [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]]
    assert score(gts, [[[0, 0, 10, 10]], []]) == [pytest.approx(5 / 17, abs=1e-15)]


def test_a_miss_costs_four_times_a_false_positive():
    assert score([[[0, 0, 10, 10]]], [[[0, 0, 10, 10], [50, 50, 60, 60]]]) == [pytest.approx(5 / 6, abs=1e-15)]
    assert score([[[0, 0, 10, 10], [50, 50, 60, 60]]], [[[0, 0, 10, 10]]]) == [pytest.approx(5 / 9, abs=1e-15)]


def test_nothing_to_find_and_nothing_claimed_scores_one_and_any_claim_then_scores_zero():
    assert score([[], []], [[], []]) == [1.0]
    assert score([[], []], [[[0, 0, 5, 5]], []]) == [0.0]
    assert score([[[0, 0, 5, 5]]], [[]]) == [0.0]


def test_the_most_confident_prediction_matches_first():
    # p1 overlaps g1 (IoU 2/3) and g2 (3/7); p2 is g1 itself. p1 first takes g1, leaving p2 a false positive (its IoU
    # with g2 is 1/4): TP 1, FP 1, FN 1 at every threshold. p2 first takes g1, and p1 then takes g2 where 3/7 > t
    # (0.30..0.40): TP 2 there
    gts, preds = [[[0, 0, 10, 10], [6, 0, 16, 10]]], [[[2, 0, 12, 10], [0, 0, 10, 10]]]
    assert score(gts, preds, [[0.9, 0.1]]) == [pytest.approx(0.5, abs=1e-15)]
    assert score(gts, preds, [[0.1, 0.9]]) == [pytest.approx(7 / 11, abs=1e-15)]


_coord = st.integers(0, 12)
_box = st.tuples(_coord, _coord, st.integers(1, 8), st.integers(1, 8)).map(
    lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])
_image = st.tuples(st.lists(_box, max_size=5),
                   st.lists(st.tuples(_box, st.sampled_from([0.1, 0.5, 0.5, 0.9])), max_size=7))


@settings(max_examples=200, deadline=None)
@given(st.lists(_image, min_size=1, max_size=6))
def test_equals_the_plain_python_reference_at_every_score_threshold(images):
    # integer boxes: IoUs exactly at a threshold happen; few score values: ties, and thresholds at a score
    gts = [g for g, _ in images]
    preds = [[b for b, _ in p] for _, p in images]
    scores = [[s for _, s in p] for _, p in images]
    thresholds = [-np.inf, 0.1, 0.3, 0.5, 0.9, 1.0]
    expected = [ref_f2(gts, [[b for b, s in zip(p, ss) if s >= t] for p, ss in zip(preds, scores)],
                       [[s for s in ss if s >= t] for ss in scores]) for t in thresholds]
    assert score(gts, preds, scores, thresholds) == pytest.approx(expected, abs=1e-12)


def test_threads_over_images_give_the_single_thread_counts(monkeypatch):
    from pipeline.metrics import gbr
    rng = np.random.default_rng(5)
    gts, preds, scores = [], [], []
    for _ in range(400):
        g = rng.uniform(0, 80, (int(rng.integers(0, 4)), 2))
        gts.append(np.c_[g, g + rng.uniform(5, 20, (len(g), 2))])
        p = np.r_[gts[-1] + rng.normal(0, 3, gts[-1].shape), rng.uniform(0, 80, (int(rng.integers(0, 3)), 4))]
        preds.append(np.c_[np.minimum(p[:, :2], p[:, 2:]), np.maximum(p[:, :2], p[:, 2:])])
        scores.append(np.round(rng.random(len(p)), 1))
    order = [np.argsort(-s, kind="stable") for s in scores]
    args = (*pack(gts), *pack([p[o] for p, o in zip(preds, order)]))
    pr_scores = np.concatenate([s[o] for s, o in zip(scores, order)])
    thresholds = np.array([0.0, 0.3, 0.55, 1.0])
    runs = []
    for cpus in (3, 1):
        monkeypatch.setattr(gbr, "available_cpus", lambda cpus=cpus: cpus)
        counts = f2_counts(args[0], args[1], args[2], pr_scores, args[3], thresholds)
        runs.append([(c.tp.tolist(), c.n_pred, c.n_gt) for c in counts])
    assert runs[0] == runs[1]
    expected = [ref_f2(gts, [p[s >= t] for p, s in zip(preds, scores)], [s[s >= t] for s in scores])
                for t in thresholds]
    assert score(gts, preds, scores, thresholds) == pytest.approx(expected, abs=1e-12)


def test_registered_for_the_stages_with_its_breakdown():
    entry = get_metric("gbr_f2")
    assert entry.higher_is_better and not entry.class_aware and entry.boxes_read is None
    assert entry.score_by_threshold is not None
    gt = make_gt({"a": [(0, 0, 10, 10)], "b": [(0, 0, 10, 10), (20, 20, 30, 30)], "c": []})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("b", 0, 0, 10, 10, 0.8), ("c", 50, 50, 60, 60, 0.3)])
    result = evaluate("gbr_f2", gt, preds)
    # TP 2, FN 1, FP 1 at every threshold: F2 = 10 / (10 + 4 + 1)
    assert result.score == pytest.approx(10 / 15, abs=1e-15)
    assert set(result.details) == {f"iou{t:.2f}" for t in IOU_THRESHOLDS} | {"precision", "recall"}
    assert result.details["precision"] == pytest.approx(2 / 3) and result.details["recall"] == pytest.approx(2 / 3)
