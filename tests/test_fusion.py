"""pipeline.fusion against ensemble_boxes 1.0.9: property test, hand cases, the whole-table entry point."""
from __future__ import annotations

import ast
import hashlib
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ensemble_boxes import weighted_boxes_fusion as eb_wbf
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pipeline.fusion
from pipeline.fusion import BACKENDS, CONF_TYPES, fuse_predictions, weighted_boxes_fusion
from pipeline.fusion.packing import pack_table
from pipeline.layout import PREDICTION_COLUMNS


def lib(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eb_wbf(*args, **kwargs)


def ours(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return weighted_boxes_fusion(*args, **kwargs)


def assert_same(ref, got):
    """Same count, order, labels; boxes <= 1e-5, scores <= 1e-6. Rows whose library scores tie (the library's
    unstable argsort leaves their order undefined) are compared as a multiset."""
    rb, rs, rl = (np.asarray(a, np.float64) for a in ref)
    gb, gs, gl = got
    assert gb.shape == rb.reshape(-1, 4).shape and gs.shape == rs.shape and gl.shape == rl.shape
    if len(rs) == 0:
        return
    assert gb.dtype == np.float64 and gs.dtype == np.float64 and gl.dtype == np.float64
    np.testing.assert_allclose(gs, rs, rtol=0, atol=1e-6)
    if len(np.unique(rs)) < len(rs):  # ties in the output scores: canonical order inside tie groups
        ko = np.lexsort((rb[:, 3], rb[:, 2], rb[:, 1], rb[:, 0], rl, -rs))
        kg = np.lexsort((gb[:, 3], gb[:, 2], gb[:, 1], gb[:, 0], gl, -gs))
        rb, rs, rl, gb, gs, gl = rb[ko], rs[ko], rl[ko], gb[kg], gs[kg], gl[kg]
    np.testing.assert_array_equal(gl, rl)
    np.testing.assert_allclose(gb, rb, rtol=0, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(gs, rs, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# random inputs
# ------------------------------------------------------------------------------------------------------------------
def make_inputs(rng: np.random.Generator, n_sets: int, max_boxes: int, n_labels: int, quantise: bool,
                messy: bool):
    """Boxes around a few objects (so that clusters form), some false positives; optionally on a 1/32 grid
    (exact duplicates and IoUs exactly at the threshold) and messy (swapped, out-of-range, zero-area boxes)."""
    n_obj = int(rng.integers(1, 8))
    centres = rng.uniform(0.1, 0.9, (n_obj, 2))
    sizes = rng.uniform(0.05, 0.4, (n_obj, 2))
    boxes, scores, labels = [], [], []
    for _ in range(n_sets):
        n = int(rng.integers(0, max_boxes + 1))
        k = rng.integers(0, n_obj, n)
        c = centres[k] + rng.normal(0, 0.03, (n, 2))
        wh = sizes[k] * rng.uniform(0.8, 1.25, (n, 2))
        b = np.c_[c - wh / 2, c + wh / 2]
        fp = rng.random(n) < 0.3
        b[fp] = np.c_[rng.uniform(0, 0.8, (fp.sum(), 2)), np.zeros((fp.sum(), 2))]
        b[fp, 2:] = b[fp, :2] + rng.uniform(0.02, 0.3, (fp.sum(), 2))
        if quantise:
            b = np.round(b * 32) / 32
        if messy and n:
            sw = rng.random(n) < 0.1
            b[sw] = b[sw][:, [2, 1, 0, 3]]
            b[rng.random(n) < 0.1, 3] += 0.3  # beyond 1 after clipping for some
            b[rng.random(n) < 0.05, 0] -= 0.5
            z = rng.random(n) < 0.05
            b[z, 2] = b[z, 0]  # zero width
        else:
            b = np.clip(b, 0.0, 1.0)
        boxes.append(b)
        scores.append(rng.uniform(0.0, 1.0, n))
        labels.append(rng.integers(0, n_labels, n))
    return boxes, scores, labels


def no_tied_weighted_scores(scores, weights) -> bool:
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, np.float64)
    ws = np.concatenate([np.asarray(s) * w[t] for t, s in enumerate(scores)] + [np.zeros(0)])
    return len(np.unique(ws)) == len(ws)


RANDOM_CASES = dict(
    seed=st.integers(0, 2**32 - 1), n_sets=st.integers(0, 6), max_boxes=st.sampled_from([0, 3, 12, 30]),
    n_labels=st.integers(1, 3), quantise=st.booleans(), messy=st.booleans(),
    weighted=st.booleans(), conf_type=st.sampled_from(CONF_TYPES), allows_overflow=st.booleans(),
    iou_thr=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0, 0.42]),
    skip_box_thr=st.sampled_from([0.0, 0.0, 0.1, 0.35]), float32_scores=st.booleans())


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


def check_random_case(seed, n_sets, max_boxes, n_labels, quantise, messy, weighted, conf_type, allows_overflow,
                      iou_thr, skip_box_thr, float32_scores):
    rng = np.random.default_rng(seed)
    boxes, scores, labels = make_inputs(rng, n_sets, max_boxes, n_labels, quantise, messy)
    weights = rng.uniform(0.2, 3.0, n_sets).tolist() if weighted else None
    if float32_scores:
        scores = [s.astype(np.float32) for s in scores]
    assume(no_tied_weighted_scores(scores, weights))
    kw = dict(weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type,
              allows_overflow=allows_overflow)
    assert_same(lib(boxes, scores, labels, **kw), ours(boxes, scores, labels, **kw))


@pytest.mark.parametrize("seed", range(6))
def test_matches_library_on_large_inputs(seed):
    """Big label groups switch the grid index on; scattered and agreeing mixes, all conf types."""
    rng = np.random.default_rng(1000 + seed)
    n_sets = int(rng.integers(10, 30))
    boxes, scores, labels = [], [], []
    objs = rng.uniform(0, 0.9, (60, 2))
    for _ in range(n_sets):
        n = int(rng.integers(50, 150))
        k = rng.integers(0, 60, n)
        xy = objs[k] + rng.normal(0, 0.01 + 0.03 * (seed % 2), (n, 2))
        wh = rng.uniform(0.01, 0.15, (n, 2))
        fp = rng.random(n) < 0.5
        xy[fp] = rng.uniform(0, 0.9, (fp.sum(), 2))
        boxes.append(np.clip(np.c_[xy, xy + wh], 0, 1))
        scores.append(rng.random(n))
        labels.append(rng.integers(0, 1 + seed % 3, n))
    weights = rng.uniform(0.5, 2, n_sets).tolist()
    for conf_type in CONF_TYPES:
        kw = dict(weights=weights, iou_thr=float(rng.uniform(0.3, 0.8)), conf_type=conf_type,
                  allows_overflow=bool(seed % 2))
        assert_same(lib(boxes, scores, labels, **kw), ours(boxes, scores, labels, **kw))


def cases_across_row_words(seed: int) -> list[tuple[list, list, list, dict]]:
    """``(boxes, scores, labels, kwargs)`` at three IoU thresholds: 3,000 boxes about 0.6 % of the image wide in 20
    weighted sets, ~110 grid cells per axis, so each row of a search grid spans four words of occupancy bits
    (pipeline.fusion.grid.mark_cell); clusters sit on the cells either side of each word boundary and between them."""
    rng = np.random.default_rng(seed)
    n_cells = int(2 * np.sqrt(3000)) + 1  # the cap that applies here (the window asks for more cells)
    edges = np.array([32, 64, 96]) / n_cells
    cx = np.r_[np.repeat(edges, 12) + rng.normal(0, 0.004, 36), rng.uniform(0.01, 0.99, 64)]
    objs = np.c_[cx, rng.uniform(0.01, 0.99, 100)]
    boxes, scores, labels = [], [], []
    for _ in range(20):
        k = rng.integers(0, 100, 150)
        wh = rng.uniform(0.004, 0.008, (150, 2))
        xy = objs[k] + rng.normal(0, 0.0005, (150, 2)) - wh / 2
        fp = rng.random(150) < 0.3
        xy[fp] = rng.uniform(0, 0.99, (fp.sum(), 2))
        boxes.append(np.clip(np.c_[xy, xy + wh], 0, 1))
        scores.append(rng.random(150))
        labels.append(np.zeros(150))
    return [(boxes, scores, labels, {"iou_thr": t, "weights": rng.uniform(0.5, 2, 20).tolist()})
            for t in (0.3, 0.55, 0.8)]


def test_matches_library_with_small_boxes_on_a_grid_of_several_words_per_row():
    for boxes, scores, labels, kw in cases_across_row_words(7):
        assert_same(lib(boxes, scores, labels, **kw), ours(boxes, scores, labels, **kw))


# ------------------------------------------------------------------------------------------------------------------
# hand cases
# ------------------------------------------------------------------------------------------------------------------
BOX = [0.1, 0.2, 0.5, 0.6]


def test_two_identical_boxes_fuse_into_one():
    b, s, lab = weighted_boxes_fusion([[BOX], [BOX]], [[0.9], [0.5]], [[1], [1]])
    np.testing.assert_allclose(b, [BOX], atol=1e-7)
    np.testing.assert_allclose(s, [0.7])  # (0.9 + 0.5) / 2 * min(2, 2) / 2
    np.testing.assert_array_equal(lab, [1.0])
    # a third set without boxes still counts: rescaled by min(3, 2) / 3
    b, s, lab = weighted_boxes_fusion([[BOX], [BOX], np.zeros((0, 4))], [[0.9], [0.5], []], [[1], [1], []])
    np.testing.assert_allclose(s, [0.7 * 2 / 3])
    assert_same(lib([[BOX], [BOX], np.zeros((0, 4))], [[0.9], [0.5], []], [[1], [1], []]),
                (b, s, lab))


def test_conf_type_formulas_by_hand():
    boxes = [[BOX], [BOX], [[0.6, 0.6, 0.9, 0.9]]]
    scores = [[0.8], [0.4], [0.6]]
    labels = [[0], [0], [0]]
    w = [2.0, 1.0, 1.0]
    ws = np.array([1.6, 0.4])  # weighted scores of the fused pair
    f32 = lambda v: float(np.float32(v))  # noqa: E731 - the library stores the fused score as float32
    expected = {
        "avg": [f32(ws.mean()) * 2 / 4, 0.6 / 4],
        "max": [f32(1.6) / 2, 0.6 / 2],
        "box_and_model_avg": [f32(ws.mean()) * 2 / 3 * 3 / 4, 0.6 * 1 / 1 * 1 / 4],
        "absent_model_aware_avg": [f32(ws.mean()) * 2 / (3 + 1), 0.6 * 1 / (1 + 3)],
    }
    for conf_type, exp in expected.items():
        b, s, _ = weighted_boxes_fusion(boxes, scores, labels, weights=w, conf_type=conf_type)
        got = dict(zip([tuple(np.round(x, 6)) for x in b], s))
        np.testing.assert_allclose(sorted(got.values(), reverse=True), sorted(exp, reverse=True), rtol=1e-12)
        assert_same(lib(boxes, scores, labels, weights=w, conf_type=conf_type), (b, s, _))


def test_allows_overflow_and_same_set_boxes():
    boxes = [[BOX, BOX]]  # one set, two identical boxes: n = 2 > len(weights) = 1
    for overflow, exp in [(False, 0.5), (True, 1.0)]:
        _, s, _ = weighted_boxes_fusion(boxes, [[0.6, 0.4]], [[0, 0]], allows_overflow=overflow)
        np.testing.assert_allclose(s, [exp])


def test_iou_exactly_at_threshold_does_not_match():
    a = [0.0, 0.0, 0.5, 0.5]
    b = [0.25, 0.0, 0.75, 0.5]  # inter 0.125, union 0.375: the computed IoU is the double nearest 1/3
    for thr, n in [(1 / 3, 2), (0.3, 1)]:
        out = weighted_boxes_fusion([[a], [b]], [[0.9], [0.8]], [[0], [0]], iou_thr=thr)
        ref = lib([[a], [b]], [[0.9], [0.8]], [[0], [0]], iou_thr=thr)
        assert len(out[1]) == len(ref[1]) == n
        assert_same(ref, out)


@pytest.mark.parametrize("iou_thr", [1 / 3, 0.5, 0.6, 0.5 - 1e-12, 1 / 3 - 1e-13, 0.25 - 1e-12])
def test_ious_at_and_just_above_the_threshold_in_the_grid_search(iou_thr):
    # boxes on a 1/16 lattice in label groups big enough for the grid index: many pairs have an IoU of exactly
    # 1/2, 1/3, 1/4 or 3/5, at the threshold or a hair above it; the kernel passes a cluster over without dividing
    # only when its IoU cannot exceed the threshold (tests/test_fusion_nmw.py runs the same boxes through NMW)
    boxes, scores, labels = lattice_boxes()
    kw = dict(iou_thr=iou_thr, conf_type="avg")
    assert_same(lib(boxes, scores, labels, **kw), ours(boxes, scores, labels, **kw))


def lattice_boxes(seed: int = 7, n_sets: int = 5, n: int = 40):
    """Boxes on a 1/16 lattice, one label, distinct weighted scores: IoUs of exactly 1/2, 1/3, 1/4, 3/5..."""
    rng = np.random.default_rng(seed)
    boxes, scores, labels = [], [], []
    for t in range(n_sets):
        xy = rng.integers(0, 12, (n, 2)) / 16
        wh = rng.integers(1, 5, (n, 2)) / 16
        boxes.append(np.c_[xy, np.minimum(xy + wh, 1.0)])
        scores.append(rng.permutation(np.linspace(0.05, 0.95, n)) * (1 + 1e-3 * t))
        labels.append(np.zeros(n, dtype=np.int64))
    return boxes, scores, labels


def test_labels_are_fused_separately_and_truncated():
    boxes = [[BOX, BOX], [BOX]]
    out = weighted_boxes_fusion(boxes, [[0.9, 0.3], [0.5]], [[1.7, 2.0], [1.0]])
    np.testing.assert_array_equal(np.sort(out[2]), [1.0, 2.0])
    assert_same(lib(boxes, [[0.9, 0.3], [0.5]], [[1.7, 2.0], [1.0]]), out)


def test_skip_threshold_compares_like_numpy():
    """A float32 score array meets a Python-float threshold in float32 (NEP 50): float32(0.7) is not < 0.7."""
    boxes = [[BOX], [BOX]]
    for scores in ([np.array([0.7], np.float32), np.array([0.69], np.float32)], [[float(np.float32(0.7))], [0.9]]):
        for thr in (0.7, np.float64(0.7), np.float32(0.7)):
            out = weighted_boxes_fusion(boxes, scores, [[0], [0]], skip_box_thr=thr)
            assert_same(lib(boxes, scores, [[0], [0]], skip_box_thr=thr), out)
    kept = weighted_boxes_fusion([[BOX], np.zeros((0, 4))], [np.array([0.7], np.float32), []], [[0], []],
                                 skip_box_thr=0.7)
    assert len(kept[1]) == 1


def test_clipping_swapping_and_zero_area_warn_and_match():
    boxes = [[[0.5, 0.2, 0.1, 0.6], [-0.2, 0.1, 0.3, 1.4], [0.3, 0.3, 0.3, 0.9], [1.2, 0.1, 1.5, 0.4]]]
    scores = [[0.9, 0.8, 0.7, 0.6]]
    labels = [[0, 0, 0, 0]]
    with pytest.warns(UserWarning):
        out = weighted_boxes_fusion(boxes, scores, labels)
    assert len(out[1]) == 2  # zero-width box and the box clipped to zero width are dropped
    assert (out[0] >= 0).all() and (out[0] <= 1).all()
    assert_same(lib(boxes, scores, labels), out)


def test_zero_score_cluster_nan_quirk_matches_library():
    """Members with weighted score 0 give the library a 0/0 (NaN) fused box that then absorbs every later box."""
    # tied zero scores: <= 16 boxes, so numpy's order is defined (later input first): the two BOXes come first,
    # fuse into a NaN box, and the two far-away boxes are absorbed by it
    boxes = [[[0.7, 0.7, 0.9, 0.9], [0.0, 0.0, 0.05, 0.05]], [BOX], [BOX]]
    scores = [[0.0, 0.0], [0.0], [0.0]]
    labels = [[0, 0], [0], [0]]
    ref = lib(boxes, scores, labels)
    out = ours(boxes, scores, labels)
    assert len(out[1]) == len(ref[1]) == 1 and np.isnan(out[0]).all()
    assert_same(ref, out)


def test_tie_rule_later_input_first_on_small_inputs():
    """Documented tie rule (reverse of a stable sort) = numpy's order for <= 16 elements."""
    boxes = [[[0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]], [[0.5, 0.5, 0.6, 0.6]]]
    scores = [[0.5, 0.5], [0.5]]
    labels = [[0, 0], [0]]
    out = weighted_boxes_fusion(boxes, scores, labels)
    # clusters are created in the order 0.5, 0.2, 0.0 (later input first); their equal final scores reverse that
    np.testing.assert_array_equal(out[0][:, 0], [0.0, 0.2, 0.5])
    ref = lib(boxes, scores, labels)
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])


def test_empty_inputs_and_argument_checks():
    for args in [([], [], []), ([np.zeros((0, 4))], [[]], [[]]), ([[BOX]], [[0.1]], [[0]])]:
        out = weighted_boxes_fusion(*args, skip_box_thr=0.2)
        assert out[0].shape == (0, 4) and out[1].shape == (0,) and out[2].shape == (0,)
    with pytest.raises(ValueError):
        weighted_boxes_fusion([[BOX]], [[0.5]], [[0]], conf_type="median")
    with pytest.raises(ValueError):
        weighted_boxes_fusion([[BOX]], [[0.5, 0.4]], [[0]])
    with pytest.raises(ValueError):
        weighted_boxes_fusion([[[0.1, np.nan, 0.2, 0.3]]], [[0.5]], [[0]])
    with pytest.warns(UserWarning, match="incorrect number of weights"):
        out = weighted_boxes_fusion([[BOX], [BOX]], [[0.5], [0.3]], [[0], [0]], weights=[1.0, 2.0, 3.0])
    np.testing.assert_allclose(out[1], [0.4])


# ------------------------------------------------------------------------------------------------------------------
# whole prediction table
# ------------------------------------------------------------------------------------------------------------------
SIZES = {"a": (640, 480), "b": (1024, 768), "c": (300, 500), "empty": (100, 100)}


def make_table(seed: int = 0, models=("m0", "m1", "m2"), folds=(0, 1)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for image_id in ["a", "b", "c"]:
        w, h = SIZES[image_id]
        bl, sl, ll = make_inputs(rng, len(models) * len(folds), 15, 2, quantise=False, messy=False)
        k = 0
        for model in models:
            for fold in folds:
                if image_id == "c" and model == "m2":  # m2 predicts nothing on image c
                    k += 1
                    continue
                b = bl[k] * [w, h, w, h]
                rows.append(pd.DataFrame({"image_id": image_id, "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2],
                                          "y2": b[:, 3], "score": sl[k], "label": ll[k], "model": model,
                                          "fold": fold, "tta": "none"}))
                k += 1
    return pd.concat(rows, ignore_index=True)[PREDICTION_COLUMNS]


def library_on_table(table, set_keys, cols, weights, **kw):
    """Reference: the library per image on normalised coordinates with one entry per set (empty ones too)."""
    out = []
    for image_id in sorted(table["image_id"].unique()):
        w, h = SIZES[image_id]
        img = table[table["image_id"] == image_id]
        keyed = list(zip(*(img[c] for c in cols))) if len(cols) > 1 else img[cols[0]].tolist()
        bl, sl, ll = [], [], []
        for key in set_keys:
            part = img[np.array([k == key for k in keyed], dtype=bool)]
            bl.append(part[["x1", "y1", "x2", "y2"]].to_numpy() / [w, h, w, h])
            sl.append(part["score"].to_numpy())
            ll.append(part["label"].to_numpy())
        b, s, lab = lib(bl, sl, ll, weights=weights, **kw)
        out.append(pd.DataFrame({"image_id": image_id, "x1": b[:, 0] * w, "y1": b[:, 1] * h, "x2": b[:, 2] * w,
                                 "y2": b[:, 3] * h, "score": s, "label": lab.astype(np.int64)}))
    return pd.concat(out, ignore_index=True)


def assert_table_matches(got: pd.DataFrame, ref: pd.DataFrame):
    assert list(got.columns) == PREDICTION_COLUMNS
    assert len(got) == len(ref)
    assert (got["model"] == "wbf").all() and (got["fold"] == -1).all() and (got["tta"] == "wbf").all()
    np.testing.assert_array_equal(got["image_id"].to_numpy(), ref["image_id"].to_numpy())
    np.testing.assert_array_equal(got["label"].to_numpy(), ref["label"].to_numpy())
    np.testing.assert_allclose(got[["x1", "y1", "x2", "y2"]].to_numpy(), ref[["x1", "y1", "x2", "y2"]].to_numpy(),
                               rtol=0, atol=1e-5 * 1024)
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_fuse_predictions_pixel_round_trip_equals_library(conf_type):
    table = make_table()
    weights = {"m0": 2.0, "m1": 1.0, "m2": 0.5}
    got = fuse_predictions(table, SIZES, weights=weights, conf_type=conf_type, iou_thr=0.5, skip_box_thr=0.05)
    ref = library_on_table(table, ["m0", "m1", "m2"], ["model"], [2.0, 1.0, 0.5], conf_type=conf_type, iou_thr=0.5,
                           skip_box_thr=0.05)
    assert_table_matches(got, ref)
    assert set(got["image_id"]) == {"a", "b", "c"}  # "empty" has no rows in, none out


def test_fuse_predictions_tuple_groups_weights_by_model_and_sets():
    table = make_table(seed=1)
    keys = sorted(set(zip(table["model"], table["fold"])))
    weights = {"m0": 1.5, ("m1", 1): 3.0, "m1": 1.0, "m2": 0.7}
    wl = [weights.get(k, weights[k[0]]) for k in keys]
    got = fuse_predictions(table, SIZES, group_col=("model", "fold"), weights=weights)
    assert_table_matches(got, library_on_table(table, keys, ["model", "fold"], wl))
    # an explicit set list with a member absent from the table: it still counts in the rescaling
    sets = [*keys, ("m3", 0)]
    got = fuse_predictions(table, SIZES, group_col=("model", "fold"), weights={**weights, "m3": 1.0}, sets=sets)
    ref = library_on_table(table, sets, ["model", "fold"], [*wl, 1.0])
    assert_table_matches(got, ref)
    with pytest.raises(ValueError, match="not in `sets`"):
        fuse_predictions(table, SIZES, group_col=("model", "fold"), sets=keys[:-1])


@pytest.mark.parametrize("method", ["wbf", "nms", "soft_nms", "nmw"])
def test_fuse_predictions_leave_out_equals_filtering_the_rows(method):
    """Leaving sets out at packing gives the output of filtering the table first, for a set key and, with several
    group columns, for a member (every set it heads); rows of an image without a size may be left out."""
    table = make_table(seed=2)
    kw = dict(method=method, model_name="f")
    keys = sorted(set(zip(table["model"], table["fold"])))
    weights = {"m0": 1.0, "m1": 2.0, "m2": 0.0}
    kept = table[table["model"] != "m2"]
    want = fuse_predictions(kept, SIZES, group_col=("model", "fold"), weights=weights,
                            sets=[k for k in keys if k[0] != "m2"], **kw)
    got = fuse_predictions(table, SIZES, group_col=("model", "fold"), weights=weights, sets=keys,
                           leave_out={"m2"}, **kw)
    assert len(want) > 0
    pd.testing.assert_frame_equal(got, want)
    want = fuse_predictions(table[table["model"] != "m1"], SIZES, group_col="model", **kw)
    got = fuse_predictions(table, SIZES, group_col="model", leave_out=["m1"], **kw)
    pd.testing.assert_frame_equal(got, want)
    alone = pd.concat([table, table[table["model"] == "m2"].assign(image_id="unsized")], ignore_index=True)
    got = fuse_predictions(alone, SIZES, group_col="model", leave_out=["m1", "m2"], **kw)
    pd.testing.assert_frame_equal(got, fuse_predictions(table[table["model"] == "m0"], SIZES, group_col="model",
                                                        **kw))
    assert fuse_predictions(table, SIZES, group_col="model", leave_out=["m0", "m1", "m2"], **kw).empty


def test_sets_left_out_of_a_packing_equal_packing_without_them():
    """without_sets (the OOF tuner's packings of member subsets, taken from all members' packing) gives what
    pack_table gives with leave_out, field for field -- an image left with no segment dropped too."""
    from pipeline.fusion.packing import without_sets

    table = make_table(seed=6)  # m2 predicts nothing on image c: leaving m0 and m1 out leaves c without segments
    keys = sorted(set(zip(table["model"], table["fold"])))
    weights = {"m0": 1.0, "m1": 2.0, "m2": 3.0}
    full = pack_table(table, SIZES, ("model", "fold"), weights, keys)
    for leave_out in [{"m1"}, {"m0", "m1"}, {"m2"}, {("m0", 1), "m2"}]:
        want = pack_table(table, SIZES, ("model", "fold"), weights, keys, leave_out)
        got = without_sets(full, leave_out, weights, multi=True)
        assert list(got.image_ids) == list(want.image_ids) and got.set_keys == want.set_keys, leave_out
        for name in ["width", "height", "row_offs", "seg_offs", "seg_start", "seg_len", "seg_set", "weights"]:
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and a.flags.writeable == b.flags.writeable, (leave_out, name)
            np.testing.assert_array_equal(a, b, err_msg=f"{leave_out} {name}")
    assert "c" not in list(without_sets(full, {"m0", "m1"}, weights, multi=True).image_ids)
    assert without_sets(full, {"m0", "m1", "m2"}, weights, multi=True) is None


def test_fuse_predictions_backends_agree_and_threads_agree():
    rng = np.random.default_rng(5)
    parts = []
    sizes = {}
    for i in range(40):
        image_id = f"img{i:03d}"
        sizes[image_id] = (int(rng.integers(200, 1200)), int(rng.integers(200, 1200)))
        bl, sl, ll = make_inputs(rng, 4, 20, 2, quantise=False, messy=False)
        w, h = sizes[image_id]
        for t in range(4):
            b = bl[t] * [w, h, w, h]
            parts.append(pd.DataFrame({"image_id": image_id, "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2],
                                       "y2": b[:, 3], "score": sl[t], "label": ll[t], "model": f"m{t}", "fold": 0,
                                       "tta": "none"}))
    table = pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=0)  # row order must not matter
    size_table = pd.DataFrame([(k, w, h) for k, (w, h) in sizes.items()], columns=["image_id", "width", "height"])
    kw = dict(conf_type="box_and_model_avg", iou_thr=0.6)
    one = fuse_predictions(table, sizes, threads=1, **kw)
    two = fuse_predictions(table, size_table, threads=2, **kw)
    pd.testing.assert_frame_equal(one, two)
    slow = fuse_predictions(table, sizes, backend="ensemble_boxes", **kw)
    pd.testing.assert_frame_equal(one, slow, check_exact=False, rtol=0, atol=1e-6)


def test_fuse_predictions_errors_and_empty():
    table = make_table()
    with pytest.raises(ValueError, match="image_sizes lacks"):
        fuse_predictions(table, {"a": (640, 480)})
    with pytest.raises(KeyError):
        fuse_predictions(table, SIZES, weights={"m0": 1.0})
    with pytest.raises(ValueError, match="backend"):
        fuse_predictions(table, SIZES, backend="torch")
    empty = fuse_predictions(table.iloc[:0], SIZES)
    assert list(empty.columns) == PREDICTION_COLUMNS and len(empty) == 0
    assert len(fuse_predictions(table, SIZES, skip_box_thr=2.0)) == 0


# ------------------------------------------------------------------------------------------------------------------
# package layout: public API, packing, the oracle off the hot path
# ------------------------------------------------------------------------------------------------------------------
def test_public_api():
    assert sorted(pipeline.fusion.__all__) == ["BACKENDS", "CONF_TYPES", "FUSION_METHODS", "FusionRule",
                                               "fuse_predictions", "fuse_tuned", "nms", "nms_method",
                                               "non_maximum_weighted", "rule_params", "soft_nms",
                                               "weighted_boxes_fusion"]
    assert BACKENDS == ("numba", "ensemble_boxes")
    assert CONF_TYPES == ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


def test_ensemble_boxes_is_imported_only_for_its_backend():
    code = """if True:
        import sys
        import pandas as pd
        from pipeline.fusion import fuse_predictions, weighted_boxes_fusion
        weighted_boxes_fusion([[[0.1, 0.2, 0.5, 0.6]]], [[0.9]], [[0]])
        table = pd.DataFrame({"image_id": ["a"], "x1": [1.0], "y1": [2.0], "x2": [5.0], "y2": [6.0], "score": [0.9],
                              "label": [0], "model": ["m"], "fold": [0], "tta": ["none"]})
        fuse_predictions(table, {"a": (10, 10)})
        assert "ensemble_boxes" not in sys.modules, "the numba path imported the library"
        fuse_predictions(table, {"a": (10, 10)}, backend="ensemble_boxes")
        assert "ensemble_boxes" in sys.modules
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_pack_table_orders_by_image_then_set_then_row_and_normalises():
    table = pd.DataFrame({
        "image_id": ["b", "a", "b", "a", "b"], "x1": [10.0, 1.0, 20.0, 2.0, 30.0], "y1": [5.0, 1.0, 5.0, 1.0, 5.0],
        "x2": [40.0, 3.0, 50.0, 4.0, 60.0], "y2": [15.0, 2.0, 15.0, 2.0, 15.0], "score": [0.1, 0.2, 0.3, 0.4, 0.5],
        "label": [1, 0, 1, 0, 2], "model": ["n", "n", "m", "m", "n"]})
    packed = pack_table(table, {"a": (4, 2), "b": (100, 50)}, "model", {"m": 2.0, "n": 0.5}, sets=None)
    assert packed.image_ids.tolist() == ["a", "b"] and packed.set_keys == ["m", "n"]
    np.testing.assert_array_equal(packed.row_offs, [0, 2, 5])
    np.testing.assert_array_equal(packed.image_rows(0), [3, 1])  # a: m, n
    np.testing.assert_array_equal(packed.image_rows(1), [2, 0, 4])  # b: m, then n in row order
    np.testing.assert_array_equal(packed.score[packed.image_rows(1)], [0.3, 0.1, 0.5])
    np.testing.assert_array_equal(packed.image_sets(1), [0, 1, 1])
    np.testing.assert_array_equal(packed.normalised_boxes(0)[0], [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(packed.normalised_boxes(1)[0], [0.2, 0.1, 0.5, 0.3])
    np.testing.assert_array_equal(packed.weights, [2.0, 0.5])
    assert pack_table(table.iloc[:0], {}, "model", None, sets=None) is None


def test_pack_table_segments_are_runs_of_rows_and_share_the_columns():
    """Consecutive rows of one image and set are one segment; the row columns are the table's own (no copy)."""
    table = pd.DataFrame({"image_id": ["a"] * 3 + ["b"] * 2 + ["a"] * 2, "x1": 1.0, "y1": 1.0, "x2": 2.0, "y2": 2.0,
                          "score": np.linspace(0.1, 0.7, 7), "label": 0,
                          "model": ["m", "m", "n", "n", "n", "m", "m"]})
    packed = pack_table(table, {"a": (10, 10), "b": (10, 10)}, "model", None, sets=None)
    assert len(packed.seg_start) == 4  # a/m, a/n, b/n, a/m
    np.testing.assert_array_equal(packed.seg_offs, [0, 3, 4])
    np.testing.assert_array_equal(packed.image_rows(0), [0, 1, 5, 6, 2])  # a: m rows in table order, then n
    assert np.shares_memory(packed.score, table["score"].to_numpy())
    assert not packed.score.flags.writeable


COMPILED_PACKAGES = ("fusion", "metrics")  # the packages whose modules hold cached compiled functions


def package_sources_compiled_into(path: Path) -> set[tuple[str, str]]:
    """The ``pipeline.fusion`` and ``pipeline.metrics`` files a module imports, directly or through each other, as
    ``(package, file name)``."""
    root = path.parent.parent
    found, todo = set(), [path]
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text(encoding="utf-8"))):
            parts = (node.module or "").split(".") if isinstance(node, ast.ImportFrom) else []
            if len(parts) == 3 and parts[0] == "pipeline" and parts[1] in COMPILED_PACKAGES:
                source = (parts[1], parts[2] + ".py")
                if source not in found:
                    found.add(source)
                    todo.append(root / parts[1] / source[1])
    return found


def test_compiled_modules_record_the_sources_compiled_into_them():
    """numba's disk cache only sees the file that defines a function; each module with cached compiled functions
    records the digests of the package files compiled into them (a file of another package as ``package/file``), so
    a change there changes the module too."""
    root = Path(pipeline.fusion.__file__).parent.parent
    for package in COMPILED_PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            dependencies = package_sources_compiled_into(path)
            if "numba.njit" not in text or not dependencies:
                continue
            module = importlib.import_module(f"pipeline.{package}.{path.stem}")
            current = {(name if other == package else f"{other}/{name}"):
                       hashlib.sha256((root / other / name).read_bytes()).hexdigest()[:16]
                       for other, name in sorted(dependencies)}
            assert getattr(module, "COMPILED_AGAINST", None) == current, (
                f"numba would serve stale cached code: set COMPILED_AGAINST = {current!r} in {package}/{path.name}")


def _levels_case(rng: np.random.Generator):
    """One image's lists for fuse_packed_levels: clustered boxes of 1-3 labels, scores drawn so that some tie
    (one decimal) or are 0 (a cluster of zero scores fuses to NaN in the library)."""
    from pipeline.fusion.packing import pack_lists

    n_sets = int(rng.integers(1, 6))
    lens = rng.integers(0, 50, n_sets)
    n = int(lens.sum())
    centres = rng.uniform(0.1, 0.9, (6, 2))[rng.integers(0, 6, n)] + rng.normal(0, 0.03, (n, 2))
    wh = rng.uniform(0.05, 0.2, (n, 2))
    kind = int(rng.integers(0, 3))
    score = [rng.uniform(0, 1, n), np.round(rng.uniform(0, 1, n), 1), (rng.uniform(0, 1, n) > 0.6) * 0.5][kind]
    label = rng.integers(0, int(rng.integers(1, 4)), n)
    boxes = np.c_[centres - wh / 2, centres + wh / 2]  # some past the image's edge: clipped as the library does
    return pack_lists(boxes, score, label.astype(np.int64), lens, n_sets)._replace(weights=np.ones(n_sets))


def test_wbf_at_several_skip_thresholds_in_one_pass_is_a_fusion_per_threshold():
    # fuse_packed_levels: the tuner's skip_box_thr grid in one kernel pass (every weight 1), each level's output bit
    # for bit fuse_packed's with that threshold -- ties across labels (the level's own label-group order decides
    # them), NaN clusters, every conf_type
    from pipeline.fusion.wbf import fuse_packed, fuse_packed_levels

    rng = np.random.default_rng(7)
    for case in range(240):
        packed = _levels_case(rng)
        levels = sorted(rng.choice([0.0, 0.05, 0.1, 0.3, 0.5, 0.6], int(rng.integers(1, 4)), replace=False).tolist())
        iou_thr, code, overflow = float(rng.choice([0.05, 0.3, 0.55, 0.7])), case % 4, bool(case % 8 >= 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = fuse_packed_levels(packed, iou_thr, levels, code, overflow)
            expected = [fuse_packed(packed, iou_thr, level, code, overflow) for level in levels]
        for got, ref in zip(outputs, expected):
            m = int(ref.count[0])
            assert int(got.count[0]) == m, (case, levels)
            np.testing.assert_array_equal(got.boxes[:m], ref.boxes[:m])  # NaN == NaN here
            np.testing.assert_array_equal(got.score[:m], ref.score[:m])
            np.testing.assert_array_equal(got.label[:m], ref.label[:m])


def test_wbf_levels_refuse_weights_other_than_one_and_unsorted_thresholds():
    from pipeline.fusion.wbf import fuse_packed_levels

    packed = _levels_case(np.random.default_rng(0))
    with pytest.raises(ValueError, match="weight 1"):
        fuse_packed_levels(packed._replace(weights=np.full(len(packed.weights), 2.0)), 0.55, [0.0, 0.1], 0, False)
    with pytest.raises(ValueError, match="non-decreasing"):
        fuse_packed_levels(packed, 0.55, [0.1, 0.0], 0, False)
