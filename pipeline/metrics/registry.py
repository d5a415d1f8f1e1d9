"""The metric registry: one :class:`Metric` entry per metric, carrying every fact a stage needs about it.

An entry holds its ``name``, which way is better (``higher_is_better``), whether predictions need a ``label``
(``class_aware``), its ``score`` function and an optional one-time ``prepare`` step on the ground truth. Stages
never assume a direction: they start a search from :attr:`Metric.worst`, compare with :meth:`Metric.better` and
pick among candidates with :meth:`Metric.best_index`.

Each metric module registers its entries when imported (``pipeline.metrics`` imports the built-in ones).
This module imports nothing from the rest of the pipeline, so ``pipeline.config`` may validate against
:func:`metric_names` without an import cycle.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import pandas as pd

from pipeline.metrics.packing import Packed

State = TypeVar("State")


@dataclass(frozen=True)
class MetricResult:
    """One scoring: ``score`` is the headline number, ``details`` the metric's breakdown (see each metric)."""

    name: str
    score: float  # the headline number; which way is better is the metric entry's ``higher_is_better``
    details: dict[str, float] = field(default_factory=dict)
    per_image: pd.Series | None = field(default=None, compare=False, repr=False)  # image_id -> score (gwd has one)


@dataclass(frozen=True)
class GroundTruth:
    """What a metric scores against, packed once per :class:`~pipeline.metrics.Scorer`."""

    image_ids: pd.Index  # the scored images, in order; image index ``i`` in ``packed`` is ``image_ids[i]``
    classes: tuple[str, ...]  # label ``c`` is ``classes[c]``
    packed: Packed  # ground-truth boxes of the scored images (scores are ones)


@dataclass(frozen=True)
class Metric(Generic[State]):
    """One metric and its facts.

    ``score(state, preds)`` scores packed predictions (labels are zeros unless ``class_aware``), where ``state``
    is ``prepare(ground_truth)``, computed once per scorer (e.g. the COCO index of the ground truth), or the
    :class:`GroundTruth` itself when ``prepare`` is None.
    """

    name: str
    higher_is_better: bool
    class_aware: bool  # predictions need a ``label`` column, checked against the class list
    score: Callable[[State, Packed], MetricResult] = field(repr=False)
    prepare: Callable[[GroundTruth], State] | None = field(default=None, repr=False)
    # how many boxes per image the competition's scorer reads (COCO's maxDets: 100); None: every box counts (a
    # false positive costs score, as in GWD). A submission keeps the best this many: more is size, not score.
    boxes_read: int | None = None
    # score_by_threshold(state, preds, thresholds): the score of the predictions scoring >= t for each t, from one
    # pass (GWD, COCO, VOC: the greedy matching of a score-ordered prefix is the prefix of the matching), equal to
    # scoring each threshold's predictions apart; None: :class:`~pipeline.metrics.Scorer` scores them apart
    score_by_threshold: Callable[[State, Packed, np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    # whether a confidence threshold changes the score (a false positive costs score: GWD, F2), so that a model is
    # judged at its best one, as its submission is cut at a tuned one; False for ranking metrics (AP: boxes below
    # a threshold only add recall), which score every box
    thresholded: bool = False

    @property
    def worst(self) -> float:
        """A value every real score beats (-inf or +inf): the starting "best so far" of a search."""
        return -math.inf if self.higher_is_better else math.inf

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is strictly better than ``b``. Ties and NaN give False: the incumbent stays."""
        return a > b if self.higher_is_better else a < b

    def gain(self, score: float, reference: float) -> float:
        """How much ``score`` beats ``reference``: positive when better, in the metric's units (e.g. what fusing
        bought over the best single model)."""
        return score - reference if self.higher_is_better else reference - score

    def best_index(self, scores: Sequence[float]) -> int:
        """Position of the best of ``scores``; ties go to the earliest (in a search, the simpler candidate).
        NaN never wins; ValueError when there is nothing to pick (empty, or NaN only)."""
        best: int | None = None
        for i, s in enumerate(scores):
            if not math.isnan(s) and (best is None or self.better(s, scores[best])):
                best = i
        if best is None:
            raise ValueError(f"{self.name}: no score to pick from ({len(scores)} candidates, none a number)")
        return best

    def bind(self, ground_truth: GroundTruth) -> Callable[[Packed], MetricResult]:
        """Run the one-time ``prepare`` step; the returned function scores packed predictions."""
        state = self.prepare(ground_truth) if self.prepare is not None else ground_truth
        return functools.partial(self.score, state)


_REGISTRY: dict[str, Metric] = {}  # name -> entry, in registration order


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to the registry and return it; ValueError if its name is taken."""
    if not metric.name or not isinstance(metric.name, str):
        raise ValueError(f"a metric needs a non-empty name, got {metric.name!r}")
    if metric.name in _REGISTRY:
        raise ValueError(f"metric {metric.name!r} is already registered")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> Metric:
    """Remove and return the entry ``name`` (e.g. a metric a test registered); ValueError if unknown."""
    metric = get_metric(name)
    del _REGISTRY[name]
    return metric


def get_metric(name: str) -> Metric:
    """The entry registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable "name"
        raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(_REGISTRY)}") from None


def metric_names() -> tuple[str, ...]:
    """Names of every registered metric, in registration order (runtime registrations included)."""
    return tuple(_REGISTRY)


def higher_is_better(name: str) -> bool:
    """Whether a higher score of metric ``name`` is better (ValueError for an unknown name)."""
    return get_metric(name).higher_is_better


__all__ = ["GroundTruth", "Metric", "MetricResult", "get_metric", "higher_is_better", "metric_names",
           "register_metric", "unregister_metric"]
