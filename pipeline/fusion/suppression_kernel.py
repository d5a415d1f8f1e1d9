"""Compiled stages of NMS and soft-NMS; what they replicate of ensemble-boxes is in
:mod:`pipeline.fusion.suppression`.

:func:`fuse_image_range` fuses a range of images of a packed table, one after the other; :func:`fuse_lists` the
drop-ins' one image, read from the library's lists concatenated (no packed table to build):

1. :func:`~pipeline.fusion.rows.read_image` -- read the rows, clip and sort each coordinate pair, drop zero areas,
   weight the scores (the drop-ins: read where they are when :func:`_needs_no_repair` finds nothing to repair);
2. :func:`_order_by_label` -- label groups in ascending label order, each in input order;
3. per group (:func:`_gather_group`; NMS of a single label reads the boxes where they are),
   :func:`_hard_nms_group` (greedy suppression in score order, as the library's forward: each kept box marks the
   boxes it suppresses among the members filed in the grid cells of its window, eight slots at a time; the order
   comes from buckets of the scores, each sorted when its turn comes, without the members suppressed by then) or
   :func:`_soft_nms_group` (the library's selection loop over its own score array, whose maximum is found through
   lazy per-block maxima; only boxes that overlap the selected one are decayed -- every other weight is exactly 1
   -- found by :func:`_overlapping` in a grid of their own (:func:`_soft_grid_build`); boxes that can no longer be
   returned drop out);
4. the kept boxes are written group by group, in selection order.

Cost. NMS: one bucketing pass over the scores, filing every member, per bucket a sort of its few members still
live, and per kept box a few runs of grid slots tested in SIMD lanes.
Soft-NMS: per selected box, a window of grid rows, eight slots at a time (their IoUs, and the overlapping ones
packed with their library positions: :mod:`pipeline.fusion.vector_hits`), then its overlapping live boxes' decays
at the library's positions, eight at a time, each (gaussian) with an ``exp`` computed in the same registers
(:mod:`pipeline.fusion.vector_exp`) -- every overlapping pair is decayed once, as in the library, which computes the
same products for all remaining boxes at every step; finding each step's maximum scans a few dozen bounds and
scores, and again for each stale block bound it meets (about 1.6 a step, agreeing 40 x 100). Tens of thousands of
overlapping pairs per image at 40 sets x 100 boxes keep gaussian soft-NMS the slowest rule.

Work arrays are laid out in :class:`Scratch` (one allocation per thread, rows named by :class:`BoxRow`,
:class:`FloatRow`, :class:`IntRow`), passed as separate arguments like the WBF kernel's.
"""
from __future__ import annotations

import math
import threading
from enum import IntEnum, unique
from typing import NamedTuple

import numba
import numpy as np

from pipeline.fusion.grid import (GRID_MAX, GRID_MIN_BOXES, GRID_MIN_THR, cells_per_axis, grid_layout,
                                  search_radius_factor, window_cells)
from pipeline.fusion.primitives import (NJIT_NO_REFCOUNT, NJIT_OPTIONS, RADIX_HIST_SIZE, float_sort_keys, int_sort_keys,
                                        iou, radix_argsort)
from pipeline.fusion.rows import read_image
from pipeline.fusion.vector_exp import covers_gaussian_weights, exp_vectorisable
from pipeline.fusion.vector_hits import LANES, decay8, gaussian_decay8, iou_hits8, suppress8

# numba's cache cannot see changes to other files compiled in here: see pipeline.fusion.wbf_kernel.
COMPILED_AGAINST = {"grid.py": "4c31c531fd090b1c", "primitives.py": "5a867f87f2eb7faf", "rows.py": "d18c55d7d48eb07d",
                    "vector_exp.py": "21393a15e5df49fd", "vector_hits.py": "b284ec8f0c7e4d8d"}

# The library's ``method`` codes.
LINEAR = 1
GAUSSIAN = 2
HARD = 3

SOFT_LARGE = 3.0  # soft-NMS: members wider or taller than this many times the mean are checked on every step
SOFT_CELL_FACTOR = 0.25  # soft-NMS grid cells per axis: about 1 / (this * the largest filed size)
SOFT_COLUMNS = 4  # soft-NMS grid columns per row cell: a window row is one run of slots, so narrower columns trim
#                   the run's ends at no cost per row (agreeing 40 x 100: ~3 % a step, benchmarks/README.md)
SLOT_PAD = LANES  # grid slots are tested in runs of whole 8s (AVX-512's doubles, twice AVX2's), past a run's end
SOFT_REFILE_MIN = 64  # soft-NMS: refile the grid once fewer than half its slots are live, if it has more than this
NMS_BUCKET_SIZE = 4  # NMS orders its members by buckets of their scores, about this many a bucket (sizes 4-8 ran
#                      fastest at 40 x 100, 16 slower), and
NMS_BUCKETS_MIN = 8  # between this many buckets
NMS_BUCKETS_MAX = 8192  # and this many (Scratch.cell_count holds GRID_MAX ** 2 bucket starts)
SHORT_BUCKET = 32  # a bucket's members are ordered by an insertion sort up to this many, else by a radix sort


@unique
class BoxRow(IntEnum):
    """Rows of ``Scratch.boxes`` (float64, ``(len(BoxRow), cap, 4)``)."""

    KEPT = 0  # per box: the image's boxes after clipping, in (set, input) order
    GROUP = 1  # per group member: its box (contiguous, in the library's order)


@unique
class FloatRow(IntEnum):
    """Rows of ``Scratch.floats`` (float64, ``(len(FloatRow), cap)``)."""

    KEPT_SCORE = 0  # per box: weighted score
    GROUP_SCORE = 1  # per group member: weighted score (hard: the sort input; soft: the score returned)
    FINAL = 2  # soft-NMS, per step: the selected member's score at selection (compared with ``thresh``)
    CAND_IOU = 3  # soft-NMS: IoU of the selected member with each candidate (``IntRow.CAND``)


@unique
class IntRow(IntEnum):
    """Rows of ``Scratch.ints`` (int64, ``(len(IntRow), cap + SLOT_PAD)``: ``SLOT_POS`` is read, and ``CAND``
    written, eight slots at a time)."""

    KEPT_SET = 0
    KEPT_LABEL = 1
    BY_LABEL = 2  # kept boxes by label, ascending, each label in input order
    BY_SCORE = 3  # NMS: a group's members by bucket of their scores (_bucket_by_key)
    SORT_KEY = 4
    SORT_KEY_A = 5
    SORT_KEY_B = 6
    SORT_INDEX_B = 7
    CELL_OF = 8  # per group member: its grid cell, -1 when not filed
    SLOT_OF = 9  # per group member: its grid slot
    SLOT_POS = 10  # soft-NMS, per grid slot: the library position of the member filed there
    AT_POS = 11  # soft-NMS: member at each library array position
    POS_OF = 12  # soft-NMS: library array position of each member
    LIST = 13  # soft-NMS: the large members (checked on every step)
    SELECTED = 14  # soft-NMS: member selected at each step
    REMOVED = 15  # soft-NMS, per member: 1 once selected or dead (score <= thresh); NMS, per slot: suppressed
    CAND = 16  # soft-NMS: the library positions of the members a selected member overlaps (between steps: free)


class Scratch(NamedTuple):
    """The kernel's work arrays for images of up to ``cap`` boxes."""

    boxes: np.ndarray  # float64 (len(BoxRow), cap, 4)
    floats: np.ndarray  # float64 (len(FloatRow), cap + SLOT_PAD)
    ints: np.ndarray  # int64 (len(IntRow), cap + SLOT_PAD)
    group_start: np.ndarray  # int64 (cap + 1)
    pos_score: np.ndarray  # float64 (score_room(cap)): soft-NMS, the library's score array (padded to whole
    #                        blocks), then each block's upper bound of its maximum (see _soft_nms_group)
    soft_slots: np.ndarray  # float64 (4, cap + SLOT_PAD): the grid (NMS and soft-NMS), per slot: x1, y1, x2, y2 (a
    #                         row each); NMS's runs of slots are read in whole multiples of SLOT_PAD
    cell_start: np.ndarray  # int64 (GRID_MAX ** 2 + 1): first slot of each grid cell
    cell_count: np.ndarray  # int64 (GRID_MAX ** 2): boxes filed in each cell
    radix_hist: np.ndarray  # int64 (RADIX_HIST_SIZE)


def score_room(cap: int) -> int:
    """Length of ``Scratch.pos_score`` for groups of up to ``cap`` members: the scores in whole blocks, the block
    bounds in whole groups and the group bounds of :func:`block_layout` (tests/test_fusion_suppression.py checks
    the fit)."""
    return 2 * cap + 256


def allocate_scratch(cap: int) -> Scratch:
    """Work arrays for images of up to ``cap`` boxes, uninitialised (the kernel writes before it reads) but for
    the grid's padding slots, which hold a box that overlaps nothing."""
    cap = max(int(cap), 1)
    slots = np.empty((4, cap + SLOT_PAD))
    slots[:2, cap:] = np.inf
    slots[2:, cap:] = -np.inf
    return Scratch(np.empty((len(BoxRow), cap, 4)), np.empty((len(FloatRow), cap + SLOT_PAD)),
                   np.empty((len(IntRow), cap + SLOT_PAD), np.int64), np.empty(cap + 1, np.int64),
                   np.empty(score_room(cap)),
                   slots, np.empty(GRID_MAX * GRID_MAX + 1, np.int64), np.empty(GRID_MAX * GRID_MAX, np.int64),
                   np.empty(RADIX_HIST_SIZE, np.int64))


_THREAD_LOCAL = threading.local()


def thread_scratch(cap: int) -> Scratch:
    """This thread's cached :class:`Scratch` for ``cap`` boxes, grown by half when too small, never shrunk."""
    cached: Scratch | None = getattr(_THREAD_LOCAL, "scratch", None)
    if cached is not None and len(cached.group_start) > cap:
        return cached
    if cached is not None:
        cap = max(cap, int((len(cached.group_start) - 1) * 1.5))
    _THREAD_LOCAL.scratch = allocate_scratch(cap)
    return _THREAD_LOCAL.scratch


@numba.njit(**NJIT_OPTIONS)
def fuse_image_range(img_lo: int, img_hi: int, seg_offs: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray,
                     seg_set: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                     score: np.ndarray, label: np.ndarray, width: np.ndarray, height: np.ndarray,
                     row_offs: np.ndarray, factor: np.ndarray, divisor: float, method: int, iou_thr: float,
                     sigma: float, thresh: float, float32_scores: bool, out_box: np.ndarray,
                     out_score: np.ndarray, out_label: np.ndarray, out_count: np.ndarray,
                     out_selection: np.ndarray, stats: np.ndarray, *scratch_blocks: np.ndarray) -> None:
    """NMS (``method`` 3) or soft-NMS (1 linear, 2 gaussian) of images ``img_lo..img_hi-1`` of a packed table.

    Scores are weighted as ``(score * factor[set]) / divisor``; ``thresh``: soft-NMS keeps a box whose score at
    selection is ``> thresh``; ``float32_scores``: the library's score array is float32, so each decayed score is
    rounded to float32 as numpy stores it. Outputs of image ``i``: rows ``row_offs[i] : + out_count[i]``;
    ``out_selection``: soft-NMS, each row's score at selection (decayed: the value compared with ``thresh``); NMS
    leaves it alone.
    """
    scratch = Scratch(*scratch_blocks)
    no_skip = np.full(factor.shape[0], -np.inf)
    for img in range(img_lo, img_hi):
        m = read_image(img, seg_offs, seg_start, seg_len, seg_set, x1, y1, x2, y2, score, label, width, height,
                       no_skip, factor, divisor, scratch.boxes[BoxRow.KEPT], scratch.floats[FloatRow.KEPT_SCORE],
                       scratch.ints[IntRow.KEPT_SET], scratch.ints[IntRow.KEPT_LABEL], stats)
        o = _fuse_kept(m, row_offs[img], method, iou_thr, sigma, thresh, float32_scores, out_box, out_score,
                       out_label, out_selection, scratch.boxes[BoxRow.KEPT], scratch.floats[FloatRow.KEPT_SCORE],
                       scratch.ints[IntRow.KEPT_LABEL], scratch)
        out_count[img] = o - row_offs[img]


@numba.njit(**NJIT_OPTIONS)
def fuse_lists(boxes: np.ndarray, score: np.ndarray, label: np.ndarray, method: int, iou_thr: float, sigma: float,
               thresh: float, float32_scores: bool, out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray,
               out_selection: np.ndarray, stats: np.ndarray, *scratch_blocks: np.ndarray) -> int:
    """The drop-ins' one image, straight from the library's lists concatenated (``boxes`` ``(n, 4)`` normalised,
    C-contiguous; scores already weighted, as float64; labels as int64 codes): :func:`fuse_image_range` without a
    packed table to build in Python. Writes the kept rows from slot 0, returns their number."""
    scratch = Scratch(*scratch_blocks)
    n = score.shape[0]
    if _needs_no_repair(boxes, score):  # the usual case: the rules read the inputs where they are
        return _fuse_kept(n, 0, method, iou_thr, sigma, thresh, float32_scores, out_box, out_score, out_label,
                          out_selection, boxes, score, label, scratch)
    kept = scratch.boxes[BoxRow.KEPT]
    kept_score = scratch.floats[FloatRow.KEPT_SCORE]
    kept_label = scratch.ints[IntRow.KEPT_LABEL]
    one = np.ones(1)
    m = read_image(0, np.arange(2), np.zeros(1, np.int64), np.full(1, n, np.int64), np.zeros(1, np.int64),
                   boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], score, label, one, one, np.full(1, -np.inf),
                   one, 1.0, kept, kept_score, scratch.ints[IntRow.KEPT_SET], kept_label, stats)
    return _fuse_kept(m, 0, method, iou_thr, sigma, thresh, float32_scores, out_box, out_score, out_label,
                      out_selection, kept, kept_score, kept_label, scratch)


@numba.njit(**NJIT_NO_REFCOUNT)
def _needs_no_repair(boxes: np.ndarray, score: np.ndarray) -> bool:
    """Whether every box (a row of the C-contiguous ``(n, 4)`` ``boxes``) is inside [0, 1] with ``x1 < x2``,
    ``y1 < y2`` and a positive area, and every score finite: what :func:`~pipeline.fusion.rows.read_image` would
    then keep is the rows as they are (a branch-free count over the flat coordinates, so that it vectorises --
    two-dimensional indexing did not, and strided columns read three times slower; NaN fails every
    comparison)."""
    flat = boxes.reshape(-1)
    bad = 0
    for i in range(score.shape[0]):
        a = flat[4 * i]
        b = flat[4 * i + 1]
        c = flat[4 * i + 2]
        d = flat[4 * i + 3]
        ok = ((a >= 0.0) & (a < c) & (c <= 1.0) & (b >= 0.0) & (b < d) & (d <= 1.0) & ((c - a) * (d - b) > 0.0)
              & (abs(score[i]) < np.inf))
        bad += not ok
    return bad == 0


@numba.njit(**NJIT_NO_REFCOUNT)
def _fuse_kept(m: int, o: int, method: int, iou_thr: float, sigma: float, thresh: float, float32_scores: bool,
               out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray, out_selection: np.ndarray,
               kept: np.ndarray, kept_score: np.ndarray, kept_label: np.ndarray, scratch: Scratch) -> int:
    """One image's ``m`` read boxes (``kept``, ``kept_score``, ``kept_label``: the scratch's ``KEPT`` rows, or the
    drop-ins' inputs as they are) fused label by label, written from slot ``o``; returns the next slot."""
    radius_factor = search_radius_factor(iou_thr)
    use_grid = iou_thr >= GRID_MIN_THR
    n_groups = _order_by_label(m, kept_label, scratch)
    for g in range(n_groups):
        gs = scratch.group_start[g]
        ge = scratch.group_start[g + 1]
        label = kept_label[scratch.ints[IntRow.BY_LABEL, gs]]
        if method == HARD and n_groups == 1:  # one label: the group is the kept boxes as they are
            o = _hard_nms_group(gs, ge, o, iou_thr, radius_factor, use_grid, label, out_box, out_score, out_label,
                                kept, kept_score, scratch)
            continue
        _gather_group(gs, ge, kept, kept_score, scratch)
        if method == HARD:
            o = _hard_nms_group(gs, ge, o, iou_thr, radius_factor, use_grid, label, out_box, out_score, out_label,
                                scratch.boxes[BoxRow.GROUP], scratch.floats[FloatRow.GROUP_SCORE], scratch)
        else:
            o = _soft_nms_group(gs, ge, o, method, iou_thr, sigma, thresh, float32_scores, label, out_box,
                                out_score, out_label, out_selection, scratch)
    return o


@numba.njit(**NJIT_NO_REFCOUNT)
def _order_by_label(m: int, kept_label: np.ndarray, scratch: Scratch) -> int:
    """``BY_LABEL``: the ``m`` kept boxes by label ascending (``np.unique`` order), each label in input order;
    ``group_start``: where each label starts. Returns the number of labels."""
    ints = scratch.ints
    by_label = ints[IntRow.BY_LABEL]
    group_start = scratch.group_start
    if m == 0:
        return 0
    one_label = True
    for i in range(1, m):
        if kept_label[i] != kept_label[0]:
            one_label = False
            break
    if one_label:
        for i in range(m):
            by_label[i] = i
        group_start[0] = 0
        group_start[1] = m
        return 1
    keys = ints[IntRow.SORT_KEY]
    int_sort_keys(kept_label, m, keys)
    radix_argsort(keys, m, by_label, ints[IntRow.SORT_KEY_A], ints[IntRow.SORT_KEY_B], ints[IntRow.SORT_INDEX_B],
                  scratch.radix_hist)
    n_groups = np.int64(0)  # not the literal 0: numba would compile callees twice (see wbf_kernel)
    for r in range(m):
        if r == 0 or kept_label[by_label[r]] != kept_label[by_label[r - 1]]:
            group_start[n_groups] = r
            n_groups += 1
    group_start[n_groups] = m
    return n_groups


@numba.njit(**NJIT_NO_REFCOUNT)
def _gather_group(gs: int, ge: int, kept: np.ndarray, kept_score: np.ndarray, scratch: Scratch) -> None:
    """The group's boxes and scores, contiguous in the library's order: member ``q`` is ``BY_LABEL[gs + q]``."""
    gbox = scratch.boxes[BoxRow.GROUP]
    gscore = scratch.floats[FloatRow.GROUP_SCORE]
    by_label = scratch.ints[IntRow.BY_LABEL]
    for q in range(ge - gs):
        i = by_label[gs + q]
        for k in range(4):
            gbox[q, k] = kept[i, k]
        gscore[q] = kept_score[i]


@numba.njit(**NJIT_NO_REFCOUNT)
def _hard_nms_group(gs: int, ge: int, o: int, iou_thr: float, radius_factor: float, use_grid: bool, label: int,
                    out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray, gbox: np.ndarray,
                    gscore: np.ndarray, scratch: Scratch) -> int:
    """Greedy NMS of one label group, members ``gbox[:n]`` with scores ``gscore[:n]`` (``n = ge - gs``); writes
    the kept boxes from slot ``o`` in selection order, returns the next slot. A box is kept unless a kept box has
    IoU with it ``> iou_thr`` (the library keeps ``ovr <= thr``).

    As the library, forward: each kept box marks the boxes it suppresses. Every member is filed in a grid over
    the centres (one cell when the bound is too loose or the group small), so the candidates of a kept box are
    the members in the cells of its window (pipeline.fusion.grid's bound, in the kept box's own size) -- a few
    contiguous runs of slots, tested eight at a time (:func:`~pipeline.fusion.vector_hits.suppress8`). Members
    already decided are tested too (a mark on them is never read): cheaper than taking them out.

    The order. The members are counted into about ``n / NMS_BUCKET_SIZE`` buckets of their scores
    (:func:`_bucket_by_key`), and the buckets taken from the highest: a bucket's members not suppressed yet are
    sorted (stable, ascending) and taken from the last -- the order of a stable ascending sort of all the scores
    read backwards (ties: the later box first), without sorting the members suppressed before their turn (three of
    four in an agreeing ensemble; a full radix sort took about a sixth of the drop-in's time at 40 sets x 100 boxes)."""
    ints = scratch.ints
    by_score = ints[IntRow.BY_SCORE]
    slot_of = ints[IntRow.SLOT_OF]
    dead = ints[IntRow.REMOVED].view(np.uint8)  # per slot: 1 once a kept box suppresses its member
    n = ge - gs
    keys = ints[IntRow.SORT_KEY]
    float_sort_keys(gscore, n, keys)
    bucket_start = scratch.cell_count  # free in NMS: its grid needs only cell_start
    n_buckets = _bucket_by_key(keys, n, by_score, ints[IntRow.SORT_KEY_B], bucket_start)
    n_cells = 1
    if use_grid and n >= GRID_MIN_BOXES:
        n_cells = cells_per_axis(radius_factor * _size_sum(gbox, n) / (2.0 * n), n)
    else:
        radius_factor = np.inf  # one cell: every member is a candidate
    _file_members(n_cells, gbox, n, scratch)
    for s in range(n):
        dead[s] = 0
    live = ints[IntRow.SORT_KEY_A]
    for bucket in range(n_buckets - 1, -1, -1):  # score descending
        k = 0
        for t in range(bucket_start[bucket], bucket_start[bucket + 1]):  # members suppressed already need no order
            q = by_score[t]
            live[k] = q
            k += dead[slot_of[q]] == 0
        if k == 0:
            continue
        if k > 1:
            _sort_ids_by_key(live, k, keys, ints[IntRow.AT_POS], ints[IntRow.POS_OF], ints[IntRow.SORT_KEY_B],
                            ints[IntRow.SORT_INDEX_B], ints[IntRow.LIST], scratch.radix_hist)
        o = _keep_in_order(live, k, o, iou_thr, radius_factor, n_cells, label, out_box, out_score, out_label, gbox,
                           gscore, scratch)
    return o


@numba.njit(inline="always", **NJIT_OPTIONS)
def _keep_in_order(live: np.ndarray, k: int, o: int, iou_thr: float, radius_factor: float, n_cells: int, label: int,
                   out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray, gbox: np.ndarray,
                   gscore: np.ndarray, scratch: Scratch) -> int:
    """Members ``live[k-1], .., live[0]`` in turn (score descending; ties: the later box first): each one not
    suppressed yet is kept (written from slot ``o``) and marks the members it suppresses. Returns the next slot."""
    slot_of = scratch.ints[IntRow.SLOT_OF]
    dead = scratch.ints[IntRow.REMOVED].view(np.uint8)
    cell_start = scratch.cell_start
    slots = scratch.soft_slots
    for r in range(k - 1, -1, -1):
        q = live[r]
        if dead[slot_of[q]]:
            continue
        bx1 = gbox[q, 0]
        by1 = gbox[q, 1]
        bx2 = gbox[q, 2]
        by2 = gbox[q, 3]
        gx0, gx1, gy0, gy1 = window_cells(bx1, by1, bx2, by2, (bx2 - bx1) * radius_factor,
                                          (by2 - by1) * radius_factor, n_cells)
        for gy in range(gy0, gy1 + 1):
            lo = cell_start[gy * n_cells + gx0]
            # whole multiples of SLOT_PAD: no scalar remainder loop. The slots past the run hold other members (or
            # padding, flagged in bytes past n that nothing reads): marking those with IoU > iou_thr is what NMS
            # does anyway (a mark on a member already decided is never read)
            hi = lo + (cell_start[gy * n_cells + gx1 + 1] - lo + SLOT_PAD - 1) // SLOT_PAD * SLOT_PAD
            _suppress_run(lo, hi, bx1, by1, bx2, by2, iou_thr, slots[0], slots[1], slots[2], slots[3], dead)
        out_box[o, 0] = bx1
        out_box[o, 1] = by1
        out_box[o, 2] = bx2
        out_box[o, 3] = by2
        out_score[o] = gscore[q]
        out_label[o] = label
        o += 1
    return o


@numba.njit(**NJIT_NO_REFCOUNT)
def _bucket_by_key(keys: np.ndarray, n: int, order: np.ndarray, bucket_of: np.ndarray, start: np.ndarray) -> int:
    """``order[:n]``: members ``0..n-1`` by bucket of their sort key (``(key - smallest) >> shift``, unsigned, so
    the buckets follow the keys' order), each bucket in member order; ``start[b] .. start[b + 1]``: bucket ``b``'s
    range. About ``n / NMS_BUCKET_SIZE`` buckets (a power of two, at most ``NMS_BUCKETS_MAX``): NMS sorts a bucket
    only when its turn comes, and only its members not suppressed by then. Returns the number of buckets."""
    lo = numba.uint64(keys[0])
    hi = lo
    for q in range(1, n):
        u = numba.uint64(keys[q])
        lo = min(lo, u)
        hi = max(hi, u)
    cap = numba.uint64(NMS_BUCKETS_MIN)
    while cap * NMS_BUCKET_SIZE < n and cap < NMS_BUCKETS_MAX:
        cap *= numba.uint64(2)
    shift = numba.uint64(0)
    while ((hi - lo) >> shift) >= cap:
        shift += numba.uint64(1)
    n_buckets = numba.int64((hi - lo) >> shift) + 1
    for b in range(n_buckets + 1):
        start[b] = 0
    for q in range(n):
        b = numba.int64((numba.uint64(keys[q]) - lo) >> shift)
        bucket_of[q] = b
        start[b + 1] += 1
    for b in range(n_buckets):
        start[b + 1] += start[b]
    for q in range(n):  # each bucket's cursor: its start moves to its end
        b = bucket_of[q]
        order[start[b]] = q
        start[b] += 1
    for b in range(n_buckets, 0, -1):  # back to each bucket's start
        start[b] = start[b - 1]
    start[0] = 0
    return n_buckets


@numba.njit(inline="always", **NJIT_OPTIONS)
def _sort_ids_by_key(ids: np.ndarray, k: int, keys: np.ndarray, sub_keys: np.ndarray, perm: np.ndarray,
                    ka: np.ndarray, kb: np.ndarray, ib: np.ndarray, hist: np.ndarray) -> None:
    """Sort ``ids[:k]`` stably by ``keys[ids[t]]`` ascending (unsigned bit order, see
    :func:`~pipeline.fusion.primitives.float_sort_keys`): an insertion sort up to ``SHORT_BUCKET`` ids, else
    :func:`~pipeline.fusion.primitives.radix_argsort` of their keys (``sub_keys``, ``perm``, ``ka``, ``kb``,
    ``ib``: scratch of length >= k; ``hist``: ``RADIX_HIST_SIZE``)."""
    if k <= SHORT_BUCKET:
        for a in range(1, k):
            v = ids[a]
            key = numba.uint64(keys[v])
            b = a - 1
            while b >= 0 and numba.uint64(keys[ids[b]]) > key:
                ids[b + 1] = ids[b]
                b -= 1
            ids[b + 1] = v
        return
    for t in range(k):
        sub_keys[t] = keys[ids[t]]
    radix_argsort(sub_keys, k, perm, ka, kb, ib, hist)
    for t in range(k):
        ka[t] = ids[perm[t]]
    for t in range(k):
        ids[t] = ka[t]


@numba.njit(inline="always", **NJIT_OPTIONS)
def _size_sum(gbox: np.ndarray, n: int) -> float:
    """The sum of the ``n`` boxes' widths and heights, for the grid's cell size only: four running sums over the
    flat coordinates, so that the additions do not wait on each other."""
    flat = gbox.reshape(-1)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for q in range(0, n - 3, 4):
        s0 += (flat[4 * q + 2] - flat[4 * q]) + (flat[4 * q + 3] - flat[4 * q + 1])
        s1 += (flat[4 * q + 6] - flat[4 * q + 4]) + (flat[4 * q + 7] - flat[4 * q + 5])
        s2 += (flat[4 * q + 10] - flat[4 * q + 8]) + (flat[4 * q + 11] - flat[4 * q + 9])
        s3 += (flat[4 * q + 14] - flat[4 * q + 12]) + (flat[4 * q + 15] - flat[4 * q + 13])
    for q in range(n - n % 4, n):
        s0 += (flat[4 * q + 2] - flat[4 * q]) + (flat[4 * q + 3] - flat[4 * q + 1])
    return (s0 + s1) + (s2 + s3)


@numba.njit(**NJIT_NO_REFCOUNT)
def _file_members(n_cells: int, gbox: np.ndarray, n: int, scratch: Scratch) -> None:
    """NMS's grid: members ``0..n-1`` filed by centre cell in member order (hard NMS needs no order within a cell),
    no room between cells: ``slot_of`` and ``soft_slots``. The cells come from a branch-free loop (so that it can
    vectorise), the slots from one counting pass and one scatter."""
    ints = scratch.ints
    cell_of = ints[IntRow.CELL_OF]
    slot_of = ints[IntRow.SLOT_OF]
    next_slot = scratch.cell_start
    slots = scratch.soft_slots
    g = float(n_cells)
    top = float(n_cells - 1)
    flat = gbox.reshape(-1)  # flat coordinates: the loop vectorises (two-dimensional indexing did not)
    for q in range(n):
        cx = int(min(max((flat[4 * q] + flat[4 * q + 2]) * 0.5 * g, 0.0), top))
        cy = int(min(max((flat[4 * q + 1] + flat[4 * q + 3]) * 0.5 * g, 0.0), top))
        cell_of[q] = cy * n_cells + cx
    n_all = n_cells * n_cells
    for c in range(n_all + 1):
        next_slot[c] = 0
    for q in range(n):
        next_slot[cell_of[q] + 1] += 1
    for c in range(n_all):
        next_slot[c + 1] += next_slot[c]
    for q in range(n):
        c = cell_of[q]
        s = next_slot[c]
        next_slot[c] = s + 1
        slot_of[q] = s
        for d in range(4):
            slots[d, s] = gbox[q, d]
    for c in range(n_all, 0, -1):  # back to each cell's first slot
        next_slot[c] = next_slot[c - 1]
    next_slot[0] = 0


@numba.njit(inline="always", **NJIT_OPTIONS)
def _slot_iou(bx1: float, by1: float, bx2: float, by2: float, area_b: float, x1: float, y1: float, x2: float,
              y2: float) -> float:
    """IoU of box B (area ``area_b``) with box ``x1, y1, x2, y2``: the library's ``ovr``, B's area first (as
    ``areas[i] + areas[order[1:]] - inter``). Conditional expressions, not ``max``/``min`` (the same values
    without NaN), so that the loops calling it vectorise; an emptied slot (x1 = y1 = inf, x2 = y2 = -inf) gets 0,
    and a real box never NaN (zero areas were dropped)."""
    w = (bx2 if bx2 < x2 else x2) - (bx1 if bx1 > x1 else x1)
    h = (by2 if by2 < y2 else y2) - (by1 if by1 > y1 else y1)
    inter = (w if w > 0.0 else 0.0) * (h if h > 0.0 else 0.0)
    return inter / ((area_b + (x2 - x1) * (y2 - y1)) - inter)


@numba.njit(inline="always", **NJIT_OPTIONS)
def _suppress_run(lo: int, hi: int, bx1: float, by1: float, bx2: float, by2: float, iou_thr: float,
                  sx1: np.ndarray, sy1: np.ndarray, sx2: np.ndarray, sy2: np.ndarray, dead: np.ndarray) -> None:
    """Mark slots ``lo..hi-1`` (``hi - lo`` a multiple of ``SLOT_PAD``) whose box has IoU ``> iou_thr`` with the
    kept box B, eight at a time (:func:`~pipeline.fusion.vector_hits.suppress8`)."""
    for s in range(lo, hi, SLOT_PAD):
        suppress8(sx1, sy1, sx2, sy2, s, bx1, by1, bx2, by2, iou_thr, dead)


@numba.njit(**NJIT_NO_REFCOUNT)
def _soft_nms_group(gs: int, ge: int, o: int, method: int, iou_thr: float, sigma: float, thresh: float,
                    float32_scores: bool, label: int, out_box: np.ndarray, out_score: np.ndarray,
                    out_label: np.ndarray, out_selection: np.ndarray, scratch: Scratch) -> int:
    """The library's ``cpu_soft_nms_float`` on one label group (label ``label``); writes the boxes whose score at
    selection is ``> thresh`` from slot ``o``, in selection order, with their undecayed scores (``out_score``) and
    their scores at selection (``out_selection``); returns the next slot.

    The library's array. ``score[p]`` is the score at the library's position ``p`` (``AT_POS`` / ``POS_OF`` map
    positions and members, swapped as the library swaps rows); a selected box counts as -inf, so step ``i``'s
    "leftmost maximum of positions ``i..``" (``np.max`` / ``np.argmax``, ties included) is the leftmost maximum
    of the whole array, and the library's swap puts it at position ``i``.

    Dead boxes. With ``thresh >= 0`` a box whose score is ``<= thresh`` can never be returned (weights are at most
    1, so scores only shrink towards 0) and never decays a box that can: the library selects it only after every
    box above ``thresh``. Such boxes count as -inf (which compares below every live score exactly as their true
    score does) and leave the grid, and the loop stops once the maximum is dead.

    Lazy block maxima. The positions are cut into blocks of ``bs`` and the blocks into groups of ``gsz`` (about
    ``2 cbrt(n)`` and ``cbrt(n) / 2``); ``bound[b]`` is at least the maximum of block ``b``, ``group_bound[g]``
    at least every bound of group ``g``. A decay only lowers a score, so bounds are left alone by decays; a step
    finds the leftmost group of the largest group bound, in it the leftmost block of that bound, and rescans the
    block: if its maximum is the bound, that is the leftmost maximum of the array (every block and group to its
    left has a smaller bound), else the stale bound is lowered, its group's bound recomputed, and the search
    repeats. A score that grows (a negative one, decayed towards 0 when ``thresh < 0``) raises its block's and
    group's bounds at once.
    """
    gbox = scratch.boxes[BoxRow.GROUP]
    floats = scratch.floats
    ints = scratch.ints
    gscore = floats[FloatRow.GROUP_SCORE]
    final = floats[FloatRow.FINAL]
    cand_iou = floats[FloatRow.CAND_IOU]
    at_pos = ints[IntRow.AT_POS]
    pos_of = ints[IntRow.POS_OF]
    slot_pos = ints[IntRow.SLOT_POS]
    selected = ints[IntRow.SELECTED]
    removed = ints[IntRow.REMOVED]
    cell_of = ints[IntRow.CELL_OF]
    slot_of = ints[IntRow.SLOT_OF]
    slots = scratch.soft_slots
    prune = thresh >= 0.0
    # linear decay acts only above iou_thr: the IoU bound of pipeline.fusion.grid narrows the search (0: overlap)
    window_factor = search_radius_factor(iou_thr) if method == LINEAR and iou_thr >= GRID_MIN_THR else 0.0
    decay_above = iou_thr if method == LINEAR else 0.0  # an IoU at or below this leaves the score as it is
    vector_weights = method == GAUSSIAN and covers_gaussian_weights(sigma)
    n = ge - gs
    bs, gsz, nb, ng = _start_positions(n, prune, thresh, scratch)
    score, bound, group_bound = _position_arrays(scratch.pos_score, bs, gsz, nb, ng)
    n_cells, fw, fh, n_big = _file_soft_group(n, scratch)
    n_filed = 0
    for q in range(n):
        n_filed += cell_of[q] != -1
    n_room = n_filed  # grid slots, live or emptied
    n_sel = 0
    for i in range(n):
        top, p = _leftmost_max(score, bound, group_bound, bs, gsz)
        if p == -1:
            break  # every remaining box is dead: none can be returned
        if p != i:  # the library swaps the maximum into position i (the box there keeps its score, <= top)
            qi = at_pos[i]
            bp = at_pos[p]
            at_pos[i] = bp
            at_pos[p] = qi
            pos_of[bp] = i
            pos_of[qi] = p
            if cell_of[qi] != -1:
                slot_pos[slot_of[qi]] = p
            score[p] = score[i]
        q = at_pos[i]
        selected[n_sel] = q
        final[n_sel] = top
        n_sel += 1
        removed[q] = 1
        score[i] = -np.inf
        bp = p // bs  # the selected box's block (and its group) lost their maximum: refresh them now
        bound[bp] = _block_max(score, bp * bs, bp * bs + bs)
        gp = bp // gsz
        group_bound[gp] = _block_max(bound, gp * gsz, gp * gsz + gsz)
        n_filed -= _soft_grid_remove(q, cell_of, slot_of, slots)
        if n_cells > 0 and 2 * n_filed < n_room and n_room > SOFT_REFILE_MIN:
            n_room = _refile(n, n_cells, scratch)  # the scans cover emptied slots too: drop them
        nc = _overlapping(q, n_cells, fw, fh, n_big, window_factor, decay_above, scratch)
        if vector_weights and prune:  # each weight computed in the registers that decay its score
            n_filed -= _gaussian_decays(nc, sigma, thresh, float32_scores, score, scratch)
        else:
            _decay_weights(nc, method, sigma, vector_weights, cand_iou)
            if float32_scores:  # two loops, so that the common one carries no float32 rounding
                n_filed -= _decay(nc, True, prune, thresh, score, bound, group_bound, bs, gsz, scratch)
            else:
                n_filed -= _decay(nc, False, prune, thresh, score, bound, group_bound, bs, gsz, scratch)
    for k in range(n_sel):
        if final[k] > thresh:
            q = selected[k]
            for c in range(4):
                out_box[o, c] = gbox[q, c]
            out_score[o] = gscore[q]
            out_selection[o] = final[k]
            out_label[o] = label
            o += 1
    return o


@numba.njit(**NJIT_NO_REFCOUNT)
def _decay_weights(nc: int, method: int, sigma: float, vector_weights: bool, w: np.ndarray) -> None:
    """``w[:nc]``, the candidates' IoUs, become their weights: ``1 - iou`` (linear; only IoUs above ``iou_thr``
    are candidates) or ``exp(-(iou * iou) / sigma)``, in one vectorised loop when ``vector_weights``
    (:mod:`pipeline.fusion.vector_exp`), else glibc's ``exp`` per candidate."""
    if vector_weights:
        for t in range(numba.uint64(0), numba.uint64(nc)):
            w[t] = exp_vectorisable(-(w[t] * w[t]) / sigma)
    elif method == LINEAR:
        for t in range(numba.uint64(0), numba.uint64(nc)):
            w[t] = 1.0 - w[t]
    else:
        for t in range(nc):
            w[t] = math.exp(-(w[t] * w[t]) / sigma)


@numba.njit(**NJIT_NO_REFCOUNT)
def _gaussian_decays(nc: int, sigma: float, thresh: float, float32_scores: bool, score: np.ndarray,
                     scratch: Scratch) -> int:
    """:func:`_decay_weights` then :func:`_decay` of a gaussian step with ``prune``, eight candidates at a time in
    one pass (:func:`~pipeline.fusion.vector_hits.gaussian_decay8`: the weights never leave the registers; the
    same bits as the two passes). Returns how many left the grid."""
    cand = scratch.ints[IntRow.CAND]
    cand_iou = scratch.floats[FloatRow.CAND_IOU]
    n_out = 0
    for t in range(0, nc, LANES):
        n_out += _drop_died(gaussian_decay8(score, cand, cand_iou, t, nc, sigma, thresh, float32_scores), t, scratch)
    return n_out


@numba.njit(inline="always", **NJIT_OPTIONS)
def _drop_died(died: int, t: int, scratch: Scratch) -> int:
    """The candidates ``t + b`` whose bit ``b`` is set in ``died`` (their score fell to ``thresh``): ``REMOVED``,
    out of the grid. Returns how many left the grid."""
    n_out = 0
    if died != 0:
        cand = scratch.ints[IntRow.CAND]
        at_pos = scratch.ints[IntRow.AT_POS]
        for b in range(LANES):
            if (died >> b) & 1:
                j = at_pos[cand[t + b]]
                scratch.ints[IntRow.REMOVED, j] = 1
                n_out += _soft_grid_remove(j, scratch.ints[IntRow.CELL_OF], scratch.ints[IntRow.SLOT_OF],
                                           scratch.soft_slots)
    return n_out


@numba.njit(inline="always", **NJIT_OPTIONS)
def _decay(nc: int, float32_scores: bool, prune: bool, thresh: float, score: np.ndarray, bound: np.ndarray,
           group_bound: np.ndarray, bs: int, gsz: int, scratch: Scratch) -> int:
    """Each candidate's score (``CAND``: its library position) times its weight (``CAND_IOU``), as the library
    computes it (``weight * score``, rounded to float32 when its array is float32); a score that falls to
    ``thresh`` or below (``prune``) dies: -inf, ``REMOVED``, out of the grid. Returns how many left the grid.
    With ``prune``, eight candidates at a time (:func:`~pipeline.fusion.vector_hits.decay8`)."""
    cand = scratch.ints[IntRow.CAND]
    weight = scratch.floats[FloatRow.CAND_IOU]
    at_pos = scratch.ints[IntRow.AT_POS]
    removed = scratch.ints[IntRow.REMOVED]
    cell_of = scratch.ints[IntRow.CELL_OF]
    slot_of = scratch.ints[IntRow.SLOT_OF]
    n_out = 0
    if prune:  # every live score is above thresh >= 0: none grows, so no bound moves
        for t in range(0, nc, LANES):
            n_out += _drop_died(decay8(score, cand, weight, t, nc, thresh, float32_scores), t, scratch)
        return n_out
    for t in range(nc):
        pj = cand[t]
        old = score[pj]
        sj = weight[t] * old
        if float32_scores:
            sj = np.float64(np.float32(sj))
        if prune and not (sj > thresh):
            j = at_pos[pj]
            removed[j] = 1
            score[pj] = -np.inf
            n_out += _soft_grid_remove(j, cell_of, slot_of, scratch.soft_slots)
        else:
            score[pj] = sj
            if sj > old:  # a negative score grows towards 0: its block's and group's bounds grow with it
                bound[pj // bs] = max(bound[pj // bs], sj)
                group_bound[pj // (bs * gsz)] = max(group_bound[pj // (bs * gsz)], sj)
    return n_out


@numba.njit(**NJIT_NO_REFCOUNT)
def _start_positions(n: int, prune: bool, thresh: float, scratch: Scratch) -> tuple[int, int, int, int]:
    """The library's array before step 0: member ``q`` at position ``q``, its score (-inf and ``REMOVED`` when
    ``prune`` and it is dead already), -inf up to whole blocks, then the bounds: each block's maximum, -inf for
    the blocks that pad the last group, and each group's maximum. Returns :func:`block_layout`."""
    gscore = scratch.floats[FloatRow.GROUP_SCORE]
    at_pos = scratch.ints[IntRow.AT_POS]
    pos_of = scratch.ints[IntRow.POS_OF]
    removed = scratch.ints[IntRow.REMOVED]
    bs, gsz, nb, ng = block_layout(n)
    score, bound, group_bound = _position_arrays(scratch.pos_score, bs, gsz, nb, ng)
    for q in range(n):
        at_pos[q] = q
        pos_of[q] = q
        live = not prune or gscore[q] > thresh
        removed[q] = 0 if live else 1
        score[q] = gscore[q] if live else -np.inf
    for p in range(n, nb * bs):
        score[p] = -np.inf
    for b in range(len(bound)):
        bound[b] = _block_max(score, b * bs, b * bs + bs) if b < nb else -np.inf
    for g in range(len(group_bound)):
        group_bound[g] = _block_max(bound, g * gsz, g * gsz + gsz)
    return bs, gsz, nb, ng


@numba.njit(**NJIT_NO_REFCOUNT)
def block_layout(n: int) -> tuple[int, int, int, int]:
    """``(bs, gsz, nb, ng)``: ``n`` positions in ``nb`` blocks of ``bs``, the blocks in ``ng`` groups of ``gsz``
    (``bs`` and ``gsz`` multiples of 8, as the scans take 4 at a time; about ``2 cbrt(n)`` and ``cbrt(n) / 2``),
    ``ng`` a multiple of 4. :func:`_position_arrays` cuts ``Scratch.pos_score`` accordingly."""
    bs = 8
    while bs * bs * bs < 8 * n:  # bs about 2 cbrt(n), gsz about cbrt(n) / 2: the fastest at 4,000 (wbf.py)
        bs += 8
    nb = (n + bs - 1) // bs
    gsz = 8
    while 8 * gsz * gsz * gsz < n:
        gsz += 8
    ng = ((nb + gsz - 1) // gsz + 3) // 4 * 4
    return bs, gsz, nb, ng


@numba.njit(inline="always", **NJIT_OPTIONS)
def _position_arrays(pos_score: np.ndarray, bs: int, gsz: int, nb: int,
                     ng: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(score, bound, group_bound)``: ``nb * bs`` scores, ``ng * gsz`` block bounds, ``ng`` group bounds."""
    nbound = ng * gsz
    return (pos_score[:nb * bs], pos_score[nb * bs:nb * bs + nbound],
            pos_score[nb * bs + nbound:nb * bs + nbound + ng])


@numba.njit(inline="always", **NJIT_OPTIONS)
def _leftmost_max(score: np.ndarray, bound: np.ndarray, group_bound: np.ndarray, bs: int,
                  gsz: int) -> tuple[float, int]:
    """``(value, position)`` of the leftmost maximum of ``score`` (blocks of ``bs`` in groups of ``gsz`` blocks,
    each ``bound`` / ``group_bound`` at least the maximum below it); ``(-inf, -1)`` when every score is -inf.
    Rescans the leftmost group of the largest group bound and its leftmost block of that bound, lowering stale
    bounds, until a block's maximum is its group's bound."""
    while True:
        top, g = _block_argmax(group_bound, 0, len(group_bound))
        if top == -np.inf:
            return top, -1
        g_max, b = _block_argmax(bound, g * gsz, g * gsz + gsz)
        if g_max != top:
            group_bound[g] = g_max
            continue
        m, p = _block_argmax(score, b * bs, b * bs + bs)
        if m == top:
            return top, p
        bound[b] = m  # stale: lowered, and its group's bound with it (else the next pass finds that stale too)
        group_bound[g] = _block_max(bound, g * gsz, g * gsz + gsz)


@numba.njit(inline="always", **NJIT_OPTIONS)
def _block_argmax(a: np.ndarray, lo: int, hi: int) -> tuple[float, int]:
    """``(maximum, its leftmost index)`` of ``a[lo:hi]`` (``hi - lo`` a positive multiple of 4, no NaN), four
    running maxima at a time, without a data-dependent branch."""
    m0 = a[lo]
    m1 = a[lo + 1]
    m2 = a[lo + 2]
    m3 = a[lo + 3]
    i0 = lo
    i1 = lo + 1
    i2 = lo + 2
    i3 = lo + 3
    for k in range(lo + 4, hi, 4):  # strictly greater: each lane keeps its leftmost maximum
        x0 = a[k]
        x1 = a[k + 1]
        x2 = a[k + 2]
        x3 = a[k + 3]
        i0 = k if x0 > m0 else i0
        i1 = k + 1 if x1 > m1 else i1
        i2 = k + 2 if x2 > m2 else i2
        i3 = k + 3 if x3 > m3 else i3
        m0 = x0 if x0 > m0 else m0
        m1 = x1 if x1 > m1 else m1
        m2 = x2 if x2 > m2 else m2
        m3 = x3 if x3 > m3 else m3
    i0 = i1 if m1 > m0 or (m1 == m0 and i1 < i0) else i0
    m0 = m1 if m1 > m0 else m0
    i2 = i3 if m3 > m2 or (m3 == m2 and i3 < i2) else i2
    m2 = m3 if m3 > m2 else m2
    i0 = i2 if m2 > m0 or (m2 == m0 and i2 < i0) else i0
    return (m2 if m2 > m0 else m0), i0


@numba.njit(inline="always", **NJIT_OPTIONS)
def _block_max(a: np.ndarray, lo: int, hi: int) -> float:
    """Maximum of ``a[lo:hi]`` (``hi - lo`` a positive multiple of 4, no NaN), four running maxima at a time."""
    m0 = a[lo]
    m1 = a[lo + 1]
    m2 = a[lo + 2]
    m3 = a[lo + 3]
    for k in range(lo + 4, hi, 4):
        x0 = a[k]
        x1 = a[k + 1]
        x2 = a[k + 2]
        x3 = a[k + 3]
        m0 = x0 if x0 > m0 else m0
        m1 = x1 if x1 > m1 else m1
        m2 = x2 if x2 > m2 else m2
        m3 = x3 if x3 > m3 else m3
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    return m2 if m2 > m0 else m0


@numba.njit(**NJIT_NO_REFCOUNT)
def _file_soft_group(n: int, scratch: Scratch) -> tuple[int, float, float, int]:
    """File the group's live members for the overlap search: members up to ``SOFT_LARGE`` times the mean width and
    height in the grid, larger ones in ``LIST``. Returns ``(cells per axis (0: no grid, every member in LIST),
    the largest filed width, height, number of large members)``."""
    gbox = scratch.boxes[BoxRow.GROUP]
    ints = scratch.ints
    cell_of = ints[IntRow.CELL_OF]
    removed = ints[IntRow.REMOVED]
    big = ints[IntRow.LIST]
    filed = ints[IntRow.CAND]  # free until the selection loop
    n_cells = 0
    lim_w = 0.0
    lim_h = 0.0
    if n >= GRID_MIN_BOXES:
        sw = 0.0
        sh = 0.0
        for q in range(n):
            sw += gbox[q, 2] - gbox[q, 0]
            sh += gbox[q, 3] - gbox[q, 1]
        lim_w = SOFT_LARGE * sw / n
        lim_h = SOFT_LARGE * sh / n
        n_cells = cells_per_axis(SOFT_CELL_FACTOR * max(lim_w, lim_h), n)
    n_big = 0
    n_filed = 0
    fw = 0.0
    fh = 0.0
    for q in range(n):
        cell_of[q] = -1
        if removed[q] == 1:
            continue
        w = gbox[q, 2] - gbox[q, 0]
        h = gbox[q, 3] - gbox[q, 1]
        if n_cells == 0 or w > lim_w or h > lim_h:
            big[n_big] = q
            n_big += 1
        else:
            filed[n_filed] = q
            n_filed += 1
            fw = max(fw, w)
            fh = max(fh, h)
    if n_cells > 0:
        _soft_grid_build(n_cells, filed, n_filed, scratch)
    return n_cells, fw, fh, n_big


# ----------------------------------------------------------------------------------------------------------------
# Soft-NMS's grid: members filed by centre cell (pipeline.fusion.grid's rows, SOFT_COLUMNS times as many columns)
# with no room between cells, so the cells of one row of a search window are one contiguous run of slots, scanned
# in a single loop. A member taken out leaves its slot holding a box that overlaps nothing (x1 = y1 = inf, x2 = y2 =
# -inf); once fewer than half the slots are live, the emptied slots are dropped (:func:`_refile`: the live ones
# moved down in place, which is the layout filing them again gives), so scans stay proportional to them.
#   cell_of[j]: member j's cell (-1: not in the grid); slot_of[j]: its slot; slot_pos[s]: the library position of
#   the member in slot s (kept as the library swaps, so a decay reads its score with one load less);
#   soft_slots[:, s]: its x1, y1, x2, y2; cell_start[c] .. cell_start[c + 1]: the slots of cell c.
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(**NJIT_NO_REFCOUNT)
def _soft_grid_build(n_cells: int, ids: np.ndarray, k: int, scratch: Scratch) -> None:
    """File members ``ids[:k]`` (any order) of the gathered group in ``n_cells`` rows of cells."""
    _file_slots(n_cells, scratch.boxes[BoxRow.GROUP], ids, k, scratch)


@numba.njit(**NJIT_NO_REFCOUNT)
def _file_slots(n_cells: int, gbox: np.ndarray, ids: np.ndarray, k: int, scratch: Scratch) -> None:
    """File members ``ids[:k]`` (rows of ``gbox``, any order) in ``n_cells`` rows x :func:`_soft_columns` columns
    of cells, each cell in ``ids`` order, with no room between cells: ``cell_of``, ``slot_of``, ``slot_pos``,
    ``soft_slots``."""
    ints = scratch.ints
    cell_of = ints[IntRow.CELL_OF]
    slot_of = ints[IntRow.SLOT_OF]
    slot_pos = ints[IntRow.SLOT_POS]
    pos_of = ints[IntRow.POS_OF]
    cell_start = scratch.cell_start
    fill = scratch.cell_count
    slots = scratch.soft_slots
    grid_layout(n_cells, _soft_columns(n_cells), gbox, ids, k, cell_of, cell_start, fill)
    for r in range(k):
        j = ids[r]
        c = cell_of[j]
        s = cell_start[c] + fill[c]
        fill[c] += 1
        slot_of[j] = s
        slot_pos[s] = pos_of[j]
        for d in range(4):
            slots[d, s] = gbox[j, d]


@numba.njit(inline="always", **NJIT_OPTIONS)
def _soft_columns(n_cells: int) -> int:
    """Columns of soft-NMS's grid of ``n_cells`` rows (the grid's cell table holds ``GRID_MAX ** 2`` cells)."""
    return min(SOFT_COLUMNS * n_cells, GRID_MAX)


@numba.njit(inline="always", **NJIT_OPTIONS)
def _soft_grid_remove(j: int, cell_of: np.ndarray, slot_of: np.ndarray, slots: np.ndarray) -> int:
    """Take member ``j`` out of the grid (its slot then overlaps nothing); returns 1 if it was filed, else 0."""
    if cell_of[j] == -1:
        return 0
    cell_of[j] = -1
    s = slot_of[j]
    slots[0, s] = np.inf
    slots[1, s] = np.inf
    slots[2, s] = -np.inf
    slots[3, s] = -np.inf
    return 1


@numba.njit(**NJIT_NO_REFCOUNT)
def _refile(n: int, n_cells: int, scratch: Scratch) -> int:
    """Drop the emptied slots: each cell's live slots moved down in place, in their order (the layout filing the
    live members again would give, without recomputing a cell or scattering a box: a sequential pass), with
    ``cell_start``, ``slot_of`` and ``slot_pos`` following. Returns the number of slots left."""
    ints = scratch.ints
    slot_of = ints[IntRow.SLOT_OF]
    slot_pos = ints[IntRow.SLOT_POS]
    at_pos = ints[IntRow.AT_POS]
    cell_start = scratch.cell_start
    sx1 = scratch.soft_slots[0]
    sy1 = scratch.soft_slots[1]
    sx2 = scratch.soft_slots[2]
    sy2 = scratch.soft_slots[3]
    n_all = n_cells * _soft_columns(n_cells)
    w = 0
    for c in range(n_all):
        lo = cell_start[c]
        hi = cell_start[c + 1]
        cell_start[c] = w
        for s in range(lo, hi):  # without a branch on liveness (half the slots are emptied: unpredictable)
            live = sx1[s] != np.inf  # emptied by _soft_grid_remove; a live box's x1 is at most 1
            p = slot_pos[s]
            sx1[w] = sx1[s]
            sy1[w] = sy1[s]
            sx2[w] = sx2[s]
            sy2[w] = sy2[s]
            slot_pos[w] = p
            slot_of[at_pos[p] if live else n] = w  # an emptied slot's position is stale: its write goes to n
            w += live
    cell_start[n_all] = w
    return w


@numba.njit(**NJIT_NO_REFCOUNT)
def _overlapping(q: int, n_cells: int, fw: float, fh: float, n_big: int, radius_factor: float, above: float,
                 scratch: Scratch) -> int:
    """``CAND[:k]`` and ``CAND_IOU[:k]``: the library positions of the remaining live members whose IoU with
    member ``q`` is above ``above`` (the decay acts on no other: linear only above ``iou_thr``; gaussian's weight is
    exactly 1 at IoU 0), and that IoU -- the library's, ``q``'s area first. Filed members are looked up in a window
    around ``q``'s centre: ``(w_q + fw) / 2`` (a positive intersection needs ``|dx| < (w_q + w_j) / 2``) or, when
    ``radius_factor > 0`` (linear decay), ``radius_factor * w_q``; large members are all checked. Returns ``k``."""
    gbox = scratch.boxes[BoxRow.GROUP]
    ints = scratch.ints
    cand = ints[IntRow.CAND]
    cand_iou = scratch.floats[FloatRow.CAND_IOU]
    slot_pos = ints[IntRow.SLOT_POS]
    pos_of = ints[IntRow.POS_OF]
    removed = ints[IntRow.REMOVED]
    big = ints[IntRow.LIST]
    cell_start = scratch.cell_start
    sx1 = scratch.soft_slots[0]
    sy1 = scratch.soft_slots[1]
    sx2 = scratch.soft_slots[2]
    sy2 = scratch.soft_slots[3]
    qx1 = gbox[q, 0]
    qy1 = gbox[q, 1]
    qx2 = gbox[q, 2]
    qy2 = gbox[q, 3]
    k = 0
    if n_cells > 0:
        if radius_factor > 0.0:
            rx = radius_factor * (qx2 - qx1)
            ry = radius_factor * (qy2 - qy1)
        else:
            rx = 0.5 * ((qx2 - qx1) + fw)
            ry = 0.5 * ((qy2 - qy1) + fh)
        n_cols = _soft_columns(n_cells)
        gx0, gx1, _, _ = window_cells(qx1, qy1, qx2, qy2, rx, ry, n_cols)
        _, _, gy0, gy1 = window_cells(qx1, qy1, qx2, qy2, rx, ry, n_cells)
        for gy in range(gy0, gy1 + 1):  # row by row, eight slots at a time (the last eight may reach past the
            lo = cell_start[gy * n_cols + gx0]  # run, into slots that are ignored)
            hi = cell_start[gy * n_cols + gx1 + 1]
            for s in range(lo, hi, SLOT_PAD):
                k = iou_hits8(sx1, sy1, sx2, sy2, slot_pos, s, hi, qx1, qy1, qx2, qy2, above, cand, cand_iou, k)
    for r in range(n_big):
        j = big[r]
        if (removed[j] == 0 and min(qx2, gbox[j, 2]) - max(qx1, gbox[j, 0]) > 0.0
                and min(qy2, gbox[j, 3]) - max(qy1, gbox[j, 1]) > 0.0):
            v = iou(qx1, qy1, qx2, qy2, gbox[j, 0], gbox[j, 1], gbox[j, 2], gbox[j, 3])
            if v > above:
                cand[k] = pos_of[j]
                cand_iou[k] = v
                k += 1
    return k
