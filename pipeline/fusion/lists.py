"""The reference library's input format -- one entry of ``boxes_list`` / ``scores_list`` / ``labels_list`` per
set -- as the drop-ins read it: concatenated arrays, per-set counts and thresholds, weights.

Shared by the drop-ins (:func:`~pipeline.fusion.wbf.weighted_boxes_fusion`, :mod:`pipeline.fusion.suppression`,
:func:`~pipeline.fusion.nmw.non_maximum_weighted`); what differs between the library's rules (how a rule weights
scores, whether labels are truncated) stays in each rule's module.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np


def effective_threshold(score_dtype: np.dtype, thr: Any) -> float:
    """The float64 threshold that reproduces a numpy comparison of a score array of ``score_dtype`` with ``thr``.

    numpy compares each element with the threshold under its promotion rules: a float32 score array against a
    Python float compares in float32 (NEP 50: the Python float is "weak"), so the threshold is effectively
    ``float32(thr)``; a float64 array, a list of Python floats or a float64 threshold compare in float64.
    """
    if score_dtype.kind != "f" or score_dtype.itemsize >= 8:
        return float(thr)
    ct = np.result_type(score_dtype, thr)
    return float(ct.type(thr)) if ct.kind == "f" and ct.itemsize < 8 else float(thr)


def list_weights(weights: Sequence[float] | np.ndarray | None, n_sets: int, stacklevel: int = 3) -> np.ndarray:
    """float64 weights, one per set; ones when missing or of the wrong length (with a warning, as the library)."""
    if weights is None:
        return np.ones(n_sets)
    if len(weights) != n_sets:
        warnings.warn(f"incorrect number of weights {len(weights)}. Must be: {n_sets}. Set weights equal to 1.",
                      stacklevel=stacklevel)
        return np.ones(n_sets)
    return np.asarray(weights, dtype=np.float64)


def concat_lists(boxes_list: Any, scores_list: Any, labels_list: Any, n_sets: int,
                 skip_box_thr: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The library's per-set lists (or 3-D / 2-D arrays) concatenated: ``(boxes (n, 4), scores, labels, boxes per
    set, skip threshold per set)``; ``ValueError`` when a set's boxes, scores and labels differ in length."""
    if isinstance(boxes_list, np.ndarray) and boxes_list.ndim == 3:
        b = boxes_list.reshape(-1, 4)
        lens = np.full(n_sets, boxes_list.shape[1], np.int64)
    else:
        parts = [np.asarray(bb, dtype=np.float64).reshape(-1, 4) for bb in boxes_list]
        lens = np.array([len(p) for p in parts], np.int64)
        b = np.concatenate(parts) if parts else np.zeros((0, 4))
    if isinstance(scores_list, np.ndarray) and scores_list.ndim == 2:
        sc = scores_list.reshape(-1)
        slen = np.full(n_sets, scores_list.shape[1] if n_sets else 0, np.int64)
        thr_set = np.full(n_sets, effective_threshold(scores_list.dtype, skip_box_thr))
    else:
        sparts = [np.asarray(s).reshape(-1) for s in scores_list]
        thr_set = np.array([effective_threshold(p.dtype, skip_box_thr) for p in sparts], np.float64)
        slen = np.array([len(p) for p in sparts], np.int64)
        sc = np.concatenate([p.astype(np.float64) for p in sparts]) if sparts else np.zeros(0)
    if isinstance(labels_list, np.ndarray) and labels_list.ndim == 2:
        lab = labels_list.reshape(-1)
        llen = np.full(n_sets, labels_list.shape[1] if n_sets else 0, np.int64)
    else:
        lparts = [np.asarray(v).reshape(-1) for v in labels_list]
        llen = np.array([len(p) for p in lparts], np.int64)
        lab = np.concatenate(lparts) if lparts else np.zeros(0, np.int64)
    check_lengths(lens, slen, llen)
    return b, sc, lab, lens, thr_set


def check_lengths(lens: np.ndarray, slen: np.ndarray, llen: np.ndarray) -> None:
    """``ValueError`` when a set's boxes, scores and labels differ in length (the library exits or misaligns)."""
    if not (np.array_equal(lens, slen) and np.array_equal(lens, llen)):
        raise ValueError(f"per-set lengths differ: boxes {lens.tolist()}, scores {slen.tolist()}, "
                         f"labels {llen.tolist()}")


def check_finite(boxes: np.ndarray, scores: np.ndarray) -> None:
    """``ValueError`` for non-finite coordinates or scores (the library silently produces garbage)."""
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError("boxes and scores must be finite")
