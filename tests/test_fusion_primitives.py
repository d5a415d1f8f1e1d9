"""pipeline.fusion.primitives: the compiled building blocks are exact (numpy's sum, a stable argsort, the
library's IoU bit for bit)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.fusion.primitives import (RADIX_HIST_SIZE, cell_index, float_sort_keys, int_sort_keys, iou,
                                        pairwise_sum, radix_argsort, radix_argsort_top)


def test_pairwise_sum_is_numpy_sum():
    rng = np.random.default_rng(0)
    for n in [1, 5, 8, 9, 100, 128, 129, 300, 1000, 5000]:
        a = rng.random(n) * 10.0 ** rng.uniform(-3, 3, n)
        buf = np.r_[7.0, a]
        assert pairwise_sum(buf, 1, n) == a.sum()


def radix_order(keys: np.ndarray) -> np.ndarray:
    n = len(keys)
    idx, ka, kb, ib = (np.empty(n, np.int64) for _ in range(4))
    radix_argsort(keys, n, idx, ka, kb, ib, np.empty(RADIX_HIST_SIZE, np.int64))
    return idx


@pytest.mark.parametrize("n", [0, 1, 2, 17, 300, 5000])
def test_radix_argsort_of_floats_is_numpys_stable_argsort(n):
    rng = np.random.default_rng(n)
    a = np.round(rng.normal(0, 10, n), 1)  # many ties
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 5e-324, -5e-324, 1e308, -1e308])
    a[: min(n, 8)] = specials[: min(n, 8)]
    rng.shuffle(a)
    keys = np.empty(n, np.int64)
    float_sort_keys(a, n, keys)
    np.testing.assert_array_equal(radix_order(keys), np.argsort(a, kind="stable"))  # -0.0 ties with 0.0 in both


@pytest.mark.parametrize("n", [0, 1, 3, 1000])
def test_radix_argsort_of_ints_is_numpys_stable_argsort(n):
    rng = np.random.default_rng(n)
    a = rng.integers(-5, 5, n) * rng.choice([1, 2**40], n)
    a[: min(n, 2)] = [np.iinfo(np.int64).min, np.iinfo(np.int64).max][: min(n, 2)]
    keys = np.empty(n, np.int64)
    int_sort_keys(a, n, keys)
    np.testing.assert_array_equal(radix_order(keys), np.argsort(a, kind="stable"))


def test_iou_is_the_librarys_bit_for_bit():
    rng = np.random.default_rng(1)
    a = np.sort(rng.random((500, 2, 2)), axis=1).reshape(500, 4)[:, [0, 2, 1, 3]]  # x1 <= x2, y1 <= y2
    b = np.sort(rng.random((500, 2, 2)), axis=1).reshape(500, 4)[:, [0, 2, 1, 3]]
    a[:50] = np.round(a[:50] * 8) / 8  # exact overlaps and touching edges
    b[:50] = np.round(b[:50] * 8) / 8
    for boxes, new_box in zip(a, b):
        # ensemble_boxes 1.0.9, find_matching_box_fast.bb_iou_array, for one cluster box
        xa, ya = np.maximum(boxes[0], new_box[0]), np.maximum(boxes[1], new_box[1])
        xb, yb = np.minimum(boxes[2], new_box[2]), np.minimum(boxes[3], new_box[3])
        inter = np.maximum(xb - xa, 0) * np.maximum(yb - ya, 0)
        area_a = (boxes[2] - boxes[0]) * (boxes[3] - boxes[1])
        area_b = (new_box[2] - new_box[0]) * (new_box[3] - new_box[1])
        with np.errstate(invalid="ignore"):
            expected = inter / (area_a + area_b - inter)
        got = iou(*boxes, *new_box)
        assert got == expected or (np.isnan(got) and np.isnan(expected))


def test_cell_index_clamps_to_the_grid():
    assert [cell_index(v, 4) for v in (-1.0, 0.0, 0.24, 0.25, 0.5, 0.99, 1.0, 7.0)] == [0, 0, 0, 1, 2, 3, 3, 3]
    assert cell_index(np.nextafter(1.0, 0.0), 3) == 2


@pytest.mark.parametrize("n", [0, 1, 2, 17, 300, 5000])
@pytest.mark.parametrize("spread", ["wide", "ties", "narrow"])
def test_radix_argsort_top_is_numpys_stable_argsort(n, spread):
    """Runs of equal top halves are finished by insertion sort; a long run falls back to the full radix sort."""
    rng = np.random.default_rng(n)
    if spread == "wide":
        a = rng.random(n)
    elif spread == "ties":
        a = np.round(rng.random(n), 2)  # long runs of equal keys: stable order kept
    else:
        a = 0.5 + rng.random(n) * 1e-9  # distinct keys sharing their top 32 bits: the fallback
    a[: min(n, 3)] = [-0.0, 0.0, -1.0][: min(n, 3)]
    keys = np.empty(n, np.int64)
    float_sort_keys(a, n, keys)
    idx, ka, kb, ib = (np.empty(n, np.int64) for _ in range(4))
    radix_argsort_top(keys, n, idx, ka, kb, ib, np.empty(RADIX_HIST_SIZE, np.int64))
    np.testing.assert_array_equal(idx, np.argsort(a, kind="stable"))
