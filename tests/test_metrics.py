"""Metrics: hand-computed cases, plain-Python references (hypothesis) and pycocotools parity."""
from __future__ import annotations

import contextlib
import functools
import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.table import AnnotationTable
from pipeline.metrics import (METRICS, GroundTruth, Metric, MetricResult, Packed, Scorer, evaluate, get_metric,
                              higher_is_better, metric_names, register_metric, unregister_metric)
from pipeline.metrics.gwd import IOU_THRESHOLDS, gwd_score
from pipeline.metrics.packing import group_by_image, image_positions, pack_boxes, scoring_at_least
from pipeline.metrics.voc import _ap_terms, average_precision, voc_ap_by_threshold

THRESHOLDS = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75]


# ----------------------------------------------------------------------------------------------- helpers


def make_gt(gt: dict[str, list], classes: tuple[str, ...] = ("wheat",)) -> AnnotationTable:
    """``gt``: image_id -> list of (x1, y1, x2, y2[, label]); every key is an image, empty lists included."""
    images = pd.DataFrame({"image_id": list(gt), "path": list(gt), "width": 1000, "height": 1000})
    rows = [(i, *b[:4], b[4] if len(b) > 4 else 0) for i, bs in gt.items() for b in bs]
    boxes = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    return AnnotationTable(images, boxes, list(classes))


def make_preds(rows: list[tuple]) -> pd.DataFrame:
    """rows: (image_id, x1, y1, x2, y2, score[, label])."""
    full = [(*r[:6], r[6] if len(r) > 6 else 0) for r in rows]
    return pd.DataFrame(full, columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])


def ref_iou(a, b) -> float:
    # Same float operations as the kernel: areas, inter = iw * ih, union = (area_a + area_b) - inter.
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0) + max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0) - inter
    return inter / union if union > 0 else 0.0


def ref_true_positives(gts, preds, scores, t: float) -> int:
    """Plain-Python greedy matching of one image at IoU threshold ``t``: predictions in stable descending-score
    order, each to the free GT of highest IoU > t (ties: the lower GT index); the number matched."""
    free = [True] * len(gts)
    tp = 0
    for p in sorted(range(len(preds)), key=lambda i: -scores[i]):
        best, best_iou = -1, t
        for g, gt in enumerate(gts):
            iou = ref_iou(preds[p], gt)
            if free[g] and iou > best_iou:
                best, best_iou = g, iou
        if best >= 0:
            free[best] = False
            tp += 1
    return tp


def ref_gwd_image(gts, preds, scores) -> float:
    """Plain-Python GWD for one image: stable descending-score order, best free GT with IoU > t."""
    values = []
    for t in THRESHOLDS:
        tp = ref_true_positives(gts, preds, scores, t)
        denom = len(preds) + len(gts) - tp
        values.append(1.0 if denom == 0 else tp / denom)
    return sum(values) / len(values)


def gwd_one(gts, preds, scores=None) -> float:
    scores = [1.0] * len(preds) if scores is None else scores
    return gwd_score([np.array(gts, float).reshape(-1, 4)], [np.array(preds, float).reshape(-1, 4)],
                     [np.array(scores, float)]).score


# ----------------------------------------------------------------------------------------------- gwd by hand


def test_gwd_perfect_prediction_scores_one():
    assert gwd_one([[0, 0, 10, 10], [20, 0, 30, 10]], [[20, 0, 30, 10], [0, 0, 10, 10]]) == 1.0


def test_gwd_hand_computed_mixed_case():
    # GT A=[0,0,10,10], B=[20,0,30,10].
    # p1 (0.9) [0,0,10,8]  : IoU(A) = 80/100 = 0.80 -> hit at every threshold.
    # p2 (0.8) [20,0,30,6] : IoU(B) = 60/100 = 0.60 -> hit at 0.50, 0.55 only (0.60 is not > 0.60).
    # p3 (0.7) far away    : FP everywhere.
    # t=0.50, 0.55: TP=2 FP=1 FN=0 -> 2/3 ; t=0.60..0.75: TP=1 FP=2 FN=1 -> 1/4
    # image = (2 * 2/3 + 4 * 1/4) / 6 = (4/3 + 1) / 6 = 7/18
    gt = make_gt({"a": [(0, 0, 10, 10), (20, 0, 30, 10)]})
    preds = make_preds([("a", 0, 0, 10, 8, 0.9), ("a", 20, 0, 30, 6, 0.8), ("a", 50, 50, 60, 60, 0.7)])
    r = evaluate("gwd", gt, preds)
    assert r.score == pytest.approx(7 / 18)
    assert [r.details[f"iou{t:.2f}"] for t in THRESHOLDS] == pytest.approx([2 / 3, 2 / 3] + [1 / 4] * 4)


def test_gwd_prediction_takes_the_highest_iou_ground_truth():
    # GT A=[0,0,10,10], B=[5,0,15,10]; p1 (0.9) [4,0,14,10]: IoU(A) = 60/140 = 0.43, IoU(B) = 90/110 = 0.82 -> B.
    # p2 (0.8) = A exactly -> A. Both TP at every threshold -> 1.
    assert gwd_one([[0, 0, 10, 10], [5, 0, 15, 10]], [[4, 0, 14, 10], [0, 0, 10, 10]], [0.9, 0.8]) == 1.0


def test_gwd_iou_tie_goes_to_lower_gt_index():
    # GT A=[0,0,10,10], B=[6,0,16,10]; p1 (0.9) [3,0,13,10]: IoU(A) = IoU(B) = 70/130 = 0.538 (exact tie).
    # p2 (0.8) = A exactly; IoU(p2, B) = 40/160 = 0.25.
    # Tie -> A (lower index). t=0.50: p1 takes A, p2 finds A taken and B too far -> TP=1 FP=1 FN=1 -> 1/3.
    # t>=0.55: p1 misses (0.538), p2 takes A -> TP=1 FP=1 FN=1 -> 1/3. Image = 1/3.
    # (Had the tie gone to B: t=0.50 gives 2/2 = 1 and the image (1 + 5/3)/6 = 4/9.)
    score = gwd_one([[0, 0, 10, 10], [6, 0, 16, 10]], [[3, 0, 13, 10], [0, 0, 10, 10]], [0.9, 0.8])
    assert score == pytest.approx(1 / 3)


def test_gwd_equal_scores_keep_table_order():
    # Same boxes as the tie test, same score: table order decides who goes first.
    # order (p1, p2) -> 1/3 as above; order (p2, p1): t=0.50 p2 takes A, p1 takes B (0.538 > 0.5) -> 1;
    # t>=0.55 -> 1/3; image = (1 + 5 * 1/3) / 6 = 4/9.
    gts = [[0, 0, 10, 10], [6, 0, 16, 10]]
    assert gwd_one(gts, [[3, 0, 13, 10], [0, 0, 10, 10]], [0.5, 0.5]) == pytest.approx(1 / 3)
    assert gwd_one(gts, [[0, 0, 10, 10], [3, 0, 13, 10]], [0.5, 0.5]) == pytest.approx(4 / 9)


def test_gwd_confidence_order_decides_matching():
    # Boxes of the tie test, scores swapped: q = [3,0,13,10] (IoU 0.538 with A and B), e = A exactly.
    # q first (0.9 > 0.8): 1/3 as in the tie test. e first: t=0.50: e takes A, q takes B -> 2/2 = 1;
    # t>=0.55: e takes A, q misses -> TP=1 FP=1 FN=1 -> 1/3; image = (1 + 5/3) / 6 = 4/9.
    gts = [[0, 0, 10, 10], [6, 0, 16, 10]]
    assert gwd_one(gts, [[3, 0, 13, 10], [0, 0, 10, 10]], [0.9, 0.8]) == pytest.approx(1 / 3)
    assert gwd_one(gts, [[3, 0, 13, 10], [0, 0, 10, 10]], [0.8, 0.9]) == pytest.approx(4 / 9)
    # Duplicates: GT once, two exact copies and one far box: TP=1 FP=2 FN=0 -> 1/3 at every threshold.
    assert gwd_one([[0, 0, 10, 10]], [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("t_index", range(6))
def test_gwd_threshold_boundary_is_strict(t_index):
    # GT [0,0,100,100], prediction [0,0,100,h] inside it: IoU = 100*h / 10000 = h/100 exactly equal to threshold t.
    # With ``IoU > t`` (our convention, Kaggle's wording) it is a hit at the thresholds below t only:
    # score = t_index / 6 (hits at t_index thresholds, 0 elsewhere: TP=0 FP=1 FN=1).
    # With ``IoU >= t`` it would be (t_index + 1) / 6.
    h = round(THRESHOLDS[t_index] * 100)
    assert gwd_one([[0, 0, 100, 100]], [[0, 0, 100, h]]) == pytest.approx(t_index / 6)


def test_gwd_empty_images_and_missing_predictions():
    # a: perfect -> 1 ; b: no GT, no prediction -> 1 ; c: no GT, one prediction -> 0 ; d: GT, no prediction -> 0
    gt = make_gt({"a": [(0, 0, 10, 10)], "b": [], "c": [], "d": [(0, 0, 10, 10)]})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("c", 0, 0, 10, 10, 0.9)])
    r = evaluate("gwd", gt, preds)
    assert r.per_image.to_dict() == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0}
    assert r.score == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for v in r.details.values())


def test_gwd_ignores_labels():
    gt = make_gt({"a": [(0, 0, 10, 10, 1)]}, classes=("x", "y"))
    assert evaluate("gwd", gt, make_preds([("a", 0, 0, 10, 10, 0.9, 0)])).score == 1.0


def test_gwd_thresholds_are_literal_decimals():
    assert IOU_THRESHOLDS.tolist() == THRESHOLDS


# ----------------------------------------------------------------------------------------------- gwd vs reference

_coord = st.integers(0, 12)
_box = st.tuples(_coord, _coord, st.integers(1, 8), st.integers(1, 8)).map(
    lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]
)
_image = st.tuples(
    st.lists(_box, max_size=6),
    st.lists(st.tuples(_box, st.sampled_from([0.1, 0.5, 0.5, 0.9])), max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_image, min_size=1, max_size=6))
@pytest.mark.slow
def test_gwd_matches_plain_python_reference(images):
    # Integer grid -> IoUs exactly at thresholds happen often; few score values -> score ties happen often.
    gts = [g for g, _ in images]
    preds = [[b for b, _ in p] for _, p in images]
    scores = [[s for _, s in p] for _, p in images]
    r = gwd_score([np.array(g, float).reshape(-1, 4) for g in gts], [np.array(p, float).reshape(-1, 4) for p in preds],
                  [np.array(s, float) for s in scores])
    expected = [ref_gwd_image(g, p, s) for g, p, s in zip(gts, preds, scores)]
    assert r.per_image.tolist() == pytest.approx(expected, abs=1e-12)
    assert r.score == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def random_gwd_images(seed: int, n_images: int = 300) -> tuple[list, list, list]:
    """Per image: up to 11 GT boxes, their jittered copies plus up to 7 random boxes, uniform scores."""
    rng = np.random.default_rng(seed)
    gts, preds, scores = [], [], []
    for _ in range(n_images):
        g = rng.uniform(0, 80, (int(rng.integers(0, 12)), 2))
        gts.append(np.c_[g, g + rng.uniform(5, 20, (len(g), 2))])
        p = np.r_[gts[-1] + rng.normal(0, 2, gts[-1].shape), rng.uniform(0, 80, (int(rng.integers(0, 8)), 4))]
        preds.append(np.c_[np.minimum(p[:, :2], p[:, 2:]), np.maximum(p[:, :2], p[:, 2:])])
        scores.append(rng.random(len(p)))
    return gts, preds, scores


def test_gwd_threads_over_images_give_the_single_thread_table(monkeypatch):
    from pipeline.metrics import gwd
    gts, preds, scores = random_gwd_images(3)
    monkeypatch.setattr(gwd, "available_cpus", lambda: 3)
    threaded = gwd_score(gts, preds, scores)
    monkeypatch.setattr(gwd, "available_cpus", lambda: 1)
    single = gwd_score(gts, preds, scores)
    assert threaded.per_image.tolist() == single.per_image.tolist()
    assert threaded.per_image.tolist() == pytest.approx([ref_gwd_image(g, p, s) for g, p, s in zip(gts, preds, scores)],
                                                        abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 0.3, 0.3, 0.7, 1.0])), max_size=40))
def test_group_by_image_is_a_stable_lexsort(rows):
    image = np.array([r[0] for r in rows], dtype=np.int64)
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    order, offsets = group_by_image(image, scores, 5)
    assert order.tolist() == np.lexsort((-scores, image)).tolist()
    assert offsets.tolist() == [0, *np.cumsum(np.bincount(image, minlength=5)).tolist()]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_packing_on_threads_is_the_stable_lexsort(monkeypatch, threads):
    """Images sorted and rows gathered in ranges on several threads: the same packed arrays as one lexsort, rows
    of unscored images dropped, ties in row order, images already in score order and empty images included."""
    from pipeline.metrics import packing
    monkeypatch.setattr(packing, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(packing, "available_cpus", lambda: threads)
    rng = np.random.default_rng(threads)
    n_images, n = 40, 3000
    image = rng.integers(-1, n_images - 3, n)  # -1: not scored; the last three images have no row
    scores = np.round(rng.random(n), 2)  # ties
    first = np.flatnonzero(image == 0)
    scores[first] = np.sort(scores[first])[::-1]  # an image already in score order
    boxes, labels = rng.random((n, 4)), rng.integers(0, 3, n)
    packed = packing.pack_positions(image, boxes, scores, labels, n_images)
    kept = np.flatnonzero(image >= 0)
    ref = kept[np.lexsort((-scores[kept], image[kept]))]
    np.testing.assert_array_equal(packed.boxes, boxes[ref])
    np.testing.assert_array_equal(packed.scores, scores[ref])
    np.testing.assert_array_equal(packed.labels, labels[ref])
    np.testing.assert_array_equal(packed.image, image[ref])
    assert packed.offsets.tolist() == [0, *np.cumsum(np.bincount(image[kept], minlength=n_images)).tolist()]


@pytest.mark.parametrize("kind", ["str", "object", "int", "category"])
def test_image_positions_look_ids_up_as_strings(kind):
    index = pd.Index(["7", "a", "b", "nan"])
    raw = {"str": pd.array(["b", "zz", "a", "b", None, "7"], dtype="str"),
           "object": pd.Series(["b", "zz", "a", "b", np.nan, "7"], dtype=object),
           "int": pd.Series([7, 3, 7, 7, 3, 7]),
           "category": pd.Series(["b", "zz", "a", "b", np.nan, "7"], dtype="category")}[kind]
    col = pd.Series(raw)
    expected = index.get_indexer(col.astype(str))  # what the scorer did before factorising
    assert image_positions(index, col).tolist() == expected.tolist()
    assert image_positions(index, col.iloc[:0]).tolist() == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "x"]), st.sampled_from([0.1, 0.5, 0.5, 0.9])),
                max_size=30), st.booleans())
def test_pack_boxes_groups_by_image_and_score_whether_or_not_already_sorted(rows, presort):
    index = pd.Index(["c", "a", "b"])
    if presort:  # the fused tables' order, where pack_boxes copies nothing
        rows = sorted(rows, key=lambda r: (index.get_indexer([r[0]])[0], -r[1]))
    ids = pd.Series([r[0] for r in rows], dtype="str")
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    boxes = np.arange(4 * len(rows), dtype=np.float64).reshape(-1, 4)
    labels = np.arange(len(rows), dtype=np.int64)
    p = pack_boxes(index, ids, boxes, scores, labels)
    pos = index.get_indexer(ids)
    keep = np.flatnonzero(pos >= 0)
    ref = keep[np.lexsort((-scores[keep], pos[keep]))]
    assert p.labels.tolist() == ref.tolist() and p.image.tolist() == pos[ref].tolist()
    np.testing.assert_array_equal(p.boxes, boxes[ref])
    assert p.boxes.flags.c_contiguous
    assert p.offsets.tolist() == [0, *np.cumsum(np.bincount(pos[keep], minlength=3)).tolist()]


# ----------------------------------------------------------------------------------------------- evaluate / Scorer


def test_image_ids_restrict_scoring():
    # Scored {a, b}: a perfect (1), b has GT but no prediction (0) -> 0.5; the wrong box on c is ignored.
    gt = make_gt({"a": [(0, 0, 10, 10)], "b": [(0, 0, 10, 10)], "c": [(0, 0, 10, 10)]})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("c", 50, 50, 60, 60, 0.9), ("zz", 0, 0, 1, 1, 0.9)])
    r = evaluate("gwd", gt, preds, image_ids=["a", "b"])
    assert r.score == pytest.approx(0.5)
    assert list(r.per_image.index) == ["a", "b"]


def test_scorer_is_reusable_and_matches_evaluate():
    gt = make_gt({"a": [(0, 0, 10, 10)], "b": [(0, 0, 10, 10)]})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("b", 0, 0, 10, 7, 0.9)])
    for metric in METRICS:
        scorer = Scorer(metric, gt)
        first, second = scorer(preds), scorer(preds)
        assert first == second == evaluate(metric, gt, preds)
        assert scorer(preds.iloc[:0]).score == 0.0  # no predictions at all


def test_a_thresholded_metric_is_read_at_its_best_confidence_threshold_a_ranking_metric_at_every_box():
    """GWD and F2 lose score to a false positive, so a model is judged at the best threshold of a grid (the
    lowest of equal scores); AP metrics score every box."""
    from pipeline.metrics import score_at_best_threshold

    assert {m for m in METRICS if get_metric(m).thresholded} == {"gwd", "gbr_f2"}
    gt = make_gt({"a": [(0, 0, 10, 10), (20, 20, 30, 30)], "b": [(0, 0, 10, 10)], "c": []})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("a", 20, 20, 30, 30, 0.35), ("a", 50, 50, 60, 60, 0.2),
                        ("b", 0, 0, 10, 10, 0.8), ("b", 40, 40, 50, 50, 0.28), ("c", 0, 0, 5, 5, 0.1),
                        ("d", 0, 0, 5, 5, 0.95)])  # d: not scored
    grid = [0.5, 0.1, 0.32, 0.3, 0.25]
    for metric in ("gwd", "gbr_f2", "coco_map", "voc_map50"):
        scorer = Scorer(metric, gt, ["a", "b", "c"])
        result, t = score_at_best_threshold(scorer, preds, grid)
        apart = {u: scorer(preds[preds.score >= u]).score for u in (0.0, 0.1, 0.25, 0.3, 0.32, 0.5)}
        if get_metric(metric).thresholded:  # 0.3 and 0.32 keep the same boxes: the lower one is taken
            assert t == 0.3 and result == scorer(preds[preds.score >= t]) and apart[0.3] > apart[0.25]
            assert result.score == max(apart.values()) > apart[0.0]
        else:
            assert t == 0.0 and result == scorer(preds)
    assert score_at_best_threshold(Scorer("gwd", gt), preds.iloc[:0], grid) == (Scorer("gwd", gt)(preds.iloc[:0]),
                                                                                 0.0)


# rows of a fusion's output: (image position, label, score, x, y)
_fused_rows = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.sampled_from([0.2, 0.5, 0.5, 0.9]),
                                 st.integers(0, 8), st.integers(0, 8)), max_size=25)


@functools.cache
def fused_rows_gt() -> AnnotationTable:
    """The ground truth of every fused-rows case, made once (it never changes)."""
    return make_gt({"a": [(0, 0, 10, 10), (4, 4, 12, 12)], "b": [(2, 2, 9, 9)], "c": []}, classes=("p", "q"))


@functools.cache
def fused_rows_scorer(metric: str) -> Scorer:
    """A Scorer of fused_rows_gt(), made once per metric and reused as the tuner reuses one: packing the same ground
    truth again for every hypothesis example was half of these tests' time."""
    return Scorer(metric, fused_rows_gt())


def fused_rows_case(rows: list) -> tuple:
    """``(gt, image_ids, image, boxes, scores, labels)``: the rows' images are positions in ``image_ids``, which are
    in another order than the scorer's; "zz" is not scored, "c" has no ground truth."""
    gt = fused_rows_gt()
    image = np.array([r[0] for r in rows], dtype=np.int64)
    boxes = np.array([(r[3], r[4], r[3] + 5.0, r[4] + 6.0) for r in rows], dtype=np.float64).reshape(-1, 4)
    scores = np.array([r[2] for r in rows], dtype=np.float64)
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    return gt, pd.Index(["b", "zz", "c", "a"]), image, boxes, scores, labels


@settings(max_examples=40, deadline=None)
@given(_fused_rows, st.booleans())
def test_scoring_rows_equals_scoring_the_table(rows, class_aware):
    # the OOF tuner scores a fusion's rows (images as positions in the fusion's own sorted ids) without a table
    _, image_ids, image, boxes, scores, labels = fused_rows_case(rows)
    table = pd.DataFrame({"image_id": pd.array(np.asarray(image_ids)[image], dtype="str"), "x1": boxes[:, 0],
                          "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3], "score": scores, "label": labels})
    for metric in [m for m in METRICS if get_metric(m).class_aware == class_aware] or METRICS:
        scorer = fused_rows_scorer(metric)
        from_rows = scorer.score_rows(image_ids, image, boxes, scores, labels)
        from_table = scorer(table)
        assert from_rows.score == from_table.score
        assert from_rows == from_table


@settings(max_examples=40, deadline=None)
@given(_fused_rows)
def test_scoring_a_fusions_own_rows_reads_their_boxes_in_place(rows):
    # rows as a fusion hands them to the tuner: images in the scorer's order, grouped, scores descending inside an
    # image, the boxes the transpose of (4, N) coordinate rows -- packed without a copy, scored as the table
    from pipeline.metrics.packing import pack_indexed
    gt, _, image, boxes, scores, labels = fused_rows_case(rows)
    image = image % 3
    order = np.lexsort((-scores, image))
    image, scores, labels = image[order], scores[order], labels[order]
    columns = np.ascontiguousarray(boxes[order].T)
    image_ids = pd.Index(["a", "b", "c"])
    table = pd.DataFrame({"image_id": pd.array(np.asarray(image_ids)[image], dtype="str"), "x1": columns[0],
                          "y1": columns[1], "x2": columns[2], "y2": columns[3], "score": scores, "label": labels})
    for metric in METRICS:
        scorer = fused_rows_scorer(metric)
        assert list(scorer.index) == list(image_ids)
        packed = pack_indexed(scorer.index, image_ids, image, columns.T, scores, labels, 2)
        assert np.shares_memory(packed.boxes, columns) or len(image) == 0
        assert packed.offsets.tolist() == np.searchsorted(image, np.arange(4)).tolist()
        assert scorer.score_rows(image_ids, image, columns.T, scores, labels) == scorer(table)
        thresholds = [0.0, 0.5, 0.9]
        assert scorer.score_rows_by_threshold(image_ids, image, columns.T, scores, labels, thresholds) == [
            scorer(table[table.score >= t]).score for t in thresholds]
    if len(image):
        columns[3, -1] = np.nan  # the last coordinate of the last row: the check reads every column
        with pytest.raises(ValueError, match="NaN"):
            Scorer("gwd", gt).score_rows(image_ids, image, columns.T, scores, labels)


@settings(max_examples=60, deadline=None)
@given(_fused_rows)
def test_scoring_every_threshold_at_once_equals_scoring_each(rows):
    # GWD from one pass (the greedy matching of a score-ordered prefix is the prefix of the matching), the other
    # metrics threshold by threshold: the score of the rows scoring >= t, bit for bit, thresholds at score values
    # (ties), above every score and below; images without ground truth ("c") or rows ("a" at times)
    _, image_ids, image, boxes, scores, labels = fused_rows_case(rows)
    thresholds = [0.0, 0.2, 0.3, 0.5, 0.9, 1.0]
    for metric in METRICS:
        scorer = fused_rows_scorer(metric)
        each = [scorer.score_rows(image_ids, image[scores >= t], boxes[scores >= t], scores[scores >= t],
                                  labels[scores >= t]).score for t in thresholds]
        assert scorer.score_rows_by_threshold(image_ids, image, boxes, scores, labels, thresholds) == each
    # the one-pass paths were the ones checked for GWD and COCO
    assert all(get_metric(m).score_by_threshold is not None for m in ("gwd", "coco_map", "coco_map50"))


def test_gwd_every_threshold_on_threads_and_many_images(monkeypatch):
    from pipeline.metrics import gwd
    gts, preds, scores = random_gwd_images(4)
    scores = [np.round(s, 1) for s in scores]  # ties, some at the thresholds
    thresholds = np.array([0.0, 0.1, 0.35, 0.5, 0.9])
    expected = [gwd_score(gts, [p[s >= t] for p, s in zip(preds, scores)], [s[s >= t] for s in scores]).score
                for t in thresholds]
    ordered = [np.argsort(-s, kind="stable") for s in scores]
    gt_boxes, gt_offsets = gwd.pack(gts)
    pr_boxes, pr_offsets = gwd.pack([p[o] for p, o in zip(preds, ordered)])
    pr_scores = np.concatenate([s[o] for s, o in zip(scores, ordered)])
    for cpus in (3, 1):
        monkeypatch.setattr(gwd, "available_cpus", lambda cpus=cpus: cpus)
        got = gwd.gwd_by_score_threshold(gt_boxes, gt_offsets, pr_boxes, pr_scores, pr_offsets, thresholds)
        assert got.tolist() == expected


def test_scoring_rows_refuses_nan_and_labels_outside_the_classes():
    scorer = Scorer("coco_map", make_gt({"a": [(0, 0, 10, 10)]}, classes=("p", "q")))
    ids, image, box = pd.Index(["a"]), np.zeros(1, np.int64), np.array([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="NaN"):
        scorer.score_rows(ids, image, box, np.array([np.nan]), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="outside the class list"):
        scorer.score_rows(ids, image, box, np.array([0.5]), np.array([2]))


def test_api_contract():
    gt = make_gt({"a": [(0, 0, 10, 10)]})
    assert METRICS == ("gwd", "coco_map", "coco_map50", "voc_map50", "voc_map40", "gbr_f2")
    assert all(higher_is_better(m) for m in METRICS)
    with pytest.raises(ValueError, match="nope"):
        evaluate("nope", gt, make_preds([]))
    with pytest.raises(ValueError, match="nope"):
        higher_is_better("nope")
    with pytest.raises(ValueError, match="not in the annotation table"):
        Scorer("gwd", gt, ["a", "missing"])
    with pytest.raises(ValueError, match="duplicate"):
        Scorer("gwd", gt, ["a", "a"])
    with pytest.raises(ValueError, match="label"):
        evaluate("voc_map50", gt, make_preds([("a", 0, 0, 1, 1, 0.5)]).drop(columns="label"))
    with pytest.raises(ValueError, match="class list"):
        evaluate("coco_map", gt, make_preds([("a", 0, 0, 1, 1, 0.5, 3)]))
    r = evaluate("gwd", gt, make_preds([("a", 0, 0, 10, 10, 0.5)]).assign(model="m", fold=0, tta="none"))
    assert isinstance(r, MetricResult) and r.name == "gwd" and r.score == 1.0
    with pytest.raises(AttributeError):
        r.score = 0.0  # frozen


# ----------------------------------------------------------------------------------------------- registry


@pytest.fixture
def count_error():
    """A toy lower-is-better metric: mean over images of |predicted boxes - ground-truth boxes|. Its ``prepare``
    step (GT box count per image) records each call, to check it runs once per scorer."""
    prepared: list[int] = []

    def prepare(gt: GroundTruth) -> np.ndarray:
        prepared.append(len(gt.image_ids))
        return np.diff(gt.packed.offsets)

    def score(gt_counts: np.ndarray, preds: Packed) -> MetricResult:
        per_image = np.abs(np.diff(preds.offsets) - gt_counts)
        return MetricResult("count_error", float(per_image.mean()) if len(per_image) else 0.0)

    metric = register_metric(Metric("count_error", higher_is_better=False, class_aware=False, score=score,
                                    prepare=prepare))
    yield metric, prepared
    unregister_metric("count_error")


def test_registered_metric_is_scored_through_its_entry(count_error):
    metric, prepared = count_error
    # a: 2 GT, 1 prediction -> 1 ; b: no GT, 2 predictions -> 2 ; c: 1 and 1 -> 0 ; mean 1.0
    gt = make_gt({"a": [(0, 0, 10, 10), (20, 0, 30, 10)], "b": [], "c": [(0, 0, 10, 10)]})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("b", 0, 0, 5, 5, 0.5), ("b", 5, 5, 9, 9, 0.4),
                        ("c", 50, 50, 60, 60, 0.9)]).drop(columns="label")  # class-agnostic: no label needed
    assert "count_error" in metric_names() and get_metric("count_error") is metric
    assert higher_is_better("count_error") is False
    scorer = Scorer("count_error", gt)
    assert scorer.entry is metric and scorer.metric == "count_error"
    assert scorer(preds) == MetricResult("count_error", 1.0)
    assert scorer(preds.iloc[:1]).score == pytest.approx(2 / 3)  # only a's box: a 1, b 0, c 1
    assert prepared == [3]  # one prepare per scorer, whatever the number of calls
    assert evaluate("count_error", gt, preds, image_ids=["a", "c"]).score == pytest.approx(0.5)
    assert prepared == [3, 2]


def test_direction_helpers_follow_the_entry(count_error):
    lower, higher = count_error[0], get_metric("gwd")
    assert (lower.worst, higher.worst) == (float("inf"), float("-inf"))
    assert lower.better(0.1, 0.2) and not lower.better(0.2, 0.1) and not lower.better(0.1, 0.1)
    assert higher.better(0.2, 0.1) and not higher.better(0.1, 0.2) and not higher.better(0.1, 0.1)
    assert lower.better(0.5, lower.worst) and higher.better(0.5, higher.worst)  # any real score beats worst
    assert not lower.better(float("nan"), 0.5) and not higher.better(float("nan"), 0.5)
    assert lower.gain(0.1, 0.3) == pytest.approx(0.2) and higher.gain(0.1, 0.3) == pytest.approx(-0.2)
    scores = [0.3, 0.1, 0.5, 0.1, 0.5]
    assert lower.best_index(scores) == 1 and higher.best_index(scores) == 2  # ties: the earliest
    assert lower.best_index([float("nan"), 0.4, float("nan")]) == 1  # NaN never wins
    for metric in (lower, higher):
        with pytest.raises(ValueError, match="no score"):
            metric.best_index([])
        with pytest.raises(ValueError, match="no score"):
            metric.best_index([float("nan")])

    def keep_best(metric: Metric, history: list[float]) -> tuple[float, int]:
        """The checkpoint loop of a training run: start at ``worst``, replace on a strictly better score."""
        best, epoch = metric.worst, -1
        for e, s in enumerate(history):
            if metric.better(s, best):
                best, epoch = s, e
        return best, epoch

    history = [0.4, 0.2, 0.6, 0.2]
    assert keep_best(lower, history) == (0.2, 1) and keep_best(higher, history) == (0.6, 2)


def test_duplicate_registration_is_an_error(count_error):
    builtin = get_metric("gwd")
    with pytest.raises(ValueError, match="'gwd' is already registered"):
        register_metric(Metric("gwd", higher_is_better=False, class_aware=True, score=lambda gt, p: None))
    with pytest.raises(ValueError, match="already registered"):
        register_metric(count_error[0])
    assert get_metric("gwd") is builtin
    with pytest.raises(ValueError, match="non-empty name"):
        register_metric(Metric("", higher_is_better=True, class_aware=False, score=lambda gt, p: None))


def test_unknown_metric_error_lists_known_names():
    for call in (get_metric, higher_is_better, unregister_metric, lambda name: Scorer(name, make_gt({"a": []}))):
        with pytest.raises(ValueError, match="unknown metric 'nope'") as info:
            call("nope")
        assert all(name in str(info.value) for name in METRICS)


def test_builtin_entries_carry_their_facts():
    facts = {name: (get_metric(name).higher_is_better, get_metric(name).class_aware) for name in METRICS}
    assert facts == {"gwd": (True, False), "coco_map": (True, True), "coco_map50": (True, True),
                     "voc_map50": (True, True), "voc_map40": (True, True), "gbr_f2": (True, False)}
    toy = register_metric(Metric("toy", higher_is_better=True, class_aware=False, score=lambda gt, p: None))
    assert metric_names() == (*METRICS, "toy")
    assert unregister_metric("toy") is toy and metric_names() == METRICS


def test_a_new_metric_module_in_the_package_registers_itself(tmp_path, monkeypatch):
    # "Adding a metric is one file": a module found on the package path is imported and registers its entry.
    import pipeline.metrics as package

    (tmp_path / "toy_box_count.py").write_text(
        "from pipeline.metrics.registry import Metric, MetricResult, register_metric\n"
        "register_metric(Metric('toy_box_count', higher_is_better=False, class_aware=False,\n"
        "                       score=lambda gt, p: MetricResult('toy_box_count', float(len(p.boxes)))))\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        package._import_metric_modules()  # what importing the package runs; built-ins are not registered twice
        assert metric_names() == (*METRICS, "toy_box_count")
        assert evaluate("toy_box_count", make_gt({"a": []}), make_preds([("a", 0, 0, 1, 1, 0.5)])).score == 1.0
    finally:
        if "toy_box_count" in metric_names():
            unregister_metric("toy_box_count")
        sys.modules.pop("pipeline.metrics.toy_box_count", None)
        if hasattr(package, "toy_box_count"):
            delattr(package, "toy_box_count")


def test_importing_metrics_does_not_import_config():
    # pipeline.config validates ``metric`` against metric_names(): importing the metrics must not need the config.
    code = "import sys, pipeline.metrics; sys.exit('pipeline.config' in sys.modules or 'pipeline.data' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------------------------- voc


def test_voc_hand_computed_ap():
    # One class, GT A=[0,0,10,10], B=[20,0,30,10]. d1 (0.9) = A: TP; d2 (0.8) far: FP; d3 (0.7) = B: TP.
    # precision 1, 1/2, 2/3 ; recall 1/2, 1/2, 1. Envelope: 1 up to recall 1/2, 2/3 up to recall 1.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    gt = make_gt({"a": [(0, 0, 10, 10), (20, 0, 30, 10)]})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("a", 50, 50, 60, 60, 0.8), ("a", 20, 0, 30, 10, 0.7)])
    assert evaluate("voc_map50", gt, preds).score == pytest.approx(5 / 6)


def test_voc_duplicate_on_taken_gt_is_false_positive():
    # GT A=[0,0,10,10], B=[4,0,14,10]. d1 (0.9) = A: TP. d2 (0.8) = [1,0,11,10]: IoU(A) = 90/110 = 0.82,
    # IoU(B) = 70/130 = 0.54. Devkit rule: best GT is A, already taken -> FP (COCO would give it B).
    # precision 1, 1/2 ; recall 1/2, 1/2 -> AP = 1/2 * 1 = 0.5
    gt = make_gt({"a": [(0, 0, 10, 10), (4, 0, 14, 10)]})
    preds = make_preds([("a", 0, 0, 10, 10, 0.9), ("a", 1, 0, 11, 10, 0.8)])
    assert evaluate("voc_map50", gt, preds).score == pytest.approx(0.5)


def test_voc_mean_over_classes_with_ground_truth():
    # class x: one GT, exact hit -> AP 1. class y: GT A, B as in the duplicate test -> AP 0.5.
    # class z: no GT, one prediction (on the empty image b) -> skipped. mAP = (1 + 0.5) / 2 = 0.75
    gt = make_gt({"a": [(0, 0, 10, 10, 0), (0, 0, 10, 10, 1), (4, 0, 14, 10, 1)], "b": []}, classes=("x", "y", "z"))
    preds = make_preds([("a", 0, 0, 10, 10, 0.9, 0), ("a", 0, 0, 10, 10, 0.9, 1), ("a", 1, 0, 11, 10, 0.8, 1),
                        ("b", 0, 0, 10, 10, 0.9, 2)])
    r = evaluate("voc_map50", gt, preds)
    assert r.score == pytest.approx(0.75)
    assert r.details == pytest.approx({"map50": 0.75, "ap50_x": 1.0, "ap50_y": 0.5})


def test_voc_strict_iou_threshold():
    # IoU exactly 0.5 ([0,0,10,5] inside [0,0,10,10]) is not a match -> AP 0.
    gt = make_gt({"a": [(0, 0, 10, 10)]})
    assert evaluate("voc_map50", gt, make_preds([("a", 0, 0, 10, 5, 0.9)])).score == 0.0
    assert evaluate("voc_map50", gt, make_preds([("a", 0, 0, 10, 6, 0.9)])).score == 1.0


def test_voc_at_iou_040_is_vinbigdatas_metric_strict_at_its_own_threshold():
    # [0,0,10,4] inside [0,0,10,10]: IoU 0.4 exactly (no match at 0.4, strict); [0,0,10,4.5]: 0.45, a match at 0.4
    # only; the details carry the threshold's own names
    gt = make_gt({"a": [(0, 0, 10, 10)]}, ("nodule", "other"))
    assert evaluate("voc_map40", gt, make_preds([("a", 0, 0, 10, 4, 0.9)])).score == 0.0
    result = evaluate("voc_map40", gt, make_preds([("a", 0, 0, 10, 4.5, 0.9)]))
    assert result.score == 1.0 and result.details == {"map40": 1.0, "ap40_nodule": 1.0}
    assert evaluate("voc_map50", gt, make_preds([("a", 0, 0, 10, 4.5, 0.9)])).score == 0.0


def ref_voc_ap(gts, dets, n_gt) -> float:
    """Devkit-style reference, one class. gts: image -> boxes; dets: (image, box, score) list."""
    taken = {i: [False] * len(b) for i, b in gts.items()}
    flags = []
    for i, box, _ in sorted(dets, key=lambda d: -d[2]):
        ious = [ref_iou(box, g) for g in gts.get(i, [])]
        j = max(range(len(ious)), key=lambda k: (ious[k], -k)) if ious else -1
        hit = j >= 0 and ious[j] > 0.5 and not taken[i][j]
        if hit:
            taken[i][j] = True
        flags.append(hit)
    # all-point AP by the textbook loop
    tp = fp = 0
    rec, prec = [], []
    for f in flags:
        tp, fp = tp + f, fp + (not f)
        rec.append(tp / n_gt)
        prec.append(tp / (tp + fp))
    ap, prev_r = 0.0, 0.0
    for k, r in enumerate(rec):
        if r > prev_r:
            ap += (r - prev_r) * max(prec[k:])
            prev_r = r
    return ap


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(st.lists(_image, min_size=1, max_size=5))
def test_voc_matches_reference_single_class(images):
    gts = {str(i): g for i, (g, _) in enumerate(images)}
    dets = [(str(i), b, s) for i, (_, p) in enumerate(images) for b, s in p]
    n_gt = sum(len(g) for g in gts.values())
    gt = make_gt({i: [tuple(b) for b in g] for i, g in gts.items()})
    r = evaluate("voc_map50", gt, make_preds([(i, *b, s) for i, b, s in dets]))
    assert r.score == pytest.approx(ref_voc_ap(gts, dets, n_gt) if n_gt else 0.0, abs=1e-12)


def voc_reference(gt: Packed, dets: Packed, n_classes: int, thr: float = 0.5) -> np.ndarray:
    """AP per class as voc.py computed it before: every detection of every image by descending score (stable), the
    devkit's matching in that order, numpy's :func:`average_precision` per class."""
    from pipeline.metrics.gwd import box_iou

    order = np.argsort(-dets.scores, kind="stable")
    taken = np.zeros(len(gt.labels), bool)
    tp = np.zeros(len(order), bool)
    for r, d in enumerate(order):
        i, best, best_iou = dets.image[d], -1, -1.0
        for g in range(gt.offsets[i], gt.offsets[i + 1]):
            if gt.labels[g] == dets.labels[d]:
                v = box_iou(dets.boxes[d], gt.boxes[g], max(dets.boxes[d, 2] - dets.boxes[d, 0], 0.0)
                            * max(dets.boxes[d, 3] - dets.boxes[d, 1], 0.0),
                            max(gt.boxes[g, 2] - gt.boxes[g, 0], 0.0) * max(gt.boxes[g, 3] - gt.boxes[g, 1], 0.0))
                if v > best_iou:
                    best, best_iou = g, v
        if best >= 0 and best_iou > thr and not taken[best]:
            taken[best] = tp[r] = True
    n_gt = np.bincount(gt.labels, minlength=n_classes)
    labels = dets.labels[order]
    return np.array([average_precision(tp[labels == k], int(n_gt[k])) for k in range(n_classes)])


def test_average_precision_edge_cases():
    assert np.isnan(average_precision(np.array([], bool), 0))
    assert average_precision(np.array([], bool), 3) == 0.0
    assert average_precision(np.array([True, True]), 2) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300), st.integers(1, 40))
def test_voc_ap_terms_sum_to_the_devkit_ap(flags, n_gt):
    # the compiled terms (only where recall changes) summed by numpy: the numpy AP bit for bit
    tp = np.array(flags, dtype=bool)[:n_gt * 3]
    tp[np.flatnonzero(tp)[n_gt:]] = False  # a class has at most n_gt true positives
    terms = _ap_terms(tp, n_gt)
    assert (float(np.sum(terms)) if len(tp) else 0.0) == average_precision(tp, n_gt)


@pytest.mark.parametrize("seed", range(4))
def test_voc_every_threshold_on_threads_equals_the_reference_for_each(seed, monkeypatch):
    """Images matched apart, on two threads, one sort for every score threshold: the AP per class of each
    threshold's detections as the devkit order gives it, bit for bit, with tied scores, wrong classes, empty
    images and a class without ground truth."""
    from pipeline.metrics import voc

    monkeypatch.setattr(voc, "PARALLEL_MIN_DETECTIONS", 1)
    rng = np.random.default_rng(200 + seed)
    gt, dets = packed_case(rng, n_images=4 + 6 * seed, n_gt=30 + 50 * seed, n_det=100 + 300 * seed, n_classes=2,
                           tied=seed % 2 == 0)
    thresholds = np.array([-1.0, 0.0, 0.25, 0.5, 0.73, 1.5])
    got = voc_ap_by_threshold(gt, dets, 3, thresholds)
    for t, ap in zip(thresholds, got):
        want = voc_reference(gt, scoring_at_least(dets, t), 3)
        np.testing.assert_array_equal(ap, want)
    assert got[0][0] > got[4][0] > 0.0 == got[-1][0] and np.isnan(got[:, 2]).all()


# ----------------------------------------------------------------------------------------------- coco


def random_dataset(seed: int, n_images: int = 14, classes: tuple[str, ...] = ("a", "b", "c")):
    """Realistic-ish: jittered true positives, label swaps, background FPs, empty images, one crowded image."""
    rng = np.random.default_rng(seed)
    gt, pred_rows = {}, []
    for k in range(n_images):
        image_id = f"img{k}"
        n = 0 if k in (0, 1, 2) else (130 if k == 3 else int(rng.integers(1, 25)))
        xy = rng.uniform(0, 800, (n, 2))
        wh = rng.uniform(8, 200, (n, 2))
        labels = rng.integers(0, len(classes), n)
        gt[image_id] = [(*xy[j], *(xy[j] + wh[j]), int(labels[j])) for j in range(n)]
        for j in range(n):
            if rng.random() < 0.85:
                jit = rng.normal(0, 0.08, 4) * np.r_[wh[j], wh[j]]
                box = np.r_[xy[j], xy[j] + wh[j]] + jit
                lab = labels[j] if rng.random() < 0.9 else rng.integers(0, len(classes))
                pred_rows.append((image_id, *box, rng.random(), int(lab)))
        n_fp = 0 if k in (0, 1) else int(rng.integers(0, 12))  # img2: no GT but false positives
        for _ in range(n_fp):
            x, y = rng.uniform(0, 800, 2)
            w, h = rng.uniform(8, 150, 2)
            pred_rows.append((image_id, x, y, x + w, y + h, rng.random() * 0.6, int(rng.integers(0, len(classes)))))
    return make_gt(gt, classes), make_preds(pred_rows)


def pycocotools_map(table: AnnotationTable, preds: pd.DataFrame, image_ids: list[str]) -> dict[str, float]:
    """Independent conversion + pycocotools, maxDets = [1, 10, max(100, largest per-image count)]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    img_id = {i: n + 1 for n, i in enumerate(image_ids)}
    gts = table.boxes[table.boxes.image_id.isin(img_id)]
    anns = [{"id": n + 1, "image_id": img_id[r.image_id], "category_id": int(r.label) + 1,
             "bbox": [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1], "area": (r.x2 - r.x1) * (r.y2 - r.y1), "iscrowd": 0}
            for n, r in enumerate(gts.itertuples())]
    dataset = {"images": [{"id": v, "width": 1000, "height": 1000} for v in img_id.values()],
               "categories": [{"id": k + 1, "name": c} for k, c in enumerate(table.classes)], "annotations": anns}
    dts = preds[preds.image_id.isin(img_id)]
    res = [{"image_id": img_id[r.image_id], "category_id": int(r.label) + 1,
            "bbox": [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1], "score": r.score} for r in dts.itertuples()]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(res), "bbox")
        ev.params.maxDets = [1, 10, max(100, int(dts.image_id.value_counts().max()))]
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, -1]
    return {"map": p[p > -1].mean(), "map50": p[0][p[0] > -1].mean(), "map75": p[5][p[5] > -1].mean()}


@pytest.mark.parametrize("seed", range(4))
def test_coco_parity_with_pycocotools(seed):
    table, preds = random_dataset(seed)
    image_ids = list(table.images.image_id[:-2])  # the last two images are left out: their predictions must not count
    ours = evaluate("coco_map", table, preds, image_ids)
    ref = pycocotools_map(table, preds, image_ids)
    assert 0.2 < ref["map"] < 0.95  # a non-trivial case
    for key in ("map", "map50", "map75"):
        assert ours.details[key] == pytest.approx(ref[key], abs=1e-9), key
    assert ours.score == ours.details["map"]
    assert evaluate("coco_map50", table, preds, image_ids).score == pytest.approx(ref["map50"], abs=1e-9)


def packed_case(rng: np.random.Generator, n_images: int, n_gt: int, n_det: int, n_classes: int,
                tied: bool) -> tuple[Packed, Packed]:
    """Ground truth and detections packed as the scorer packs them: jittered copies of the ground truth (some
    with the wrong class, some moved to another image, some with x2 < x1 or y2 < y1), random scores (rounded to
    two decimals when ``tied``); images without ground truth or detections included."""
    gt_image = rng.integers(0, n_images, n_gt)
    xy = rng.uniform(0, 500, (n_gt, 2))
    gt_boxes = np.c_[xy, xy + rng.uniform(3, 80, (n_gt, 2))]
    gt_labels = rng.integers(0, n_classes, n_gt)
    src = rng.integers(0, n_gt, n_det)
    det_boxes = gt_boxes[src] + rng.normal(0, 6, (n_det, 4))
    det_image, det_labels = gt_image[src].copy(), gt_labels[src].copy()
    swap = rng.random(n_det) < 0.2
    det_labels[swap] = rng.integers(0, n_classes, swap.sum())
    moved = rng.random(n_det) < 0.3
    det_image[moved] = rng.integers(0, n_images, moved.sum())
    scores = rng.random(n_det)
    scores = np.round(scores, 2) if tied else scores

    def pack(boxes, s, labels, image) -> Packed:
        order, offsets = group_by_image(image, s, n_images)
        return Packed(np.ascontiguousarray(boxes[order]), s[order], labels[order], image[order], offsets)

    return pack(gt_boxes, np.ones(n_gt), gt_labels, gt_image), pack(det_boxes, scores, det_labels, det_image)


@pytest.mark.parametrize("seed", range(6))
def test_compiled_coco_matches_faster_coco_eval(seed):
    """The compiled evaluator against the library on the same packed boxes: every detail to 1e-12, with tied
    scores, wrong classes, empty images, classes without ground truth and negative-area detections (COCO
    ignores those when unmatched)."""
    from pipeline.metrics.coco import CocoEvaluator, CompiledCocoEvaluator

    rng = np.random.default_rng(seed)
    n_classes = 2 + seed % 3
    classes = [f"c{k}" for k in range(n_classes + 1)]  # the last class never has ground truth
    gt, dets = packed_case(rng, n_images=3 + 7 * seed, n_gt=10 + 60 * seed, n_det=30 + 400 * seed,
                           n_classes=n_classes, tied=seed % 2 == 0)
    assert ((dets.boxes[:, 2] < dets.boxes[:, 0]) ^ (dets.boxes[:, 3] < dets.boxes[:, 1])).any() or seed == 0
    n_images = len(gt.offsets) - 1
    want = CocoEvaluator(gt, n_images, classes)(dets)
    got = CompiledCocoEvaluator(gt, n_images, classes)(dets)
    assert set(got) == set(want) and 0.02 < want["map"] < 0.9
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", range(4))
def test_compiled_coco_scores_every_threshold_as_the_library_scores_each(seed, monkeypatch):
    """One matching, on two threads, for every score threshold against the library on each threshold's detections
    alone: thresholds equal to tied scores (two decimals), above every score and below."""
    from pipeline.metrics import coco_kernel
    from pipeline.metrics.coco import CocoEvaluator, CompiledCocoEvaluator

    monkeypatch.setattr(coco_kernel, "PARALLEL_MIN_DETECTIONS", 1)  # the images on two threads
    rng = np.random.default_rng(100 + seed)
    classes = ["c0", "c1", "c2"]
    gt, dets = packed_case(rng, n_images=4 + 6 * seed, n_gt=30 + 50 * seed, n_det=100 + 300 * seed, n_classes=2,
                           tied=True)
    n_images = len(gt.offsets) - 1
    thresholds = np.array([-1.0, 0.0, 0.25, 0.5, 0.5, 0.73, 0.99, 1.5])
    library = CocoEvaluator(gt, n_images, classes)
    want = [library(scoring_at_least(dets, t)) for t in thresholds]
    got = CompiledCocoEvaluator(gt, n_images, classes).by_threshold(dets, thresholds)
    assert len(got) == len(thresholds) and want[0]["map"] > want[5]["map"] > 0.0 == want[-1]["map"]
    for w, g in zip(want, got):
        assert set(g) == set(w)
        for key, value in w.items():
            assert g[key] == pytest.approx(value, abs=1e-12), key


def test_coco_ground_truth_outside_the_area_range_goes_to_the_library():
    """COCO ignores ground truth whose area is outside [0, 1e10]: only the library evaluator replicates that."""
    from pipeline.metrics.coco import CocoEvaluator, CompiledCocoEvaluator

    def evaluator(table: AnnotationTable):
        return Scorer("coco_map", table)._score.args[0]  # the entry's prepared state

    big = make_gt({"a": [(0, 0, 10, 10, 0), (0, 0, 2e5, 2e5, 0)]})
    assert isinstance(evaluator(big), CocoEvaluator)
    # the ignored giant box is no miss: one exact detection scores 1
    assert evaluate("coco_map50", big, make_preds([("a", 0, 0, 10, 10, 0.9, 0)])).score == pytest.approx(1.0)
    # every score threshold from the library too, each threshold's detections apart
    # (a false positive outranks the exact box: precision 1/2 at full recall with both, none with one)
    rows = (np.array([0, 0]), np.array([[0, 0, 10, 10], [50, 50, 60, 60.0]]), np.array([0.5, 0.9]), np.array([0, 0]))
    assert Scorer("coco_map50", big).score_rows_by_threshold(pd.Index(["a"]), *rows, [0.0, 0.6, 1.0]) == \
        pytest.approx([0.5, 0.0, 0.0])
    assert isinstance(evaluator(make_gt({"a": [(0, 0, 10, 10, 0)]})), CompiledCocoEvaluator)


def test_coco_counts_more_than_100_detections_per_image():
    # 150 GT, 150 exact predictions with decreasing scores: with maxDets=100 recall would stop at 100/150.
    boxes = [(20 * (j % 15), 20 * (j // 15), 20 * (j % 15) + 15, 20 * (j // 15) + 15) for j in range(150)]
    gt = make_gt({"a": boxes})
    preds = make_preds([("a", *b, 1 - j / 1000) for j, b in enumerate(boxes)])
    assert evaluate("coco_map", gt, preds).score == pytest.approx(1.0)


def test_coco_is_class_aware_and_handles_empty_cases():
    gt = make_gt({"a": [(0, 0, 10, 10, 0)], "b": []}, classes=("x", "y"))
    assert evaluate("coco_map", gt, make_preds([("a", 0, 0, 10, 10, 0.9, 0)])).score == pytest.approx(1.0)
    assert evaluate("coco_map", gt, make_preds([("a", 0, 0, 10, 10, 0.9, 1)])).score == 0.0  # wrong class
    assert evaluate("coco_map", gt, make_preds([])).score == 0.0  # no predictions
    # scored set without any ground truth: 0.0 by convention
    assert evaluate("coco_map50", gt, make_preds([("b", 0, 0, 10, 10, 0.9, 0)]), image_ids=["b"]).score == 0.0
    # a false positive on an empty image lowers AP: precision 1/2 at full recall when it outranks the TP
    r = evaluate("coco_map50", gt, make_preds([("a", 0, 0, 10, 10, 0.5, 0), ("b", 0, 0, 10, 10, 0.9, 0)]))
    assert r.score == pytest.approx(0.5)
