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

Cost: the IoUs of each detection with the ground truth of its image (one vectorised loop), the threshold loops only
over the boxes passing the lowest threshold, the images on the process's CPUs; one radix sort of every detection;
per category, one pass that computes precision only at the true positives. No Python objects per box. Every score
threshold of a search comes from the same matching and sort (:func:`coco_precision_by_threshold`).
"""
from __future__ import annotations

import numba
import numpy as np

from pipeline.cpus import alongside, available_cpus, on_ranges
from pipeline.metrics.packing import by_class, descending_order

# Digests of the package files compiled into this module's cached functions (numba's cache cannot see changes to
# them); see pipeline.fusion.wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {"fusion/primitives.py": "5a867f87f2eb7faf", "packing.py": "df836e67dad1bbc1"}

EPS = float(np.spacing(1))  # accumulate()'s np.spacing(1)
AREA_MAX = 1e5 ** 2  # the "all" area range is [0, 1e5 ** 2]
PARALLEL_MIN_DETECTIONS = 50_000  # detections per thread at least (fewer: one thread matches them all)


def coco_precision_by_threshold(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_offsets: np.ndarray,
                                det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray,
                                det_offsets: np.ndarray, n_classes: int, iou_thrs: np.ndarray, rec_thrs: np.ndarray,
                                score_thrs: np.ndarray) -> np.ndarray:
    """``precision[s, t, r, k]``: ``COCOeval.eval['precision'][:, :, :, 0, -1]`` of the detections scoring
    ``>= score_thrs[s]`` alone, from one matching and one sort. Boxes ``x1, y1, x2, y2``, both sets grouped by
    image (``offsets``), detections by descending score inside an image (stable). An image's detections are
    matched in descending score order, each against what the earlier ones left, so those above a score threshold
    match as they would alone; and they come first in the sorted order of every class. The images are matched on
    this process's CPUs."""
    n_det = det_labels.shape[0]
    matched = np.zeros(n_det, np.uint64)  # bit t: matched at IoU threshold t
    if iou_thrs.shape[0] > 64:
        raise ValueError(f"at most 64 IoU thresholds, got {iou_thrs.shape[0]}")
    threads = min(available_cpus(), n_det // PARALLEL_MIN_DETECTIONS, len(det_offsets) - 1)
    order = alongside(lambda: descending_order(det_scores),  # the sort needs no matching: it runs meanwhile
                      lambda: on_ranges(lambda lo, hi: match_images(lo, hi, gt_boxes, gt_labels, gt_offsets,
                                                                    det_boxes, det_labels, det_offsets, iou_thrs,
                                                                    matched), det_offsets, threads), threads)
    return accumulate(order, det_scores, det_labels, matched, outside_area_range(det_boxes), gt_labels, n_classes,
                      iou_thrs.shape[0], rec_thrs, score_thrs)


@numba.njit(cache=True, nogil=True, error_model="numpy")  # no zero-division checks: the IoU loop vectorises
def match_images(lo: int, hi: int, gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_offsets: np.ndarray,
                 det_boxes: np.ndarray, det_labels: np.ndarray, det_offsets: np.ndarray, iou_thrs: np.ndarray,
                 matched: np.ndarray) -> None:
    """Bit ``t`` of ``matched[d]``: detection ``d`` of images ``lo..hi-1`` matched a ground-truth box at IoU
    threshold ``t`` (step 2). Only the ground truth whose IoU passes the lowest threshold can be taken at any
    threshold: the threshold loops run over those candidates, in ground-truth order."""
    n_thr = iou_thrs.shape[0]
    most_gt = 0
    for i in range(lo, hi):
        most_gt = max(most_gt, gt_offsets[i + 1] - gt_offsets[i])
    gt_taken = np.zeros((n_thr, most_gt), np.bool_)
    ious = np.empty(most_gt)
    cand_iou = np.empty(most_gt)
    cand = np.empty(most_gt, np.int64)
    gt_xywh = np.empty((4, gt_boxes.shape[0]))  # as pipeline.metrics.coco builds its annotations: w = x2 - x1
    for g in range(gt_offsets[lo], gt_offsets[hi]):
        gt_xywh[0, g] = gt_boxes[g, 0]
        gt_xywh[1, g] = gt_boxes[g, 1]
        gt_xywh[2, g] = gt_boxes[g, 2] - gt_boxes[g, 0]
        gt_xywh[3, g] = gt_boxes[g, 3] - gt_boxes[g, 1]
    lowest = np.inf
    for t in range(n_thr):
        lowest = min(lowest, min(iou_thrs[t], 1 - 1e-10))
    for i in range(lo, hi):
        g0, g1 = gt_offsets[i], gt_offsets[i + 1]
        gt_taken[:, :g1 - g0] = False
        for d in range(det_offsets[i], det_offsets[i + 1]):
            nc = _candidates(d, g0, g1, lowest, gt_xywh, gt_labels, det_boxes, det_labels, ious, cand, cand_iou)
            for t in range(n_thr if nc else 0):
                best = min(iou_thrs[t], 1 - 1e-10)
                m = -1
                for c in range(nc):  # as pycocotools: the highest IoU >= best, the last one among equal IoUs
                    j = cand[c]
                    if gt_taken[t, j] or cand_iou[c] < best:
                        continue
                    best = cand_iou[c]
                    m = j
                if m >= 0:
                    gt_taken[t, m] = True
                    matched[d] |= np.uint64(1) << np.uint64(t)


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _candidates(d: int, g0: int, g1: int, lowest: float, gt_xywh: np.ndarray, gt_labels: np.ndarray,
                det_boxes: np.ndarray, det_labels: np.ndarray, ious: np.ndarray, cand: np.ndarray,
                cand_iou: np.ndarray) -> int:
    """``cand[:n]`` (offsets from ``g0``) and ``cand_iou[:n]``: the ground truth ``g0..g1-1`` whose IoU with
    detection ``d`` is not below ``lowest`` (another class: -1, as pycocotools leaves it unmatched); returns ``n``.
    ``gt_xywh``: the ground truth's x, y, w, h as rows. Every IoU in one loop without branches (it vectorises),
    counting the candidates; most detections have none (a false positive at every threshold)."""
    k = det_labels[d]
    dx, dy = det_boxes[d, 0], det_boxes[d, 1]
    dw, dh = det_boxes[d, 2] - dx, det_boxes[d, 3] - dy
    # the image's own rows, indexed from 0: an index numba cannot prove non-negative gets a wraparound select per
    # lane, and the loop then gathers instead of loading (measured: ~2x the matching)
    gx, gy, gw, gh = gt_xywh[0, g0:g1], gt_xywh[1, g0:g1], gt_xywh[2, g0:g1], gt_xywh[3, g0:g1]
    gl = gt_labels[g0:g1]
    n = 0
    for j in range(g1 - g0):  # maskApi.c's bbIou: 0 without overlap, else inter / (area_d + area_g - inter)
        iw = min(dw + dx, gw[j] + gx[j]) - max(dx, gx[j])
        ih = min(dh + dy, gh[j] + gy[j]) - max(dy, gy[j])
        v = (iw * ih) / (dw * dh + gw[j] * gh[j] - iw * ih)
        v = -1.0 if gl[j] != k else (0.0 if (iw <= 0) | (ih <= 0) else v)
        ious[j] = v
        n += not v < lowest  # the threshold loops' own test: a NaN IoU stays a candidate there too
    if n == 0:
        return n
    n = 0
    for j in range(g1 - g0):
        if not ious[j] < lowest:
            cand[n] = j
            cand_iou[n] = ious[j]
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def accumulate(order: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray, matched: np.ndarray,
               outside: np.ndarray, gt_labels: np.ndarray, n_classes: int, n_thr: int, rec_thrs: np.ndarray,
               score_thrs: np.ndarray) -> np.ndarray:
    """``precision[s, t, r, k]`` (step 3) of the detections scoring ``>= score_thrs[s]``. ``order``: every
    detection, stably by descending score (accumulate() sorts each category's detections so: reading one category
    out of the whole order gives the same); ``outside[d]``: detection ``d``'s area is outside the range."""
    n_gt = np.zeros(n_classes, np.int64)
    for g in range(gt_labels.shape[0]):
        n_gt[gt_labels[g]] += 1
    rows, start = by_class(order, det_labels, n_classes)
    seq_matched = matched[rows]  # each class's detections in ``order``, as contiguous columns
    seq_outside = outside[rows]
    seq_score = det_scores[rows]
    precision = np.full((score_thrs.shape[0], n_thr, rec_thrs.shape[0], n_classes), -1.0)
    for k in range(n_classes):
        if n_gt[k] == 0:
            continue
        for s in range(score_thrs.shape[0]):
            cut = start[k]
            while cut < start[k + 1] and seq_score[cut] >= score_thrs[s]:
                cut += 1
            precision[s, :, :, k] = class_precision(seq_matched[start[k]:cut], seq_outside[start[k]:cut], n_gt[k],
                                                    n_thr, rec_thrs)
    return precision


@numba.njit(cache=True, nogil=True)
def class_precision(matched: np.ndarray, outside: np.ndarray, n_gt: int, n_thr: int,
                    rec_thrs: np.ndarray) -> np.ndarray:
    """``precision[t, r]`` of one class, its detections' ``matched`` bits and ``outside`` flags by descending score.

    pycocotools computes recall and precision at every detection, makes precision non-increasing from the right
    and reads it where recall first reaches each recall threshold. Recall grows only at a true positive, so every
    such place is a true positive (or the first detection, for threshold 0); and from a true positive to the next,
    precision only falls (more false positives, the same true ones). The maximum right of a place is then the
    maximum over the true positives there: only they are computed, with pycocotools' arithmetic."""
    nd = matched.shape[0]
    out = np.zeros((n_thr, rec_thrs.shape[0]))
    most_tp = min(nd, n_gt)  # a ground-truth box is matched once at most
    fp_at = np.empty((n_thr, most_tp))  # false positives before each true positive
    n_tp = np.zeros(n_thr, np.int64)
    ignored = np.zeros(n_thr, np.int64)  # unmatched detections outside the area range: neither true nor false
    for r in range(nd):
        bits = matched[r]
        if bits == 0 and not outside[r]:
            continue  # a false positive at every threshold (most detections)
        for t in range(n_thr):
            if (bits >> np.uint64(t)) & np.uint64(1):
                fp_at[t, n_tp[t]] = r - n_tp[t] - ignored[t]
                n_tp[t] += 1
            elif outside[r]:
                ignored[t] += 1
    recall_at = np.empty(most_tp)
    for q in range(most_tp):
        recall_at[q] = (q + 1.0) / n_gt
    best_after = np.empty(most_tp)  # the highest precision at this true positive or a later one
    for t in range(n_thr):
        best = 0.0
        for q in range(n_tp[t] - 1, -1, -1):
            tp = q + 1.0
            best = max(best, tp / (fp_at[t, q] + tp + EPS))
            best_after[q] = best
        at = np.searchsorted(recall_at[:n_tp[t]], rec_thrs)  # side='left': the first true positive reaching it
        for r in range(rec_thrs.shape[0]):
            if rec_thrs[r] <= 0.0:  # reached at the first detection: the best precision of them all
                out[t, r] = best_after[0] if n_tp[t] > 0 else 0.0
            elif at[r] < n_tp[t]:
                out[t, r] = best_after[at[r]]
    return out


@numba.njit(cache=True, nogil=True)
def outside_area_range(boxes: np.ndarray) -> np.ndarray:
    """Per box: its COCO area ``w * h`` is outside the "all" range [0, 1e10]."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area < 0.0) | (area > AREA_MAX)
