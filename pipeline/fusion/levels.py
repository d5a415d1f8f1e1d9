"""Shared stages of the fusions at several skip thresholds in one pass (WBF's and NMW's ``fuse_image_range_levels``).

A rule that drops boxes whose raw score is under ``skip_box_thr`` and then clusters each label group in weighted
score order (WBF, NMW) clusters, at every set weight 1 (or equal), a higher threshold's boxes as the *first* boxes
of each group's order: its clusters are the lowest threshold's clusters at the end of that prefix. A kernel clusters
each group once, reads the clusters off at the end of each higher threshold's prefix (:func:`count_group_levels`
says where), writes them to that threshold's output slots group by group, and sorts each threshold's rows at the
end of the image as the rule's own last stage does (:func:`sort_level_rows`), its label groups in the threshold's own
first-appearance order.

``level_ints`` (int64, ``(K, 4, cap + 1)``), per threshold ``k`` and label group ``g``: ``[k, 0, g]`` the first
slot of the group's clusters (relative to the image's), ``[k, 1, g]`` their number, ``[k, 2, g]`` the group's first
kept box (input order) that ``k`` keeps (``m``: none), ``[k, 3, g]`` how many of its boxes ``k`` keeps.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np

from pipeline.fusion.primitives import NJIT_OPTIONS, float_sort_keys, int_sort_keys, radix_argsort, radix_argsort_top

# numba's cache cannot see changes to other files compiled in here: see pipeline.fusion.wbf_kernel.
COMPILED_AGAINST = {"primitives.py": "5a867f87f2eb7faf"}


@numba.njit(**NJIT_OPTIONS)
def count_group_levels(g: int, gs: int, ge: int, m: int, by_group: np.ndarray, kept_score: np.ndarray,
                       skip_levels: np.ndarray, level_ints: np.ndarray) -> None:
    """``level_ints[k, 2, g]`` and ``[k, 3, g]`` for the label group ``by_group[gs:ge]`` of an image of ``m`` kept
    boxes (``kept_score``: their raw scores, every weight 1); ``skip_levels`` non-decreasing."""
    for k in range(1, skip_levels.shape[0]):
        level_ints[k, 2, g] = m
        level_ints[k, 3, g] = 0
    for r in range(gs, ge):
        i = by_group[r]
        for k in range(1, skip_levels.shape[0]):
            if kept_score[i] >= skip_levels[k]:  # not (score < thr): read_image's test
                level_ints[k, 3, g] += 1
                if i < level_ints[k, 2, g]:
                    level_ints[k, 2, g] = i


@numba.njit(inline="always", **NJIT_OPTIONS)
def place_group(k: int, g: int, n_clusters: int, level_ints: np.ndarray) -> int:
    """Record that label group ``g`` has ``n_clusters`` clusters at threshold ``k``, after the groups before it;
    returns their first slot (relative to the image's)."""
    start = 0 if g == 0 else level_ints[k, 0, g - 1] + level_ints[k, 1, g - 1]
    level_ints[k, 0, g] = start
    level_ints[k, 1, g] = n_clusters
    return start


@numba.njit(**NJIT_OPTIONS)
def sort_level_rows(k: int, base: int, n_groups: int, out_box: np.ndarray, out_score: np.ndarray,
                    out_label: np.ndarray, level_ints: np.ndarray, temp_box: np.ndarray, temp_score: np.ndarray,
                    temp_label: np.ndarray, keys: np.ndarray, by_label: np.ndarray, by_score: np.ndarray,
                    ka: np.ndarray, kb: np.ndarray, ib: np.ndarray, hist: np.ndarray) -> int:
    """Threshold ``k``'s rows of one image, written group by group from slot ``base`` on, sorted in place as the
    rule sorts its clusters (score descending, ties: the cluster numbered later first), the clusters numbered in
    ``k``'s own label-group order; returns their number. ``temp_*``: room for the rows; the rest: sort scratch
    (:func:`~pipeline.fusion.primitives.radix_argsort`)."""
    int_sort_keys(level_ints[k, 2], n_groups, keys)
    radix_argsort(keys, n_groups, by_label, ka, kb, ib, hist)
    total = 0
    for q in range(n_groups):
        g = by_label[q]
        start = base + level_ints[k, 0, g]
        for j in range(level_ints[k, 1, g]):
            for c in range(4):
                temp_box[total, c] = out_box[start + j, c]
            temp_score[total] = out_score[start + j]
            temp_label[total] = out_label[start + j]
            total += 1
    float_sort_keys(temp_score, total, keys)
    radix_argsort_top(keys, total, by_score, ka, kb, ib, hist)
    for r in range(total):
        j = by_score[total - 1 - r]
        for c in range(4):
            out_box[base + r, c] = temp_box[j, c]
        out_score[base + r] = temp_score[j]
        out_label[base + r] = temp_label[j]
    return total


def checked_levels(skip_levels: Sequence[float]) -> np.ndarray:
    """The thresholds as a float64 array; ``ValueError`` unless they are non-decreasing numbers (at least one)."""
    levels = [float(v) for v in skip_levels]
    if not levels or any(math.isnan(v) for v in levels) or levels != sorted(levels):
        raise ValueError(f"skip_levels must be non-decreasing numbers, got {levels}")
    return np.asarray(levels)
