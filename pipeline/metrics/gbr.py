"""Great Barrier Reef (TensorFlow - Help Protect the Great Barrier Reef) metric: the mean over IoU thresholds of F2.

Conventions (the Kaggle evaluation page -- "F2 Score at different intersection over union (IoU) thresholds", swept
from 0.3 to 0.8 at 0.05 increments -- is the reference; where it is silent, the choice is stated here):

- IoU thresholds: 0.30, 0.35, ..., 0.80 (11, the literal decimals).
- Matching per image is the Global Wheat metric's (:mod:`pipeline.metrics.gwd`): predictions by descending score
  (equal scores in input order), each matched greedily to the unmatched ground-truth box of highest IoU with
  ``IoU > t`` (strict; an IoU tie goes to the lower ground-truth index). Public re-implementations that test
  ``IoU >= t`` differ only where an IoU equals a threshold exactly.
- Counts are summed over the dataset at each threshold, not averaged per image: ``TP``, ``FP`` = predictions - TP,
  ``FN`` = ground truths - TP, and ``F2 = 5 TP / (5 TP + 4 FN + FP)``. With no ground truth and no prediction at all
  F2 is 1 (nothing to find, nothing claimed).
- Every submitted box counts: a false positive costs score, so the confidence threshold matters (the ensemble
  tuner searches it on OOF through :func:`f2_by_score_threshold`, one pass for every threshold).
- Class-agnostic: labels are ignored (one class, starfish).

Registered as ``"gbr_f2"`` (higher is better, class-agnostic). Details: ``"iou0.30"`` .. ``"iou0.80"`` (F2 at each
threshold), ``"precision"`` and ``"recall"`` (means over the thresholds; 0 where undefined). The score is a
dataset-level ratio, so there is no per-image score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from pipeline.cpus import available_cpus, on_ranges
from pipeline.metrics.gwd import PARALLEL_MIN_IMAGES, _candidates, _greedy_matches, _work_arrays, box_areas
from pipeline.metrics.packing import Packed, box_rows
from pipeline.metrics.registry import GroundTruth, Metric, MetricResult, register_metric

# Digests of the package files compiled into this module's cached functions (numba's cache cannot see changes to
# them); see pipeline.fusion.wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {
    "fusion/primitives.py": "5a867f87f2eb7faf",
    "gwd.py": "71131656a78dd28e",
    "packing.py": "df836e67dad1bbc1",
    "registry.py": "c7d01582269e09f9",
}

IOU_THRESHOLDS = np.array([0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80], dtype=np.float64)
BETA2 = 4.0  # F-beta with beta = 2: recall weighs four times precision


@dataclass(frozen=True)
class F2Counts:
    """Dataset totals at each IoU threshold (``tp``) for one set of predictions."""

    tp: np.ndarray  # (n_thresholds,) true positives
    n_pred: int
    n_gt: int

    def f2(self) -> np.ndarray:
        fp, fn = self.n_pred - self.tp, self.n_gt - self.tp
        denominator = (1 + BETA2) * self.tp + BETA2 * fn + fp
        return np.where(denominator > 0, (1 + BETA2) * self.tp / np.maximum(denominator, 1), 1.0)

    def precision(self) -> np.ndarray:
        return self.tp / self.n_pred if self.n_pred else np.zeros(len(self.tp))

    def recall(self) -> np.ndarray:
        return self.tp / self.n_gt if self.n_gt else np.zeros(len(self.tp))


@numba.njit(cache=True, nogil=True)
def _true_positive_rows(gt_boxes, gt_area, gt_offsets, pr_boxes, pr_score, pr_offsets, thresholds, score_thr,
                        lo, hi, tp, kept) -> None:
    """For images ``lo..hi-1``: ``kept[i, k]`` predictions of image ``i`` score ``>= score_thr[k]`` (a prefix: they
    are in descending score order) and ``tp[i, k, t]`` of them are true positives at IoU threshold ``t``, from one
    greedy matching per threshold (the matching of a prefix is the prefix of the matching)."""
    cand_g, cand_iou, cand_off, tp_after, matched, gt_rows = _work_arrays(gt_offsets, pr_offsets, lo, hi)
    for i in range(lo, hi):
        g0, g1, p0, p1 = gt_offsets[i], gt_offsets[i + 1], pr_offsets[i], pr_offsets[i + 1]
        longest = 0
        for k in range(score_thr.shape[0]):
            m = 0
            while m < p1 - p0 and pr_score[p0 + m] >= score_thr[k]:
                m += 1
            kept[i, k] = m
            longest = max(longest, m)
        tp[i] = 0
        if g1 == g0 or longest == 0:
            continue
        _candidates(gt_boxes[g0:g1], gt_area[g0:g1], pr_boxes[p0:p0 + longest], thresholds.min(),
                    cand_g, cand_iou, cand_off, gt_rows)
        tp_after[0] = 0
        for t in range(thresholds.shape[0]):
            _greedy_matches(g1 - g0, longest, thresholds[t], cand_g, cand_iou, cand_off, matched, tp_after, True)
            for k in range(score_thr.shape[0]):
                tp[i, k, t] = tp_after[kept[i, k]]


def f2_counts(gt_boxes: np.ndarray, gt_offsets: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray,
              pred_offsets: np.ndarray, score_thresholds: np.ndarray,
              thresholds: np.ndarray = IOU_THRESHOLDS) -> list[F2Counts]:
    """The dataset's counts of the predictions scoring ``>= t``, for each ``t`` of ``score_thresholds`` (``-inf``:
    every prediction), from one pass; predictions sorted by descending score inside each image."""
    if len(gt_offsets) != len(pred_offsets):
        raise ValueError("gt_offsets and pred_offsets must describe the same number of images")
    gt_boxes = np.ascontiguousarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_offsets = np.ascontiguousarray(gt_offsets, dtype=np.int64)
    pred_offsets = np.ascontiguousarray(pred_offsets, dtype=np.int64)
    score_thr = np.ascontiguousarray(score_thresholds, dtype=np.float64)
    thresholds = np.ascontiguousarray(thresholds, dtype=np.float64)
    n_img = len(gt_offsets) - 1
    tp = np.zeros((max(n_img, 0), len(score_thr), len(thresholds)), dtype=np.int64)
    kept = np.zeros((max(n_img, 0), len(score_thr)), dtype=np.int64)
    if n_img > 0:
        args = (gt_boxes, box_areas(gt_boxes), gt_offsets, box_rows(pred_boxes),
                np.ascontiguousarray(pred_scores, dtype=np.float64), pred_offsets, thresholds, score_thr)
        on_ranges(lambda lo, hi: _true_positive_rows(*args, lo, hi, tp, kept), pred_offsets,
                  min(available_cpus(), n_img // PARALLEL_MIN_IMAGES))
    n_gt = int(gt_offsets[-1] - gt_offsets[0]) if n_img > 0 else 0
    totals, kept_totals = tp.sum(axis=0), kept.sum(axis=0)
    return [F2Counts(totals[k], int(kept_totals[k]), n_gt) for k in range(len(score_thr))]


def f2_by_score_threshold(gt_boxes: np.ndarray, gt_offsets: np.ndarray, pred_boxes: np.ndarray,
                          pred_scores: np.ndarray, pred_offsets: np.ndarray, score_thresholds: np.ndarray,
                          thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """The score of the predictions scoring ``>= t`` for each ``t``: equal to scoring each threshold's apart."""
    counts = f2_counts(gt_boxes, gt_offsets, pred_boxes, pred_scores, pred_offsets, score_thresholds, thresholds)
    return np.array([float(c.f2().mean()) for c in counts])


def _every_prediction(gt: GroundTruth, preds: Packed) -> F2Counts:
    return f2_counts(gt.packed.boxes, gt.packed.offsets, preds.boxes, preds.scores, preds.offsets,
                     np.array([-np.inf]))[0]


def _score(gt: GroundTruth, preds: Packed) -> MetricResult:
    counts = _every_prediction(gt, preds)
    f2 = counts.f2()
    details = {f"iou{t:.2f}": float(v) for t, v in zip(IOU_THRESHOLDS, f2)}
    details.update(precision=float(counts.precision().mean()), recall=float(counts.recall().mean()))
    return MetricResult("gbr_f2", float(f2.mean()), details)


def _score_by_threshold(gt: GroundTruth, preds: Packed, score_thresholds: np.ndarray) -> np.ndarray:
    return f2_by_score_threshold(gt.packed.boxes, gt.packed.offsets, preds.boxes, preds.scores, preds.offsets,
                                 score_thresholds)


register_metric(Metric("gbr_f2", higher_is_better=True, class_aware=False, score=_score,
                       score_by_threshold=_score_by_threshold, thresholded=True))

__all__ = ["IOU_THRESHOLDS", "F2Counts", "f2_by_score_threshold", "f2_counts"]
