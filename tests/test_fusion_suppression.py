"""pipeline.fusion.suppression against ensemble_boxes 1.0.9's nms / soft_nms / nms_method: property tests, hand
cases."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import pytest
from ensemble_boxes import nms as eb_nms
from ensemble_boxes import nms_method as eb_nms_method
from ensemble_boxes import soft_nms as eb_soft_nms
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.fusion import nms, nms_method, soft_nms
from tests.test_fusion import make_inputs


def lib(fn, *args, **kwargs):
    """The library on deep copies (it overwrites the caller's score arrays when weighting), quietly (it prints)."""
    args = copy.deepcopy(args)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def ours(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def assert_identical(ref, got):
    """Same count, order, boxes, scores and labels, bit for bit, and the library's score and label dtypes."""
    rb, rs, rl = ref
    gb, gs, gl = got
    assert gs.shape == np.shape(rs) and gl.shape == np.shape(rl) and gb.shape == (len(rs), 4)
    np.testing.assert_array_equal(gb, np.asarray(rb, np.float64).reshape(-1, 4))
    np.testing.assert_array_equal(gs, rs)
    np.testing.assert_array_equal(gl, rl)
    assert gs.dtype == np.asarray(rs).dtype and gl.dtype == np.asarray(rl).dtype


def library_scores(scores, weights):
    """The score array the library works on: weighted as ``(s * w) / w.sum()``, concatenated."""
    if weights is not None:
        w = np.array(weights)
        scores = [(np.array(s) * w[t]) / w.sum() for t, s in enumerate(scores)]
    return np.concatenate([np.asarray(s).reshape(-1) for s in scores] + [np.zeros(0, np.float32)])


def has_boxes(boxes) -> bool:
    """Whether a box keeps a positive area after clipping (the library raises on inputs without one)."""
    b = np.clip(np.concatenate([np.reshape(x, (-1, 4)) for x in boxes] + [np.zeros((0, 4))]), 0, 1)
    return bool((np.abs(b[:, 2] - b[:, 0]) * np.abs(b[:, 3] - b[:, 1]) > 0).any())


RANDOM_CASES = dict(
    seed=st.integers(0, 2**32 - 1), n_sets=st.integers(1, 6), max_boxes=st.sampled_from([3, 12, 30]),
    n_labels=st.integers(1, 3), quantise=st.booleans(), messy=st.booleans(), weighted=st.booleans(),
    method=st.sampled_from([1, 2, 3]), iou_thr=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0, 0.42]),
    sigma=st.sampled_from([0.05, 0.25, 0.5, 1.0, 0.001]), thresh=st.sampled_from([0.0, 0.001, 0.05, 0.3]),
    float32_scores=st.booleans())


def check_random_case(seed, n_sets, max_boxes, n_labels, quantise, messy, weighted, method, iou_thr, sigma, thresh,
                      float32_scores):
    rng = np.random.default_rng(seed)
    boxes, scores, labels = make_inputs(rng, n_sets, max_boxes, n_labels, quantise, messy)
    weights = rng.uniform(0.2, 3.0, n_sets).tolist() if weighted else None
    if float32_scores:
        scores = [s.astype(np.float32) for s in scores]
    work = library_scores(scores, weights)
    assume(len(np.unique(work)) == len(work) and has_boxes(boxes))  # no ties; the library raises without boxes
    kw = dict(method=method, iou_thr=iou_thr, sigma=sigma, thresh=thresh, weights=weights)
    assert_identical(lib(eb_nms_method, boxes, scores, labels, **kw), ours(nms_method, boxes, scores, labels, **kw))


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_CASES)
def test_matches_library_on_random_inputs(**case):
    check_random_case(**case)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_CASES)
def test_matches_library_on_random_inputs_quick(**case):
    """A sample of the slow property test above, for the fast lane (``-m "not slow"``)."""
    check_random_case(**case)


def large_inputs(seed: int):
    """Big label groups (the grids switch on): clustered objects plus scattered false positives, a few huge boxes."""
    rng = np.random.default_rng(2000 + seed)
    n_sets = int(rng.integers(8, 20))
    objs = rng.uniform(0, 0.9, (50, 2))
    boxes, scores, labels = [], [], []
    for _ in range(n_sets):
        n = int(rng.integers(40, 120))
        k = rng.integers(0, 50, n)
        xy = objs[k] + rng.normal(0, 0.01 + 0.03 * (seed % 2), (n, 2))
        wh = rng.uniform(0.01, 0.15, (n, 2))
        fp = rng.random(n) < 0.4
        xy[fp] = rng.uniform(0, 0.9, (fp.sum(), 2))
        wh[rng.random(n) < 0.02] = 0.8  # large boxes: soft-NMS scans them separately
        boxes.append(np.clip(np.c_[xy, xy + wh], 0, 1))
        scores.append(rng.random(n))
        labels.append(rng.integers(0, 1 + seed % 3, n))
    return boxes, scores, labels, rng.uniform(0.5, 2, n_sets).tolist()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method, iou_thr, sigma", [(3, 0.5, 0.5), (3, 0.75, 0.5), (3, 0.05, 0.5), (1, 0.3, 0.5),
                                                    (2, 0.5, 0.1), (2, 0.5, 1.0), (2, 0.5, 0.001)])
def test_matches_library_on_large_inputs(seed, method, iou_thr, sigma):
    boxes, scores, labels, weights = large_inputs(seed)
    for w in (None, weights):
        kw = dict(method=method, iou_thr=iou_thr, sigma=sigma, thresh=0.01, weights=w)
        assert_identical(lib(eb_nms_method, boxes, scores, labels, **kw),
                         ours(nms_method, boxes, scores, labels, **kw))


# ------------------------------------------------------------------------------------------------------------------
# hand cases
# ------------------------------------------------------------------------------------------------------------------
A = [0.1, 0.1, 0.5, 0.5]
A_SHIFTED = [0.15, 0.1, 0.55, 0.5]  # IoU with A: 0.35 / 0.45 = 0.777...
FAR = [0.6, 0.6, 0.9, 0.9]


def test_nms_keeps_the_best_of_overlapping_boxes_per_label_in_label_order():
    boxes = [[A, FAR], [A_SHIFTED, A]]
    scores = [[0.9, 0.3], [0.8, 0.95]]
    labels = [[1, 1], [1, 0]]
    b, s, lab = nms(boxes, scores, labels, iou_thr=0.5)
    # label 0 first (ascending), then label 1 by score: A (0.9) suppresses A_SHIFTED, FAR survives
    np.testing.assert_array_equal(lab, [0, 1, 1])
    np.testing.assert_array_equal(s, [0.95, 0.9, 0.3])
    np.testing.assert_array_equal(b, [A, A, FAR])
    assert_identical(lib(eb_nms, boxes, scores, labels, iou_thr=0.5), (b, s, lab))
    # above the pair's IoU nothing is suppressed
    assert len(nms(boxes, scores, labels, iou_thr=0.8)[1]) == 4


def test_weights_rescale_by_their_sum_and_none_leaves_scores():
    boxes, scores, labels = [[A], [FAR]], [[0.8], [0.6]], [[0], [0]]
    _, s, _ = nms(boxes, scores, labels)
    np.testing.assert_array_equal(s, [0.8, 0.6])
    _, s, _ = nms(boxes, scores, labels, weights=[1, 3])
    np.testing.assert_array_equal(s, [0.6 * 3 / 4, 0.8 * 1 / 4])
    with pytest.warns(UserWarning, match="incorrect number of weights"):
        _, s, _ = nms(boxes, scores, labels, weights=[1, 2, 3])
    np.testing.assert_array_equal(s, [0.8, 0.6])  # ignored, as the library does
    kept = [np.array([0.8]), np.array([0.6])]
    nms(boxes, kept, labels, weights=[1, 3])
    np.testing.assert_array_equal(kept[0], [0.8])  # the caller's scores are left alone (the library overwrites)


def test_soft_nms_decays_and_returns_undecayed_scores():
    boxes, scores, labels = [[A, A_SHIFTED, FAR]], [[0.9, 0.8, 0.5]], [[0, 0, 0]]
    ovr = 0.35 / 0.45
    for method, decayed in [(1, 0.8 * (1 - ovr)), (2, 0.8 * np.exp(-ovr * ovr / 0.5))]:
        for thresh, n in [(decayed - 1e-9, 3), (decayed + 1e-9, 2)]:
            b, s, lab = soft_nms(boxes, scores, labels, method=method, iou_thr=0.5, sigma=0.5, thresh=thresh)
            assert len(s) == n
            # selection order: A (0.9), then FAR (0.5) above the decayed A_SHIFTED
            np.testing.assert_array_equal(s, [0.9, 0.5, 0.8][:n])
            assert_identical(lib(eb_soft_nms, boxes, scores, labels, method=method, iou_thr=0.5, sigma=0.5,
                                 thresh=thresh), (b, s, lab))
    # linear: an IoU at or below iou_thr leaves the score alone
    _, s, _ = soft_nms(boxes, scores, labels, method=1, iou_thr=0.8, thresh=0.6)
    np.testing.assert_array_equal(s, [0.9, 0.8])


def test_soft_nms_ties_follow_the_librarys_positions():
    """Identical boxes decay each other to exactly 0 (linear): the zero scores tie, and the library's swaps and
    first-maximum rule decide the order -- replicated, also with thresh < 0 where the tied boxes are returned."""
    rng = np.random.default_rng(7)
    b = np.round(rng.uniform(0, 0.7, (20, 2)) * 8) / 8
    boxes = [np.c_[b, b + 0.25], np.c_[b[::-1], b[::-1] + 0.25]]
    scores = [rng.random(20), rng.random(20)]
    labels = [np.zeros(20), np.zeros(20)]
    for thresh in (0.001, -1.0):
        kw = dict(method=1, iou_thr=0.3, thresh=thresh)
        assert_identical(lib(eb_soft_nms, boxes, scores, labels, **kw), ours(soft_nms, boxes, scores, labels, **kw))


def test_float32_scores_decay_and_compare_in_float32():
    boxes = [[A, A_SHIFTED]]
    scores = [np.array([0.9, 0.7], np.float32)]
    labels = [[0, 0]]
    for thresh in (0.1, float(np.float32(0.7) * (1 - 0.35 / 0.45))):
        kw = dict(method=1, iou_thr=0.5, thresh=thresh)
        got = soft_nms(boxes, scores, labels, **kw)
        assert got[1].dtype == np.float32
        assert_identical(lib(eb_soft_nms, boxes, scores, labels, **kw), got)


def test_labels_keep_their_values_and_dtype():
    boxes = [[A, A, FAR]]
    for labels in ([[2.5, 1.0, 2.5]], [np.array([7, 3, 7], np.int32)], [["b", "a", "b"]]):
        got = nms(boxes, [[0.9, 0.8, 0.7]], labels)
        assert_identical(lib(eb_nms, boxes, [[0.9, 0.8, 0.7]], labels), got)


def test_input_repairs_warn_and_match():
    boxes = [[[0.5, 0.2, 0.1, 0.6], [-0.2, 0.1, 0.3, 1.4], [0.3, 0.3, 0.3, 0.9], [1.2, 0.1, 1.5, 0.4]]]
    scores, labels = [[0.9, 0.8, 0.7, 0.6]], [[0, 0, 0, 0]]
    with pytest.warns(UserWarning, match="NMS"):
        got = nms(boxes, scores, labels)
    assert len(got[1]) == 2  # the zero-width box and the one clipped to zero width are dropped
    assert_identical(lib(eb_nms, boxes, scores, labels), got)


def test_empty_inputs_and_argument_checks():
    for args in [([], [], []), ([np.zeros((0, 4))], [[]], [[]])]:
        b, s, lab = nms(*args)
        assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)
    with pytest.warns(UserWarning, match="zero-area"):
        b, s, lab = nms([[[0.2, 0.2, 0.2, 0.5]]], [[0.5]], [[0]])  # only a zero-area box: the library raises
    assert b.shape == (0, 4) and len(s) == 0
    with pytest.raises(ValueError, match="method"):
        nms_method([[A]], [[0.5]], [[0]], method=4)
    with pytest.raises(ValueError, match="sigma"):
        soft_nms([[A]], [[0.5]], [[0]], sigma=0.0)
    with pytest.raises(ValueError, match="finite"):
        nms([[[0.1, np.nan, 0.2, 0.3]]], [[0.5]], [[0]])
    with pytest.raises(ValueError, match="lengths"):
        nms([[A, FAR]], [[0.5]], [[0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        nms([[A]], [[0.5]], [[0]], iou_thr=float("nan"))


def test_negative_scores_and_a_negative_thresh_keep_every_box_in_the_librarys_order():
    """thresh < 0: nothing is dropped early (a negative score grows towards 0 when decayed)."""
    rng = np.random.default_rng(11)
    boxes, scores, labels = make_inputs(rng, 4, 20, 2, quantise=False, messy=False)
    scores = [s - 0.5 for s in scores]  # half of them negative
    for method in (1, 2):
        kw = dict(method=method, iou_thr=0.3, sigma=0.2, thresh=-1.0)
        got = ours(soft_nms, boxes, scores, labels, **kw)
        assert len(got[1]) == sum(len(s) for s in scores)
        assert_identical(lib(eb_soft_nms, boxes, scores, labels, **kw), got)


def test_results_of_consecutive_calls_are_independent():
    """The drop-ins reuse their output arrays between calls; what they return must not change afterwards."""
    rng = np.random.default_rng(12)
    first_inputs = make_inputs(rng, 3, 20, 1, quantise=False, messy=False)
    first = nms(*first_inputs)
    kept = tuple(a.copy() for a in first)
    nms(*make_inputs(rng, 5, 30, 1, quantise=False, messy=False))
    soft_nms(*make_inputs(rng, 5, 30, 1, quantise=False, messy=False))
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


def test_large_groups_with_tied_scores_follow_the_librarys_positions():
    """One big label group (many blocks of the lazy maximum, the grid refiled as boxes drop out) with scores and
    boxes on coarse grids: exact duplicates decay each other to 0 (linear) and scores tie across blocks; with
    thresh < 0 nothing drops out and negative scores grow towards 0."""
    rng = np.random.default_rng(21)
    n_sets, per_set = 12, 60
    objs = np.round(rng.uniform(0, 0.8, (40, 2)) * 32) / 32
    boxes, scores, labels = [], [], []
    for _ in range(n_sets):
        k = rng.integers(0, 40, per_set)
        xy = objs[k] + np.round(rng.normal(0, 0.02, (per_set, 2)) * 32) / 32
        wh = np.round(rng.uniform(0.05, 0.2, (per_set, 2)) * 32) / 32
        boxes.append(np.clip(np.c_[xy, xy + wh], 0, 1))
        scores.append(np.round(rng.uniform(0, 1, per_set) * 16) / 16)
        labels.append(np.zeros(per_set, np.int64))
    negative = [s - 0.5 for s in scores]
    for method, sigma in ((1, 0.5), (2, 0.5), (2, 0.05)):
        for sc, thresh in ((scores, 0.001), (scores, 0.2), (negative, -1.0),
                           ([s.astype(np.float32) for s in scores], 0.001)):
            kw = dict(method=method, iou_thr=0.3, sigma=sigma, thresh=thresh)
            assert_identical(lib(eb_soft_nms, boxes, sc, labels, **kw), ours(soft_nms, boxes, sc, labels, **kw))


def _soft_scratch(boxes: np.ndarray, dead: np.ndarray, positions: np.ndarray):
    """A soft-NMS scratch holding one group: ``boxes`` as its members, ``dead`` ones marked removed, member ``q`` at
    library position ``positions[q]``."""
    from pipeline.fusion.suppression_kernel import BoxRow, IntRow, allocate_scratch
    scratch = allocate_scratch(len(boxes))
    scratch.boxes[BoxRow.GROUP, :len(boxes)] = boxes
    scratch.ints[IntRow.REMOVED, :len(boxes)] = dead
    scratch.ints[IntRow.POS_OF, :len(boxes)] = positions
    scratch.ints[IntRow.AT_POS, positions] = np.arange(len(boxes))
    return scratch


def test_soft_overlap_search_finds_exactly_the_live_overlapping_boxes():
    """The soft-NMS grid through removals and refiles: every live member whose IoU with the selected one is
    positive is found (as its library position), with the library's IoU; nothing else (gaussian window); linear's
    narrower window finds exactly the members above ``iou_thr``."""
    from pipeline.fusion.grid import search_radius_factor
    from pipeline.fusion.primitives import iou
    from pipeline.fusion.suppression_kernel import (FloatRow, IntRow, _file_soft_group, _overlapping, _refile,
                                                    _soft_grid_remove)
    rng = np.random.default_rng(5)
    n = 700
    xy = rng.uniform(0, 0.9, (n, 2))
    wh = rng.uniform(0.01, 0.12, (n, 2))
    wh[rng.random(n) < 0.03] = 0.6  # large members: checked on every step, outside the grid
    boxes = np.clip(np.c_[xy, xy + wh], 0, 1)
    scratch = _soft_scratch(boxes, (rng.random(n) < 0.1).astype(np.int64), rng.permutation(n))
    ints = scratch.ints
    at_pos = ints[IntRow.AT_POS]
    removed, cell_of, slot_of = ints[IntRow.REMOVED], ints[IntRow.CELL_OF], ints[IntRow.SLOT_OF]
    n_cells, fw, fh, n_big = _file_soft_group(n, scratch)
    assert n_cells > 0 and n_big > 0
    steps = 0
    for q in rng.permutation(np.flatnonzero(removed[:n] == 0)):
        if removed[q]:
            continue
        steps += 1
        removed[q] = 1
        _soft_grid_remove(q, cell_of, slot_of, scratch.soft_slots)
        for j in rng.choice(n, 2):  # boxes that die
            removed[j] = 1
            _soft_grid_remove(j, cell_of, slot_of, scratch.soft_slots)
        if steps % 40 == 0:
            _refile(n, n_cells, scratch)
        live = np.flatnonzero(removed[:n] == 0)
        inter = ((np.minimum(boxes[q, 2], boxes[live, 2]) - np.maximum(boxes[q, 0], boxes[live, 0]) > 0)
                 & (np.minimum(boxes[q, 3], boxes[live, 3]) - np.maximum(boxes[q, 1], boxes[live, 1]) > 0))
        k = _overlapping(q, n_cells, fw, fh, n_big, 0.0, 0.0, scratch)
        found = dict(zip(at_pos[ints[IntRow.CAND, :k]].tolist(), scratch.floats[FloatRow.CAND_IOU, :k].tolist()))
        assert len(found) == k and set(found) == set(live[inter].tolist())
        assert all(v == iou(*boxes[q], *boxes[j]) for j, v in found.items())
        k = _overlapping(q, n_cells, fw, fh, n_big, search_radius_factor(0.5), 0.5, scratch)
        narrow = dict(zip(at_pos[ints[IntRow.CAND, :k]].tolist(), scratch.floats[FloatRow.CAND_IOU, :k].tolist()))
        assert set(narrow) == {j for j in live[inter].tolist() if iou(*boxes[q], *boxes[j]) > 0.5}
        assert all(v == found[j] for j, v in narrow.items())
    assert steps >= 160  # four refiles at least


def test_refile_compacts_the_grid_into_the_layout_of_filing_the_live_members_again():
    """``_refile`` moves each cell's live slots down in place; the grid it leaves is the one ``_soft_grid_build`` files
    from the live members (cells, slots, coordinates, positions, each member's slot), through several refiles."""
    from pipeline.fusion.suppression_kernel import (IntRow, _file_soft_group, _refile, _soft_columns, _soft_grid_build,
                                                    _soft_grid_remove)
    rng = np.random.default_rng(21)
    n = 900
    xy = rng.uniform(0, 0.9, (n, 2))
    boxes = np.clip(np.c_[xy, xy + rng.uniform(0.01, 0.1, (n, 2))], 0, 1)
    scratch = _soft_scratch(boxes, (rng.random(n) < 0.1).astype(np.int64), rng.permutation(n))
    ints = scratch.ints
    cell_of, slot_of = ints[IntRow.CELL_OF], ints[IntRow.SLOT_OF]
    n_cells, _, _, _ = _file_soft_group(n, scratch)
    n_all = n_cells * _soft_columns(n_cells)
    for _ in range(4):
        for j in rng.choice(np.flatnonzero(cell_of[:n] != -1), 150, replace=False):
            _soft_grid_remove(j, cell_of, slot_of, scratch.soft_slots)
        k = _refile(n, n_cells, scratch)
        live = np.flatnonzero(cell_of[:n] != -1)
        assert k == len(live)
        got = (scratch.cell_start[:n_all + 1].copy(), scratch.soft_slots[:, :k].copy(),
               ints[IntRow.SLOT_POS, :k].copy(), slot_of[live].copy())
        fresh = copy.deepcopy(scratch)
        ids = fresh.ints[IntRow.CAND]
        ids[:k] = live
        _soft_grid_build(n_cells, ids, k, fresh)
        np.testing.assert_array_equal(got[0], fresh.cell_start[:n_all + 1])
        np.testing.assert_array_equal(got[1], fresh.soft_slots[:, :k])
        np.testing.assert_array_equal(got[2], fresh.ints[IntRow.SLOT_POS, :k])
        np.testing.assert_array_equal(got[3], fresh.ints[IntRow.SLOT_OF][live])


def test_block_max_and_leftmost_argmax():
    from pipeline.fusion.suppression_kernel import _block_argmax, _block_max
    rng = np.random.default_rng(9)
    for _ in range(200):
        a = np.round(rng.normal(0, 1, 8 * int(rng.integers(1, 6))) * 4) / 4
        a[rng.random(len(a)) < 0.3] = -np.inf
        lo = 4 * int(rng.integers(0, len(a) // 4))
        m = _block_max(a, lo, len(a))
        assert m == a[lo:].max()
        assert _block_argmax(a, lo, len(a)) == (m, lo + int(np.argmax(a[lo:])))  # ties: the leftmost


def test_block_layout_fits_the_scratch():
    from pipeline.fusion.suppression_kernel import block_layout, score_room
    for n in list(range(1, 3000)) + [10 ** 5, 10 ** 6 + 7]:
        bs, gsz, nb, ng = block_layout(n)
        assert bs % 8 == 0 and gsz % 8 == 0 and ng % 4 == 0 and (nb - 1) * bs < n <= nb * bs and ng * gsz >= nb
        assert nb * bs + ng * gsz + ng <= score_room(n)


def test_leftmost_max_through_decays_removals_and_growth():
    """The three-level lazy maxima give ``np.argmax``'s leftmost maximum after any sequence of the loop's updates:
    scores lowered (bounds left stale), removed (-inf) and raised (bounds raised with them)."""
    from pipeline.fusion.suppression_kernel import (_block_max, _leftmost_max, _position_arrays, block_layout,
                                                    score_room)
    rng = np.random.default_rng(11)
    for n in (1, 5, 64, 333, 4000):
        bs, gsz, nb, ng = block_layout(n)
        room = np.empty(score_room(n))
        score, bound, group_bound = _position_arrays(room, bs, gsz, nb, ng)
        score[:] = -np.inf
        score[:n] = np.round(rng.normal(0, 1, n) * 3) / 3  # ties
        bound[:] = [_block_max(score, b * bs, b * bs + bs) if b < nb else -np.inf for b in range(len(bound))]
        group_bound[:] = [_block_max(bound, g * gsz, g * gsz + gsz) for g in range(ng)]
        for _ in range(min(n, 300)):
            top, p = _leftmost_max(score, bound, group_bound, bs, gsz)
            if p == -1:  # every score removed
                assert top == -np.inf and score.max() == -np.inf
                break
            assert (top, p) == (score.max(), int(np.argmax(score)))
            score[p] = -np.inf
            for j in rng.integers(0, n, 5):
                if score[j] == -np.inf:
                    continue
                r = rng.random()
                if r < 0.6:
                    score[j] = score[j] * 0.5 if score[j] > 0 else score[j] - 1.0  # lowered
                elif r < 0.8:
                    score[j] = -np.inf
                else:  # raised
                    score[j] = score[j] + 0.5
                    bound[j // bs] = max(bound[j // bs], score[j])
                    group_bound[j // (bs * gsz)] = max(group_bound[j // (bs * gsz)], score[j])
        assert _leftmost_max(np.full_like(score, -np.inf), np.full_like(bound, -np.inf),
                             np.full_like(group_bound, -np.inf), bs, gsz) == (-np.inf, -1)


# ------------------------------------------------------------------------------------------------------------------
# the drop-ins' kernel entry (no packed table)
# ------------------------------------------------------------------------------------------------------------------
def test_needs_no_repair_exactly_when_reading_repairs_nothing():
    from pipeline.fusion.suppression_kernel import _needs_no_repair
    ok = [0.0, 0.0, 1.0, 1.0]
    cases = {  # box, score -> nothing to repair
        "edges": (ok, 0.5, True), "inside": (A, -3.0, True), "swapped": ([0.5, 0.1, 0.1, 0.5], 0.5, False),
        "zero width": ([0.2, 0.1, 0.2, 0.5], 0.5, False), "below 0": ([-0.1, 0.1, 0.3, 0.5], 0.5, False),
        "above 1": ([0.1, 0.1, 0.3, 1.5], 0.5, False), "NaN box": ([0.1, np.nan, 0.3, 0.5], 0.5, False),
        "NaN score": (A, np.nan, False), "infinite score": (A, np.inf, False),
        "area underflows to 0": ([0.5, 0.5, 0.5 + 1e-170, 0.5 + 1e-170], 0.5, False),
    }
    for name, (box, score, clean) in cases.items():
        b = np.array([A, box], np.float64)
        for sc in (np.array([0.9, score]), np.array([0.9, score], np.float32)):  # the drop-ins pass float64
            assert _needs_no_repair(b, sc.astype(np.float64)) == clean, name
            assert _needs_no_repair(np.repeat(b, 3, axis=0), np.repeat(sc, 3).astype(np.float64)) == clean, name


@pytest.mark.parametrize("messy", [False, True])
@pytest.mark.parametrize("method", [1, 2, 3])
def test_drop_ins_fuse_as_the_packed_table_path(messy, method):
    """``nms_method`` (kernel entry ``fuse_lists``) and ``fuse_packed`` on the same one-image table give the same
    rows and report the same repairs."""
    from pipeline.fusion.packing import pack_lists
    from pipeline.fusion.suppression import fuse_packed
    rng = np.random.default_rng(5 + messy)
    boxes, scores, labels = make_inputs(rng, 6, 30, 2, False, messy)
    b = np.concatenate([np.reshape(x, (-1, 4)) for x in boxes]).astype(np.float64)
    sc = np.concatenate(scores).astype(np.float64)
    lab = np.concatenate(labels).astype(np.int64)
    lens = np.array([len(x) for x in scores])
    with warnings.catch_warnings(record=True) as packed_warnings:
        warnings.simplefilter("always")
        out = fuse_packed(pack_lists(b, sc, lab, lens, len(lens)), method, 0.5, 0.5, 0.001, weighted=False)
    with warnings.catch_warnings(record=True) as list_warnings:
        warnings.simplefilter("always")
        got_b, got_s, got_l = nms_method(boxes, scores, labels, method=method, iou_thr=0.5, sigma=0.5, thresh=0.001)
    m = int(out.count[0])
    np.testing.assert_array_equal(got_b, out.boxes[:m])
    np.testing.assert_array_equal(got_s, out.score[:m])
    np.testing.assert_array_equal(got_l, out.label[:m])
    assert [str(w.message) for w in list_warnings] == [str(w.message) for w in packed_warnings]
    assert bool(list_warnings) == messy



@pytest.mark.parametrize("method", [1, 2, 3])
def test_each_kept_row_carries_its_score_at_selection(method):
    """Soft-NMS: the rows kept at a ``thresh`` are, in order, the rows kept at a lower one whose selection score is
    above it, on a table of 24 images split over threads (and the library's at that ``thresh`` on one image); NMS
    gives none."""
    import pandas as pd

    from pipeline.fusion.packing import pack_table
    from pipeline.fusion.runner import dense_rows
    from pipeline.fusion.suppression import fuse_packed

    rng = np.random.default_rng(8)
    images = [make_inputs(rng, 4, 30, 2, quantise=False, messy=False) for _ in range(24)]
    parts = [pd.DataFrame({"image_id": f"i{k:02d}", "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2], "y2": b[:, 3],
                           "score": s, "label": la, "model": f"m{t}"})
             for k, (bl, sl, ll) in enumerate(images) for t, (b, s, la) in enumerate(zip(bl, sl, ll))]
    sizes = {f"i{k:02d}": (1, 1) for k in range(24)}
    packed = pack_table(pd.concat(parts, ignore_index=True), sizes, "model", None, [f"m{t}" for t in range(4)])
    low = dense_rows(packed, fuse_packed(packed, method, 0.3, 0.2, 0.0, False, threads=2), 2)
    if method == 3:
        assert low.selection is None  # NMS has no selection threshold
        return
    assert (low.selection <= low.values[4]).all() and (low.selection < low.values[4]).any()
    for thresh in (0.05, 0.2):
        high = dense_rows(packed, fuse_packed(packed, method, 0.3, 0.2, thresh, False, threads=2), 2)
        keep = low.selection > thresh
        assert 0 < keep.sum() < len(keep)
        for mine, theirs in zip(low.take(keep), high, strict=True):
            np.testing.assert_array_equal(mine, theirs)
        bl, sl, ll = images[5]
        ref = eb_soft_nms(copy.deepcopy(bl), copy.deepcopy(sl), copy.deepcopy(ll), method=method, iou_thr=0.3,
                          sigma=0.2, thresh=thresh)
        np.testing.assert_array_equal(high.values[:4, high.image == 5].T, ref[0])
        np.testing.assert_array_equal(high.values[4, high.image == 5], ref[1])


def test_bucketed_score_order_is_the_stable_argsort_of_the_keys():
    """NMS's order: buckets of the sort keys (``_bucket_by_key``), each sorted when its turn comes
    (``_sort_ids_by_key``: insertion sort, or a radix sort past ``SHORT_BUCKET``), is ``np.argsort(kind="stable")``
    of the scores -- through ties, -0.0, infinities and ranges that put most keys in one bucket."""
    from pipeline.fusion.primitives import float_sort_keys
    from pipeline.fusion.suppression_kernel import SHORT_BUCKET, _bucket_by_key, _sort_ids_by_key, allocate_scratch
    rng = np.random.default_rng(13)
    cases = [rng.random(1), rng.random(4000), np.round(rng.random(3000), 1),  # ties: buckets past SHORT_BUCKET
             np.r_[rng.normal(0, 1, 500), [0.0, -0.0, np.inf, -np.inf, 1e300, -1e-300]],
             np.r_[0.5 + rng.random(2000) * 1e-9, 1e-300]]  # one far score: nearly all in one bucket
    largest = 0
    for scores in cases:
        n = len(scores)
        scratch = allocate_scratch(n)
        keys, order, tmp = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        float_sort_keys(scores, n, keys)
        n_buckets = _bucket_by_key(keys, n, order, tmp, scratch.cell_count)
        start = scratch.cell_count[:n_buckets + 1]
        assert start[0] == 0 and start[-1] == n and (np.diff(start) >= 0).all()
        largest = max(largest, int(np.diff(start).max()))
        got = []
        for b in range(n_buckets):
            ids = order[start[b]:start[b + 1]].copy()
            assert (np.diff(ids) > 0).all()  # each bucket in member order
            ints = scratch.ints
            _sort_ids_by_key(ids, len(ids), keys, ints[0], ints[1], ints[2], ints[3], ints[4], scratch.radix_hist)
            got += ids.tolist()
        expected = np.argsort(np.where(scores == 0, 0.0, scores), kind="stable")
        assert got == expected.tolist()
    assert largest > SHORT_BUCKET  # the radix branch ran


def test_nms_order_with_many_tied_scores_is_the_later_box_first():
    """Scores on a coarse grid tie across and within buckets; boxes either coincide, overlap by IoU 1/3 or are
    apart: kept rows are those of greedy NMS by score descending, a tie taken by the later box first."""
    rng = np.random.default_rng(17)
    for trial in range(20):
        n = int(rng.integers(50, 400))
        cell = rng.integers(0, 6, (n, 2)) * 0.15
        shift = rng.integers(0, 2, n) * 0.05  # half of a 0.1 box: IoU 1/3 with the unshifted one
        boxes = np.c_[cell[:, 0] + shift, cell[:, 1], cell[:, 0] + shift + 0.1, cell[:, 1] + 0.1]
        scores = np.round(rng.random(n), 1)
        b, s, _ = nms([boxes], [scores], [np.zeros(n)], iou_thr=0.3 if trial % 2 else 0.5)
        thr = 0.3 if trial % 2 else 0.5
        keep, dead = [], np.zeros(n, bool)
        for i in sorted(range(n), key=lambda i: (scores[i], i), reverse=True):
            if dead[i]:
                continue
            keep.append(i)
            inter = (np.clip(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0, None)
                     * np.clip(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0, None))
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            dead |= inter / (area[i] + area - inter) > thr
        np.testing.assert_array_equal(b, boxes[keep])
        np.testing.assert_array_equal(s, scores[keep])
