"""COCO box evaluation compiled: the precision array of ``COCOeval.evaluate()`` + ``accumulate()`` for our setting,
without building COCO objects (faster-coco-eval and pycocotools stay the test oracles, tests/test_metrics.py).

Our setting (pipeline.metrics.coco): every box ``iscrowd = 0``, one area range ("all"), ``maxDets`` at least the
largest per-image detection count (so no detection is cut), every class a category, every scored image listed.
What is replicated, step by step as pycocotools does it:

1. IoU: ``maskApi.c``'s ``bbIou`` on ``[x, y, w, h]`` boxes (``w = x2 - x1``, as the annotations are built):
   ``iw = min(dx + dw, gx + gw) - max(dx, gx)`` (0 when ``<= 0``), likewise ``ih``, ``i / (dw * dh + gw * gh - i)``.
2. Matching (``evaluateImg``), per image and category, detections by descending score (stable: the packed order
   of :mod:`pipeline.metrics.packing` already is), for each IoU threshold ``t``: the detection takes the
   still-unmatched ground truth of the highest IoU ``>= min(t, 1 - 1e-10)``, the last one among equal IoUs
   (``if iou < best: continue`` lets an equal IoU replace the earlier).
3. Accumulation (``accumulate``), per category: the detections of all images in image order, stably sorted by
   descending score (``mergesort``), cumulative true / false positives, ``recall = tp / n_gt``, ``precision =
   tp / (tp + fp + eps)``, made non-increasing from the right, read at the 101 recall thresholds
   (``searchsorted(recall, thr, 'left')``, 0 past the end); -1 for a category without ground truth. An unmatched
   detection whose area ``w * h`` is outside the range [0, 1e10] (negative when exactly one of ``x2 < x1``,
   ``y2 < y1``) is ignored: neither a true nor a false positive.

Cost: the IoUs of each detection with the ground truth of its image and class, and a few passes per category --
no Python objects per box.
"""
from __future__ import annotations

import numba
import numpy as np

EPS = float(np.spacing(1))  # accumulate()'s np.spacing(1)
AREA_MAX = 1e5 ** 2  # the "all" area range is [0, 1e5 ** 2]


@numba.njit(cache=True, nogil=True)
def coco_precision(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_offsets: np.ndarray, det_boxes: np.ndarray,
                   det_scores: np.ndarray, det_labels: np.ndarray, det_offsets: np.ndarray, n_classes: int,
                   iou_thrs: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """``precision[t, r, k]`` as ``COCOeval.eval['precision'][:, :, :, 0, -1]``. Boxes ``x1, y1, x2, y2``, both
    sets grouped by image (``offsets``), detections by descending score inside an image (stable)."""
    matched = match_detections(gt_boxes, gt_labels, gt_offsets, det_boxes, det_labels, det_offsets, iou_thrs)
    n_gt = np.zeros(n_classes, np.int64)
    for g in range(gt_labels.shape[0]):
        n_gt[gt_labels[g]] += 1
    outside = outside_area_range(det_boxes)  # an unmatched one is ignored
    precision = np.full((iou_thrs.shape[0], rec_thrs.shape[0], n_classes), -1.0)
    for k in range(n_classes):
        if n_gt[k] > 0:
            precision[:, :, k] = class_precision(k, n_gt[k], det_scores, det_labels, matched, outside, rec_thrs)
    return precision


@numba.njit(cache=True, nogil=True)
def match_detections(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_offsets: np.ndarray, det_boxes: np.ndarray,
                     det_labels: np.ndarray, det_offsets: np.ndarray, iou_thrs: np.ndarray) -> np.ndarray:
    """``matched[t, d]``: detection ``d`` matched a ground-truth box at IoU threshold ``t`` (step 2)."""
    n_thr = iou_thrs.shape[0]
    matched = np.zeros((n_thr, det_labels.shape[0]), np.bool_)
    most_gt = 0
    for i in range(gt_offsets.shape[0] - 1):
        most_gt = max(most_gt, gt_offsets[i + 1] - gt_offsets[i])
    gt_taken = np.zeros((n_thr, most_gt), np.bool_)
    ious = np.empty(most_gt)
    gx, gy, gw, gh = _xywh(gt_boxes)
    dx, dy, dw, dh = _xywh(det_boxes)
    for i in range(gt_offsets.shape[0] - 1):
        g0, g1 = gt_offsets[i], gt_offsets[i + 1]
        gt_taken[:, :g1 - g0] = False
        for d in range(det_offsets[i], det_offsets[i + 1]):
            k = det_labels[d]
            for g in range(g0, g1):  # -1: another class (never matched)
                ious[g - g0] = -1.0 if gt_labels[g] != k else _bb_iou(dx[d], dy[d], dw[d], dh[d], gx[g], gy[g],
                                                                      gw[g], gh[g])
            for t in range(n_thr):
                best = min(iou_thrs[t], 1 - 1e-10)
                m = -1
                for j in range(g1 - g0):
                    if gt_taken[t, j] or ious[j] < best:
                        continue
                    best = ious[j]
                    m = j
                if m >= 0:
                    gt_taken[t, m] = True
                    matched[t, d] = True
    return matched


@numba.njit(cache=True, nogil=True)
def class_precision(k: int, n_gt: int, det_scores: np.ndarray, det_labels: np.ndarray, matched: np.ndarray,
                    outside: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """``precision[t, r]`` of class ``k`` (step 3); ``outside[d]``: detection ``d``'s area is outside the range."""
    dets = np.flatnonzero(det_labels == k)  # image order, each image by descending score
    order = dets[np.argsort(-det_scores[dets], kind="mergesort")]
    nd = order.shape[0]
    out = np.zeros((matched.shape[0], rec_thrs.shape[0]))
    recall = np.empty(nd)
    prec = np.empty(nd)
    for t in range(matched.shape[0]):
        tp = 0.0
        fp = 0.0
        for r in range(nd):
            d = order[r]
            if matched[t, d]:
                tp += 1.0
            elif not outside[d]:
                fp += 1.0
            recall[r] = tp / n_gt
            prec[r] = tp / (fp + tp + EPS)
        for r in range(nd - 1, 0, -1):
            if prec[r] > prec[r - 1]:
                prec[r - 1] = prec[r]
        at = np.searchsorted(recall, rec_thrs)  # side='left'
        for r in range(rec_thrs.shape[0]):
            if at[r] < nd:
                out[t, r] = prec[at[r]]
    return out


@numba.njit(cache=True, nogil=True)
def outside_area_range(boxes: np.ndarray) -> np.ndarray:
    """Per box: its COCO area ``w * h`` is outside the "all" range [0, 1e10]."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area < 0.0) | (area > AREA_MAX)


@numba.njit(cache=True, nogil=True)
def _xywh(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """COCO ``[x, y, w, h]`` columns as pipeline.metrics.coco builds its annotations (``w = x2 - x1``)."""
    return boxes[:, 0].copy(), boxes[:, 1].copy(), boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


@numba.njit(cache=True, nogil=True, inline="always")
def _bb_iou(dx: float, dy: float, dw: float, dh: float, gx: float, gy: float, gw: float, gh: float) -> float:
    """``maskApi.c`` ``bbIou`` for one detection and one non-crowd ground-truth box."""
    iw = min(dw + dx, gw + gx) - max(dx, gx)
    if iw <= 0:
        return 0.0
    ih = min(dh + dy, gh + gy) - max(dy, gy)
    if ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (dw * dh + gw * gh - inter)
