"""pipeline.fusion.grid: the search bounds never skip a box that could pass; cells stored slot by slot stay
consistent through adds and removals."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.fusion.grid import (GRID_MAX, centre_cell, grid_add, grid_layout, grid_remove, search_radius_factor,
                                  window_cells)
from pipeline.fusion.primitives import iou


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.55, 0.7, 0.9])
def test_iou_above_threshold_implies_the_centre_bound(thr):
    """Every pair with IoU > thr lies inside the window of either box, including pairs built at the bound."""
    rng = np.random.default_rng(int(thr * 100))
    k = search_radius_factor(thr)
    wh = rng.uniform(0.01, 0.3, (20000, 2, 2))
    c = rng.uniform(0.3, 0.7, (20000, 1, 2)) + rng.normal(0, 0.05, (20000, 2, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=2)  # (pairs, 2 boxes, x1 y1 x2 y2)
    for a, b in boxes:
        if iou(*a, *b) > thr:
            for look, other in ((b, a), (a, b)):
                dx = abs((other[0] + other[2]) / 2 - (look[0] + look[2]) / 2)
                dy = abs((other[1] + other[3]) / 2 - (look[1] + look[3]) / 2)
                assert dx < k * (look[2] - look[0]) and dy < k * (look[3] - look[1])


def test_window_cells_cover_the_window():
    n = 16
    for x in np.linspace(0.0, 1.0, 23):
        gx0, gx1, gy0, gy1 = window_cells(x - 0.01, x - 0.01, x + 0.01, x + 0.01, 0.1, 0.05, n)
        cells = {(cy, cx) for cy in range(gy0, gy1 + 1) for cx in range(gx0, gx1 + 1)}
        for px in np.linspace(x - 0.1, x + 0.1, 9):
            for py in np.linspace(x - 0.05, x + 0.05, 9):
                c = centre_cell(px, py, px, py, n)
                assert (c // n, c % n) in cells


def test_grid_add_and_remove_keep_each_cell_a_contiguous_run():
    rng = np.random.default_rng(3)
    m, n_cells = 300, 8
    xy = rng.uniform(0, 0.9, (m, 2))
    boxes = np.c_[xy, xy + 0.05]
    cell_of = np.full(m, -1, np.int64)
    slot_of, slot_box = np.empty(m, np.int64), np.empty(m, np.int64)
    slot_xy = np.empty((m, 4))
    cell_start, cell_count = np.empty(GRID_MAX ** 2 + 1, np.int64), np.empty(GRID_MAX ** 2, np.int64)
    ids = np.arange(m, dtype=np.int64)
    grid_layout(n_cells, n_cells, boxes, ids, m, cell_of, cell_start, cell_count)
    filed = set(rng.choice(m, 200, replace=False).tolist())
    for j in filed:
        grid_add(j, boxes, cell_of, slot_of, slot_box, slot_xy, cell_start, cell_count)
    for j in rng.choice(sorted(filed), 120, replace=False).tolist():
        grid_remove(j, cell_of, slot_of, slot_box, slot_xy, cell_start, cell_count)
        filed.discard(j)
        grid_remove(j, cell_of, slot_of, slot_box, slot_xy, cell_start, cell_count)  # a second removal: no-op
    seen = set()
    for c in range(n_cells * n_cells):
        assert cell_start[c] + cell_count[c] <= cell_start[c + 1]
        for s in range(cell_start[c], cell_start[c] + cell_count[c]):
            j = slot_box[s]
            assert slot_of[j] == s and cell_of[j] == c == centre_cell(*boxes[j], n_cells)
            np.testing.assert_array_equal(slot_xy[s], boxes[j])
            seen.add(j)
    assert seen == filed
