"""Compiled stages of non-maximum weighted fusion; what each replicates of ensemble-boxes is in
:mod:`pipeline.fusion.nmw`.

:func:`fuse_image_range` fuses a range of images, one after the other:

1. :func:`~pipeline.fusion.rows.read_image` -- drop low scores, swap and clip coordinates, drop zero areas, weight
   the scores (by ``weight / max weight``);
2. :func:`_order_by_label` -- label groups in first-appearance order, boxes by weighted score descending;
3. :func:`_cluster_label_group` -- each box joins the cluster whose representative (its first, best-scored box)
   has the highest IoU with it, if ``> iou_thr``, else starts one; the representatives never move, so they are
   filed once in a grid over their centres, stored cell by cell (:mod:`pipeline.fusion.grid`); the library's
   float32 weighted box is accumulated as boxes join;
4. :func:`_emit_by_score` -- the fused boxes by their float32 score, descending.

:func:`fuse_image_range_levels` runs them once for several ``skip_box_thr`` at every weight equal
(:mod:`pipeline.fusion.levels`): each label group clustered in pieces (:func:`_cluster_boxes`), its clusters copied
out at the end of each higher threshold's prefix.

Work arrays: :class:`Scratch`, rows named by :class:`FloatRow` and :class:`IntRow`, passed as separate arguments.
"""
from __future__ import annotations

import threading
from enum import IntEnum, unique
from typing import NamedTuple

import numba
import numpy as np

from pipeline.fusion.grid import (CELL_BITS, GRID_MAX, GRID_MIN_BOXES, GRID_MIN_THR, ROW_WORDS, cells_per_axis,
                                  first_cell, grid_layout, mark_cell, occupied_in_word, search_radius_factor,
                                  window_cells)
from pipeline.fusion.levels import count_group_levels, place_group, sort_level_rows
from pipeline.fusion.primitives import (NJIT_OPTIONS, RADIX_HIST_SIZE, float_sort_keys, int_sort_keys, iou,
                                        may_exceed, overlap_union, radix_argsort, radix_argsort_top)
from pipeline.fusion.rows import read_image

# numba's cache cannot see changes to other files compiled in here: see pipeline.fusion.wbf_kernel.
COMPILED_AGAINST = {"grid.py": "4c31c531fd090b1c", "levels.py": "b9bb07e1d9a6fade",
                    "primitives.py": "5a867f87f2eb7faf", "rows.py": "d18c55d7d48eb07d"}


@unique
class FloatRow(IntEnum):
    """Rows of ``Scratch.floats`` (float64, ``(len(FloatRow), cap)``)."""

    KEPT_SCORE = 0  # per box: score * weight / max weight
    CONF = 1  # per cluster: the library's ``conf``, sum of score * IoU with the representative, float64
    FINAL_SCORE = 2  # per cluster: the representative's weighted score, rounded to float32


@unique
class IntRow(IntEnum):
    """Rows of ``Scratch.ints`` (int64, ``(len(IntRow), cap)``)."""

    KEPT_SET = 0
    KEPT_LABEL = 1
    BY_SCORE = 2  # stable ascending argsort by weighted score
    BY_LABEL = 3  # stable ascending argsort by label; then of the label groups by first appearance
    BY_GROUP = 4  # kept boxes by label group (first-appearance order), then weighted score descending
    GROUP_ID = 5
    GROUP_FIRST = 6
    GROUP_RANK = 7
    SORT_KEY = 8
    SORT_KEY_A = 9
    SORT_KEY_B = 10
    SORT_INDEX_B = 11
    REP = 12  # per cluster: its representative (kept box)
    CELL_OF = 13  # per kept box: the grid cell of its centre (pipeline.fusion.grid)
    SLOT_CLUSTER = 14  # per grid slot: the cluster whose representative is filed there
    CLUSTER_LABEL = 15


class Scratch(NamedTuple):
    """The kernel's work arrays for images of up to ``cap`` boxes."""

    kept: np.ndarray  # float64 (cap, 4): the image's boxes after the prefilter
    box_sums: np.ndarray  # float32 (cap, 4): per cluster, the library's float32 sums of weight * coordinate
    floats: np.ndarray  # float64 (len(FloatRow), cap)
    ints: np.ndarray  # int64 (len(IntRow), cap)
    group_start: np.ndarray  # int64 (cap + 1)
    slot_xy: np.ndarray  # float64 (cap, 4): per grid slot, the representative's box
    cell_start: np.ndarray  # int64 (GRID_MAX ** 2 + 1): first slot of each grid cell
    cell_count: np.ndarray  # int64 (GRID_MAX ** 2): representatives filed in each cell
    radix_hist: np.ndarray  # int64 (RADIX_HIST_SIZE)
    grid_rows: np.ndarray  # int64 (GRID_MAX * ROW_WORDS): which cells hold representatives (grid.mark_cell)


def allocate_scratch(cap: int) -> Scratch:
    """Uninitialised work arrays for images of up to ``cap`` boxes (the kernel writes before it reads)."""
    cap = max(int(cap), 1)
    return Scratch(np.empty((cap, 4)), np.empty((cap, 4), np.float32), np.empty((len(FloatRow), cap)),
                   np.empty((len(IntRow), cap), np.int64), np.empty(cap + 1, np.int64), np.empty((cap, 4)),
                   np.empty(GRID_MAX * GRID_MAX + 1, np.int64), np.empty(GRID_MAX * GRID_MAX, np.int64),
                   np.empty(RADIX_HIST_SIZE, np.int64), np.empty(GRID_MAX * ROW_WORDS, np.int64))


_THREAD_LOCAL = threading.local()


def thread_scratch(cap: int) -> Scratch:
    """This thread's cached :class:`Scratch` for ``cap`` boxes, grown by half when too small, never shrunk."""
    cached: Scratch | None = getattr(_THREAD_LOCAL, "scratch", None)
    if cached is not None and cached.ints.shape[1] >= cap:
        return cached
    if cached is not None:
        cap = max(cap, int(cached.ints.shape[1] * 1.5))
    _THREAD_LOCAL.scratch = allocate_scratch(cap)
    return _THREAD_LOCAL.scratch


@numba.njit(**NJIT_OPTIONS)
def fuse_image_range(img_lo: int, img_hi: int, seg_offs: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray,
                     seg_set: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                     score: np.ndarray, label: np.ndarray, width: np.ndarray, height: np.ndarray,
                     row_offs: np.ndarray, factor: np.ndarray, skip_thr: np.ndarray, iou_thr: float,
                     out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray, out_count: np.ndarray,
                     stats: np.ndarray, *scratch_blocks: np.ndarray) -> None:
    """Non-maximum weighted fusion of images ``img_lo..img_hi-1`` of a packed table; ``factor``: per set,
    ``weight / max weight``; ``skip_thr``: per set. Outputs of image ``i``: rows ``row_offs[i] : + out_count[i]``."""
    scratch = Scratch(*scratch_blocks)
    radius_factor = search_radius_factor(iou_thr)
    use_grid = iou_thr >= GRID_MIN_THR
    for img in range(img_lo, img_hi):
        m = read_image(img, seg_offs, seg_start, seg_len, seg_set, x1, y1, x2, y2, score, label, width, height,
                       skip_thr, factor, 1.0, scratch.kept, scratch.floats[FloatRow.KEPT_SCORE],
                       scratch.ints[IntRow.KEPT_SET], scratch.ints[IntRow.KEPT_LABEL], stats)
        if m == 0:
            out_count[img] = 0
            continue
        n_groups = _order_by_label(m, scratch)
        nc = np.int64(0)  # not the literal 0: numba would compile callees twice (see wbf_kernel)
        for g in range(n_groups):
            nc = _cluster_label_group(scratch.group_start[g], scratch.group_start[g + 1], nc, iou_thr,
                                      radius_factor, use_grid, scratch)
        out_count[img] = _emit_by_score(nc, row_offs[img], out_box, out_score, out_label, scratch)


@numba.njit(**NJIT_OPTIONS)
def fuse_image_range_levels(img_lo: int, img_hi: int, seg_offs: np.ndarray, seg_start: np.ndarray,
                            seg_len: np.ndarray, seg_set: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray,
                            y2: np.ndarray, score: np.ndarray, label: np.ndarray, width: np.ndarray,
                            height: np.ndarray, row_offs: np.ndarray, factor: np.ndarray, skip_levels: np.ndarray,
                            iou_thr: float, out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray,
                            out_count: np.ndarray, level_ints: np.ndarray, stats: np.ndarray,
                            *scratch_blocks: np.ndarray) -> None:
    """:func:`fuse_image_range` at each threshold of ``skip_levels`` (K, non-decreasing) in one pass, every
    ``factor`` 1 (:mod:`pipeline.fusion.levels`). Threshold ``k``'s output of image ``i``: slots ``k * n +
    row_offs[i] : + out_count[k * n_img + i]`` (``n = row_offs[-1]``)."""
    scratch = Scratch(*scratch_blocks)
    radius_factor = search_radius_factor(iou_thr)
    use_grid = iou_thr >= GRID_MIN_THR
    n_levels = skip_levels.shape[0]
    n_img = width.shape[0]
    n = row_offs[n_img]
    lowest = np.full(factor.shape[0], skip_levels[0])  # read_image's per-set thresholds
    for img in range(img_lo, img_hi):
        m = read_image(img, seg_offs, seg_start, seg_len, seg_set, x1, y1, x2, y2, score, label, width, height,
                       lowest, factor, 1.0, scratch.kept, scratch.floats[FloatRow.KEPT_SCORE],
                       scratch.ints[IntRow.KEPT_SET], scratch.ints[IntRow.KEPT_LABEL], stats)
        for k in range(n_levels):
            out_count[k * n_img + img] = 0
        if m == 0:
            continue
        n_groups = _order_by_label(m, scratch)
        nc = np.int64(0)  # not the literal 0: numba would compile callees twice (see wbf_kernel)
        for g in range(n_groups):
            gs = scratch.group_start[g]
            ge = scratch.group_start[g + 1]
            count_group_levels(g, gs, ge, m, scratch.ints[IntRow.BY_GROUP], scratch.floats[FloatRow.KEPT_SCORE],
                               skip_levels, level_ints)
            n_cells = _group_grid(gs, ge, radius_factor, use_grid, scratch)
            first = nc
            r = gs
            for k in range(n_levels - 1, 0, -1):  # the shortest prefix first
                end = gs + level_ints[k, 3, g]
                nc = _cluster_boxes(r, end, first, nc, n_cells, iou_thr, radius_factor, scratch)
                r = end
                _copy_clusters(first, nc, k * n + row_offs[img] + place_group(k, g, nc - first, level_ints), out_box,
                               out_score, out_label, scratch)
            nc = _cluster_boxes(r, ge, first, nc, n_cells, iou_thr, radius_factor, scratch)
        out_count[img] = _emit_by_score(nc, row_offs[img], out_box, out_score, out_label, scratch)
        ints = scratch.ints
        for k in range(1, n_levels):  # the image's sums are written out: their rows hold the rows being sorted
            out_count[k * n_img + img] = sort_level_rows(
                k, k * n + row_offs[img], n_groups, out_box, out_score, out_label, level_ints, scratch.kept,
                scratch.floats[FloatRow.CONF], ints[IntRow.REP], ints[IntRow.SORT_KEY], ints[IntRow.BY_LABEL],
                ints[IntRow.BY_SCORE], ints[IntRow.SORT_KEY_A], ints[IntRow.SORT_KEY_B], ints[IntRow.SORT_INDEX_B],
                scratch.radix_hist)


@numba.njit(**NJIT_OPTIONS)
def _copy_clusters(c_lo: int, c_hi: int, o: int, out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray,
                   scratch: Scratch) -> None:
    """Clusters ``c_lo..c_hi-1`` as they stand (box ``float32(sum / conf)``, score, label) to slots ``o...``."""
    conf = scratch.floats[FloatRow.CONF]
    final_score = scratch.floats[FloatRow.FINAL_SCORE]
    cluster_label = scratch.ints[IntRow.CLUSTER_LABEL]
    for c in range(c_lo, c_hi):
        for k in range(4):
            out_box[o, k] = np.float64(np.float32(np.float64(scratch.box_sums[c, k]) / conf[c]))
        out_score[o] = final_score[c]
        out_label[o] = cluster_label[c]
        o += 1


@numba.njit(**NJIT_OPTIONS)
def _order_by_label(m: int, scratch: Scratch) -> int:
    """``BY_GROUP`` and ``group_start`` for the ``m`` kept boxes: label groups in the order in which their label
    first appears (the library's dict), inside a group by weighted score descending, ties: later box first.
    Returns the number of groups."""
    ints = scratch.ints
    hist = scratch.radix_hist
    kept_label = ints[IntRow.KEPT_LABEL]
    by_score = ints[IntRow.BY_SCORE]
    by_label = ints[IntRow.BY_LABEL]
    by_group = ints[IntRow.BY_GROUP]
    group_first = ints[IntRow.GROUP_FIRST]
    group_id = ints[IntRow.GROUP_ID]
    group_rank = ints[IntRow.GROUP_RANK]
    group_start = scratch.group_start
    keys = ints[IntRow.SORT_KEY]
    keys_a = ints[IntRow.SORT_KEY_A]
    keys_b = ints[IntRow.SORT_KEY_B]
    index_b = ints[IntRow.SORT_INDEX_B]
    float_sort_keys(scratch.floats[FloatRow.KEPT_SCORE], m, keys)
    radix_argsort_top(keys, m, by_score, keys_a, keys_b, index_b, hist)
    one_label = True
    for i in range(1, m):
        if kept_label[i] != kept_label[0]:
            one_label = False
            break
    if one_label:
        for i in range(m):
            by_group[i] = by_score[m - 1 - i]
        group_start[0] = 0
        group_start[1] = m
        return 1
    int_sort_keys(kept_label, m, keys)
    radix_argsort(keys, m, by_label, keys_a, keys_b, index_b, hist)
    n_groups = np.int64(0)
    prev = 0
    for r in range(m):
        i = by_label[r]
        if r == 0 or kept_label[i] != prev:
            group_first[n_groups] = i  # stable sort: a label group's first row is its first appearance
            n_groups += 1
            prev = kept_label[i]
        group_id[i] = n_groups - 1
    int_sort_keys(group_first, n_groups, keys)
    radix_argsort(keys, n_groups, by_label, keys_a, keys_b, index_b, hist)
    for g in range(n_groups):
        group_rank[by_label[g]] = g
    for g in range(n_groups + 1):
        group_start[g] = 0
    for i in range(m):
        group_start[group_rank[group_id[i]] + 1] += 1
    for g in range(n_groups):
        group_start[g + 1] += group_start[g]
    for g in range(n_groups):  # group_first reused as the per-group write cursor
        group_first[g] = group_start[g]
    for r in range(m):
        i = by_score[m - 1 - r]
        g = group_rank[group_id[i]]
        by_group[group_first[g]] = i
        group_first[g] += 1
    return n_groups


@numba.njit(**NJIT_OPTIONS)
def _cluster_label_group(gs: int, ge: int, first: int, iou_thr: float, radius_factor: float, use_grid: bool,
                         scratch: Scratch) -> int:
    """Cluster the boxes ``BY_GROUP[gs:ge]`` into clusters ``first, first + 1, ...`` as the library does, and
    accumulate each cluster's weighted box; returns the number of clusters of the image so far."""
    n_cells = _group_grid(gs, ge, radius_factor, use_grid, scratch)
    return _cluster_boxes(gs, ge, first, first, n_cells, iou_thr, radius_factor, scratch)


@numba.njit(**NJIT_OPTIONS)
def _group_grid(gs: int, ge: int, radius_factor: float, use_grid: bool, scratch: Scratch) -> int:
    """Cells per axis of the grid of the label group ``BY_GROUP[gs:ge]``'s representatives, laid out with room for
    every box of the group (any may become one) and empty; 0: no grid, every representative is scanned."""
    kept = scratch.kept
    by_group = scratch.ints[IntRow.BY_GROUP]
    n_cells = 0
    if use_grid and ge - gs >= GRID_MIN_BOXES:
        sw = 0.0
        for r in range(gs, ge):
            i = by_group[r]
            sw += (kept[i, 2] - kept[i, 0]) + (kept[i, 3] - kept[i, 1])
        n_cells = cells_per_axis(radius_factor * sw / (2.0 * (ge - gs)), ge - gs)
        grid_layout(n_cells, n_cells, kept, by_group[gs:ge], ge - gs, scratch.ints[IntRow.CELL_OF],
                    scratch.cell_start, scratch.cell_count)
        for k in range(n_cells * ROW_WORDS):
            scratch.grid_rows[k] = 0
    return n_cells


@numba.njit(**NJIT_OPTIONS)
def _cluster_boxes(r_lo: int, r_hi: int, first: int, nc: int, n_cells: int, iou_thr: float, radius_factor: float,
                   scratch: Scratch) -> int:
    """The boxes ``BY_GROUP[r_lo:r_hi]`` of a label group whose clusters are ``first..nc-1`` so far (grid:
    :func:`_group_grid`), clustered in order; returns the new ``nc``. A group may be clustered in pieces
    (:func:`fuse_image_range_levels` reads the clusters between them)."""
    kept = scratch.kept
    box_sums = scratch.box_sums
    floats = scratch.floats
    ints = scratch.ints
    kept_score = floats[FloatRow.KEPT_SCORE]
    conf = floats[FloatRow.CONF]
    final_score = floats[FloatRow.FINAL_SCORE]
    by_group = ints[IntRow.BY_GROUP]
    rep = ints[IntRow.REP]
    cell_of = ints[IntRow.CELL_OF]
    slot_cluster = ints[IntRow.SLOT_CLUSTER]
    cluster_label = ints[IntRow.CLUSTER_LABEL]
    kept_label = ints[IntRow.KEPT_LABEL]
    slot_xy = scratch.slot_xy
    cell_start = scratch.cell_start
    cell_count = scratch.cell_count
    grid_rows = scratch.grid_rows
    thr_low = iou_thr * (1.0 - 1e-9)  # a candidate certainly not above iou_thr is passed over (may_exceed)
    for r in range(r_lo, r_hi):
        i = by_group[r]
        bx1 = kept[i, 0]
        by1 = kept[i, 1]
        bx2 = kept[i, 2]
        by2 = kept[i, 3]
        best_iou = -np.inf
        best_c = -1
        scan_all = True
        area_b = (bx2 - bx1) * (by2 - by1)
        if n_cells > 0:
            gx0, gx1, gy0, gy1 = window_cells(bx1, by1, bx2, by2, (bx2 - bx1) * radius_factor,
                                              (by2 - by1) * radius_factor, n_cells)
            if (gx1 - gx0 + 1) * (gy1 - gy0 + 1) < nc - first:
                scan_all = False
                for gy in range(gy0, gy1 + 1):  # the window row's occupied cells only (grid.occupied_in_word)
                    for w in range(gx0 // CELL_BITS, gx1 // CELL_BITS + 1):
                        occupied = occupied_in_word(grid_rows, gy, w, gx0, gx1)
                        while occupied != 0:
                            cell = gy * n_cells + first_cell(occupied, w)
                            occupied &= occupied - 1
                            best_iou, best_c = _best_in_cell(cell_start[cell], cell_start[cell] + cell_count[cell],
                                                             bx1, by1, bx2, by2, area_b, thr_low, slot_xy,
                                                             slot_cluster, best_iou, best_c)
        if scan_all:
            for c in range(first, nc):
                j = rep[c]
                inter, union = overlap_union(kept[j, 0], kept[j, 1], kept[j, 2], kept[j, 3], bx1, by1, bx2, by2, area_b)
                if may_exceed(inter, union, thr_low):
                    v = inter / union
                    if v > best_iou:
                        best_iou = v
                        best_c = c
        if best_c == -1 or not (best_iou > iou_thr):
            c = nc
            nc += 1
            rep[c] = i
            conf[c] = 0.0
            for k in range(4):
                box_sums[c, k] = np.float32(0.0)
            final_score[c] = np.float64(np.float32(kept_score[i]))
            cluster_label[c] = kept_label[i]
            if n_cells > 0:  # file the representative (they never move)
                cell = cell_of[i]
                s = cell_start[cell] + cell_count[cell]
                if cell_count[cell] == 0:
                    mark_cell(grid_rows, cell, n_cells, True)
                cell_count[cell] += 1
                slot_cluster[s] = c
                slot_xy[s, 0] = bx1
                slot_xy[s, 1] = by1
                slot_xy[s, 2] = bx2
                slot_xy[s, 3] = by2
        else:
            c = best_c
        # get_weighted_box: member weight = score * IoU(member, representative), float32 coordinate sums
        j = rep[c]
        weight = kept_score[i] * iou(bx1, by1, bx2, by2, kept[j, 0], kept[j, 1], kept[j, 2], kept[j, 3])
        box_sums[c, 0] = np.float32(np.float64(box_sums[c, 0]) + weight * bx1)
        box_sums[c, 1] = np.float32(np.float64(box_sums[c, 1]) + weight * by1)
        box_sums[c, 2] = np.float32(np.float64(box_sums[c, 2]) + weight * bx2)
        box_sums[c, 3] = np.float32(np.float64(box_sums[c, 3]) + weight * by2)
        conf[c] += weight
    return nc


@numba.njit(inline="always", **NJIT_OPTIONS)
def _best_in_cell(lo: int, hi: int, bx1: float, by1: float, bx2: float, by2: float, area_b: float, thr_low: float,
                  slot_xy: np.ndarray, slot_cluster: np.ndarray, best_iou: float, best_c: int) -> tuple[float, int]:
    """``(best_iou, best_c)`` updated with the representatives in slots ``lo..hi-1``: the highest IoU with box B,
    the lowest cluster index among equal IoUs (slots are unordered); a candidate that cannot pass ``iou_thr`` is
    passed over without the division (:func:`~pipeline.fusion.primitives.may_exceed`)."""
    for s in range(lo, hi):
        inter, union = overlap_union(slot_xy[s, 0], slot_xy[s, 1], slot_xy[s, 2], slot_xy[s, 3], bx1, by1, bx2, by2,
                                     area_b)
        if not may_exceed(inter, union, thr_low):
            continue
        v = inter / union
        c = slot_cluster[s]
        if v > best_iou or (v == best_iou and c < best_c):
            best_iou = v
            best_c = c
    return best_iou, best_c


@numba.njit(**NJIT_OPTIONS)
def _emit_by_score(nc: int, out_row: int, out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray,
                   scratch: Scratch) -> int:
    """Write clusters ``0..nc-1`` from row ``out_row`` by float32 score descending (ties: the cluster created
    later first), each box ``float32(sum / conf)``; returns ``nc``."""
    ints = scratch.ints
    final_score = scratch.floats[FloatRow.FINAL_SCORE]
    conf = scratch.floats[FloatRow.CONF]
    by_score = ints[IntRow.BY_SCORE]
    keys = ints[IntRow.SORT_KEY]
    float_sort_keys(final_score, nc, keys)
    radix_argsort_top(keys, nc, by_score, ints[IntRow.SORT_KEY_A], ints[IntRow.SORT_KEY_B],
                      ints[IntRow.SORT_INDEX_B], scratch.radix_hist)
    o = out_row
    for r in range(nc):
        c = by_score[nc - 1 - r]
        for k in range(4):
            out_box[o, k] = np.float64(np.float32(np.float64(scratch.box_sums[c, k]) / conf[c]))
        out_score[o] = final_score[c]
        out_label[o] = ints[IntRow.CLUSTER_LABEL, c]
        o += 1
    return nc
