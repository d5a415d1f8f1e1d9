"""pipeline.fusion.nmw against ensemble_boxes 1.0.9's non_maximum_weighted: property tests, hand cases."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import pytest
from ensemble_boxes import non_maximum_weighted as eb_nmw
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.fusion import non_maximum_weighted
from tests.test_fusion import cases_across_row_words, lattice_boxes, make_inputs


def lib(*args, **kwargs):
    args = copy.deepcopy(args)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return eb_nmw(*args, **kwargs)


def ours(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return non_maximum_weighted(*args, **kwargs)


def assert_identical(ref, got):
    """Same count, order, boxes (the library's float32 values), scores and labels, bit for bit. Output rows whose
    float32 scores tie (the library's unstable argsort leaves their order undefined) compare as a multiset."""
    rb, rs, rl = (np.asarray(a, np.float64) for a in ref)
    gb, gs, gl = got
    assert gb.dtype == gs.dtype == gl.dtype == np.float64
    assert gb.shape == rb.reshape(-1, 4).shape and gs.shape == rs.shape and gl.shape == rl.shape
    if len(rs) == 0:
        return
    np.testing.assert_array_equal(gs, rs)
    if len(np.unique(rs)) < len(rs):
        ko = np.lexsort((rb[:, 3], rb[:, 2], rb[:, 1], rb[:, 0], rl, -rs))
        kg = np.lexsort((gb[:, 3], gb[:, 2], gb[:, 1], gb[:, 0], gl, -gs))
        rb, rl, gb, gl = rb[ko], rl[ko], gb[kg], gl[kg]
    np.testing.assert_array_equal(gl, rl)
    np.testing.assert_array_equal(gb, rb)


def no_tied_weighted_scores(scores, weights) -> bool:
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, np.float64)
    w = w / max(w) if len(w) else w
    ws = np.concatenate([np.asarray(s, np.float64) * w[t] for t, s in enumerate(scores)] + [np.zeros(0)])
    return len(np.unique(ws)) == len(ws)


RANDOM_CASES = dict(
    seed=st.integers(0, 2**32 - 1), n_sets=st.integers(1, 6), max_boxes=st.sampled_from([0, 3, 12, 30]),
    n_labels=st.integers(1, 3), quantise=st.booleans(), messy=st.booleans(), weighted=st.booleans(),
    iou_thr=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0, 0.42]),
    skip_box_thr=st.sampled_from([0.0, 0.0, 0.1, 0.35]), float32_scores=st.booleans())


def check_random_case(seed, n_sets, max_boxes, n_labels, quantise, messy, weighted, iou_thr, skip_box_thr,
                      float32_scores):
    rng = np.random.default_rng(seed)
    boxes, scores, labels = make_inputs(rng, n_sets, max_boxes, n_labels, quantise, messy)
    weights = rng.uniform(0.2, 3.0, n_sets).tolist() if weighted else None
    if float32_scores:
        scores = [s.astype(np.float32) for s in scores]
    assume(no_tied_weighted_scores(scores, weights))
    kw = dict(weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr)
    assert_identical(lib(boxes, scores, labels, **kw), ours(boxes, scores, labels, **kw))


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_CASES)
def test_matches_library_on_random_inputs(**case):
    check_random_case(**case)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_CASES)
def test_matches_library_on_random_inputs_quick(**case):
    """A sample of the slow property test above, for the fast lane (``-m "not slow"``)."""
    check_random_case(**case)


@pytest.mark.parametrize("seed", range(4))
def test_matches_library_on_large_inputs(seed):
    """Big label groups switch the grid index on (the library takes ~1 s per case)."""
    rng = np.random.default_rng(3000 + seed)
    n_sets = int(rng.integers(8, 16))
    objs = rng.uniform(0, 0.9, (40, 2))
    boxes, scores, labels = [], [], []
    for _ in range(n_sets):
        n = int(rng.integers(30, 80))
        k = rng.integers(0, 40, n)
        xy = objs[k] + rng.normal(0, 0.01 + 0.03 * (seed % 2), (n, 2))
        wh = rng.uniform(0.01, 0.15, (n, 2))
        fp = rng.random(n) < 0.3
        xy[fp] = rng.uniform(0, 0.9, (fp.sum(), 2))
        boxes.append(np.clip(np.c_[xy, xy + wh], 0, 1))
        scores.append(rng.random(n))
        labels.append(rng.integers(0, 1 + seed % 3, n))
    weights = rng.uniform(0.5, 2, n_sets).tolist()
    for iou_thr in (0.3, 0.55, 0.8):
        kw = dict(weights=weights, iou_thr=iou_thr, skip_box_thr=0.05)
        assert_identical(lib(boxes, scores, labels, **kw), ours(boxes, scores, labels, **kw))


@pytest.mark.slow  # 3 x 3,000 boxes through the library's pure-Python NMW: ~5 s (make test runs it)
def test_matches_library_with_small_boxes_on_a_grid_of_several_words_per_row():
    for boxes, scores, labels, kw in cases_across_row_words(8):
        assert_identical(lib(boxes, scores, labels, **kw), ours(boxes, scores, labels, **kw))


# ------------------------------------------------------------------------------------------------------------------
# hand cases
# ------------------------------------------------------------------------------------------------------------------
A = [0.1, 0.1, 0.5, 0.5]
A_SHIFTED = [0.15, 0.1, 0.55, 0.5]  # IoU with A: 0.35 / 0.45
FAR = [0.6, 0.6, 0.9, 0.9]


def test_cluster_box_is_weighted_by_score_and_iou_with_the_representative():
    boxes, scores, labels = [[A, FAR], [A_SHIFTED]], [[0.9, 0.4], [0.6]], [[0, 0], [0]]
    b, s, lab = non_maximum_weighted(boxes, scores, labels, weights=[2.0, 1.0], iou_thr=0.5)
    ovr = 0.35 / 0.45
    w_rep, w_shift = 0.9 * 1.0, 0.6 * 0.5 * ovr  # scores times weight / max weight, times IoU with A
    x1 = (w_rep * 0.1 + w_shift * 0.15) / (w_rep + w_shift)
    np.testing.assert_allclose(b[0], [x1, 0.1, (w_rep * 0.5 + w_shift * 0.55) / (w_rep + w_shift), 0.5], rtol=1e-6)
    np.testing.assert_array_equal(s, [np.float32(0.9), np.float32(0.4)])  # the representative's score, float32
    np.testing.assert_allclose(b[1], FAR, rtol=1e-6)  # float32(float32(s * c) / s): not always float32(c)
    assert_identical(lib(boxes, scores, labels, weights=[2.0, 1.0], iou_thr=0.5), (b, s, lab))


def test_representatives_do_not_move():
    """Chained boxes: each overlaps the previous one but not the first; the first box's cluster keeps its own
    representative, so the third box starts a new cluster (WBF would move the fused box towards it)."""
    boxes = [[[0.0, 0.0, 0.4, 0.4]], [[0.1, 0.0, 0.5, 0.4]], [[0.22, 0.0, 0.62, 0.4]]]
    scores, labels = [[0.9], [0.8], [0.7]], [[0], [0], [0]]
    got = non_maximum_weighted(boxes, scores, labels, iou_thr=0.5)
    assert len(got[1]) == 2
    assert_identical(lib(boxes, scores, labels, iou_thr=0.5), got)


def test_skip_threshold_labels_and_empty():
    boxes = [[A, FAR], [A]]
    out = non_maximum_weighted(boxes, [[0.9, 0.05], [0.5]], [[1.7, 2.0], [1.2]], skip_box_thr=0.1)
    np.testing.assert_array_equal(out[2], [1.0])  # labels truncated; the 0.05 box skipped
    assert_identical(lib(boxes, [[0.9, 0.05], [0.5]], [[1.7, 2.0], [1.2]], skip_box_thr=0.1), out)
    for args in [([], [], []), ([np.zeros((0, 4))], [[]], [[]]), ([[A]], [[0.1]], [[0]])]:
        b, s, lab = non_maximum_weighted(*args, skip_box_thr=0.2)
        assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)
    with pytest.raises(ValueError, match="finite"):
        non_maximum_weighted([[[0.1, np.inf, 0.2, 0.3]]], [[0.5]], [[0]])
    with pytest.raises(ValueError, match="lengths"):
        non_maximum_weighted([[A, FAR]], [[0.5]], [[0, 0]])


def test_results_of_consecutive_calls_are_independent():
    rng = np.random.default_rng(12)
    first = non_maximum_weighted(*make_inputs(rng, 3, 20, 1, quantise=False, messy=False))
    kept = tuple(a.copy() for a in first)
    non_maximum_weighted(*make_inputs(rng, 5, 30, 1, quantise=False, messy=False))
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("iou_thr", [1 / 3, 0.5, 0.6, 0.5 - 1e-12, 1 / 3 - 1e-13, 0.25 - 1e-12])
def test_ious_at_and_just_above_the_threshold_in_the_grid_search(iou_thr):
    # the representatives' search passes a candidate over without dividing only when its IoU cannot exceed the
    # threshold: lattice boxes put many IoUs exactly at it or a hair above it
    boxes, scores, labels = lattice_boxes()
    assert_identical(lib(boxes, scores, labels, iou_thr=iou_thr), ours(boxes, scores, labels, iou_thr=iou_thr))


def test_nmw_at_several_skip_thresholds_in_one_pass_is_a_fusion_per_threshold():
    # fuse_packed_levels (pipeline.fusion.levels): each threshold's output bit for bit fuse_packed's, at weights 1
    # or all equal (NMW divides them by their maximum), ties across labels and zero scores included
    from pipeline.fusion.nmw import fuse_packed, fuse_packed_levels
    from pipeline.fusion.packing import pack_lists
    from tests.test_fusion import _levels_case

    rng = np.random.default_rng(11)
    for case in range(200):
        packed = _levels_case(rng)
        if case % 3 == 0:
            packed = packed._replace(weights=np.full(len(packed.weights), 2.5))
        levels = sorted(rng.choice([0.0, 0.05, 0.1, 0.3, 0.5, 0.6], int(rng.integers(1, 4)), replace=False).tolist())
        iou_thr = float(rng.choice([0.05, 0.3, 0.55, 0.7]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = fuse_packed_levels(packed, iou_thr, levels)
            expected = [fuse_packed(packed, iou_thr, level) for level in levels]
        for got, ref in zip(outputs, expected):
            m = int(ref.count[0])
            assert int(got.count[0]) == m, (case, levels)
            np.testing.assert_array_equal(got.boxes[:m], ref.boxes[:m])
            np.testing.assert_array_equal(got.score[:m], ref.score[:m])
            np.testing.assert_array_equal(got.label[:m], ref.label[:m])
    two_sets = pack_lists(np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]]), np.array([0.9, 0.8]),
                          np.zeros(2, np.int64), np.array([1, 1]), 2)
    with pytest.raises(ValueError, match="equal"):
        fuse_packed_levels(two_sets._replace(weights=np.array([1.0, 2.0])), 0.55, [0.0, 0.1])
