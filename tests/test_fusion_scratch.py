"""pipeline.fusion.wbf_scratch: the kernel's work arrays, laid out once; the kernel reads none it has not written."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.fusion import weighted_boxes_fusion, wbf_scratch
from pipeline.fusion.packing import pack_lists
from pipeline.fusion.rows import N_STATS
from pipeline.fusion.wbf_kernel import CONF_TYPES, fuse_image_range
from pipeline.fusion.grid import ROW_WORDS
from pipeline.fusion.wbf_scratch import (GRID_MAX, BoxRow, FloatRow, IntRow, Scratch, allocate_scratch,
                                         thread_scratch)


def test_allocate_scratch_sizes_every_block():
    s = allocate_scratch(10, 3)
    assert isinstance(s, Scratch)
    shapes = {name: (block.shape, block.dtype) for name, block in s._asdict().items()}
    assert shapes == {
        "boxes": ((len(BoxRow), 10, 4), np.float64),
        "box_sums": ((10, 4), np.float32),
        "floats": ((len(FloatRow), 10), np.float64),
        "ints": ((len(IntRow), 10), np.int64),
        "group_start": ((11,), np.int64),
        "radix_hist": ((2048,), np.int64),
        "grid_head": ((GRID_MAX * GRID_MAX,), np.int64),
        "grid_rows": ((GRID_MAX * ROW_WORDS,), np.int64),
        "set_stamp": ((3,), np.int64),
        "set_list": ((3,), np.int64),
        "set_weights": ((3,), np.float64),
    }
    assert all(block.flags.c_contiguous for block in s)  # rows are contiguous views inside the kernel
    assert (s.cap, s.n_sets) == (10, 3)
    assert allocate_scratch(0, 0).cap == 1


def test_row_enums_number_the_rows_of_their_block():
    for rows in (BoxRow, FloatRow, IntRow):
        assert [r.value for r in rows] == list(range(len(rows)))


def test_thread_scratch_is_cached_grown_and_per_thread(monkeypatch):
    monkeypatch.setattr(wbf_scratch, "_THREAD_LOCAL", threading.local())
    a = thread_scratch(10, 2)
    assert thread_scratch(5, 1) is a and thread_scratch(10, 2) is a
    b = thread_scratch(11, 2)
    assert b is not a and b.cap == 15 and b.n_sets == 2  # grown by half, so growth steps are few
    c = thread_scratch(3, 4)  # more sets: regrown, never smaller
    assert c.cap >= b.cap and c.n_sets == 4
    other = []
    worker = threading.Thread(target=lambda: other.append(thread_scratch(3, 4)))
    worker.start()
    worker.join()
    assert other[0] is not c


def dense_image(seed: int) -> tuple[list, list, list, list]:
    """Several labels, big label groups (grid index on), many joins, some all-zero clusters, 4 weighted sets."""
    rng = np.random.default_rng(seed)
    objs = rng.uniform(0, 0.8, (12, 2))
    boxes, scores, labels = [], [], []
    for _ in range(4):
        k = rng.integers(0, 12, 40)
        xy = objs[k] + rng.normal(0, 0.01, (40, 2))
        boxes.append(np.clip(np.c_[xy, xy + 0.15], 0, 1))
        scores.append(np.where(rng.random(40) < 0.1, 0.0, rng.random(40)))
        labels.append(k % 3)
    return boxes, scores, labels, [1.0, 2.0, 0.5, 1.5]


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_kernel_reads_no_work_array_it_has_not_written(conf_type):
    """Exact-size scratch prefilled with two different garbage patterns: same output, the public function's."""
    boxes, scores, labels, weights = dense_image(3)
    expected = weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=0.5, conf_type=conf_type)
    n = sum(len(s) for s in scores)
    w = np.array(weights)
    table = pack_lists(np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels), np.full(4, 40), 4)
    packed = (0, 1, *table.kernel_rows, table.row_offs, w, w.sum(), w.max(), 0.5, np.zeros(4),
              CONF_TYPES.index(conf_type), False)
    for fill_float, fill_int in [(np.nan, 0), (-3.5, -1)]:
        scratch = allocate_scratch(n, 4)
        for block in scratch:
            block.fill(fill_int if block.dtype == np.int64 else fill_float)
        out = np.empty((n, 4)), np.empty(n), np.empty(n, np.int64), np.zeros(1, np.int64)
        fuse_image_range(*packed, *out, np.zeros(N_STATS, np.int64), *scratch)
        m = out[3][0]
        np.testing.assert_array_equal(out[0][:m], expected[0])
        np.testing.assert_array_equal(out[1][:m], expected[1])
        np.testing.assert_array_equal(out[2][:m], expected[2])
