"""Pascal VOC mAP at IoU 0.5 (VOC2010+ all-point interpolated AP), class-aware.

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

Registered as ``"voc_map50"`` (higher is better, class-aware). Details: ``map50``, ``ap50_<class>``.
"""
from __future__ import annotations

import numba
import numpy as np

from pipeline.metrics.gwd import box_areas, box_iou
from pipeline.metrics.packing import Packed
from pipeline.metrics.registry import GroundTruth, Metric, MetricResult, register_metric

IOU_THRESHOLD = 0.5


@numba.njit(cache=True)
def _match(gt_boxes, gt_labels, gt_offsets, det_boxes, det_labels, det_image, thr) -> np.ndarray:
    """TP flags for detections given in descending-score order (devkit matching rule)."""
    gt_area, det_area = box_areas(gt_boxes), box_areas(det_boxes)
    taken = np.zeros(gt_boxes.shape[0], dtype=np.bool_)
    tp = np.zeros(det_boxes.shape[0], dtype=np.bool_)
    for d in range(det_boxes.shape[0]):
        i = det_image[d]
        best, best_iou = -1, -1.0
        for g in range(gt_offsets[i], gt_offsets[i + 1]):
            if gt_labels[g] != det_labels[d]:
                continue
            iou = box_iou(det_boxes[d], gt_boxes[g], det_area[d], gt_area[g])
            if iou > best_iou:
                best, best_iou = g, iou
        if best >= 0 and best_iou > thr and not taken[best]:
            taken[best] = True
            tp[d] = True
    return tp


def average_precision(tp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP from TP flags of detections sorted by descending score."""
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


def voc_ap_per_class(
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_offsets: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_labels: np.ndarray,
    det_image: np.ndarray,
    n_classes: int,
    iou_threshold: float = IOU_THRESHOLD,
) -> np.ndarray:
    """AP per class (NaN for classes without ground truth).

    GT is packed by image (image ``i`` owns rows ``gt_offsets[i]:gt_offsets[i+1]``); detections come in any order
    with ``det_image`` the image index of each.
    """
    order = np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable")
    det_labels = np.ascontiguousarray(det_labels, dtype=np.int64)[order]
    tp = _match(
        np.ascontiguousarray(gt_boxes, dtype=np.float64).reshape(-1, 4),
        np.ascontiguousarray(gt_labels, dtype=np.int64),
        np.ascontiguousarray(gt_offsets, dtype=np.int64),
        np.ascontiguousarray(np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)[order]),
        det_labels,
        np.ascontiguousarray(det_image, dtype=np.int64)[order],
        float(iou_threshold),
    )
    n_gt = np.bincount(np.asarray(gt_labels, dtype=np.int64), minlength=n_classes)
    return np.array([average_precision(tp[det_labels == c], int(n_gt[c])) for c in range(n_classes)])


def voc_map(ap_per_class: np.ndarray) -> float:
    """Mean over classes with ground truth (non-NaN AP); 0.0 when no class has any."""
    valid = ap_per_class[~np.isnan(ap_per_class)]
    return float(valid.mean()) if len(valid) else 0.0


def _score(gt: GroundTruth, preds: Packed) -> MetricResult:
    g = gt.packed
    ap = voc_ap_per_class(g.boxes, g.labels, g.offsets, preds.boxes, preds.scores, preds.labels, preds.image,
                          len(gt.classes))
    score = voc_map(ap)
    details = {"map50": score} | {f"ap50_{c}": float(a) for c, a in zip(gt.classes, ap) if not np.isnan(a)}
    return MetricResult("voc_map50", score, details)


register_metric(Metric("voc_map50", higher_is_better=True, class_aware=True, score=_score))
