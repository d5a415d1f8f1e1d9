"""COCO box mAP@[.50:.95] and mAP@.50: compiled (:mod:`pipeline.metrics.coco_kernel`), with ``faster_coco_eval``
(same numbers as ``pycocotools``) as its oracle and as the evaluator of ground truth outside COCO's area range.

Conventions:

- Class-aware; COCO category id = class index + 1 (every class of the class list is a category); COCO image id =
  position in the scored image list + 1. Every scored image is listed, also those without ground truth or
  predictions (an image with predictions and no ground truth contributes false positives).
- Boxes are converted in memory from ``x1, y1, x2, y2`` pixels to COCO ``[x, y, w, h]``; GT ``area = w * h``,
  ``iscrowd = 0``. IoU is the continuous COCO box IoU, a match needs ``IoU >= t`` (the library's rule), 101-point
  interpolated precision, area range "all" only (the small/medium/large ranges are not computed).
- ``maxDets``: the library default ``[1, 10, 100]`` would silently drop detections beyond the 100 best per image
  and category; we use ``[1, 10, max(100, largest per-image detection count)]`` and report the last one, so every
  detection counts. The parity test against pycocotools uses the same setting.
- Headline numbers are read from the accumulated precision array: mean over categories with ground truth of the
  101-point precision at IoU 0.50:0.95 (``map``), 0.50 (``map50``) and 0.75 (``map75``); categories without
  ground truth are skipped (as in COCO). No ground truth at all: every number is 0.0.
- The library's stdout/log chatter is silenced.

Registered as ``"coco_map"`` (headline ``map``) and ``"coco_map50"`` (headline ``map50``): higher is better,
class-aware. Details: ``map``, ``map50``, ``map75``, ``ap_<class>``. The ground truth is indexed once per scorer
(the entries' ``prepare`` step), each call scores one set of detections against it.
"""
from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Sequence

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from pipeline.metrics.coco_kernel import AREA_MAX, coco_precision_by_threshold, outside_area_range
from pipeline.metrics.packing import Packed, scoring_at_least
from pipeline.metrics.registry import GroundTruth, Metric, MetricResult, register_metric


def _quiet(*args: object, **kwargs: object) -> None:
    return None


@contextlib.contextmanager
def _no_gc():
    """Pause the cyclic GC while ~10^5 small dicts are built (it would rescan them over and over)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def coco_images(n_images: int) -> list[dict]:
    """Image entries; width/height are placeholders (only mask/RLE evaluation reads them, box IoU does not)."""
    return [{"id": i + 1, "width": 1, "height": 1} for i in range(n_images)]


def coco_categories(classes: Sequence[str]) -> list[dict]:
    return [{"id": c + 1, "name": str(name)} for c, name in enumerate(classes)]


def coco_annotations(boxes: np.ndarray, labels: np.ndarray, image: np.ndarray,
                     scores: np.ndarray | None = None) -> list[dict]:
    """COCO annotation dicts (ids from 1); ``scores`` given: detections, else ground truth."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    wh = boxes[:, 2:] - boxes[:, :2]
    xywh = np.column_stack([boxes[:, :2], wh]).tolist()
    area = (wh[:, 0] * wh[:, 1]).tolist()
    cats = (np.asarray(labels, dtype=np.int64) + 1).tolist()
    imgs = (np.asarray(image, dtype=np.int64) + 1).tolist()
    ids = range(1, len(xywh) + 1)
    if scores is None:
        return [{"id": k, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": 0}
                for k, i, c, b, a in zip(ids, imgs, cats, xywh, area)]
    scores = np.asarray(scores, dtype=np.float64).tolist()
    return [{"id": k, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": 0, "score": s}
            for k, i, c, b, a, s in zip(ids, imgs, cats, xywh, area, scores)]


def make_coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO(print_function=_quiet)
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco


def max_dets(det_image: np.ndarray) -> list[int]:
    """``[1, 10, max(100, largest per-image detection count)]``."""
    largest = int(np.bincount(np.asarray(det_image, dtype=np.int64), minlength=1).max()) if len(det_image) else 0
    return [1, 10, max(100, largest)]


def summarize(precision: np.ndarray, iou_thrs: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """map / map50 / map75 and per-class AP ("ap_<class>") from precision ``[T, R, K, A, M]`` (A=all, M=last)."""
    p = precision[:, :, :, 0, -1]

    def mean(x: np.ndarray) -> float:
        x = x[x > -1]
        return float(x.mean()) if x.size else 0.0

    out = {"map": mean(p), "map50": mean(p[np.isclose(iou_thrs, 0.5)]), "map75": mean(p[np.isclose(iou_thrs, 0.75)])}
    for k, name in enumerate(classes):
        if (p[:, :, k] > -1).any():
            out[f"ap_{name}"] = mean(p[:, :, k])
    return out


class CocoEvaluator:
    """faster-coco-eval on COCO objects: the ground truth indexed once; each call scores one set of detections.
    The oracle of :class:`CompiledCocoEvaluator`, and the evaluator when some ground truth lies outside COCO's
    "all" area range (COCO then ignores it, which only the library replicates)."""

    def __init__(self, gt: Packed, n_images: int, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.n_images = n_images
        self.images = coco_images(n_images)
        self.categories = coco_categories(self.classes)
        with _no_gc():
            self.gt = make_coco(self.images, self.categories, coco_annotations(gt.boxes, gt.labels, gt.image))
        self.n_gt = len(gt.labels)

    def __call__(self, preds: Packed) -> dict[str, float]:
        if self.n_gt == 0:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        with _no_gc(), contextlib.redirect_stdout(io.StringIO()):
            dets = coco_annotations(preds.boxes, preds.labels, preds.image, preds.scores)
            ev = COCOeval_faster(self.gt, make_coco(self.images, self.categories, dets), iouType="bbox",
                                 print_function=_quiet)
            ev.params.imgIds = list(range(1, self.n_images + 1))
            ev.params.catIds = [c["id"] for c in self.categories]
            ev.params.areaRng, ev.params.areaRngLbl = [[0.0, AREA_MAX]], ["all"]
            ev.params.maxDets = max_dets(preds.image)
            ev.evaluate()
            ev.accumulate()
        return summarize(np.asarray(ev.eval["precision"]), np.asarray(ev.params.iouThrs), self.classes)

    def by_threshold(self, preds: Packed, thresholds: np.ndarray) -> list[dict[str, float]]:
        """The details of the detections scoring ``>= t``, for each ``t`` of ``thresholds``: one evaluation each."""
        return [self(scoring_at_least(preds, t)) for t in thresholds]


# pycocotools' Params.setDetParams: IoU thresholds .50:.05:.95 and 101 recall thresholds, computed as it does
IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)


class CompiledCocoEvaluator:
    """The same numbers as :class:`CocoEvaluator` from
    :func:`pipeline.metrics.coco_kernel.coco_precision_by_threshold`: no COCO objects, ~38x faster on
    benchmarks/metrics_speed.py's images (faster-coco-eval and pycocotools are its test oracles). Scores packed
    predictions; built as :class:`CocoEvaluator` is (the image count is the offsets' here)."""

    def __init__(self, gt: Packed, n_images: int, classes: Sequence[str]) -> None:
        self.gt = gt
        self.classes = list(classes)

    def __call__(self, preds: Packed) -> dict[str, float]:
        if len(self.gt.labels) == 0:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        return self.by_threshold(preds, np.array([-np.inf]))[0]

    def by_threshold(self, preds: Packed, thresholds: np.ndarray) -> list[dict[str, float]]:
        """The details of the detections scoring ``>= t``, for each ``t`` of ``thresholds``, from one matching
        (:func:`~pipeline.metrics.coco_kernel.coco_precision_by_threshold`)."""
        if len(self.gt.labels) == 0:
            return [{"map": 0.0, "map50": 0.0, "map75": 0.0} for _ in thresholds]
        precision = coco_precision_by_threshold(self.gt.boxes, self.gt.labels, self.gt.offsets, preds.boxes,
                                                preds.scores, preds.labels, preds.offsets, len(self.classes),
                                                IOU_THRS, REC_THRS, np.asarray(thresholds, dtype=np.float64))
        return [summarize(p[:, :, :, None, None], IOU_THRS, self.classes) for p in precision]


def _evaluator_for(gt: GroundTruth) -> CompiledCocoEvaluator | CocoEvaluator:
    # ground truth outside COCO's "all" area range is ignored by COCO, which only the library replicates
    evaluator = CocoEvaluator if outside_area_range(gt.packed.boxes).any() else CompiledCocoEvaluator
    return evaluator(gt.packed, len(gt.image_ids), gt.classes)


def _coco_metric(name: str, headline: str) -> Metric[CompiledCocoEvaluator | CocoEvaluator]:
    """A COCO entry whose score is the ``headline`` detail (the evaluation is the same for every entry)."""

    def score(evaluator: CompiledCocoEvaluator | CocoEvaluator, preds: Packed) -> MetricResult:
        details = evaluator(preds)
        return MetricResult(name, details[headline], details)

    def score_by_threshold(evaluator: CompiledCocoEvaluator | CocoEvaluator, preds: Packed,
                           thresholds: np.ndarray) -> np.ndarray:
        return np.array([details[headline] for details in evaluator.by_threshold(preds, thresholds)])

    return Metric(name, higher_is_better=True, class_aware=True, score=score, prepare=_evaluator_for,
                  boxes_read=100,  # pycocotools' maxDets, what Kaggle's COCO scorers keep per image
                  score_by_threshold=score_by_threshold)


register_metric(_coco_metric("coco_map", "map"))
register_metric(_coco_metric("coco_map50", "map50"))
