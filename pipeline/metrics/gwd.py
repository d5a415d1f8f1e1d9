"""Global Wheat Detection metric: mean over images of the mean over IoU thresholds of TP / (TP + FP + FN).

Conventions (the Kaggle evaluation page is the reference; where it is silent, the choice is stated here):

- IoU thresholds: 0.50, 0.55, 0.60, 0.65, 0.70, 0.75 (the literal decimals, not ``np.arange`` drift).
- IoU is the plain continuous-coordinate IoU of ``x1, y1, x2, y2`` boxes: ``inter / (area_a + area_b - inter)``,
  no "+1 pixel" term. A box with non-positive width or height has area 0 (and IoU 0 with everything).
- A prediction is a hit at threshold ``t`` only if ``IoU > t`` (strict): the Kaggle page says a prediction is a hit
  "if its intersection over union with a ground truth object is greater than" the threshold. Many public GWD
  notebooks use ``IoU >= t`` and a +1-pixel IoU instead; with integer-pixel boxes an IoU exactly equal to a
  threshold does happen (a 10x5 box inside a 10x10 box has IoU 0.5), and then the two conventions differ.
- Predictions of one image are taken by descending score; equal scores keep their input order (stable sort).
- Each prediction is matched greedily to the *unmatched* ground-truth box of highest IoU among those with
  ``IoU > t``; an IoU tie between ground-truth boxes goes to the lower ground-truth index (input order).
  Matched predictions are TP, the others FP; unmatched ground truths are FN.
- Per image and threshold: ``TP / (TP + FP + FN)``. An image with no ground truth scores 0 with any prediction
  and 1 with none; an image with ground truth and no prediction scores 0.
- Image score = mean over thresholds; dataset score = mean over images (every listed image counts, empty ones
  included). The per-threshold breakdown is the mean over images at each threshold.
- Class-agnostic: labels are ignored (GWD has one class).

Registered as ``"gwd"`` (higher is better, class-agnostic). Details: ``"iou0.50"`` .. ``"iou0.75"`` (mean over
images at each threshold); ``MetricResult.per_image`` holds the per-image scores.

Data layout: boxes of all images are concatenated in one ``(N, 4)`` float64 array with ``offsets`` of length
``n_images + 1`` (image ``i`` owns rows ``offsets[i]:offsets[i+1]``). Predictions must already be sorted by
descending score inside each image for :func:`gwd_packed`; :func:`gwd_score` sorts for you.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd

from pipeline.cpus import available_cpus, on_ranges
from pipeline.metrics.packing import Packed, box_rows
from pipeline.metrics.registry import GroundTruth, Metric, MetricResult, register_metric

# Digests of the package files compiled into this module's cached functions (numba's cache cannot see changes to
# them); see pipeline.fusion.wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {
    "fusion/primitives.py": "5a867f87f2eb7faf",
    "packing.py": "df836e67dad1bbc1",
    "registry.py": "c7d01582269e09f9",
}

IOU_THRESHOLDS = np.array([0.50, 0.55, 0.60, 0.65, 0.70, 0.75], dtype=np.float64)


@dataclass(frozen=True)
class GWDResult:
    score: float  # mean over images
    per_threshold: np.ndarray  # (n_thresholds,) mean over images at each threshold
    per_image: np.ndarray  # (n_images,) mean over thresholds


@numba.njit(cache=True)
def box_iou(a: np.ndarray, b: np.ndarray, area_a: float, area_b: float) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0.0 or ih <= 0.0:
        return 0.0
    inter = iw * ih
    union = area_a + area_b - inter
    if union <= 0.0:
        return 0.0
    return inter / union


@numba.njit(cache=True)
def box_areas(boxes: np.ndarray) -> np.ndarray:
    out = np.empty(boxes.shape[0], dtype=np.float64)
    for i in range(boxes.shape[0]):
        out[i] = max(boxes[i, 2] - boxes[i, 0], 0.0) * max(boxes[i, 3] - boxes[i, 1], 0.0)
    return out


@numba.njit(cache=True)
def _image_scores(gt, gt_area, pr, thresholds, cand_g, cand_iou, cand_off, matched, gt_rows, out) -> None:
    """Fill ``out[t]`` for one image. Candidates: GT with IoU > min threshold, per prediction, GT order kept."""
    n_g, n_p = gt.shape[0], pr.shape[0]
    if n_g == 0 or n_p == 0:
        out[:] = 1.0 if (n_g == 0 and n_p == 0) else 0.0
        return
    _candidates(gt, gt_area, pr, thresholds.min(), cand_g, cand_iou, cand_off, gt_rows)
    for t in range(thresholds.shape[0]):
        tp = _greedy_matches(n_g, n_p, thresholds[t], cand_g, cand_iou, cand_off, matched, cand_off, False)
        out[t] = tp / (n_p + n_g - tp)  # TP + FP + FN with FP = n_p - TP, FN = n_g - TP


@numba.njit(cache=True, error_model="numpy")  # no zero-division check: the IoU loop vectorises (0 where no overlap)
def _candidates(gt, gt_area, pr, lowest, cand_g, cand_iou, cand_off, gt_rows) -> None:
    """``cand_g[cand_off[p]:cand_off[p + 1]]``: the GT boxes whose IoU with prediction ``p`` is above ``lowest``,
    in GT order (their IoUs in ``cand_iou``). ``gt_rows``: work space, at least ``(6, n_gt)``.

    Each prediction's IoU with every ground-truth box of the image comes from one branch-free loop over the ground
    truth laid out as rows (it runs on vector registers), counting the candidates; most predictions of a fusion have
    none (false positives), and only the others are gathered. The arithmetic is :func:`box_iou`'s, operation for
    operation, so every IoU is the same number (each prediction's area as :func:`box_areas` computes it)."""
    n_g, n_p = gt.shape[0], pr.shape[0]
    gx1, gy1, gx2, gy2, g_area, ious = gt_rows[0], gt_rows[1], gt_rows[2], gt_rows[3], gt_rows[4], gt_rows[5]
    for g in range(n_g):
        gx1[g], gy1[g], gx2[g], gy2[g], g_area[g] = gt[g, 0], gt[g, 1], gt[g, 2], gt[g, 3], gt_area[g]
    k = 0
    for p in range(n_p):
        cand_off[p] = k
        px1, py1, px2, py2 = pr[p, 0], pr[p, 1], pr[p, 2], pr[p, 3]
        p_area = max(px2 - px1, 0.0) * max(py2 - py1, 0.0)
        n = 0
        for g in range(n_g):
            iw = min(px2, gx2[g]) - max(px1, gx1[g])
            ih = min(py2, gy2[g]) - max(py1, gy1[g])
            inter = iw * ih
            union = p_area + g_area[g] - inter
            iou = 0.0 if (iw <= 0.0) | (ih <= 0.0) | (union <= 0.0) else inter / union
            ious[g] = iou
            n += iou > lowest
        if n == 0:
            continue
        for g in range(n_g):
            cand_g[k] = g
            cand_iou[k] = ious[g]
            k += ious[g] > lowest
    cand_off[n_p] = k


@numba.njit(cache=True)
def _greedy_matches(n_g, n_p, thr, cand_g, cand_iou, cand_off, matched, tp_after, record) -> int:
    """Predictions ``0..n_p-1`` in order, each matched to the unmatched candidate GT of highest IoU ``> thr``
    (ties: the lower GT index); returns the true positives, and when ``record`` writes ``tp_after[p + 1]``, those
    among the first ``p + 1``: the greedy matching of a prefix is the prefix of the matching."""
    matched[:n_g] = False
    tp = 0
    for p in range(n_p):
        best, best_iou = -1, thr
        for c in range(cand_off[p], cand_off[p + 1]):
            g = cand_g[c]
            if not matched[g] and cand_iou[c] > best_iou:
                best, best_iou = g, cand_iou[c]
        if best >= 0:
            matched[best] = True
            tp += 1
        if record:
            tp_after[p + 1] = tp
    return tp


@numba.njit(cache=True)
def _image_prefix_scores(gt, gt_area, pr, pr_score, thresholds, score_thr, cand_g, cand_iou, cand_off,
                         matched, tp_after, gt_rows, out) -> None:
    """``out[k, t]`` for one image: :func:`_image_scores` of the predictions scoring ``>= score_thr[k]`` -- a
    prefix, the predictions being in descending score order -- from one matching per IoU threshold."""
    n_g, n_p = gt.shape[0], pr.shape[0]
    n_keep = np.empty(score_thr.shape[0], np.int64)
    longest = 0
    for k in range(score_thr.shape[0]):
        m = 0
        while m < n_p and pr_score[m] >= score_thr[k]:
            m += 1
        n_keep[k] = m
        longest = max(longest, m)
    if n_g > 0 and longest > 0:
        _candidates(gt, gt_area, pr[:longest], thresholds.min(), cand_g, cand_iou, cand_off, gt_rows)
    tp_after[0] = 0
    for t in range(thresholds.shape[0]):
        if n_g > 0 and longest > 0:
            _greedy_matches(n_g, longest, thresholds[t], cand_g, cand_iou, cand_off, matched, tp_after, True)
        for k in range(score_thr.shape[0]):
            m = n_keep[k]
            if n_g == 0 or m == 0:
                out[k, t] = 1.0 if (n_g == 0 and m == 0) else 0.0
            else:
                tp = tp_after[m]
                out[k, t] = tp / (m + n_g - tp)


@numba.njit(cache=True, nogil=True)
def _work_arrays(gt_offsets, pr_offsets, lo, hi):
    """Scratch for images ``lo..hi-1``, sized by the largest: candidates (GT index, IoU, offsets per prediction),
    true positives after each prediction, matched flags per GT, the ground truth as rows (:func:`_candidates`)."""
    max_g = max_p = 0
    for i in range(lo, hi):
        max_g = max(max_g, gt_offsets[i + 1] - gt_offsets[i])
        max_p = max(max_p, pr_offsets[i + 1] - pr_offsets[i])
    return (np.empty(max_g * max_p, dtype=np.int64), np.empty(max_g * max_p, dtype=np.float64),
            np.empty(max_p + 1, dtype=np.int64), np.empty(max_p + 1, dtype=np.int64), np.zeros(max_g, dtype=np.bool_),
            np.empty((6, max_g)))


@numba.njit(cache=True, nogil=True)
def _gwd_prefix_rows(gt_boxes, gt_area, gt_offsets, pr_boxes, pr_score, pr_offsets, thresholds, score_thr,
                     lo, hi, out) -> None:
    """:func:`_gwd_rows` at every score threshold: ``out[i, k]`` (one value per IoU threshold) for images
    ``lo..hi-1``."""
    cand_g, cand_iou, cand_off, tp_after, matched, gt_rows = _work_arrays(gt_offsets, pr_offsets, lo, hi)
    for i in range(lo, hi):
        g0, g1, p0, p1 = gt_offsets[i], gt_offsets[i + 1], pr_offsets[i], pr_offsets[i + 1]
        _image_prefix_scores(gt_boxes[g0:g1], gt_area[g0:g1], pr_boxes[p0:p1], pr_score[p0:p1],
                             thresholds, score_thr, cand_g, cand_iou, cand_off, matched, tp_after, gt_rows, out[i])


@numba.njit(cache=True, nogil=True)
def _gwd_rows(gt_boxes, gt_area, gt_offsets, pr_boxes, pr_offsets, thresholds, lo, hi, out) -> None:
    """``out[i]`` (one value per threshold) for images ``lo..hi-1``; releases the GIL (threads over images)."""
    cand_g, cand_iou, cand_off, _, matched, gt_rows = _work_arrays(gt_offsets, pr_offsets, lo, hi)
    for i in range(lo, hi):
        g0, g1, p0, p1 = gt_offsets[i], gt_offsets[i + 1], pr_offsets[i], pr_offsets[i + 1]
        _image_scores(gt_boxes[g0:g1], gt_area[g0:g1], pr_boxes[p0:p1], thresholds,
                      cand_g, cand_iou, cand_off, matched, gt_rows, out[i])


PARALLEL_MIN_IMAGES = 64  # images per thread at least (fewer: one thread scores them all)


def _gwd_table(gt_boxes: np.ndarray, gt_offsets: np.ndarray, pr_boxes: np.ndarray, pr_offsets: np.ndarray,
               thresholds: np.ndarray) -> np.ndarray:
    """``(n_images, n_thresholds)`` scores; images split over this process's CPUs in ranges of about equal
    prediction counts (the work grows with predictions x ground truth per image)."""
    n_img = gt_offsets.shape[0] - 1
    out = np.empty((n_img, thresholds.shape[0]), dtype=np.float64)
    args = (gt_boxes, box_areas(gt_boxes), gt_offsets, pr_boxes, pr_offsets, thresholds)
    on_ranges(lambda lo, hi: _gwd_rows(*args, lo, hi, out), pr_offsets,
              min(available_cpus(), n_img // PARALLEL_MIN_IMAGES))
    return out


def gwd_by_score_threshold(gt_boxes: np.ndarray, gt_offsets: np.ndarray, pred_boxes: np.ndarray,
                           pred_scores: np.ndarray, pred_offsets: np.ndarray, score_thresholds: np.ndarray,
                           thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """:func:`gwd_packed`'s score of the predictions scoring ``>= t``, for each ``t`` of ``score_thresholds``, from
    one pass (predictions sorted by descending score inside each image): equal, bit for bit, to scoring each
    threshold's predictions apart."""
    gt_boxes = np.ascontiguousarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    pred_boxes = box_rows(pred_boxes)
    gt_offsets = np.ascontiguousarray(gt_offsets, dtype=np.int64)
    pred_offsets = np.ascontiguousarray(pred_offsets, dtype=np.int64)
    score_thr = np.ascontiguousarray(score_thresholds, dtype=np.float64)
    thresholds = np.ascontiguousarray(thresholds, dtype=np.float64)
    n_img = gt_offsets.shape[0] - 1
    if n_img == 0:
        return np.zeros(len(score_thr))
    out = np.empty((n_img, len(score_thr), len(thresholds)), dtype=np.float64)
    args = (gt_boxes, box_areas(gt_boxes), gt_offsets, pred_boxes, np.ascontiguousarray(pred_scores, dtype=np.float64),
            pred_offsets, thresholds, score_thr)
    on_ranges(lambda lo, hi: _gwd_prefix_rows(*args, lo, hi, out), pred_offsets,
              min(available_cpus(), n_img // PARALLEL_MIN_IMAGES))
    # each threshold's (images x IoU thresholds) table laid out as gwd_packed's, so the means add up alike
    return np.array([float(np.ascontiguousarray(out[:, k, :]).mean(axis=1).mean()) for k in range(len(score_thr))])


def gwd_packed(
    gt_boxes: np.ndarray,
    gt_offsets: np.ndarray,
    pred_boxes: np.ndarray,
    pred_offsets: np.ndarray,
    thresholds: np.ndarray = IOU_THRESHOLDS,
) -> GWDResult:
    """Score packed arrays; predictions already sorted by descending score inside each image."""
    if len(gt_offsets) != len(pred_offsets):
        raise ValueError("gt_offsets and pred_offsets must describe the same number of images")
    table = _gwd_table(
        np.ascontiguousarray(gt_boxes, dtype=np.float64).reshape(-1, 4),
        np.ascontiguousarray(gt_offsets, dtype=np.int64),
        box_rows(pred_boxes),
        np.ascontiguousarray(pred_offsets, dtype=np.int64),
        np.ascontiguousarray(thresholds, dtype=np.float64),
    )
    if table.shape[0] == 0:
        return GWDResult(0.0, np.zeros(len(thresholds)), np.zeros(0))
    per_image = table.mean(axis=1)
    return GWDResult(float(per_image.mean()), table.mean(axis=0), per_image)


def pack(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-image ``(n_i, 4)`` arrays into ``(N, 4)`` boxes and ``(n_images + 1,)`` offsets."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    boxes = [np.asarray(a, dtype=np.float64).reshape(-1, 4) for a in arrays]
    return (np.concatenate(boxes) if boxes else np.zeros((0, 4))), offsets


def gwd_score(
    gts: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    thresholds: np.ndarray = IOU_THRESHOLDS,
) -> GWDResult:
    """Convenience form: per-image lists of GT boxes, predicted boxes and their scores (any order)."""
    if not len(gts) == len(preds) == len(scores):
        raise ValueError("gts, preds and scores must have one entry per image")
    ordered = [np.asarray(p, dtype=np.float64).reshape(-1, 4)[np.argsort(-np.asarray(s), kind="stable")]
               for p, s in zip(preds, scores)]
    gt_boxes, gt_offsets = pack(gts)
    pred_boxes, pred_offsets = pack(ordered)
    return gwd_packed(gt_boxes, gt_offsets, pred_boxes, pred_offsets, thresholds)


def _score(gt: GroundTruth, preds: Packed) -> MetricResult:
    r = gwd_packed(gt.packed.boxes, gt.packed.offsets, preds.boxes, preds.offsets)
    details = {f"iou{t:.2f}": float(v) for t, v in zip(IOU_THRESHOLDS, r.per_threshold)}
    return MetricResult("gwd", r.score, details, pd.Series(r.per_image, index=gt.image_ids, name="gwd"))


def _score_by_threshold(gt: GroundTruth, preds: Packed, score_thresholds: np.ndarray) -> np.ndarray:
    return gwd_by_score_threshold(gt.packed.boxes, gt.packed.offsets, preds.boxes, preds.scores, preds.offsets,
                                  score_thresholds)


register_metric(Metric("gwd", higher_is_better=True, class_aware=False, score=_score,
                       score_by_threshold=_score_by_threshold, thresholded=True))
