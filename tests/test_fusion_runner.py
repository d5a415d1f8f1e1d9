"""pipeline.fusion.runner: the dense rows a fusion hands on, and the fresh arrays its slots and rows live in."""
from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.fusion.runner import SMALL_PAGES_MIN, DenseRows, RowsPool, fresh_array


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=40), st.booleans())
def test_taking_rows_equals_boolean_indexing_and_keeps_the_values_one_block(keep, with_selection):
    # any mask (the tuner's are prefixes of each image's rows, but nothing relies on it): every column taken alike
    rng = np.random.default_rng(len(keep))
    n = len(keep)
    rows = DenseRows(np.sort(rng.integers(0, 5, n)), rng.random((5, n)), rng.integers(0, 3, n),
                     rng.random(n) if with_selection else None)
    mask = np.array(keep, dtype=bool)
    taken = rows.take(mask)
    np.testing.assert_array_equal(taken.image, rows.image[mask])
    np.testing.assert_array_equal(taken.values, rows.values[:, mask])
    np.testing.assert_array_equal(taken.label, rows.label[mask])
    assert (taken.selection is None) == (not with_selection)
    if with_selection:
        np.testing.assert_array_equal(taken.selection, rows.selection[mask])
    # one C-ordered block: its coordinate rows' transpose is what the scorer reads in place
    assert taken.values.flags.c_contiguous and taken.values.shape == (5, int(mask.sum()))
    assert taken.image.dtype == taken.label.dtype == np.int64


def test_the_rows_pool_hands_a_buffer_out_again_only_once_no_rows_or_views_of_them_are_held():
    pool = RowsPool()
    first = pool.rows(100, selection=True)
    assert first.values.flags.c_contiguous and first.values.shape == (5, 100)
    assert first.image.dtype == first.label.dtype == np.int64 and first.selection.shape == (100,)
    columns = [first.image, first.values, first.label, first.selection]
    assert not any(np.shares_memory(a, b) for k, a in enumerate(columns) for b in columns[k + 1:])
    first.values[:] = 7.0
    second = pool.rows(100, selection=False)  # the first rows are held: another buffer
    assert second.selection is None and not np.shares_memory(second.values, first.values)
    second.values[:] = 9.0
    np.testing.assert_array_equal(first.values, 7.0)
    coordinates = first.values[:4].T  # a view, as the scorer takes it, outlives the rows it was cut from
    del first, columns
    third = pool.rows(50, selection=False)
    assert not np.shares_memory(third.values, coordinates) and not np.shares_memory(third.values, second.values)
    assert len(pool.buffers) == 3
    del coordinates, third
    fourth = pool.rows(80, selection=True)  # free again: reused, none allocated
    assert len(pool.buffers) == 3 and np.shares_memory(fourth.values, pool.buffers[0])
    del fourth
    bigger = pool.rows(1000, selection=False)  # no free buffer is large enough: the free ones go, one is made
    assert len(pool.buffers) == 2 and len(pool.buffers[-1]) >= 8 * 1000
    assert np.shares_memory(bigger.values, pool.buffers[-1])


@pytest.mark.parametrize("shape, dtype", [(10, np.int64), ((3, 7), np.float64), (1 << 20, np.float64),
                                          ((5, 300_000), np.float64), (0, np.int64)])
def test_fresh_arrays_are_writable_arrays_of_the_shape_and_dtype_asked_for(shape, dtype) -> None:
    a = fresh_array(shape, dtype)
    assert a.shape == (shape if isinstance(shape, tuple) else (shape,)) and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    a[...] = 7  # every element can be written and read back
    assert (a == 7).all()
    owner = a
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    if a.nbytes >= SMALL_PAGES_MIN and hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux: a mapping of its own (small
        assert isinstance(owner, mmap.mmap)  # pages), kept alive by the array
    else:
        assert owner is a  # numpy's own allocation


def test_fresh_arrays_without_the_huge_page_advice_still_come(monkeypatch) -> None:
    """A kernel built without transparent huge pages refuses ``MADV_NOHUGEPAGE`` (EINVAL): the mapping serves."""
    if not hasattr(mmap, "MADV_NOHUGEPAGE"):
        pytest.skip("no madvise advice on this platform: np.empty serves")

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mmap, "mmap", Refusing)
    a = fresh_array(SMALL_PAGES_MIN // 8, np.float64)
    a[:] = 1.5
    assert a.sum() == 1.5 * len(a)
