"""Non-maximum suppression, hard and soft: compiled, output-identical replacements for ``ensemble_boxes``' ``nms``,
``soft_nms`` and ``nms_method`` (ensemble-boxes 1.0.9, ``ensemble_boxes_nms.py``). (Not called ``nms.py``: the
package exports the drop-in function ``nms``, which would shadow a submodule of that name.)

Entry points: the drop-ins :func:`nms`, :func:`soft_nms` and :func:`nms_method` (same arguments, normalised
``[0, 1]`` coordinates, the same boxes, scores, labels, count and order as the library), and :func:`fuse_packed`,
the same rules for every image of a packed table (:func:`pipeline.fusion.fuse_predictions` with
``method="nms"`` / ``"soft_nms"``). The compiled stages are in :mod:`pipeline.fusion.suppression_kernel`.

What the library does, and what is replicated here:

1. Weights: when ``weights`` is given (and has one entry per set), set ``t``'s scores become
   ``(scores[t] * weights[t]) / weights.sum()`` -- with ``weights=None`` the scores are used as they are (so
   weights of all ones divide every score by the number of sets). A wrong number of weights is ignored, with a
   warning (the library prints).
2. All sets are concatenated; coordinates are clipped to ``[0, 1]``, each coordinate pair is sorted
   (``x1 <= x2``, ``y1 <= y2``) and boxes of zero area are dropped. There is no score threshold.
3. Labels are processed one at a time in ascending order (``np.unique``; labels are compared as given, not
   truncated to integers); the output is grouped by label in that order -- it is **not** sorted by score overall.
4. NMS (``method=3``): in score order, a box is kept unless a kept box of its label has IoU with it ``> iou_thr``
   (the library keeps ``ovr <= iou_thr``); kept boxes come out by score descending.
5. Soft-NMS (``method=1`` linear, ``2`` gaussian): the library's selection loop over its array of the label's
   boxes -- at step ``i`` the box at position ``i`` is swapped with the maximum of positions ``i+1..`` when its
   score is lower (``np.max`` / ``np.argmax``: the first maximum), then every later box's score is multiplied by
   ``1 - iou`` when ``iou > iou_thr`` (linear) or by ``exp(-iou**2 / sigma)`` (gaussian). A box is returned when
   its score at selection is ``> thresh``, in selection order, **with its undecayed score**. When the library's
   score array is float32 (float32 scores, no weights), each decayed score is rounded to float32 as numpy stores
   it, and ``thresh`` is compared in float32 (see :func:`pipeline.fusion.lists.effective_threshold`).
6. Boxes come back float64 (the clipped, sorted input boxes), scores in the dtype of the library's score array,
   labels with the dtype and values of the input labels.

Exactness. IoUs are computed with the library's operations in its order, so thresholds decide identically.
Score ties: the library sorts NMS scores with numba's unstable ``argsort``, so the order of equal scores is not
defined; here the later box (later set, then later in its set) comes first. Soft-NMS ties are replicated (the
positions and ``argmax``'s first maximum are simulated). The gaussian weight is computed by
:func:`pipeline.fusion.vector_exp.exp_vectorisable` (libm's ``exp`` when ``sigma < 1 / 708``), within 1 ulp of
libm's and differing from it in the last bit on ~12 % of arguments; numpy's ``exp`` (what the library calls) is
libm's on most CPUs but its own SIMD code on AVX-512 ones, which differs from libm's on ~5 %. Soft-NMS returns
undecayed scores, so a decayed score that differs by an ulp changes the output only if two decayed scores (or one
and ``thresh``) are within an ulp of each other -- where the library's own output already depends on the CPU.

Deviations: non-finite boxes or scores, NaN labels, ``sigma <= 0`` with the gaussian decay, a NaN threshold, an
unknown ``method`` or mismatched list lengths raise ``ValueError`` (the library returns garbage, divides by zero,
treats any other ``method`` as hard NMS filtered by ``thresh``, or misaligns); inputs without boxes give empty
outputs (the library raises); the caller's ``scores`` list is not modified (the library overwrites its entries
when weighting). float32 *boxes* are computed in float64 (the library's hard NMS computes their IoU in float32;
soft-NMS converts to float64 as here). Integer or float16 score arrays are treated as float64 (the library would
store decayed scores in their own dtype).

Speed. Each box is compared only with boxes that can matter: NMS files every box in a grid over the centres and
each kept box tests only the boxes whose centre is close enough for IoU > ``iou_thr`` (the bound of
:mod:`pipeline.fusion.grid`), marking those it suppresses in one vectorised loop per row of cells; soft-NMS
decays only the boxes that overlap the selected one (every other weight is exactly 1, and ``1.0 * s == s``),
found through a grid, drops boxes whose score fell to ``thresh`` or below (with
``thresh >= 0`` they can never be returned nor decay a box that can, since the library selects them last), and
finds each step's maximum of the library's score array through per-block upper bounds, rescanning a block only
when its bound has gone stale (a decay only lowers a score). The drop-ins concatenate the per-set lists in one
call when they are arrays, hand them to the kernel as they are (no packed table) and reuse their work and output
arrays between calls.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.fusion.lists import check_lengths, effective_threshold
from pipeline.fusion.packing import PackedTable
from pipeline.fusion.rows import N_STATS
from pipeline.fusion.runner import KernelOutput, check_repairs, largest_image, run_kernel, thread_output
from pipeline.fusion.suppression_kernel import (GAUSSIAN, HARD, LINEAR, allocate_scratch, fuse_image_range,
                                               fuse_lists, thread_scratch)

__all__ = ["DECAYS", "nms", "soft_nms", "nms_method", "fuse_packed", "check_nms_params"]

DECAYS = {"linear": LINEAR, "gaussian": GAUSSIAN}  # soft-NMS score decay -> the library's ``method``
RULE_NAMES = {HARD: "NMS", LINEAR: "soft-NMS", GAUSSIAN: "soft-NMS"}


def check_nms_params(method: int, iou_thr: float, sigma: float, thresh: float) -> tuple[int, float, float, float]:
    """Validated ``(method, iou_thr, sigma, thresh)`` as int and floats; ``ValueError`` otherwise."""
    if method not in (LINEAR, GAUSSIAN, HARD):
        raise ValueError(f"unknown method {method!r}: 1 (linear soft-NMS), 2 (gaussian soft-NMS) or 3 (NMS)")
    iou_thr, sigma, thresh = float(iou_thr), float(sigma), float(thresh)
    if math.isnan(iou_thr) or math.isnan(thresh):
        raise ValueError("iou_thr and thresh must not be NaN")
    if method == GAUSSIAN and not sigma > 0:  # the library would divide by zero (or grow scores)
        raise ValueError(f"sigma must be positive, got {sigma}")
    return method, iou_thr, sigma, thresh


def fuse_packed(packed: PackedTable, method: int, iou_thr: float, sigma: float, thresh: float, weighted: bool,
                float32_scores: bool = False, threads: int = 1, reuse: bool = False) -> KernelOutput:
    """NMS (``method=3``) or soft-NMS (1, 2) of every image of ``packed``; image ``k``'s kept rows (normalised,
    grouped by label ascending, each in selection order) are the output slots ``packed.row_offs[k] : +
    count[k]``; soft-NMS gives each row's score at selection in ``selection`` (the decayed score compared with
    ``thresh``). ``weighted``: scores become ``score * weight / sum(weights)`` (the library given ``weights``),
    else they are used as they are (``weights=None``)."""
    method, iou_thr, sigma, thresh = check_nms_params(method, iou_thr, sigma, thresh)
    weights = np.ascontiguousarray(packed.weights, dtype=np.float64)
    if weighted:
        factor, divisor = weights, float(weights.sum())  # numpy's pairwise sum, as the library's weights.sum()
    else:
        factor, divisor = np.ones(len(weights)), 1.0
    params = (factor, divisor, method, iou_thr, sigma, thresh, bool(float32_scores))

    def work(lo: int, hi: int, out: KernelOutput, stats: np.ndarray, cached: bool) -> None:
        cap = largest_image(packed, lo, hi)
        scratch = thread_scratch(cap) if cached else allocate_scratch(cap)
        fuse_image_range(lo, hi, *packed.kernel_rows, packed.row_offs, *params, *out.slots(), out.selection, stats,
                         *scratch)

    out = run_kernel(packed, work, threads, RULE_NAMES[method], reuse, selection=True)
    return out if method != HARD else out._replace(selection=None)  # NMS writes no selection scores


def _library_inputs(boxes: Any, scores: Any, labels: Any, weights: Any,
                    n_sets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes (n, 4) float64, scores, labels)`` concatenated as the library does, scores weighted
    as ``(scores[t] * weights[t]) / weights.sum()`` when ``weights`` is valid (numpy's own expressions, so dtypes
    and bits agree; on the concatenated scores when every set's scores are arrays of one dtype, which computes the
    same per element). ``ValueError`` when a set's lengths differ."""
    if weights is not None and len(weights) != n_sets:
        warnings.warn(f"incorrect number of weights: {len(weights)}. Must be: {n_sets}. Ignored.", stacklevel=4)
        weights = None
    fast = n_sets > 0 and (weights is None or (all(isinstance(x, np.ndarray) for x in scores)
                                                and len({x.dtype for x in scores}) == 1))
    if fast:
        try:
            b, sc, lab = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
        except (ValueError, TypeError):  # ragged or empty entries: the per-set path below
            fast = False
        else:
            fast = b.ndim == 2 and b.shape[1] == 4 and sc.ndim == 1 and lab.ndim == 1
    if fast:
        box_lens = list(map(len, boxes))
        if box_lens != list(map(len, scores)) or box_lens != list(map(len, labels)):
            check_lengths(np.array(box_lens), np.array(list(map(len, scores))), np.array(list(map(len, labels))))
        if weights is not None:
            w = np.array(weights)
            sc = (sc * np.repeat(w, np.array(box_lens, np.int64))) / w.sum()
        return b.astype(np.float64, copy=False), sc, lab
    box_parts = [np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in boxes]
    if weights is None:
        score_parts = [np.asarray(x).reshape(-1) for x in scores]
    else:
        w = np.array(weights)
        score_parts = [((np.array(scores[t]) * w[t]) / w.sum()).reshape(-1) for t in range(n_sets)]
    label_parts = [np.asarray(x).reshape(-1) for x in labels]
    lens = np.array([len(x) for x in box_parts], np.int64)
    check_lengths(lens, np.array([len(x) for x in score_parts], np.int64),
                  np.array([len(x) for x in label_parts], np.int64))
    if lens.sum() == 0:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    return np.concatenate(box_parts), np.concatenate(score_parts), np.concatenate(label_parts)


def nms_method(boxes: Any, scores: Any, labels: Any, method: int = 3, iou_thr: float = 0.5, sigma: float = 0.5,
               thresh: float = 0.001,
               weights: Sequence[float] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop-in for ``ensemble_boxes.nms_method`` (1.0.9): ``method`` 1 linear soft-NMS, 2 gaussian soft-NMS,
    3 NMS. ``boxes[t]`` is set ``t``'s ``(n_t, 4)`` normalised boxes, ``scores[t]`` / ``labels[t]`` its scores
    and labels. Returns ``(boxes (m, 4), scores (m,), labels (m,))`` grouped by label ascending (see the module
    docstring for order, dtypes and deviations)."""
    method, iou_thr, sigma, _ = check_nms_params(method, iou_thr, sigma, thresh)
    n_sets = len(boxes)
    if len(scores) != n_sets or len(labels) != n_sets:
        raise ValueError("boxes, scores and labels must have the same length")
    b, sc, lab = _library_inputs(boxes, scores, labels, weights, n_sets)
    if len(sc) == 0:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    if sc.dtype.kind != "f" or sc.dtype.itemsize not in (4, 8):
        sc = sc.astype(np.float64)  # the library would decay integer or float16 scores in their own dtype
    # non-finite boxes or scores: the kernel counts them and check_repairs raises ValueError
    if lab.dtype.kind in "iu" and (lab.dtype.itemsize < 8 or lab.dtype.kind == "i"):
        uniq, codes = None, lab  # integers sort as themselves: the kernel's ascending labels are np.unique's
    else:
        if lab.dtype.kind == "f" and np.isnan(lab).any():
            raise ValueError("labels must not be NaN")
        uniq, codes = np.unique(lab, return_inverse=True)  # ascending: the library's label order
    thresh_eff = effective_threshold(sc.dtype, thresh)  # the library compares its score array with ``thresh``
    n = len(sc)
    out = thread_output(n, 1)
    stats = np.zeros(N_STATS, np.int64)
    m = fuse_lists(np.ascontiguousarray(b), np.ascontiguousarray(sc, np.float64),
                   np.ascontiguousarray(codes.reshape(-1), np.int64), method, iou_thr, sigma, thresh_eff,
                   sc.dtype == np.float32, out.boxes, out.score, out.label, out.selection, stats, *thread_scratch(n))
    check_repairs(stats, RULE_NAMES[method], stacklevel=3)  # the caller of nms() or soft_nms()
    labels_out = out.label[:m].astype(lab.dtype) if uniq is None else uniq[out.label[:m]]
    return out.boxes[:m].copy(), out.score[:m].astype(sc.dtype), labels_out


def nms(boxes: Any, scores: Any, labels: Any, iou_thr: float = 0.5,
        weights: Sequence[float] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop-in for ``ensemble_boxes.nms`` (1.0.9): standard NMS per label (see :func:`nms_method`)."""
    return nms_method(boxes, scores, labels, method=HARD, iou_thr=iou_thr, weights=weights)


def soft_nms(boxes: Any, scores: Any, labels: Any, method: int = 2, iou_thr: float = 0.5, sigma: float = 0.5,
             thresh: float = 0.001,
             weights: Sequence[float] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop-in for ``ensemble_boxes.soft_nms`` (1.0.9): ``method`` 1 linear, 2 gaussian (see :func:`nms_method`)."""
    return nms_method(boxes, scores, labels, method=method, iou_thr=iou_thr, sigma=sigma, thresh=thresh,
                      weights=weights)
