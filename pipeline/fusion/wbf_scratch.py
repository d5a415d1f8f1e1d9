"""The WBF kernel's work arrays: their layout, defined once, and their allocation.

Fusing one image needs some thirty-five work arrays (kept boxes, cluster state, sort buffers, the grid index).
They are allocated by the caller and reused across images and calls: no allocation and no page faults per image.
Passing them from Python costs per array: about 0.1 us as a separate argument, about 0.3 us inside a tuple
(typed and unboxed member by member); thirty-five of them would add ~10 us to a ~100 us single-image call. So the
arrays of one dtype and length are rows of one 2-D block, and the eleven blocks travel as separate arguments.

* :class:`Scratch` names the blocks; its field order is the order in which they are passed: the driver calls
  ``kernel(..., *scratch)`` and the kernel rebuilds ``Scratch(*blocks)``, so no argument list repeats the layout.
* :class:`BoxRow`, :class:`FloatRow`, :class:`IntRow` name the rows of the 2-D blocks; the kernel indexes
  ``scratch.floats[FloatRow.KEPT_SCORE]`` (numba freezes the enum members into constants).
* :func:`allocate_scratch` is the only place that sizes anything; :func:`thread_scratch` caches one set per thread.

"Per box" rows are indexed by kept-box position, "per cluster" rows by cluster index; both are at most the number
of boxes of the largest image (``cap``), since every cluster has at least one box.
"""
from __future__ import annotations

import threading
from enum import IntEnum, unique
from typing import NamedTuple

import numpy as np

from pipeline.fusion.grid import GRID_MAX, ROW_WORDS  # cells per axis at most, occupancy words per row
from pipeline.fusion.primitives import RADIX_HIST_SIZE


@unique
class BoxRow(IntEnum):
    """Rows of ``Scratch.boxes`` (float64, ``(len(BoxRow), cap, 4)``, ``x1, y1, x2, y2`` in [0, 1])."""

    KEPT = 0  # per box: the image's prefiltered boxes, swapped and clipped, in (set, input) order
    FUSED = 1  # per cluster: the fused box as the library stores it (float32-rounded once a second box joined)


@unique
class FloatRow(IntEnum):
    """Rows of ``Scratch.floats`` (float64, ``(len(FloatRow), cap)``)."""

    KEPT_SCORE = 0  # per box: weighted score, score * weight of its set
    CONF_SUM = 1  # per cluster: sum of the members' weighted scores, float64
    WEIGHT_SUM = 2  # per cluster: sum of the members' set weights, float64
    MAX_SCORE = 3  # per cluster: largest weighted score of a member
    SCORE = 4  # per cluster: the score as the library stores it (float32-rounded once a second box joined)
    WEIGHT = 5  # per cluster: the weight sum as the library stores it (float32-rounded likewise)
    FINAL_SCORE = 6  # per cluster: the score after the conf_type rescaling: the output score


@unique
class IntRow(IntEnum):
    """Rows of ``Scratch.ints`` (int64, ``(len(IntRow), cap)``)."""

    KEPT_SET = 0  # per box: set index
    KEPT_LABEL = 1  # per box: label
    BY_GROUP = 2  # kept boxes by label group (first-appearance order), then weighted score descending
    GROUP_ID = 3  # per box: its label group, numbered in label order
    GROUP_FIRST = 4  # per label group: its first box in input order; then reused as the group's write cursor
    GROUP_RANK = 5  # per label group: its rank in first-appearance order
    MEMBER_COUNT = 6  # per cluster: number of boxes
    CLUSTER_LABEL = 7  # per cluster: label
    MEMBER_HEAD = 8  # per cluster: its first box (the members form a linked list in joining order)
    MEMBER_TAIL = 9  # per cluster: its last box
    MEMBER_NEXT = 10  # per box: the next box of its cluster, -1 at the end
    CELL = 11  # per cluster: its grid cell, -1 when outside the grid (NaN fused box)
    CELL_NEXT = 12  # per cluster: the next cluster in the same cell, -1 at the end
    CELL_PREV = 13  # per cluster: the previous cluster in the same cell, -1 at the head
    BY_SCORE = 14  # stable ascending argsort by score (walked backwards: descending with the tie rule)
    BY_LABEL = 15  # stable ascending argsort by label; then of the label groups by first appearance
    SORT_KEY = 16  # radix sort input keys
    SORT_KEY_A = 17  # radix sort work buffers
    SORT_KEY_B = 18
    SORT_INDEX_B = 19


class Scratch(NamedTuple):
    """The kernel's work arrays for images of up to ``cap`` boxes and ``n_sets`` sets (see the module docstring)."""

    boxes: np.ndarray  # float64 (len(BoxRow), cap, 4)
    box_sums: np.ndarray  # float32 (cap, 4): per cluster, the library's float32 running sums of score * coordinate
    floats: np.ndarray  # float64 (len(FloatRow), cap)
    ints: np.ndarray  # int64 (len(IntRow), cap)
    group_start: np.ndarray  # int64 (cap + 1): label group g is BY_GROUP[group_start[g]:group_start[g + 1]]
    radix_hist: np.ndarray  # int64 (RADIX_HIST_SIZE): radix sort histograms
    grid_head: np.ndarray  # int64 (GRID_MAX ** 2): per grid cell, its first cluster, -1 when empty
    grid_rows: np.ndarray  # int64 (GRID_MAX * ROW_WORDS): per grid row, which cells hold clusters
    #                        (pipeline.fusion.grid.mark_cell); the search skips the empty ones
    set_stamp: np.ndarray  # int64 (n_sets): per set, the last cluster visit that saw it (distinct-set counting)
    set_list: np.ndarray  # int64 (n_sets): the distinct sets of one cluster, ascending
    set_weights: np.ndarray  # float64 (n_sets): weights gathered for one pairwise sum

    @property
    def cap(self) -> int:
        """Most boxes per image this scratch can fuse."""
        return self.ints.shape[1]

    @property
    def n_sets(self) -> int:
        """Most sets this scratch can fuse."""
        return self.set_weights.shape[0]


def allocate_scratch(cap: int, n_sets: int) -> Scratch:
    """Uninitialised work arrays for images of up to ``cap`` boxes (at least 1) and ``n_sets`` sets.

    Nothing needs initialising: the kernel writes every element before reading it (``set_stamp`` is reset per
    kernel call).
    """
    cap = max(int(cap), 1)
    n_sets = int(n_sets)
    return Scratch(
        boxes=np.empty((len(BoxRow), cap, 4)),
        box_sums=np.empty((cap, 4), np.float32),
        floats=np.empty((len(FloatRow), cap)),
        ints=np.empty((len(IntRow), cap), np.int64),
        group_start=np.empty(cap + 1, np.int64),
        radix_hist=np.empty(RADIX_HIST_SIZE, np.int64),
        grid_head=np.empty(GRID_MAX * GRID_MAX, np.int64),
        grid_rows=np.empty(GRID_MAX * ROW_WORDS, np.int64),
        set_stamp=np.empty(n_sets, np.int64),
        set_list=np.empty(n_sets, np.int64),
        set_weights=np.empty(n_sets),
    )


_THREAD_LOCAL = threading.local()


def thread_scratch(cap: int, n_sets: int) -> Scratch:
    """This thread's cached :class:`Scratch`, large enough for ``cap`` boxes and ``n_sets`` sets.

    Grown geometrically (x1.5), never shrunk, so repeated single-image calls neither allocate nor page-fault.
    """
    cap = max(int(cap), 1)
    cached: Scratch | None = getattr(_THREAD_LOCAL, "scratch", None)
    if cached is not None and cached.cap >= cap and cached.n_sets >= n_sets:
        return cached
    if cached is not None:
        cap = max(cap, int(cached.cap * 1.5))
        n_sets = max(n_sets, cached.n_sets)
    _THREAD_LOCAL.scratch = allocate_scratch(cap, n_sets)
    return _THREAD_LOCAL.scratch
