"""Competition metrics behind one entry point: ``evaluate(metric, gt, preds, image_ids)`` or a reusable ``Scorer``.

Metrics (all: higher is better):

- ``"gwd"``: Global Wheat Detection, mean over images of mean over IoU 0.50..0.75 of TP/(TP+FP+FN); class-agnostic.
  Conventions in :mod:`pipeline.metrics.gwd`. Details: ``"iou0.50"`` .. ``"iou0.75"`` (mean over images at each
  threshold); ``MetricResult.per_image`` holds the per-image scores.
- ``"coco_map"`` / ``"coco_map50"``: COCO box mAP@[.50:.95] / mAP@.50 via faster-coco-eval; class-aware.
  Details: ``map``, ``map50``, ``map75``, ``ap_<class>``. Conventions in :mod:`pipeline.metrics.coco`.
- ``"voc_map50"``: Pascal VOC all-point AP at IoU 0.5 averaged over classes with ground truth; class-aware.
  Details: ``map50``, ``ap50_<class>``. Conventions in :mod:`pipeline.metrics.voc`.

Scored images: ``image_ids`` (default: every image of the annotation table, in table order). Predictions for other
images are ignored; scored images without predictions count (they score as "missed everything"). The prediction
table needs ``image_id, x1, y1, x2, y2, score`` (+ ``label`` for class-aware metrics); other columns are ignored.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.data.table import AnnotationTable
from pipeline.metrics import coco, gwd, voc

METRICS: tuple[str, ...] = ("gwd", "coco_map", "coco_map50", "voc_map50")
_BOX = ["x1", "y1", "x2", "y2"]


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def higher_is_better(metric: str) -> bool:
    """True for every metric here (raises ValueError for an unknown name)."""
    _check_metric(metric)
    return True


@dataclass(frozen=True)
class MetricResult:
    name: str
    score: float  # the headline number, higher is better
    details: dict[str, float] = field(default_factory=dict)
    per_image: pd.Series | None = field(default=None, compare=False, repr=False)  # gwd only: image_id -> score


@dataclass(frozen=True)
class Packed:
    """Boxes of the scored images, grouped by image index (image ``i`` owns rows ``offsets[i]:offsets[i+1]``)."""

    boxes: np.ndarray  # (N, 4) float64
    scores: np.ndarray  # (N,) float64 (ones for ground truth)
    labels: np.ndarray  # (N,) int64
    image: np.ndarray  # (N,) int64, non-decreasing
    offsets: np.ndarray  # (n_images + 1,) int64


def _pack(index: pd.Index, image_id: pd.Series, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Packed:
    """Keep rows of images in ``index``; order by image, then descending score (stable: ties keep row order)."""
    image = index.get_indexer(image_id.astype(str))
    keep = image >= 0
    image, boxes, scores, labels = image[keep].astype(np.int64), boxes[keep], scores[keep], labels[keep]
    order, offsets = gwd.group_by_image(image, scores, len(index))
    return Packed(np.ascontiguousarray(boxes[order]), scores[order], labels[order], image[order], offsets)


def _resolve_ids(gt: AnnotationTable, image_ids: Sequence[str] | None) -> pd.Index:
    known = pd.Index(gt.images.image_id.astype(str))
    if known.has_duplicates:
        raise ValueError(f"duplicate image ids in the annotation table: {sorted(set(known[known.duplicated()]))[:5]}")
    if image_ids is None:
        return known
    ids = pd.Index([str(i) for i in image_ids])
    if ids.has_duplicates:
        raise ValueError(f"duplicate image ids in image_ids: {sorted(set(ids[ids.duplicated()]))[:5]}")
    unknown = ids.difference(known)
    if len(unknown):
        raise ValueError(f"image_ids not in the annotation table: {sorted(unknown)[:5]}")
    return ids


def _pack_gt(gt: AnnotationTable, index: pd.Index) -> Packed:
    b = gt.boxes
    return _pack(index, b.image_id, b[_BOX].to_numpy(np.float64), np.ones(len(b)), b.label.to_numpy(np.int64))


def _pack_preds(preds: pd.DataFrame, index: pd.Index, n_classes: int, class_aware: bool) -> Packed:
    need = ["image_id", *_BOX, "score"] + (["label"] if class_aware else [])
    missing = [c for c in need if c not in preds.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    boxes = preds[_BOX].to_numpy(np.float64)
    scores = preds["score"].to_numpy(np.float64)
    labels = preds["label"].to_numpy(np.int64) if class_aware else np.zeros(len(preds), dtype=np.int64)
    packed = _pack(index, preds["image_id"], boxes, scores, labels)
    if np.isnan(packed.boxes).any() or np.isnan(packed.scores).any():
        raise ValueError("prediction table has NaN coordinates or scores")
    if class_aware and len(packed.labels) and (packed.labels.min() < 0 or packed.labels.max() >= n_classes):
        raise ValueError(f"prediction labels outside the class list (0..{n_classes - 1})")
    return packed


class Scorer:
    """Precomputes the ground truth of ``image_ids`` once; ``scorer(preds)`` scores a prediction table."""

    def __init__(self, metric: str, gt: AnnotationTable, image_ids: Sequence[str] | None = None) -> None:
        self.metric = _check_metric(metric)
        self.index = _resolve_ids(gt, image_ids)
        self.classes = list(gt.classes)
        self.gt = _pack_gt(gt, self.index)
        self._coco = (coco.CocoEvaluator(self.gt.boxes, self.gt.labels, self.gt.image, len(self.index), self.classes)
                      if metric.startswith("coco") else None)

    @property
    def image_ids(self) -> list[str]:
        return list(self.index)

    def __call__(self, preds: pd.DataFrame) -> MetricResult:
        packed = _pack_preds(preds, self.index, len(self.classes), class_aware=self.metric != "gwd")
        if self.metric == "gwd":
            return self._gwd(packed)
        if self.metric == "voc_map50":
            return self._voc(packed)
        return self._coco_result(packed)

    def _gwd(self, p: Packed) -> MetricResult:
        r = gwd.gwd_packed(self.gt.boxes, self.gt.offsets, p.boxes, p.offsets)
        details = {f"iou{t:.2f}": float(v) for t, v in zip(gwd.IOU_THRESHOLDS, r.per_threshold)}
        return MetricResult("gwd", r.score, details, pd.Series(r.per_image, index=self.index, name="gwd"))

    def _voc(self, p: Packed) -> MetricResult:
        ap = voc.voc_ap_per_class(self.gt.boxes, self.gt.labels, self.gt.offsets, p.boxes, p.scores, p.labels,
                                  p.image, len(self.classes))
        score = voc.voc_map(ap)
        details = {"map50": score} | {f"ap50_{c}": float(a) for c, a in zip(self.classes, ap) if not np.isnan(a)}
        return MetricResult("voc_map50", score, details)

    def _coco_result(self, p: Packed) -> MetricResult:
        details = self._coco(p.boxes, p.scores, p.labels, p.image)
        return MetricResult(self.metric, details["map50" if self.metric == "coco_map50" else "map"], details)


def evaluate(metric: str, gt: AnnotationTable, preds: pd.DataFrame,
             image_ids: Sequence[str] | None = None) -> MetricResult:
    """Score ``preds`` against ``gt`` on ``image_ids`` (default: all images of ``gt``) with ``metric``."""
    return Scorer(metric, gt, image_ids)(preds)


__all__ = ["METRICS", "MetricResult", "Scorer", "evaluate", "higher_is_better"]
