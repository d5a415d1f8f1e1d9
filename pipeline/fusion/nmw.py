"""Non-maximum weighted fusion: a compiled, output-identical replacement for ``ensemble_boxes``'
``non_maximum_weighted`` (ensemble-boxes 1.0.9, ``ensemble_boxes_nmw.py``; Zhou et al., "CAD: Scale Invariant
Framework for Real-Time Object Detection", 2017).

Entry points: the drop-in :func:`non_maximum_weighted` (same arguments, normalised ``[0, 1]`` coordinates, the
same boxes, scores, labels, count and order as the library) and :func:`fuse_packed`, the same rule for every
image of a packed table (:func:`pipeline.fusion.fuse_predictions` with ``method="nmw"``), with
:func:`fuse_packed_levels` for several ``skip_box_thr`` in one pass at equal weights (the OOF tuner's grid,
:mod:`pipeline.fusion.levels`). The compiled stages are in :mod:`pipeline.fusion.nmw_kernel`.

What the library does, and what is replicated here:

1. Weights (ones when missing or of the wrong length, with a warning) are divided by their maximum.
2. Prefilter, per set and box in input order, as WBF's: a box whose raw score is ``< skip_box_thr`` is dropped
   (compared under numpy's promotion rules, see :func:`pipeline.fusion.lists.effective_threshold`); labels are
   truncated with ``int()``; ``x2 < x1`` / ``y2 < y1`` are swapped, coordinates clipped to ``[0, 1]``, zero-area
   boxes dropped. A kept box carries ``score * weight[set] / max weight``.
3. Label groups in first-appearance order; inside a group boxes by weighted score descending.
4. Clustering: a box joins the cluster whose *representative* -- the cluster's first box, never updated -- has
   the highest IoU with it (the lowest cluster index on equal IoU), if that IoU is ``> iou_thr``; else it starts a
   cluster and represents it.
5. Each cluster's box is ``get_weighted_box``: member weights ``score * IoU(member, representative)`` (the
   representative's IoU with itself is exactly 1), coordinates ``sum(weight * c)`` accumulated in a **float32**
   array (each step ``float32(float64(acc) + weight * c)``) and divided in float64 by the float64 sum of the
   weights, rounded to float32; the cluster's score is the representative's weighted score rounded to float32.
   Members that all score 0 give 0/0: NaN coordinates, as in the library.
6. All clusters (label groups in order, clusters in creation order) sorted by the float32 score, descending.
   Boxes and scores come back float64 holding the library's float32 values, labels as float64.

Ties. The library sorts with numpy's unstable ``argsort``; both sorts here are the reverse of a stable ascending
sort (the later box or cluster first), numpy's own order for at most 16 elements. Inputs without tied weighted
scores give identical clusters; because the output scores are rounded to float32, two clusters can still tie in
the output, where the library's order is undefined -- compare such rows as a set.

Deviations: non-finite boxes or scores, a NaN threshold and mismatched list lengths raise ``ValueError`` (the
library returns garbage or calls ``exit()``); labels above 2**24 are returned exactly (the library rounds them
through float32). Weights are expected to be positive.

Speed. Representatives never move, so they are filed once in a grid over their centres and a box only examines
those close enough for IoU > ``iou_thr`` (:mod:`pipeline.fusion.grid`); the library compares every box with every
representative of its label in Python, and recomputes every cluster's box in a Python loop.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.fusion.lists import check_finite, concat_lists, list_weights
from pipeline.fusion.levels import checked_levels
from pipeline.fusion.nmw_kernel import allocate_scratch, fuse_image_range, fuse_image_range_levels, thread_scratch
from pipeline.fusion.packing import PackedTable, pack_lists
from pipeline.fusion.runner import KernelOutput, largest_image, level_output, run_kernel

__all__ = ["non_maximum_weighted", "fuse_packed", "fuse_packed_levels"]


def fuse_packed(packed: PackedTable, iou_thr: float, skip_thr: float | np.ndarray, threads: int = 1,
                reuse: bool = False) -> KernelOutput:
    """Non-maximum weighted fusion of every image of ``packed`` with the set weights ``packed.weights``; image
    ``k``'s fused rows (normalised, by score descending) are the output slots ``packed.row_offs[k] : + count[k]``.
    ``skip_thr``: a scalar or one threshold per set."""
    iou_thr = float(iou_thr)
    skip = np.asarray(skip_thr, np.float64)
    if math.isnan(iou_thr) or np.isnan(skip).any():
        raise ValueError("iou_thr and skip_box_thr must not be NaN")
    weights = np.asarray(packed.weights, dtype=np.float64)
    n_sets = len(weights)
    factor = weights / max(weights) if n_sets else weights  # the library: np.array(weights) / max(weights)
    skip = np.broadcast_to(skip, (n_sets,)).copy()
    params = (np.ascontiguousarray(factor), skip, iou_thr)

    def work(lo: int, hi: int, out: KernelOutput, stats: np.ndarray, cached: bool) -> None:
        cap = largest_image(packed, lo, hi)
        scratch = thread_scratch(cap) if cached else allocate_scratch(cap)
        fuse_image_range(lo, hi, *packed.kernel_rows, packed.row_offs, *params, *out.slots(), stats, *scratch)

    return run_kernel(packed, work, threads, "NMW", reuse)


def fuse_packed_levels(packed: PackedTable, iou_thr: float, skip_levels: Sequence[float], threads: int = 1,
                       reuse: bool = False) -> list[KernelOutput]:
    """:func:`fuse_packed` at each ``skip_box_thr`` of ``skip_levels`` (non-decreasing) in one pass over the
    images, every set weight equal (``ValueError`` otherwise: only then are a higher threshold's boxes the first
    ones of each label group's order; :mod:`pipeline.fusion.levels`). Entry ``k`` is ``fuse_packed``'s output with
    ``skip_levels[k]``, bit for bit; input repairs are counted as the lowest threshold reads the rows."""
    iou_thr = float(iou_thr)
    levels = checked_levels(skip_levels)
    weights = np.asarray(packed.weights, dtype=np.float64)
    if math.isnan(iou_thr) or not len(weights) or not np.all(weights == weights.max()):
        raise ValueError("fuse_packed_levels needs every set weight equal and iou_thr a number")
    factor = np.ones(len(weights))  # weights / max(weights)

    def work(lo: int, hi: int, out: KernelOutput, stats: np.ndarray, cached: bool) -> None:
        cap = largest_image(packed, lo, hi)
        scratch = thread_scratch(cap) if cached else allocate_scratch(cap)
        level_ints = np.empty((len(levels), 4, cap + 1), np.int64)
        fuse_image_range_levels(lo, hi, *packed.kernel_rows, packed.row_offs, factor, levels, iou_thr, *out.slots(),
                                level_ints, stats, *scratch)

    out = run_kernel(packed, work, threads, "NMW", reuse, levels=len(levels))
    return [level_output(out, k, packed) for k in range(len(levels))]


def non_maximum_weighted(boxes_list: Any, scores_list: Any, labels_list: Any,
                         weights: Sequence[float] | np.ndarray | None = None, iou_thr: float = 0.55,
                         skip_box_thr: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop-in for ``ensemble_boxes.non_maximum_weighted`` (1.0.9): same arguments, same outputs.

    ``boxes_list[t]`` is set ``t``'s ``(n_t, 4)`` normalised boxes, ``scores_list[t]`` / ``labels_list[t]`` its
    scores and labels. Returns ``(boxes (m, 4), scores (m,), labels (m,))``, float64, by score descending.
    """
    n_sets = len(boxes_list)
    if len(scores_list) != n_sets or len(labels_list) != n_sets:
        raise ValueError("boxes_list, scores_list and labels_list must have the same length")
    w = list_weights(weights, n_sets)
    b, sc, lab, lens, thr_set = concat_lists(boxes_list, scores_list, labels_list, n_sets, skip_box_thr)
    if math.isnan(float(skip_box_thr)):
        raise ValueError("iou_thr and skip_box_thr must not be NaN")
    if int(lens.sum()) == 0:
        return np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,))
    check_finite(b, sc)
    packed = pack_lists(b, sc, lab.astype(np.int64), lens, n_sets)._replace(weights=w)  # int(): truncation
    out = fuse_packed(packed, iou_thr, thr_set, reuse=True)
    m = int(out.count[0])
    return out.boxes[:m].copy(), out.score[:m].copy(), out.label[:m].astype(np.float64)
