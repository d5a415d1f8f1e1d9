"""Pascal VOC mAP at IoU 0.5 (VOC2010+ all-point interpolated AP), class-aware; and at IoU 0.4 (VinBigData).

Conventions:

- Matching follows the VOC devkit (``voc_eval``): per class, detections of all images are taken by descending
  score (stable: equal scores keep their input order). Each detection is compared with *every* ground truth of
  its class in its image and takes the one of highest IoU (IoU ties: lower ground-truth index). If that IoU is
  ``> 0.5`` (strict, as in the devkit) and that ground truth is not yet taken, the detection is a TP and takes it;
  otherwise it is a FP, *even if another, still free ground truth overlaps it by more than 0.5* (devkit rule; COCO
  would match it to the free one).
- IoU is the continuous-coordinate IoU (no "+1 pixel" term of the original devkit: our boxes are float pixels).
- No ``difficult`` flag exists in our tables: every ground-truth box counts.
- AP: all-point interpolation (area under the precision envelope at every recall change), not the VOC2007
  11-point rule. A class with ground truth and no detection has AP 0.
- mAP: mean over the classes that have at least one ground-truth box in the scored images; classes without
  ground truth are skipped (their detections are not penalised anywhere). No ground truth at all: mAP = 0.

Registered as ``"voc_map50"`` (higher is better, class-aware; details ``map50``, ``ap50_<class>``) and, the same at
``IoU > 0.4``, ``"voc_map40"`` (VinBigData; details ``map40``, ``ap40_<class>``).

Computed as the devkit defines it, in another order: a detection's fate depends only on the higher-scoring ones of
its image and class, so each image is matched on its own (its detections come by descending score), the images on
the process's CPUs; the detections are then sorted once. Precision's envelope is read only where recall changes, at
the true positives, and from one true positive to the next precision only falls: only they are computed. The same
matching and sort give every score threshold's mAP (those scoring ``>= t`` come first), as the OOF tuner asks.
"""
from __future__ import annotations

import numba
import numpy as np

from pipeline.cpus import alongside, available_cpus, on_ranges
from pipeline.metrics.packing import Packed, by_class, descending_order
from pipeline.metrics.registry import GroundTruth, Metric, MetricResult, register_metric

# Digests of the package files compiled into this module's cached functions (numba's cache cannot see changes to
# them); see pipeline.fusion.wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {
    "fusion/primitives.py": "5a867f87f2eb7faf",
    "packing.py": "df836e67dad1bbc1",
    "registry.py": "c7d01582269e09f9",
}

IOU_THRESHOLD = 0.5
PARALLEL_MIN_DETECTIONS = 50_000  # detections per thread at least (fewer: one thread matches them all)


def voc_ap_by_threshold(gt: Packed, dets: Packed, n_classes: int, score_thrs: np.ndarray,
                        iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """``ap[s, k]``: AP of class ``k`` (NaN without ground truth) over the detections scoring ``>= score_thrs[s]``.
    Both sets packed by image (``offsets``), detections by descending score inside an image (stable)."""
    n_det = len(dets.labels)
    tp = np.zeros(n_det, np.bool_)
    threads = min(available_cpus(), n_det // PARALLEL_MIN_DETECTIONS, len(dets.offsets) - 1)
    order = alongside(lambda: descending_order(dets.scores),  # the sort needs no matching: it runs meanwhile
                      lambda: on_ranges(lambda lo, hi: _match_images(lo, hi, gt.boxes, gt.labels, gt.offsets,
                                                                     dets.boxes, dets.labels, dets.offsets,
                                                                     float(iou_threshold), tp), dets.offsets,
                                        threads), threads)
    rows, start = by_class(order, dets.labels, n_classes)
    scores, tp = dets.scores[rows], tp[rows]
    n_gt = np.bincount(gt.labels, minlength=n_classes)
    ap = np.full((len(score_thrs), n_classes), np.nan)
    for k in np.flatnonzero(n_gt):
        tp_k, scores_k = tp[start[k]:start[k + 1]], scores[start[k]:start[k + 1]]
        for s, t in enumerate(score_thrs):
            cut = int(np.count_nonzero(scores_k >= t))  # those come first: scores_k descends
            ap[s, k] = float(np.sum(_ap_terms(tp_k[:cut], int(n_gt[k])))) if cut else 0.0
    return ap


@numba.njit(cache=True, nogil=True, error_model="numpy")  # no zero-division checks: the IoU loop vectorises
def _match_images(lo: int, hi: int, gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_offsets: np.ndarray,
                  det_boxes: np.ndarray, det_labels: np.ndarray, det_offsets: np.ndarray, thr: float,
                  tp: np.ndarray) -> None:
    """``tp[d]`` for the detections of images ``lo..hi-1`` (the devkit's rule): the ground truth of its class with
    the highest IoU (the first on a tie), a true positive if that IoU is ``> thr`` and the box not taken yet."""
    most_gt = 0
    for i in range(lo, hi):
        most_gt = max(most_gt, gt_offsets[i + 1] - gt_offsets[i])
    taken = np.zeros(most_gt, np.bool_)
    ious = np.empty(most_gt)
    gt_rows = np.empty((4, gt_boxes.shape[0]))  # x1, y1, x2, y2 as rows: the IoU loop loads them side by side
    for g in range(gt_offsets[lo], gt_offsets[hi]):
        for c in range(4):
            gt_rows[c, g] = gt_boxes[g, c]
    for i in range(lo, hi):
        g0, g1 = gt_offsets[i], gt_offsets[i + 1]
        taken[:g1 - g0] = False
        for d in range(det_offsets[i], det_offsets[i + 1]):
            if _ious(d, g0, g1, thr, gt_rows, gt_labels, det_boxes, det_labels, ious) == 0:
                continue  # no IoU above thr: a false positive, whichever box is best
            best, best_iou = -1, -1.0  # another class: -1, never the best
            for j in range(g1 - g0):
                if ious[j] > best_iou:
                    best, best_iou = j, ious[j]
            if not taken[best]:
                taken[best] = True
                tp[d] = True


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _ious(d: int, g0: int, g1: int, thr: float, gt_rows: np.ndarray, gt_labels: np.ndarray, det_boxes: np.ndarray,
          det_labels: np.ndarray, ious: np.ndarray) -> int:
    """``ious[:g1 - g0]``: detection ``d``'s IoU with each ground-truth box of its image (-1 for another class),
    in one loop without branches; returns how many are ``> thr``. ``gt_rows``: the ground truth's x1, y1, x2, y2
    as rows, read from the image's own start (an index numba cannot prove non-negative gets a wraparound select per
    lane, and the loop then gathers instead of loading)."""
    k = det_labels[d]
    x1, y1, x2, y2 = det_boxes[d, 0], det_boxes[d, 1], det_boxes[d, 2], det_boxes[d, 3]
    area_d = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    n = 0
    bx1, by1, bx2, by2 = gt_rows[0, g0:g1], gt_rows[1, g0:g1], gt_rows[2, g0:g1], gt_rows[3, g0:g1]
    gl = gt_labels[g0:g1]
    for j in range(g1 - g0):  # pipeline.metrics.gwd.box_iou, arithmetic for arithmetic
        gx1, gy1, gx2, gy2 = bx1[j], by1[j], bx2[j], by2[j]
        iw = min(x2, gx2) - max(x1, gx1)
        ih = min(y2, gy2) - max(y1, gy1)
        inter = iw * ih
        union = area_d + max(gx2 - gx1, 0.0) * max(gy2 - gy1, 0.0) - inter
        v = inter / union if (iw > 0.0) & (ih > 0.0) & (union > 0.0) else 0.0
        v = v if gl[j] == k else -1.0
        ious[j] = v
        n += v > thr
    return n


@numba.njit(cache=True, nogil=True)
def _ap_terms(tp: np.ndarray, n_gt: int) -> np.ndarray:
    """The terms the all-point AP sums (``(mrec[i + 1] - mrec[i]) * mpre[i + 1]`` wherever recall changes, in
    order), from the true-positive flags of a class's detections by descending score: recall changes at each true
    positive, and at the end when it stops short of 1 (a term of 0); the envelope there is the best precision at that
    true positive or a later one. Summed with numpy's pairwise sum, they give the devkit's AP bit for bit."""
    n_tp = 0
    for r in range(tp.shape[0]):
        n_tp += tp[r]
    prec = np.empty(n_tp)
    q = 0
    for r in range(tp.shape[0]):
        if tp[r]:
            prec[q] = (q + 1) / (r + 1)  # numpy's ctp / np.arange(1, n + 1)
            q += 1
    for q in range(n_tp - 2, -1, -1):
        prec[q] = max(prec[q], prec[q + 1])
    last = n_tp / n_gt
    terms = np.empty(n_tp + (last != 1.0))
    prev = 0.0
    for q in range(n_tp):
        rec = (q + 1) / n_gt
        terms[q] = (rec - prev) * prec[q]
        prev = rec
    if last != 1.0:
        terms[n_tp] = (1.0 - last) * 0.0
    return terms


def average_precision(tp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP from TP flags of detections sorted by descending score, in numpy (the report's
    curves; the reference of :func:`_ap_terms`)."""
    if n_gt == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_map(ap_per_class: np.ndarray) -> float:
    """Mean over classes with ground truth (non-NaN AP); 0.0 when no class has any."""
    valid = ap_per_class[~np.isnan(ap_per_class)]
    return float(valid.mean()) if len(valid) else 0.0


def voc_metric(iou_threshold: float) -> Metric:
    """The registry entry of VOC mAP at ``IoU > iou_threshold``: ``voc_map50`` (VOC), ``voc_map40`` (VinBigData's
    "PASCAL VOC 2010 mAP at IoU > 0.4"). Details: ``map<t>``, ``ap<t>_<class>`` with ``t`` the threshold in
    hundredths."""
    tag = f"{round(iou_threshold * 100):02d}"

    def score(gt: GroundTruth, preds: Packed) -> MetricResult:
        ap = voc_ap_by_threshold(gt.packed, preds, len(gt.classes), np.array([-np.inf]), iou_threshold)[0]
        value = voc_map(ap)
        details = {f"map{tag}": value} | {f"ap{tag}_{c}": float(a) for c, a in zip(gt.classes, ap) if not np.isnan(a)}
        return MetricResult(f"voc_map{tag}", value, details)

    def score_by_threshold(gt: GroundTruth, preds: Packed, score_thresholds: np.ndarray) -> np.ndarray:
        return np.array([voc_map(ap) for ap in voc_ap_by_threshold(gt.packed, preds, len(gt.classes),
                                                                   score_thresholds, iou_threshold)])

    return Metric(f"voc_map{tag}", higher_is_better=True, class_aware=True, score=score,
                  score_by_threshold=score_by_threshold)


register_metric(voc_metric(IOU_THRESHOLD))
register_metric(voc_metric(0.4))
