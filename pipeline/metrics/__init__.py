"""Competition metrics behind one entry point: ``evaluate(metric, gt, preds, image_ids)`` or a reusable ``Scorer``.

Every metric is a registry entry (:class:`Metric`) that carries its own facts: ``name``, ``higher_is_better``,
``class_aware``, its ``score`` function and an optional one-time ``prepare`` step on the ground truth. Stages
get the entry with :func:`get_metric` and compare scores through it (:attr:`Metric.worst`,
:meth:`Metric.better`, :meth:`Metric.best_index`), never with a bare ``>`` or ``max``.

Built-in metrics, each registered by its own module (conventions and details there):

- ``"gwd"`` (:mod:`pipeline.metrics.gwd`): Global Wheat Detection, mean over images of mean over IoU 0.50..0.75 of
  TP/(TP+FP+FN); higher is better, class-agnostic; ``MetricResult.per_image`` holds the per-image scores.
- ``"coco_map"`` / ``"coco_map50"`` (:mod:`pipeline.metrics.coco`): COCO box mAP@[.50:.95] / mAP@.50 via
  faster-coco-eval; higher is better, class-aware.
- ``"voc_map50"`` / ``"voc_map40"`` (:mod:`pipeline.metrics.voc`): Pascal VOC all-point AP at IoU 0.5 / 0.4
  (VinBigData) averaged over classes with ground truth; higher is better, class-aware.
- ``"gbr_f2"`` (:mod:`pipeline.metrics.gbr`): Great Barrier Reef, mean over IoU 0.30..0.80 of F2 from TP / FP / FN
  summed over the dataset; higher is better, class-agnostic.

Adding a metric is one file: a module in this package that defines ``score(ground_truth, packed_preds) ->
MetricResult`` and calls ``register_metric(Metric(name, higher_is_better=..., class_aware=..., score=...))``
(every module here is imported with the package, which registers it), plus its test. A metric defined outside
the package registers when its module is imported: import it before a config naming it is validated, in every
process that scores.

Scored images: ``image_ids`` (default: every image of the annotation table, in table order). Predictions for other
images are ignored; scored images without predictions count (they score as "missed everything"). The prediction
table needs ``image_id, x1, y1, x2, y2, score`` (+ ``label`` for class-aware metrics); other columns are ignored.
"""
from __future__ import annotations

import importlib
import pkgutil

from pipeline.metrics.packing import (Packed, pack_boxes, pack_ground_truth, pack_predictions,
                                      resolve_image_ids)
from pipeline.metrics.registry import (GroundTruth, Metric, MetricResult, get_metric, higher_is_better,
                                       metric_names, register_metric, unregister_metric)
from pipeline.metrics.scoring import Scorer, at_or_above, evaluate, score_at_best_threshold

_BUILTIN_MODULES = ("gwd", "coco", "voc")  # registered first, in this order: the order of METRICS
_NOT_METRICS = {"packing", "registry", "scoring"}


def _import_metric_modules() -> None:
    """Import every module of this package, which registers its metrics: the built-ins first, then any other
    module by name, so a new metric needs no line here."""
    found = {m.name for m in pkgutil.iter_modules(__path__)} - _NOT_METRICS - set(_BUILTIN_MODULES)
    for name in (*_BUILTIN_MODULES, *sorted(found)):
        importlib.import_module(f"{__name__}.{name}")


_import_metric_modules()

# Names of the metrics of this package (a snapshot at import). The live list, with metrics registered at runtime,
# is metric_names(): validate against that.
METRICS: tuple[str, ...] = metric_names()

__all__ = ["METRICS", "GroundTruth", "Metric", "MetricResult", "Packed", "Scorer", "at_or_above", "evaluate",
           "get_metric", "higher_is_better", "metric_names", "pack_boxes", "pack_ground_truth", "pack_predictions",
           "register_metric", "resolve_image_ids", "score_at_best_threshold", "unregister_metric"]
