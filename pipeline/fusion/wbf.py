"""Weighted box fusion: a compiled, output-identical replacement for ``ensemble_boxes.weighted_boxes_fusion``.

Two entry points:

* :func:`weighted_boxes_fusion` -- drop-in for ``ensemble_boxes.weighted_boxes_fusion`` (ensemble-boxes 1.0.9):
  same arguments, normalised ``[0, 1]`` coordinates, returns ``(boxes, scores, labels)`` as float64 arrays with
  the same boxes, scores, labels, count and order as the library (see "Ties" for the one place the library's
  own output is not defined).
* :func:`fuse_packed` -- the same fusion for many images at once, on packed arrays (one compiled call per thread);
  :func:`pipeline.fusion.fuse_predictions` feeds it a whole prediction table. :func:`fuse_packed_levels` gives its
  output at several ``skip_box_thr`` from one pass when every set weight is 1 (the OOF tuner's grid): a higher
  threshold keeps the first boxes of each label group's order, and the clusters when they are done are read off.

The compiled stages are in :mod:`pipeline.fusion.wbf_kernel`, their work arrays in :mod:`pipeline.fusion.wbf_scratch`.

What the library does, and what is replicated here (ensemble-boxes 1.0.9, ``ensemble_boxes_wbf.py``):

1. Prefilter, per set ``t`` (one entry of ``boxes_list``) and box ``j`` in input order: a box whose *raw* score
   is ``< skip_box_thr`` is dropped (compared under numpy's promotion rules: float32 score arrays against a Python
   float threshold compare in float32); ``label = int(label)`` (truncation); ``x2 < x1`` / ``y2 < y1`` are swapped,
   then every coordinate is clipped to ``[0, 1]``; a box whose clipped area ``(x2-x1)*(y2-y1) == 0`` is dropped
   (the library warns once per box; here one ``UserWarning`` per call summarises the counts). A kept box carries
   the weighted score ``score * weights[t]``, the weight ``weights[t]`` and the set index ``t``.
2. Boxes are grouped by label; the groups are processed (and later concatenated) in the order in which each label
   first appears among the *kept* boxes. Inside a group boxes are sorted by weighted score, descending.
3. Clustering, per label, in that order: a box joins the existing cluster whose current *fused* box has the
   highest IoU with it (lowest cluster index on equal IoU) if that IoU is ``> iou_thr`` (strictly), else it starts
   a new cluster. The fused box of a cluster with one member is that member's box (float64). Once a second member
   joins, the library recomputes the fused box with ``get_weighted_box`` into a **float32** array: coordinates
   ``sum(ws_i * c_i)`` accumulated in float32 (each step ``float32(float64(acc) + ws_i * c_i)``), divided in
   float64 by the float64 sum of weighted scores and rounded to float32; score ``float32(sum(ws)/n)`` (or
   ``float32(max(ws))`` for ``conf_type='max'``); weight ``float32(sum(w))``. Later boxes are matched against these
   float32-rounded fused boxes, so the rounding is replicated bit for bit (the float32 partial sums are kept as
   state, which gives the same bits as the library's recomputation from scratch).
   A cluster whose members all have weighted score 0 gets NaN coordinates (0/0) in the library, and numpy's
   ``argmax`` then picks that NaN cluster for every later box of the label; this is replicated too.
4. Rescaling of each cluster's score ``s`` (``n`` members, ``W = weights.sum()``, ``S = len(weights)``, ``w`` the
   cluster's weight sum as stored in step 3):
   ``'avg'``: ``s * min(S, n) / W`` (``s * n / W`` if ``allows_overflow``); ``'max'``: ``s / weights.max()``;
   ``'box_and_model_avg'``: ``s * n / w``, then ``* sum(weights of the distinct sets in the cluster) / W``;
   ``'absent_model_aware_avg'``: ``s * n / (w + sum(weights of the sets absent from the cluster))``.
   ``allows_overflow`` only affects ``'avg'``. The partial weight sums use numpy's pairwise summation order, so
   they are bit-identical to the library's ``ndarray.sum()``.
5. All clusters of all labels are concatenated (label order of step 2, cluster creation order) and sorted by the
   rescaled score, descending. Boxes come back float64 (float32-rounded values for fused clusters), labels as
   float64.

Ties. The library sorts with ``ndarray.argsort()[::-1]`` (numpy's default, unstable sort), so the order of equal
scores is not defined and differs between numpy versions and CPUs. Here both sorts (step 2 and step 5) use one
documented rule: **reverse of a stable ascending sort** -- among equal scores the element that comes *later*
(step 2: later set, then later box within the set; step 5: later label group, then later-created cluster) comes
first. This is what numpy produces for arrays of at most 16 elements (insertion sort), so small inputs agree
exactly even with ties; on larger inputs with tied weighted scores the output may differ from the library's in
the order of the tied boxes and, through the clustering order, in the clusters. Inputs without tied weighted
scores give identical clusters. Because fused scores are rounded to float32, two *output* rows can still tie
(rare); their relative order is then the rule above, where the library's is undefined -- compare such rows as a set.

Deviations: non-finite coordinates/scores and a NaN ``iou_thr`` raise ``ValueError`` (the
library silently produces garbage); an unknown ``conf_type`` or mismatched list lengths raise ``ValueError``
(the library calls ``exit()``); a wrong number of weights warns (the library prints) and uses ones like the
library. Weights are converted to float64 (a float32 ``weights`` array makes the library compute weighted scores
in float32: differences ~1e-8). Labels above 2**24 are returned exactly (the library rounds fused labels through
float32). Weights are expected to be positive.

Speed. The matching search is the cost: each box would be compared with every open cluster of its label. An exact
spatial index prunes it: clusters are kept in a uniform grid over their fused-box centres (moved when a join moves
the fused box), and a box only examines clusters whose centre lies within ``k * width`` (x) and ``k * height``
(y) of its own centre, with ``k = 1 - t`` for ``t >= 0.5`` and ``k = (1 - t) / (2 t)`` below. Proof sketch: IoU > t
implies ``inter > t * area_B`` and ``inter_h <= h_B``, so the x-overlap ``ov > t * w_B``, likewise ``ov > t * w_A``;
with ``ov <= (w_A + w_B)/2 - |dx|`` this gives ``|dx| < (w_A + w_B)/2 - t * max(w_A, w_B)``, whose maximum over the
admissible ``w_A`` (``t w_B < w_A < w_B / t``) is ``k * w_B``. ``t`` is lowered by a relative 1e-9 and the radius
widened by 1e-9 relative + 1e-12 absolute, far beyond the rounding of the float IoU (~1e-15 relative), so no
cluster whose computed IoU could exceed ``iou_thr`` is ever skipped. For ``iou_thr < 0.1`` (bound too loose) and
whenever the grid query would visit more cells than there are clusters, every cluster is scanned as the library
does. The rest avoids per-call overhead: both sorts are an allocation-free stable LSD radix sort on the float bits
(over the keys' top halves, runs of equal top halves finished by insertion sort: the same order),
the kernel's scratch is cached per thread (no allocation or page faults on repeated calls), and
:func:`pipeline.fusion.fuse_predictions` describes the whole table as segments of its own columns
(:mod:`pipeline.fusion.packing`: no copy of the rows) and fuses it in compiled code, normalising as it reads,
splitting the images over threads (the kernel releases the GIL).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.fusion.levels import checked_levels
from pipeline.fusion.lists import check_finite, concat_lists, list_weights
from pipeline.fusion.packing import PackedTable, pack_lists
from pipeline.fusion.runner import KernelOutput, largest_image, level_output, run_kernel
from pipeline.fusion.wbf_kernel import CONF_TYPES, fuse_image_range, fuse_image_range_levels
from pipeline.fusion.wbf_scratch import allocate_scratch, thread_scratch

__all__ = ["CONF_TYPES", "weighted_boxes_fusion", "fuse_packed", "conf_code", "check_thresholds"]


def conf_code(conf_type: str) -> int:
    """The kernel's code for ``conf_type``; ``ValueError`` for an unknown one (the library calls ``exit()``)."""
    if conf_type not in CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}; must be one of {CONF_TYPES}")
    return CONF_TYPES.index(conf_type)


def check_thresholds(iou_thr: float, skip_box_thr: float) -> tuple[float, float]:
    """Both thresholds as floats; ``ValueError`` on NaN (the library would silently return garbage)."""
    iou_thr = float(iou_thr)
    skip_box_thr = float(skip_box_thr)
    if math.isnan(iou_thr) or math.isnan(skip_box_thr):
        raise ValueError("iou_thr and skip_box_thr must not be NaN")
    return iou_thr, skip_box_thr


def fuse_packed(packed: PackedTable, iou_thr: float, skip_thr: float | np.ndarray, conf_code: int,
                allows_overflow: bool, threads: int = 1, reuse: bool = False) -> KernelOutput:
    """Fuse every image of ``packed`` with the set weights ``packed.weights``; image ``k``'s fused rows
    (normalised, by score descending) are the output slots ``packed.row_offs[k] : + count[k]``.

    ``skip_thr``: a scalar or one threshold per set (see :func:`pipeline.fusion.lists.effective_threshold`).
    ``conf_code``: see :func:`conf_code`. With ``threads > 1`` (and enough images) the images are split over
    worker threads.
    """
    weights = np.ascontiguousarray(packed.weights, dtype=np.float64)
    n_sets = len(weights)
    wsum = float(weights.sum()) if n_sets else 0.0  # numpy's own sum: bit-identical to the library's
    wmax = float(weights.max()) if n_sets else 0.0
    skip_thr = np.broadcast_to(np.asarray(skip_thr, np.float64), (n_sets,)).copy()  # per-set thresholds
    params = (weights, wsum, wmax, float(iou_thr), skip_thr, int(conf_code), bool(allows_overflow))

    def work(lo: int, hi: int, out: KernelOutput, stats: np.ndarray, cached: bool) -> None:
        cap = largest_image(packed, lo, hi)
        scratch = thread_scratch(cap, n_sets) if cached else allocate_scratch(cap, n_sets)
        fuse_image_range(lo, hi, *packed.kernel_rows, packed.row_offs, *params, *out.slots(), stats, *scratch)

    return run_kernel(packed, work, threads, "WBF", reuse)


def fuse_packed_levels(packed: PackedTable, iou_thr: float, skip_levels: Sequence[float], conf_code: int,
                       allows_overflow: bool, threads: int = 1, reuse: bool = False) -> list[KernelOutput]:
    """:func:`fuse_packed` at each ``skip_box_thr`` of ``skip_levels`` (non-decreasing), in one pass over the
    images (:func:`~pipeline.fusion.wbf_kernel.fuse_image_range_levels`): the OOF tuner's grid of skip thresholds
    at the cost of about one fusion. Every set weight must be 1 (``ValueError`` otherwise): only then are the
    boxes a higher threshold keeps the first ones of each label group's order. Entry ``k`` is ``fuse_packed``'s
    output with ``skip_levels[k]``, bit for bit. Input repairs are counted as the lowest threshold reads the rows
    (one warning for the call). ``reuse``: the slots of all levels are this
    thread's cached output (:func:`~pipeline.fusion.runner.run_kernel`)."""
    weights = np.ascontiguousarray(packed.weights, dtype=np.float64)
    levels = checked_levels(skip_levels)
    if not len(weights) or not np.all(weights == 1.0):
        raise ValueError("fuse_packed_levels needs every set weight 1 (fuse each threshold with fuse_packed)")
    n_sets, n_levels = len(weights), len(levels)
    params = (weights, float(weights.sum()), float(weights.max()), float(iou_thr), levels, int(conf_code),
              bool(allows_overflow))

    def work(lo: int, hi: int, out: KernelOutput, stats: np.ndarray, cached: bool) -> None:
        cap = largest_image(packed, lo, hi)
        scratch = thread_scratch(cap, n_sets) if cached else allocate_scratch(cap, n_sets)
        level_ints = np.empty((n_levels, 4, cap + 1), np.int64)
        fuse_image_range_levels(lo, hi, *packed.kernel_rows, packed.row_offs, *params, *out.slots(), level_ints,
                                stats, *scratch)

    out = run_kernel(packed, work, threads, "WBF", reuse, levels=n_levels)
    return [level_output(out, k, packed) for k in range(n_levels)]


def weighted_boxes_fusion(boxes_list: Any, scores_list: Any, labels_list: Any,
                          weights: Sequence[float] | np.ndarray | None = None, iou_thr: float = 0.55,
                          skip_box_thr: float = 0.0, conf_type: str = "avg",
                          allows_overflow: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop-in for ``ensemble_boxes.weighted_boxes_fusion`` (1.0.9): same arguments, same outputs.

    ``boxes_list[t]`` is set ``t``'s ``(n_t, 4)`` boxes ``x1, y1, x2, y2`` in normalised ``[0, 1]`` coordinates,
    ``scores_list[t]`` / ``labels_list[t]`` its ``n_t`` scores and labels. Returns ``(boxes (m, 4), scores (m,),
    labels (m,))``, float64, sorted by score descending (ties: see the module docstring).
    """
    code = conf_code(conf_type)
    skip_thr_in = skip_box_thr  # as given: its type decides the comparison's precision (effective_threshold)
    iou_thr, skip_box_thr = check_thresholds(iou_thr, skip_box_thr)
    n_sets = len(boxes_list)
    w = list_weights(weights, n_sets)
    if len(scores_list) != n_sets or len(labels_list) != n_sets:
        raise ValueError("boxes_list, scores_list and labels_list must have the same length")
    b, sc, lab, lens, thr_set = concat_lists(boxes_list, scores_list, labels_list, n_sets, skip_thr_in)
    n = int(lens.sum())
    if n == 0:
        return np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,))
    check_finite(b, sc)
    packed = pack_lists(b, sc, lab.astype(np.int64), lens, n_sets)._replace(weights=w)  # int(): truncation
    out = fuse_packed(packed, iou_thr, thr_set, code, allows_overflow, reuse=True)
    m = int(out.count[0])
    return out.boxes[:m].copy(), out.score[:m].copy(), out.label[:m].astype(np.float64)
