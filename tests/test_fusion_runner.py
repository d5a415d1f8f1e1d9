"""pipeline.fusion.runner: the dense rows a fusion hands on."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.fusion.runner import DenseRows


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
