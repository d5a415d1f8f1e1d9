"""A uniform grid over box centres in ``[0, 1]^2``: the exact spatial index of the NMS, soft-NMS and NMW kernels.

Every rule compares a box with earlier boxes (kept boxes, cluster representatives) and acts only when their IoU
passes a threshold, or (soft-NMS) when they overlap at all. Both conditions bound the distance between the two
centres, so a box only needs the boxes filed under the grid cells of a window around its own centre:

* IoU > ``t``: ``|dx| < k * w_B`` and ``|dy| < k * h_B`` with ``k`` = :func:`search_radius_factor` (the proof is in
  :mod:`pipeline.fusion.wbf`; ``B`` is the box looking, ``A`` any box it could match);
* positive intersection: ``|dx| < (w_A + w_B) / 2``, bounded with the largest ``w_A`` filed in the grid.

The windows are widened far beyond the rounding of the computed centres and IoU (relative 1e-9, absolute 1e-12),
so no box that could pass is ever skipped; the rule's own arithmetic then decides, exactly as the library's.
Cells are filed as linked lists in the kernels' work arrays (``head`` per cell, ``next`` per box).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros  # numba's own intrinsic for LLVM's cttz

from pipeline.fusion.primitives import NJIT_NO_REFCOUNT, NJIT_OPTIONS, cell_index

# Digests of the package files compiled into this module's cached functions; see wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {"primitives.py": "5a867f87f2eb7faf"}

GRID_MAX = 128  # cells per axis at most
CELL_BITS = 32  # grid cells per occupancy word (int64 words, so no sign bit is ever used)
ROW_WORDS = GRID_MAX // CELL_BITS  # occupancy words per grid row
GRID_MIN_THR = 0.1  # below this IoU threshold the centre bound is too loose: scan every box
GRID_MIN_BOXES = 24  # groups smaller than this are scanned directly


@numba.njit(inline="always", **NJIT_OPTIONS)
def search_radius_factor(iou_thr: float) -> float:
    """``k``: a box whose centre is farther than ``k * width`` (x) or ``k * height`` (y) from box B's centre
    cannot have IoU > ``iou_thr`` with B; widened far beyond float rounding (the same bound as WBF's)."""
    t_b = min(iou_thr * (1.0 - 1e-9) - 1e-12, 0.999)
    if t_b >= 0.5:
        kfac = 1.0 - t_b
    elif t_b > 0.0:
        kfac = (1.0 - t_b) / (2.0 * t_b)
    else:
        kfac = 1e300
    return kfac * (1.0 + 1e-9)


@numba.njit(inline="always", **NJIT_OPTIONS)
def cells_per_axis(window: float, n: int) -> int:
    """Cells per axis for ``n`` boxes whose typical search window is ``window`` wide: about one window per cell,
    at most ``2 sqrt(n) + 1`` cells per axis (and ``GRID_MAX``), so that the index costs less than it saves."""
    most = min(GRID_MAX, int(2.0 * math.sqrt(n)) + 1)
    target = 1.0 / (window + 1e-12)
    if target < most:
        return max(int(target), 1)
    return most


@numba.njit(inline="always", **NJIT_OPTIONS)
def centre_cell(x1: float, y1: float, x2: float, y2: float, n_cells: int) -> int:
    """Grid cell (row-major) of the box centre."""
    return cell_index((y1 + y2) * 0.5, n_cells) * n_cells + cell_index((x1 + x2) * 0.5, n_cells)


@numba.njit(inline="always", **NJIT_OPTIONS)
def window_cells(x1: float, y1: float, x2: float, y2: float, rx: float, ry: float,
                 n_cells: int) -> tuple[int, int, int, int]:
    """``(gx0, gx1, gy0, gy1)``: the cells holding every centre within ``rx`` (x) and ``ry`` (y) of the box's
    centre, the radii widened against rounding."""
    rx = rx * (1.0 + 1e-9) + 1e-12
    ry = ry * (1.0 + 1e-9) + 1e-12
    cx = (x1 + x2) * 0.5
    cy = (y1 + y2) * 0.5
    return (cell_index(cx - rx, n_cells), cell_index(cx + rx, n_cells), cell_index(cy - ry, n_cells),
            cell_index(cy + ry, n_cells))


# ----------------------------------------------------------------------------------------------------------------
# Occupancy bits: per grid row, ROW_WORDS words, bit k of word w set iff cell CELL_BITS * w + k holds something. A
# search walks a window row's occupied cells only (most cells of a window are empty where boxes are sparse).
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(inline="always", **NJIT_OPTIONS)
def mark_cell(row_bits: np.ndarray, cell: int, n_cells: int, occupied: bool) -> None:
    """Mark grid cell ``cell`` (row-major, ``n_cells`` per axis) as holding something, or as empty."""
    row = cell // n_cells
    col = cell - row * n_cells
    k = row * ROW_WORDS + col // CELL_BITS
    bit = np.int64(1) << (col % CELL_BITS)
    row_bits[k] = (row_bits[k] | bit) if occupied else (row_bits[k] & ~bit)


@numba.njit(inline="always", **NJIT_OPTIONS)
def occupied_in_word(row_bits: np.ndarray, gy: int, w: int, gx0: int, gx1: int) -> np.int64:
    """The bits of word ``w`` of row ``gy`` that stand for occupied cells among ``gx0..gx1`` (walk them with
    :func:`first_cell` and ``bits &= bits - 1``)."""
    lo = max(gx0 - w * CELL_BITS, 0)
    hi = min(gx1 - w * CELL_BITS, CELL_BITS - 1)
    return row_bits[gy * ROW_WORDS + w] & (((np.int64(2) << hi) - 1) ^ ((np.int64(1) << lo) - 1))


@numba.njit(inline="always", **NJIT_OPTIONS)
def first_cell(bits: np.int64, w: int) -> int:
    """The column of the lowest set bit of ``bits`` (non-zero), word ``w`` of its row."""
    return w * CELL_BITS + trailing_zeros(bits)


# ----------------------------------------------------------------------------------------------------------------
# A grid of boxes stored cell by cell: each cell's boxes are a contiguous run of slots, so a window is scanned
# as a few contiguous arrays (no pointer chasing). Capacities come from a layout pass over every box that may be
# filed; boxes are then added (appended to their cell) and removed (the cell's last slot moves into the hole).
#   cell_of[j]: box j's cell (-1: not in the grid); slot_of[j]: its slot; slot_box[s]: the box in slot s;
#   slot_xy[s]: its x1, y1, x2, y2; cell_start[c] .. + cell_count[c]: the slots of cell c.
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(**NJIT_NO_REFCOUNT)
def grid_layout(n_rows: int, n_cols: int, boxes: np.ndarray, ids: np.ndarray, k: int, cell_of: np.ndarray,
                cell_start: np.ndarray, cell_count: np.ndarray) -> None:
    """Cells (``n_rows`` x ``n_cols``, row-major; :func:`centre_cell`'s when square) and capacities for boxes
    ``ids[:k]`` (rows of ``boxes``): sets their ``cell_of``, ``cell_start`` (room for all of them) and empties every
    cell."""
    n = n_rows * n_cols
    for c in range(n + 1):
        cell_start[c] = 0
    for r in range(k):
        j = ids[r]
        c = (cell_index((boxes[j, 1] + boxes[j, 3]) * 0.5, n_rows) * n_cols
             + cell_index((boxes[j, 0] + boxes[j, 2]) * 0.5, n_cols))
        cell_of[j] = c
        cell_start[c + 1] += 1
    for c in range(n):
        cell_start[c + 1] += cell_start[c]
        cell_count[c] = 0


@numba.njit(**NJIT_NO_REFCOUNT)
def grid_add(j: int, boxes: np.ndarray, cell_of: np.ndarray, slot_of: np.ndarray, slot_box: np.ndarray,
             slot_xy: np.ndarray, cell_start: np.ndarray, cell_count: np.ndarray) -> None:
    """Append box ``j`` (laid out by :func:`grid_layout`) to its cell."""
    c = cell_of[j]
    s = cell_start[c] + cell_count[c]
    cell_count[c] += 1
    slot_of[j] = s
    slot_box[s] = j
    for k in range(4):
        slot_xy[s, k] = boxes[j, k]


@numba.njit(**NJIT_NO_REFCOUNT)
def grid_remove(j: int, cell_of: np.ndarray, slot_of: np.ndarray, slot_box: np.ndarray, slot_xy: np.ndarray,
                cell_start: np.ndarray, cell_count: np.ndarray) -> None:
    """Take box ``j`` out of the grid (nothing when it is not in it): its cell's last slot moves into its slot."""
    c = cell_of[j]
    if c == -1:
        return
    cell_of[j] = -1
    s = slot_of[j]
    last = cell_start[c] + cell_count[c] - 1
    cell_count[c] -= 1
    if s != last:
        moved = slot_box[last]
        slot_box[s] = moved
        slot_of[moved] = s
        for k in range(4):
            slot_xy[s, k] = slot_xy[last, k]
