"""Scoring a prediction table: :class:`Scorer` (ground truth prepared once, many calls) and :func:`evaluate`."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.metrics.packing import pack_ground_truth, pack_indexed, pack_predictions, resolve_image_ids
from pipeline.metrics.registry import GroundTruth, Metric, MetricResult, get_metric

if TYPE_CHECKING:  # type only: importing pipeline.data at runtime would pull in pipeline.config (an import cycle)
    from pipeline.data.table import AnnotationTable


class Scorer:
    """Packs the ground truth of ``image_ids`` and runs the metric's one-time setup once; ``scorer(preds)`` scores a
    prediction table. ``metric`` is the metric's name, ``entry`` its registry entry (direction, comparisons)."""

    def __init__(self, metric: str, gt: AnnotationTable, image_ids: Sequence[str] | None = None) -> None:
        self.entry: Metric = get_metric(metric)
        self.metric: str = self.entry.name
        self.index = resolve_image_ids(gt, image_ids)
        self.classes = list(gt.classes)
        self.gt = pack_ground_truth(gt, self.index)
        ground_truth = GroundTruth(self.index, tuple(self.classes), self.gt)
        state = self.entry.prepare(ground_truth) if self.entry.prepare is not None else ground_truth
        self._score = functools.partial(self.entry.score, state)
        self._by_threshold = (None if self.entry.score_by_threshold is None
                              else functools.partial(self.entry.score_by_threshold, state))

    @property
    def image_ids(self) -> list[str]:
        return list(self.index)

    def __call__(self, preds: pd.DataFrame) -> MetricResult:
        packed = pack_predictions(preds, self.index, len(self.classes), class_aware=self.entry.class_aware)
        return self._score(packed)

    def score_rows(self, image_ids: pd.Index, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                   labels: np.ndarray) -> MetricResult:
        """The score of predictions given as arrays -- row ``r``: image ``image_ids[image[r]]``, ``boxes[r]``
        (x1, y1, x2, y2 pixels), ``scores[r]``, ``labels[r]`` -- equal to scoring them as a table in row order
        (the OOF tuner scores each fusion so, without building a table)."""
        packed = pack_indexed(self.index, image_ids, image, boxes, scores,
                              labels if self.entry.class_aware else None, len(self.classes))
        return self._score(packed)

    def score_rows_by_threshold(self, image_ids: pd.Index, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                                labels: np.ndarray, thresholds: Sequence[float]) -> list[float]:
        """:meth:`score_rows` of the rows scoring ``>= t``, for each ``t`` of ``thresholds``: from one pass when the
        metric can (``Metric.score_by_threshold``), else each threshold's rows apart."""
        if self._by_threshold is None:
            return [self.score_rows(image_ids, image[keep], boxes[keep], scores[keep], labels[keep]).score
                    for keep in (scores >= t for t in thresholds)]
        packed = pack_indexed(self.index, image_ids, image, boxes, scores,
                              labels if self.entry.class_aware else None, len(self.classes))
        return [float(v) for v in self._by_threshold(packed, np.asarray(thresholds, dtype=np.float64))]


def at_or_above(preds: pd.DataFrame, score_thr: float) -> pd.DataFrame:
    """The predictions scoring ``>= score_thr`` (all of them, uncopied, at 0 or below)."""
    return preds if score_thr <= 0 else preds[preds.score >= score_thr]


def score_at_best_threshold(scorer: Scorer, preds: pd.DataFrame,
                            thresholds: Sequence[float]) -> tuple[MetricResult, float]:
    """``(result, t)``: for a ``thresholded`` metric, the predictions scoring ``>= t`` for the best ``t`` of
    ``thresholds`` and 0 (the lowest of equal scores); for any other metric every prediction, ``t = 0``."""
    if not scorer.entry.thresholded or not len(preds):
        return scorer(preds), 0.0
    grid = sorted({0.0, *(float(t) for t in thresholds)})
    index = pd.Index(pd.unique(preds.image_id))
    labels = preds.label.to_numpy(np.int64) if "label" in preds.columns else np.zeros(len(preds), np.int64)
    scores = scorer.score_rows_by_threshold(index, index.get_indexer(preds.image_id),
                                            preds[["x1", "y1", "x2", "y2"]].to_numpy(np.float64),
                                            preds.score.to_numpy(np.float64), labels, grid)
    t = grid[scorer.entry.best_index(scores)]
    return scorer(at_or_above(preds, t)), t


def evaluate(metric: str, gt: AnnotationTable, preds: pd.DataFrame,
             image_ids: Sequence[str] | None = None) -> MetricResult:
    """Score ``preds`` against ``gt`` on ``image_ids`` (default: all images of ``gt``) with ``metric``."""
    return Scorer(metric, gt, image_ids)(preds)


__all__ = ["Scorer", "at_or_above", "evaluate", "score_at_best_threshold"]
