"""Compiled stages of weighted box fusion; what each replicates of ensemble-boxes is in :mod:`pipeline.fusion.wbf`.

:func:`fuse_image_range` fuses a range of images, one after the other, through five stages (the numbers are the
steps of the ``pipeline.fusion.wbf`` docstring):

1. :func:`~pipeline.fusion.rows.read_image` -- read the image's rows, drop low scores, swap and clip coordinates,
   drop zero areas, weight the scores;
2. :func:`_order_by_label` -- label groups in first-appearance order, boxes by weighted score descending;
3. :func:`_cluster_label_group` -- per label group and box: :func:`_best_cluster` (the search, through the grid
   index), then :func:`_open_cluster` or :func:`_join_cluster` (the library's float32 update), and the grid upkeep;
4. :func:`_rescore_clusters` -- the ``conf_type`` rescaling;
5. :func:`_emit_by_score` -- the final sort and the output rows.

:func:`fuse_image_range_levels` runs the same stages once for several ``skip_box_thr`` at every set weight 1: each
label group is clustered in pieces (:func:`_cluster_boxes`), and at the end of each threshold's prefix of the group
its clusters are rescored and copied out for that threshold (:func:`_cluster_group_levels`), then sorted as stage 5
sorts them (:func:`_emit_level`).

The stages share their work arrays through :class:`~pipeline.fusion.wbf_scratch.Scratch` (named rows, one
allocation per thread). The per-box helpers of stage 3 are inlined into its loop (``inline="always"``): a call
per box would cost more than the work. Inlining is free only if LLVM can drop the incref/decref numba wraps
around every array a helper receives; checked for this kernel (no ``NRT_incref`` left in the per-box loop of
``_cluster_label_group.inspect_llvm()``, compiled without the cache): re-check after changing a helper's arrays.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from pipeline.fusion.grid import CELL_BITS, ROW_WORDS, first_cell, mark_cell, occupied_in_word
from pipeline.fusion.levels import count_group_levels, place_group, sort_level_rows
from pipeline.fusion.primitives import (NJIT_OPTIONS, cell_index, float_sort_keys, int_sort_keys, may_exceed,
                                        overlap_union, pairwise_sum, radix_argsort, radix_argsort_top)
from pipeline.fusion.rows import read_image
from pipeline.fusion.wbf_scratch import GRID_MAX, BoxRow, FloatRow, IntRow, Scratch

# numba's disk cache keys a compiled function on its own file's content only: it does not notice when code or
# constants compiled in from another file change (numba issue #1833), and would keep serving the old kernel. The
# digests of the files compiled in here are recorded below, so changing one of them means changing this file, which
# drops the stale cache; tests/test_fusion.py fails (and prints the new record) until they are current.
COMPILED_AGAINST = {
    "grid.py": "4c31c531fd090b1c",
    "levels.py": "b9bb07e1d9a6fade",
    "primitives.py": "5a867f87f2eb7faf",
    "rows.py": "d18c55d7d48eb07d",
    "wbf_scratch.py": "3b066932c5e269ea",
}

# The kernel receives conf_type as its position in CONF_TYPES.
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
CONF_MAX = CONF_TYPES.index("max")
CONF_BOX_AND_MODEL_AVG = CONF_TYPES.index("box_and_model_avg")
CONF_ABSENT_MODEL_AWARE_AVG = CONF_TYPES.index("absent_model_aware_avg")

GRID_MIN_THR = 0.1  # below this IoU threshold the centre bound is too loose: scan all clusters
GRID_MIN_BOXES = 24  # label groups smaller than this are scanned directly


@numba.njit(**NJIT_OPTIONS)
def fuse_image_range(img_lo: int, img_hi: int, seg_offs: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray,
                     seg_set: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                     score: np.ndarray, label: np.ndarray, width: np.ndarray, height: np.ndarray,
                     row_offs: np.ndarray, weights: np.ndarray, wsum: float, wmax: float, iou_thr: float,
                     skip_thr: np.ndarray, conf_code: int, allows_overflow: bool, out_box: np.ndarray,
                     out_score: np.ndarray, out_label: np.ndarray, out_count: np.ndarray, stats: np.ndarray,
                     *scratch_blocks: np.ndarray) -> None:
    """Fuse images ``img_lo..img_hi-1`` of a packed table (:class:`~pipeline.fusion.packing.PackedTable`: the
    segment arrays, the row columns in pixels, the image sizes -- ``PackedTable.kernel_rows``).

    ``skip_thr``: one threshold per set; ``wsum`` / ``wmax``: numpy's ``weights.sum()`` / ``weights.max()``.
    Outputs of image ``i`` go to rows ``row_offs[i] : row_offs[i] + out_count[i]``, normalised. ``stats``
    (int64[N_STATS], :mod:`pipeline.fusion.rows`) accumulates the input repairs and the non-finite rows (skipped).
    ``scratch_blocks``: the fields of a :class:`~pipeline.fusion.wbf_scratch.Scratch` for the largest image of the
    range, in field order.
    """
    scratch = Scratch(*scratch_blocks)
    for t in range(weights.shape[0]):
        scratch.set_stamp[t] = 0
    # Counters passed to compiled callees start as int64, not as the literal 0: numba would type each callee
    # twice, for Literal[int](0) and for int64, and compile it twice.
    stamp = np.int64(0)
    radius_factor = _search_radius_factor(iou_thr)
    use_grid = iou_thr >= GRID_MIN_THR
    for img in range(img_lo, img_hi):
        m = read_image(img, seg_offs, seg_start, seg_len, seg_set, x1, y1, x2, y2, score, label, width, height,
                       skip_thr, weights, 1.0, scratch.boxes[BoxRow.KEPT], scratch.floats[FloatRow.KEPT_SCORE],
                       scratch.ints[IntRow.KEPT_SET], scratch.ints[IntRow.KEPT_LABEL], stats)
        if m == 0:
            out_count[img] = 0
            continue
        n_groups = _order_by_label(m, scratch)
        nc = np.int64(0)
        for g in range(n_groups):
            nc = _cluster_label_group(scratch.group_start[g], scratch.group_start[g + 1], nc, weights, iou_thr,
                                      radius_factor, use_grid, conf_code, scratch)
        stamp = _rescore_clusters(np.int64(0), nc, stamp, weights, wsum, wmax, conf_code, allows_overflow, scratch)
        out_count[img] = _emit_by_score(nc, row_offs[img], out_box, out_score, out_label, scratch)


@numba.njit(**NJIT_OPTIONS)
def fuse_image_range_levels(img_lo: int, img_hi: int, seg_offs: np.ndarray, seg_start: np.ndarray,
                            seg_len: np.ndarray, seg_set: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray,
                            y2: np.ndarray, score: np.ndarray, label: np.ndarray, width: np.ndarray,
                            height: np.ndarray, row_offs: np.ndarray, weights: np.ndarray, wsum: float, wmax: float,
                            iou_thr: float, skip_levels: np.ndarray, conf_code: int, allows_overflow: bool,
                            out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray,
                            out_count: np.ndarray, level_ints: np.ndarray, stats: np.ndarray,
                            *scratch_blocks: np.ndarray) -> None:
    """:func:`fuse_image_range` at several skip thresholds in one pass, every set weight 1.

    ``skip_levels`` (K,): the thresholds, non-decreasing. With every weight 1 a box's weighted score is its raw
    score, so the boxes a higher threshold keeps are, in each label group, the first ones of the order the lowest
    threshold clusters in -- a prefix (equal scores are kept or dropped together) -- and the library, given only
    them, goes through the same steps on them: level ``k``'s clusters are this run's clusters when the group's
    prefix is done. They are read there (rescored, written to level ``k``'s slots) and the run goes on. Level
    ``k``'s output of image ``i``: slots ``k * n + row_offs[i] : + out_count[k * n_img + i]`` (``n =
    row_offs[-1]``), by score as :func:`_emit_by_score` orders them, its label groups in their first appearance
    among the boxes level ``k`` keeps. ``level_ints``: int64 (K, 4, cap + 1) work rows (see
    :mod:`pipeline.fusion.levels`); input repairs are counted as the lowest level reads the rows.
    """
    scratch = Scratch(*scratch_blocks)
    for t in range(weights.shape[0]):
        scratch.set_stamp[t] = 0
    stamp = np.int64(0)  # not the literal 0: see fuse_image_range
    radius_factor = _search_radius_factor(iou_thr)
    use_grid = iou_thr >= GRID_MIN_THR
    n_levels = skip_levels.shape[0]
    n_img = width.shape[0]
    n = row_offs[n_img]
    lowest = np.full(weights.shape[0], skip_levels[0])  # read_image's per-set thresholds
    for img in range(img_lo, img_hi):
        m = read_image(img, seg_offs, seg_start, seg_len, seg_set, x1, y1, x2, y2, score, label, width, height,
                       lowest, weights, 1.0, scratch.boxes[BoxRow.KEPT],
                       scratch.floats[FloatRow.KEPT_SCORE], scratch.ints[IntRow.KEPT_SET],
                       scratch.ints[IntRow.KEPT_LABEL], stats)
        for k in range(n_levels):
            out_count[k * n_img + img] = 0
        if m == 0:
            continue
        n_groups = _order_by_label(m, scratch)
        nc = np.int64(0)
        for g in range(n_groups):
            nc, stamp = _cluster_group_levels(g, nc, stamp, row_offs[img], n, m, weights, wsum, wmax, iou_thr,
                                              radius_factor, use_grid, skip_levels, conf_code, allows_overflow,
                                              out_box, out_score, out_label, level_ints, scratch)
        stamp = _rescore_clusters(np.int64(0), nc, stamp, weights, wsum, wmax, conf_code, allows_overflow, scratch)
        out_count[img] = _emit_by_score(nc, row_offs[img], out_box, out_score, out_label, scratch)
        for k in range(1, n_levels):
            out_count[k * n_img + img] = _emit_level(k, k * n + row_offs[img], n_groups, out_box, out_score,
                                                     out_label, level_ints, scratch)


@numba.njit(**NJIT_OPTIONS)
def _cluster_group_levels(g: int, first: int, stamp: int, out_row: int, n: int, m: int, weights: np.ndarray,
                          wsum: float, wmax: float, iou_thr: float, radius_factor: float, use_grid: bool,
                          skip_levels: np.ndarray, conf_code: int, allows_overflow: bool, out_box: np.ndarray,
                          out_score: np.ndarray, out_label: np.ndarray, level_ints: np.ndarray,
                          scratch: Scratch) -> tuple[int, int]:
    """Label group ``g`` clustered as :func:`_cluster_label_group` does, its clusters read at the end of each
    level's prefix, the shortest first, into that level's slots (unsorted: :func:`_emit_level` sorts them).
    Returns ``nc`` and ``stamp``; ``level_ints``: see :mod:`pipeline.fusion.levels`."""
    gs = scratch.group_start[g]
    ge = scratch.group_start[g + 1]
    n_levels = skip_levels.shape[0]
    count_group_levels(g, gs, ge, m, scratch.ints[IntRow.BY_GROUP], scratch.floats[FloatRow.KEPT_SCORE], skip_levels,
                       level_ints)
    n_cells = _group_grid(gs, ge, radius_factor, use_grid, scratch)
    nc = first
    nan_c = np.int64(-1)
    r = gs
    for k in range(n_levels - 1, 0, -1):
        end = gs + level_ints[k, 3, g]
        nc, nan_c = _cluster_boxes(r, end, first, nc, nan_c, n_cells, weights, iou_thr, radius_factor, conf_code,
                                   scratch)
        r = end
        start = place_group(k, g, nc - first, level_ints)
        stamp = _rescore_clusters(first, nc, stamp, weights, wsum, wmax, conf_code, allows_overflow, scratch)
        _copy_clusters(first, nc, k * n + out_row + start, out_box, out_score, out_label, scratch)
    nc, nan_c = _cluster_boxes(r, ge, first, nc, nan_c, n_cells, weights, iou_thr, radius_factor, conf_code,
                               scratch)
    return nc, stamp


@numba.njit(**NJIT_OPTIONS)
def _copy_clusters(c_lo: int, c_hi: int, o: int, out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray,
                   scratch: Scratch) -> None:
    """Clusters ``c_lo..c_hi-1`` (fused box, ``FINAL_SCORE``, label) to slots ``o...``, in order."""
    fused = scratch.boxes[BoxRow.FUSED]
    final_score = scratch.floats[FloatRow.FINAL_SCORE]
    cluster_label = scratch.ints[IntRow.CLUSTER_LABEL]
    for c in range(c_lo, c_hi):
        for q in range(4):
            out_box[o, q] = fused[c, q]
        out_score[o] = final_score[c]
        out_label[o] = cluster_label[c]
        o += 1


@numba.njit(**NJIT_OPTIONS)
def _emit_level(k: int, base: int, n_groups: int, out_box: np.ndarray, out_score: np.ndarray,
                out_label: np.ndarray, level_ints: np.ndarray, scratch: Scratch) -> int:
    """Sort level ``k``'s rows of one image, written group by group from slot ``base`` on, as
    :func:`_emit_by_score` sorts clusters numbered in level ``k``'s own group order; returns their number. The
    image's kept boxes, cluster sums and links are done with: their rows hold the rows being sorted."""
    ints = scratch.ints
    return sort_level_rows(k, base, n_groups, out_box, out_score, out_label, level_ints, scratch.boxes[BoxRow.KEPT],
                           scratch.floats[FloatRow.CONF_SUM], ints[IntRow.CELL_NEXT], ints[IntRow.SORT_KEY],
                           ints[IntRow.BY_LABEL], ints[IntRow.BY_SCORE], ints[IntRow.SORT_KEY_A],
                           ints[IntRow.SORT_KEY_B], ints[IntRow.SORT_INDEX_B], scratch.radix_hist)


@numba.njit(inline="always", **NJIT_OPTIONS)
def _search_radius_factor(iou_thr: float) -> float:
    """``k``: a cluster whose fused-box centre is farther than ``k * width`` (x) or ``k * height`` (y) from a box's
    centre cannot have IoU > ``iou_thr`` with it; widened far beyond float rounding (proof: ``pipeline.fusion.wbf``)."""
    t_b = min(iou_thr * (1.0 - 1e-9) - 1e-12, 0.999)
    if t_b >= 0.5:
        kfac = 1.0 - t_b
    elif t_b > 0.0:
        kfac = (1.0 - t_b) / (2.0 * t_b)
    else:
        kfac = 1e300
    return kfac * (1.0 + 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# 2. label groups
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(**NJIT_OPTIONS)
def _order_by_label(m: int, scratch: Scratch) -> int:
    """Fill ``BY_GROUP`` and ``group_start`` for the ``m`` kept boxes; returns the number of label groups.

    Groups come in the order in which their label first appears among the kept boxes; inside a group, boxes by
    weighted score descending, ties: later box first (a stable ascending sort walked backwards).
    """
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
    if one_label:  # the common case, without the label sorts
        for i in range(m):
            by_group[i] = by_score[m - 1 - i]
        group_start[0] = 0
        group_start[1] = m
        return 1
    int_sort_keys(kept_label, m, keys)
    radix_argsort(keys, m, by_label, keys_a, keys_b, index_b, hist)
    n_groups = np.int64(0)  # not the literal 0: see fuse_image_range
    prev = 0
    for r in range(m):
        i = by_label[r]
        if r == 0 or kept_label[i] != prev:
            group_first[n_groups] = i  # stable sort: first row of a label group is its first appearance
            n_groups += 1
            prev = kept_label[i]
        group_id[i] = n_groups - 1
    # groups ordered by first appearance (distinct positions, any sort will do)
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


# ----------------------------------------------------------------------------------------------------------------
# 3. clustering
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(**NJIT_OPTIONS)
def _cluster_label_group(gs: int, ge: int, first: int, weights: np.ndarray, iou_thr: float, radius_factor: float,
                         use_grid: bool, conf_code: int, scratch: Scratch) -> int:
    """Cluster one label group, the boxes ``BY_GROUP[gs:ge]``, into clusters ``first, first + 1, ...`` in the
    library's order; returns the number of clusters of the image so far."""
    n_cells = _group_grid(gs, ge, radius_factor, use_grid, scratch)
    nc, _ = _cluster_boxes(gs, ge, first, first, np.int64(-1), n_cells, weights, iou_thr, radius_factor, conf_code,
                           scratch)
    return nc


@numba.njit(**NJIT_OPTIONS)
def _group_grid(gs: int, ge: int, radius_factor: float, use_grid: bool, scratch: Scratch) -> int:
    """Cells per axis of the grid index of the label group ``BY_GROUP[gs:ge]``, the grid emptied; 0: no index,
    every open cluster of the group is scanned."""
    n_cells = 0
    if use_grid and ge - gs >= GRID_MIN_BOXES:
        n_cells = _grid_cells_per_axis(gs, ge, scratch.ints[IntRow.BY_GROUP], scratch.boxes[BoxRow.KEPT],
                                       radius_factor)
        for k in range(n_cells * n_cells):
            scratch.grid_head[k] = -1
        for k in range(n_cells * ROW_WORDS):
            scratch.grid_rows[k] = 0
    return n_cells


@numba.njit(**NJIT_OPTIONS)
def _cluster_boxes(r_lo: int, r_hi: int, first: int, nc: int, nan_c: int, n_cells: int, weights: np.ndarray,
                   iou_thr: float, radius_factor: float, conf_code: int, scratch: Scratch) -> tuple[int, int]:
    """The boxes ``BY_GROUP[r_lo:r_hi]`` of a label group whose clusters are ``first..nc-1`` so far (grid:
    :func:`_group_grid`), clustered in order; returns the new ``nc`` and ``nan_c`` (the first cluster with a NaN
    fused box, -1 if none; see the module docstring of pipeline.fusion.wbf). A group may be clustered in pieces
    (:func:`fuse_image_range_levels` reads the clusters between them).

    The grid upkeep is written out here, on views taken once per call, rather than in inlined helpers: numba
    increfs and decrefs every array an inlined helper receives, per box, unless LLVM can pair the two up, which
    it cannot when the helper uses the array in only one branch (measured: ~50 more instructions per box).
    """
    kept = scratch.boxes[BoxRow.KEPT]
    fused = scratch.boxes[BoxRow.FUSED]
    floats = scratch.floats
    ints = scratch.ints
    grid_head = scratch.grid_head
    grid_rows = scratch.grid_rows
    kept_score = floats[FloatRow.KEPT_SCORE]
    kept_set = ints[IntRow.KEPT_SET]
    by_group = ints[IntRow.BY_GROUP]
    cluster_cell = ints[IntRow.CELL]
    cell_next = ints[IntRow.CELL_NEXT]
    cell_prev = ints[IntRow.CELL_PREV]
    for r in range(r_lo, r_hi):
        i = by_group[r]
        x1 = kept[i, 0]
        y1 = kept[i, 1]
        x2 = kept[i, 2]
        y2 = kept[i, 3]
        ws = kept_score[i]
        if nan_c >= 0:
            c = nan_c  # numpy's argmax returns the first NaN; NaN <= thr is False: always a match
        else:
            c = _best_cluster(x1, y1, x2, y2, first, nc, iou_thr, radius_factor, n_cells, fused, grid_head,
                              grid_rows, cell_next)
        if c == -1:
            c = nc
            nc += 1
            _open_cluster(c, i, ws, weights[kept_set[i]], kept, fused, scratch.box_sums, floats, ints)
            old_cell = -1
            new_cell = _centre_cell(x1, y1, x2, y2, n_cells) if n_cells > 0 else -1
        else:
            is_nan = _join_cluster(c, i, ws, weights[kept_set[i]], conf_code, kept, fused, scratch.box_sums,
                                   floats, ints)
            if is_nan:
                if nan_c == -1 or c < nan_c:
                    nan_c = c
            elif c == nan_c:
                nan_c = -1
            old_cell = cluster_cell[c] if n_cells > 0 else -1
            new_cell = -1  # NaN clusters live outside the grid (found through nan_c)
            if n_cells > 0 and not is_nan:
                new_cell = _centre_cell(fused[c, 0], fused[c, 1], fused[c, 2], fused[c, 3], n_cells)
        if new_cell != old_cell:  # file the cluster under the cell of its (new) fused-box centre
            if old_cell != -1:  # unlink from the old cell's list
                p = cell_prev[c]
                q = cell_next[c]
                if p != -1:
                    cell_next[p] = q
                else:
                    grid_head[old_cell] = q
                    if q == -1:  # the cell is empty now
                        mark_cell(grid_rows, old_cell, n_cells, False)
                if q != -1:
                    cell_prev[q] = p
            cluster_cell[c] = new_cell
            if new_cell != -1:  # push onto the front of the new cell's list
                cell_prev[c] = -1
                h = grid_head[new_cell]
                cell_next[c] = h
                if h != -1:
                    cell_prev[h] = c
                else:  # the cell was empty
                    mark_cell(grid_rows, new_cell, n_cells, True)
                grid_head[new_cell] = c
    return nc, nan_c


@numba.njit(inline="always", **NJIT_OPTIONS)
def _centre_cell(x1: float, y1: float, x2: float, y2: float, n_cells: int) -> int:
    """Grid cell (row-major) of the box centre."""
    return cell_index((y1 + y2) * 0.5, n_cells) * n_cells + cell_index((x1 + x2) * 0.5, n_cells)


@numba.njit(**NJIT_OPTIONS)
def _grid_cells_per_axis(gs: int, ge: int, by_group: np.ndarray, kept: np.ndarray, radius_factor: float) -> int:
    """Cells per axis for a label group: a search radius of about one cell, at most ``2 sqrt(n) + 1`` cells per
    axis (and ``GRID_MAX``), so that the index costs less than the scans it saves."""
    n = ge - gs
    mean_size = 0.0
    for r in range(gs, ge):
        i = by_group[r]
        mean_size += (kept[i, 2] - kept[i, 0]) + (kept[i, 3] - kept[i, 1])
    mean_size = mean_size / (2.0 * n)
    most = min(GRID_MAX, int(2.0 * math.sqrt(n)) + 1)
    target = 1.0 / (radius_factor * mean_size + 1e-12)
    if target < most:
        return max(int(target), 1)
    return most


@numba.njit(inline="always", **NJIT_OPTIONS)
def _best_cluster(x1: float, y1: float, x2: float, y2: float, first: int, nc: int, iou_thr: float,
                  radius_factor: float, n_cells: int, fused: np.ndarray, grid_head: np.ndarray,
                  grid_rows: np.ndarray, cell_next: np.ndarray) -> int:
    """The open cluster (``first..nc-1``) with the highest IoU with the box, lowest index on equal IoU, if that
    IoU is ``> iou_thr``; else -1. Through the grid when it visits fewer cells than there are clusters.

    A cluster whose IoU cannot pass ``iou_thr`` cannot be the answer, whatever the others score: it is passed over
    on a multiplication (:func:`~pipeline.fusion.primitives.may_exceed`), and the division of the library's IoU is made only for the others."""
    best_iou = -np.inf
    best_c = -1
    n_open = nc - first
    scan_all = True
    area_b = (x2 - x1) * (y2 - y1)
    thr_low = iou_thr * (1.0 - 1e-9)  # below the threshold by far more than the rounding of the IoU
    if n_cells > 0 and n_open > 0:
        rx = (x2 - x1) * radius_factor + 1e-12
        ry = (y2 - y1) * radius_factor + 1e-12
        cx = (x1 + x2) * 0.5
        cy = (y1 + y2) * 0.5
        gx0 = cell_index(cx - rx, n_cells)
        gx1 = cell_index(cx + rx, n_cells)
        gy0 = cell_index(cy - ry, n_cells)
        gy1 = cell_index(cy + ry, n_cells)
        if (gx1 - gx0 + 1) * (gy1 - gy0 + 1) < n_open:
            scan_all = False
            # the window's cells row by row, the empty ones skipped on their row's bits (most cells of a window
            # are empty: 69 % on tuning_speed.py's table, where a box's window spans ~9 cells)
            for gy in range(gy0, gy1 + 1):
                for w in range(gx0 // CELL_BITS, gx1 // CELL_BITS + 1):
                    occupied = occupied_in_word(grid_rows, gy, w, gx0, gx1)
                    while occupied != 0:
                        gx = first_cell(occupied, w)
                        occupied &= occupied - 1
                        c = grid_head[gy * n_cells + gx]
                        while c != -1:  # cells are unordered: keep the lowest index among equal IoUs
                            inter, union = overlap_union(fused[c, 0], fused[c, 1], fused[c, 2], fused[c, 3], x1, y1,
                                                         x2, y2, area_b)
                            if may_exceed(inter, union, thr_low):
                                v = inter / union
                                if v > best_iou or (v == best_iou and c < best_c):
                                    best_iou = v
                                    best_c = c
                            c = cell_next[c]
    if scan_all:
        for c in range(first, nc):
            inter, union = overlap_union(fused[c, 0], fused[c, 1], fused[c, 2], fused[c, 3], x1, y1, x2, y2, area_b)
            if may_exceed(inter, union, thr_low):
                v = inter / union
                if v > best_iou:
                    best_iou = v
                    best_c = c
    if best_c != -1 and not (best_iou > iou_thr):
        best_c = -1
    return best_c


@numba.njit(inline="always", **NJIT_OPTIONS)
def _open_cluster(c: int, i: int, ws: float, w_set: float, kept: np.ndarray, fused: np.ndarray,
                  box_sums: np.ndarray, floats: np.ndarray, ints: np.ndarray) -> None:
    """Cluster ``c`` := kept box ``i`` alone (weighted score ``ws``, set weight ``w_set``). The library appends the
    box itself: the fused box stays float64, unrounded, until a second box joins."""
    for k in range(4):
        fused[c, k] = kept[i, k]
        box_sums[c, k] = np.float32(ws * kept[i, k])
    floats[FloatRow.CONF_SUM, c] = ws
    floats[FloatRow.WEIGHT_SUM, c] = w_set
    floats[FloatRow.MAX_SCORE, c] = ws
    floats[FloatRow.SCORE, c] = ws
    floats[FloatRow.WEIGHT, c] = w_set
    ints[IntRow.MEMBER_COUNT, c] = 1
    ints[IntRow.CLUSTER_LABEL, c] = ints[IntRow.KEPT_LABEL, i]
    ints[IntRow.MEMBER_HEAD, c] = i
    ints[IntRow.MEMBER_TAIL, c] = i
    ints[IntRow.MEMBER_NEXT, i] = -1


@numba.njit(inline="always", **NJIT_OPTIONS)
def _join_cluster(c: int, i: int, ws: float, w_set: float, conf_code: int, kept: np.ndarray, fused: np.ndarray,
                  box_sums: np.ndarray, floats: np.ndarray, ints: np.ndarray) -> bool:
    """Kept box ``i`` joins cluster ``c``: ``get_weighted_box``'s float32 arithmetic, continued from the stored
    partial sums (the same bits as the library's recomputation from scratch). Returns whether the new fused box
    is NaN (all members scored 0: 0/0)."""
    conf = floats[FloatRow.CONF_SUM, c] + ws
    floats[FloatRow.CONF_SUM, c] = conf
    floats[FloatRow.WEIGHT_SUM, c] = floats[FloatRow.WEIGHT_SUM, c] + w_set
    if ws > floats[FloatRow.MAX_SCORE, c]:
        floats[FloatRow.MAX_SCORE, c] = ws
    n_c = ints[IntRow.MEMBER_COUNT, c] + 1
    ints[IntRow.MEMBER_COUNT, c] = n_c
    is_nan = False
    for k in range(4):
        acc = np.float32(np.float64(box_sums[c, k]) + ws * kept[i, k])
        box_sums[c, k] = acc
        f = np.float64(np.float32(np.float64(acc) / conf))
        fused[c, k] = f
        is_nan = is_nan or f != f
    if conf_code == CONF_MAX:
        floats[FloatRow.SCORE, c] = np.float64(np.float32(floats[FloatRow.MAX_SCORE, c]))
    else:
        floats[FloatRow.SCORE, c] = np.float64(np.float32(conf / n_c))
    floats[FloatRow.WEIGHT, c] = np.float64(np.float32(floats[FloatRow.WEIGHT_SUM, c]))
    ints[IntRow.MEMBER_NEXT, ints[IntRow.MEMBER_TAIL, c]] = i
    ints[IntRow.MEMBER_NEXT, i] = -1
    ints[IntRow.MEMBER_TAIL, c] = i
    return is_nan


# ----------------------------------------------------------------------------------------------------------------
# 4. rescoring
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(**NJIT_OPTIONS)
def _rescore_clusters(c_lo: int, nc: int, stamp: int, weights: np.ndarray, wsum: float, wmax: float, conf_code: int,
                      allows_overflow: bool, scratch: Scratch) -> int:
    """``FINAL_SCORE`` of clusters ``c_lo..nc-1``: the library's ``conf_type`` rescaling. ``stamp``: the last value
    written to ``set_stamp`` (distinct-set marks, never reset within a kernel call); returns the new one."""
    floats = scratch.floats
    ints = scratch.ints
    n_sets = weights.shape[0]
    for c in range(c_lo, nc):
        n_c = ints[IntRow.MEMBER_COUNT, c]
        s1 = floats[FloatRow.SCORE, c]
        if conf_code == CONF_BOX_AND_MODEL_AVG:
            stamp += 1
            sc = s1 * n_c / floats[FloatRow.WEIGHT, c]
            sc = sc * _distinct_set_weight(c, stamp, weights, scratch) / wsum
        elif conf_code == CONF_ABSENT_MODEL_AWARE_AVG:
            stamp += 1
            sc = s1 * n_c / (floats[FloatRow.WEIGHT, c] + _absent_set_weight(c, stamp, weights, scratch))
        elif conf_code == CONF_MAX:
            sc = s1 / wmax
        elif allows_overflow:
            sc = s1 * n_c / wsum
        else:
            sc = s1 * min(n_sets, n_c) / wsum
        floats[FloatRow.FINAL_SCORE, c] = sc
    return stamp


@numba.njit(inline="always", **NJIT_OPTIONS)
def _distinct_set_weight(c: int, stamp: int, weights: np.ndarray, scratch: Scratch) -> float:
    """Sum of the weights of the distinct sets in cluster ``c``, in ascending set order (numpy's pairwise sum of
    ``weights[np.unique(sets)]``, as the library computes it)."""
    kept_set = scratch.ints[IntRow.KEPT_SET]
    member_next = scratch.ints[IntRow.MEMBER_NEXT]
    set_stamp = scratch.set_stamp
    set_list = scratch.set_list
    nu = np.int64(0)  # not the literal 0: see fuse_image_range
    j = scratch.ints[IntRow.MEMBER_HEAD, c]
    while j != -1:
        t = kept_set[j]
        if set_stamp[t] != stamp:
            set_stamp[t] = stamp
            p = nu  # insertion into the sorted list of distinct sets
            while p > 0 and set_list[p - 1] > t:
                set_list[p] = set_list[p - 1]
                p -= 1
            set_list[p] = t
            nu += 1
        j = member_next[j]
    for p in range(nu):
        scratch.set_weights[p] = weights[set_list[p]]
    return pairwise_sum(scratch.set_weights, 0, nu)


@numba.njit(inline="always", **NJIT_OPTIONS)
def _absent_set_weight(c: int, stamp: int, weights: np.ndarray, scratch: Scratch) -> float:
    """Sum of the weights of the sets with no box in cluster ``c``, in set order (numpy's pairwise sum)."""
    kept_set = scratch.ints[IntRow.KEPT_SET]
    member_next = scratch.ints[IntRow.MEMBER_NEXT]
    set_stamp = scratch.set_stamp
    j = scratch.ints[IntRow.MEMBER_HEAD, c]
    while j != -1:
        set_stamp[kept_set[j]] = stamp
        j = member_next[j]
    na = np.int64(0)  # not the literal 0: see fuse_image_range
    for t in range(weights.shape[0]):
        if set_stamp[t] != stamp:
            scratch.set_weights[na] = weights[t]
            na += 1
    return pairwise_sum(scratch.set_weights, 0, na)


# ----------------------------------------------------------------------------------------------------------------
# 5. output
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(**NJIT_OPTIONS)
def _emit_by_score(nc: int, out_row: int, out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray,
                   scratch: Scratch) -> int:
    """Write clusters ``0..nc-1`` to rows ``out_row...`` by final score descending (ties: the cluster created
    later first, the same rule as the box order); returns ``nc``."""
    fused = scratch.boxes[BoxRow.FUSED]
    final_score = scratch.floats[FloatRow.FINAL_SCORE]
    cluster_label = scratch.ints[IntRow.CLUSTER_LABEL]
    by_score = scratch.ints[IntRow.BY_SCORE]
    keys = scratch.ints[IntRow.SORT_KEY]
    float_sort_keys(final_score, nc, keys)
    radix_argsort_top(keys, nc, by_score, scratch.ints[IntRow.SORT_KEY_A], scratch.ints[IntRow.SORT_KEY_B],
                      scratch.ints[IntRow.SORT_INDEX_B], scratch.radix_hist)
    o = out_row
    for r in range(nc):
        c = by_score[nc - 1 - r]
        out_box[o, 0] = fused[c, 0]
        out_box[o, 1] = fused[c, 1]
        out_box[o, 2] = fused[c, 2]
        out_box[o, 3] = fused[c, 3]
        out_score[o] = final_score[c]
        out_label[o] = cluster_label[c]
        o += 1
    return nc
