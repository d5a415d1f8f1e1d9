"""pipeline.fusion.rules and fuse_predictions(method=...): the registry, every rule on whole tables against the
library, the packing of tables of any column types."""
from __future__ import annotations

import contextlib
import inspect
import io
import warnings

import ensemble_boxes
import numpy as np
import pandas as pd
import pytest

from pipeline.fusion import FUSION_METHODS, FusionRule, fuse_predictions
from pipeline.fusion.runner import image_ranges
from pipeline.layout import PREDICTION_COLUMNS
from tests.test_fusion import SIZES, make_inputs, make_table

METHODS = sorted(FUSION_METHODS)


# ------------------------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------------------------
def test_registry_names_the_four_rules_with_the_librarys_defaults():
    assert METHODS == ["nms", "nmw", "soft_nms", "wbf"]
    for name, rule in FUSION_METHODS.items():
        assert isinstance(rule, FusionRule) and rule.name == name
        library_defaults = {k: p.default for k, p in inspect.signature(getattr(ensemble_boxes, rule.library))
                            .parameters.items() if p.default is not inspect.Parameter.empty}
        ours = dict(rule.defaults)
        if name == "soft_nms":  # the library's method=2 is the gaussian decay
            assert ours.pop("decay") == "gaussian" and library_defaults.pop("method") == 2
        library_defaults.pop("weights")
        assert ours == library_defaults, name
        assert rule.sorted_by_score == (name in ("wbf", "nmw"))  # NMS and soft-NMS come out grouped by label


def test_candidates_cover_each_grid_without_duplicates():
    for rule in FUSION_METHODS.values():
        cands = rule.candidates()
        assert cands and all(set(c) == set(rule.defaults) for c in cands)
        assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)
        assert len(cands) <= sum(int(np.prod([len(v) for v in g.values()])) for g in rule.grids)
    soft = FUSION_METHODS["soft_nms"].candidates()
    gaussian = [c for c in soft if c["decay"] == "gaussian"]
    assert {c["iou_thr"] for c in gaussian} == {0.5}  # the gaussian decay ignores iou_thr: not searched
    assert len({c["sigma"] for c in gaussian}) > 1 and any(c["decay"] == "linear" for c in soft)
    wbf = FUSION_METHODS["wbf"].candidates()
    assert {c["conf_type"] for c in wbf} == {"avg", "max", "box_and_model_avg", "absent_model_aware_avg"}


def test_resolve_fills_defaults_and_rejects_unknown_parameters():
    rule = FUSION_METHODS["nms"]
    assert rule.resolve({}) == {"iou_thr": 0.5} and rule.resolve({"iou_thr": 0.3}) == {"iou_thr": 0.3}
    with pytest.raises(TypeError, match="'nms' takes no parameter \\['conf_type'\\]"):
        rule.resolve({"conf_type": "avg"})


# ------------------------------------------------------------------------------------------------------------------
# every rule on a whole table
# ------------------------------------------------------------------------------------------------------------------
def library_on_table(table, library_fn, set_keys, weights, **kw):
    """Reference: the library per image on normalised coordinates, one entry per set (empty ones too)."""
    out = []
    for image_id in sorted(table["image_id"].unique()):
        w, h = SIZES[image_id]
        img = table[table["image_id"] == image_id]
        bl = [img[img.model == k][["x1", "y1", "x2", "y2"]].to_numpy() / [w, h, w, h] for k in set_keys]
        sl = [img[img.model == k]["score"].to_numpy() for k in set_keys]
        ll = [img[img.model == k]["label"].to_numpy() for k in set_keys]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            b, s, lab = library_fn(bl, sl, ll, weights=weights, **kw)
        b = np.asarray(b, np.float64).reshape(-1, 4)
        out.append(pd.DataFrame({"image_id": image_id, "x1": b[:, 0] * w, "y1": b[:, 1] * h, "x2": b[:, 2] * w,
                                 "y2": b[:, 3] * h, "score": np.asarray(s, np.float64),
                                 "label": np.asarray(lab).astype(np.int64)}))
    return pd.concat(out, ignore_index=True)


CASES = [
    ("nms", ensemble_boxes.nms, dict(iou_thr=0.45), {}),
    ("soft_nms", ensemble_boxes.soft_nms, dict(iou_thr=0.4, sigma=0.3, thresh=0.01, decay="linear"),
     dict(method=1)),
    ("soft_nms", ensemble_boxes.soft_nms, dict(sigma=0.3, thresh=0.02), {}),
    ("nmw", ensemble_boxes.non_maximum_weighted, dict(iou_thr=0.5, skip_box_thr=0.05), {}),
    ("wbf", ensemble_boxes.weighted_boxes_fusion, dict(iou_thr=0.5, conf_type="max"), {}),
]


@pytest.mark.parametrize("method, library_fn, params, library_extra", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_every_rule_on_a_table_equals_the_library_image_by_image(method, library_fn, params, library_extra,
                                                                 weighted):
    table = make_table(seed=3)
    weights = {"m0": 2.0, "m1": 1.0, "m2": 0.5} if weighted else None
    got = fuse_predictions(table, SIZES, method=method, weights=weights, **params)
    lib_params = {k: v for k, v in params.items() if k != "decay"} | library_extra
    ref = library_on_table(table, library_fn, ["m0", "m1", "m2"], [2.0, 1.0, 0.5] if weighted else None,
                           **lib_params)
    assert list(got.columns) == PREDICTION_COLUMNS and len(got) == len(ref) > 0
    assert (got["model"] == method).all() and (got["tta"] == method).all() and (got["fold"] == -1).all()
    np.testing.assert_array_equal(got["image_id"].to_numpy(), ref["image_id"].to_numpy())
    np.testing.assert_array_equal(got["label"].to_numpy(), ref["label"].to_numpy())
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[["x1", "y1", "x2", "y2"]].to_numpy(), ref[["x1", "y1", "x2", "y2"]].to_numpy(),
                               rtol=0, atol=1e-9)


def shuffled_table(seed: int = 5) -> tuple[pd.DataFrame, dict]:
    rng = np.random.default_rng(seed)
    parts, sizes = [], {}
    for i in range(40):
        image_id = f"img{i:03d}"
        sizes[image_id] = (int(rng.integers(200, 1200)), int(rng.integers(200, 1200)))
        bl, sl, ll = make_inputs(rng, 4, 20, 2, quantise=False, messy=False)
        w, h = sizes[image_id]
        for t in range(4):
            b = bl[t] * [w, h, w, h]
            parts.append(pd.DataFrame({"image_id": image_id, "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2],
                                       "y2": b[:, 3], "score": sl[t], "label": ll[t], "model": f"m{t}",
                                       "fold": t % 2, "tta": "none"}))
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=0), sizes


@pytest.mark.parametrize("method", METHODS)
def test_backends_and_threads_agree_for_every_rule(method):
    table, sizes = shuffled_table()
    one = fuse_predictions(table, sizes, method=method, threads=1)
    two = fuse_predictions(table, sizes, method=method, threads=2)
    pd.testing.assert_frame_equal(one, two)
    slow = fuse_predictions(table, sizes, method=method, backend="ensemble_boxes")
    pd.testing.assert_frame_equal(one, slow, check_exact=False, rtol=0, atol=1e-9)


def test_nms_weights_none_keeps_scores_and_weights_divide_by_their_sum():
    table = make_table(seed=4)
    plain = fuse_predictions(table, SIZES, method="nms")
    ones = fuse_predictions(table, SIZES, method="nms", weights={"m0": 1.0, "m1": 1.0, "m2": 1.0})
    assert set(plain["score"]) <= set(table["score"])
    np.testing.assert_array_equal(ones["score"].to_numpy(), plain["score"].to_numpy() / 3)


def test_model_name_and_errors():
    table = make_table()
    assert (fuse_predictions(table, SIZES, method="nmw", model_name="ens")["model"] == "ens").all()
    with pytest.raises(ValueError, match="unknown fusion method 'median'"):
        fuse_predictions(table, SIZES, method="median")
    with pytest.raises(TypeError, match="takes no parameter"):
        fuse_predictions(table, SIZES, method="nms", skip_box_thr=0.1)
    with pytest.raises(ValueError, match="decay"):
        fuse_predictions(table, SIZES, method="soft_nms", decay="cubic")
    with pytest.raises(ValueError, match="sigma"):
        fuse_predictions(table.iloc[:0], SIZES, method="soft_nms", sigma=0.0)  # checked before any fusion
    with pytest.raises(ValueError, match="NaN"):
        fuse_predictions(table, SIZES, method="nmw", iou_thr=float("nan"), backend="ensemble_boxes")
    for method in METHODS:
        assert len(fuse_predictions(table.iloc[:0], SIZES, method=method)) == 0


# ------------------------------------------------------------------------------------------------------------------
# packing: any column types, any row order
# ------------------------------------------------------------------------------------------------------------------
def test_column_types_and_row_order_do_not_change_the_fusion():
    table, sizes = shuffled_table(seed=6)
    kw = dict(group_col=("model", "fold"), weights={"m0": 2.0, "m1": 1.0, "m2": 0.5, "m3": 1.5}, iou_thr=0.5)
    ref = fuse_predictions(table, sizes, **kw)
    variants = {
        "sorted": table.sort_values(["image_id", "model", "fold"], kind="stable"),
        "categorical": table.astype({"image_id": "category", "model": "category"}),
        "object": table.astype({"image_id": object, "model": object}),
        "python str": table.astype({"image_id": pd.StringDtype("python"), "model": pd.StringDtype("python")}),
        "float32 coordinates": table.astype({"x1": np.float32}).assign(x1=table["x1"]),
        "arrow chunks": pd.concat([table.iloc[i:i + 97] for i in range(0, len(table), 97)]),
    }
    assert variants["arrow chunks"]["image_id"].array.__arrow_array__().num_chunks > 1
    for name, variant in variants.items():
        got = fuse_predictions(variant, sizes, **kw)
        pd.testing.assert_frame_equal(got, ref, obj=name)


def test_bad_tables_raise_clear_errors():
    table = make_table()
    bad = table.copy()
    bad.loc[5, "x2"] = np.inf
    with pytest.raises(ValueError, match="finite"):
        fuse_predictions(bad, SIZES, method="nms")
    bad = table.astype({"model": object})
    bad.loc[3, "model"] = None
    with pytest.raises(ValueError, match="group column 'model' has missing values"):
        fuse_predictions(bad, SIZES)
    bad = table.astype({"image_id": object})
    bad.loc[7, "image_id"] = None
    with pytest.raises(ValueError, match="image_id has missing values"):
        fuse_predictions(bad, SIZES)


def test_image_ranges_cover_every_image_once():
    row_offs = np.r_[0, np.cumsum(np.random.default_rng(0).integers(0, 50, 500))]
    for threads in (1, 2, 7):
        ranges = image_ranges(row_offs, threads)
        assert ranges[0][0] == 0 and ranges[-1][1] == 500
        assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
