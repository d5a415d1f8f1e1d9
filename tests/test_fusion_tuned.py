"""pipeline.fusion.fuse_tuned: the fusion the ensemble, pseudo-labelling and offline inference share."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.fusion import fuse_predictions, fuse_tuned, rule_params
from tests.test_fusion import SIZES, make_table

SETS = [(m, f) for m in ("m0", "m1", "m2") for f in (0, 1)]
GROUP = ("model", "fold")


def test_params_without_a_method_are_wbf_and_a_foreign_parameter_is_refused():
    assert rule_params({"iou_thr": 0.6, "score_thr": 0.1, "weights": None}) == (
        "wbf", {"iou_thr": 0.6, "skip_box_thr": 0.0, "conf_type": "avg", "allows_overflow": False})
    assert rule_params({"method": "nms", "iou_thr": 0.3})[1] == {"iou_thr": 0.3}
    with pytest.raises(TypeError, match="sigma"):
        rule_params({"method": "nms", "sigma": 0.5})  # a soft-NMS parameter: a file made for another rule


@pytest.mark.parametrize("method", ["wbf", "nmw", "nms", "soft_nms"])
def test_a_member_of_weight_zero_is_left_out_entirely(method):
    table = make_table(seed=2)
    params = {"method": method, "weights": {"m0": 1.0, "m1": 0.0, "m2": 2.0}}
    fused = fuse_tuned(table, SIZES, params, SETS, GROUP, name="e")
    kept = [s for s in SETS if s[0] != "m1"]
    expected = fuse_tuned(table[table.model != "m1"], SIZES, params | {"weights": {"m0": 1.0, "m2": 2.0}}, kept,
                          GROUP, name="e")
    pd.testing.assert_frame_equal(fused.reset_index(drop=True), expected.reset_index(drop=True))
    # and it differs from counting m1's boxes with weight 0 in the sets
    counted = fuse_predictions(table, SIZES, method=method, group_col=GROUP, sets=SETS, model_name="e",
                               weights=params["weights"])
    assert len(counted) != len(fused) or not np.allclose(counted.score.to_numpy(), fused.score.to_numpy())


@pytest.mark.parametrize("method", ["nms", "soft_nms"])
def test_suppression_scores_do_not_depend_on_how_many_sets_are_fused(method):
    # NMS and soft-NMS divide weighted scores by the weights' sum: with equal weights fuse_tuned gives the
    # unweighted scores back, whether the table has 2 folds (6 sets) or 1 (3 sets)
    table = make_table(seed=5)
    equal = {"method": method, "weights": {"m0": 1.0, "m1": 1.0, "m2": 1.0}}
    tuned = fuse_tuned(table, SIZES, equal, SETS, GROUP, name=method)
    plain = fuse_predictions(table, SIZES, method=method, group_col=GROUP, sets=SETS, model_name=method)
    np.testing.assert_allclose(tuned.score.to_numpy(), plain.score.to_numpy(), rtol=1e-6)
    one_fold = table[table.fold == 0]
    sets = [s for s in SETS if s[1] == 0]
    np.testing.assert_allclose(
        fuse_tuned(one_fold, SIZES, equal, sets, GROUP, name=method).score.to_numpy(),
        fuse_predictions(one_fold, SIZES, method=method, group_col=GROUP, sets=sets).score.to_numpy(), rtol=1e-6)
    # unequal weights: a box keeps score * w / max(w), so the strongest member's boxes keep their own scores
    skewed = fuse_tuned(table, SIZES, equal | {"weights": {"m0": 2.0, "m1": 1.0, "m2": 1.0}}, SETS, GROUP, name="s")
    # (weights sum 8 over the sets, max 2: the library's scores times 4; soft-NMS's thresh divided by 4 alike)
    scaled_thresh = {"thresh": 0.001 / 4} if method == "soft_nms" else {}
    raw = fuse_predictions(table, SIZES, method=method, group_col=GROUP, sets=SETS,
                           weights={"m0": 2.0, "m1": 1.0, "m2": 1.0}, **scaled_thresh)
    np.testing.assert_allclose(skewed.score.to_numpy(), raw.score.to_numpy() * 4, rtol=1e-6)


def test_the_score_threshold_is_applied_after_fusion():
    table = make_table(seed=1)
    fused = fuse_tuned(table, SIZES, {"method": "nmw"}, SETS, GROUP, name="e")
    cut = fuse_tuned(table, SIZES, {"method": "nmw", "score_thr": 0.5}, SETS, GROUP, name="e")
    assert 0 < len(cut) < len(fused) and (cut.score >= 0.5).all()
    pd.testing.assert_frame_equal(cut.reset_index(drop=True), fused[fused.score >= 0.5].reset_index(drop=True))


@pytest.mark.parametrize("method", ["wbf", "nmw", "nms", "soft_nms"])
def test_rows_with_a_shared_packing_equal_the_table(method):
    # the OOF tuner packs once per subset of members and only changes the weights: every fusion must be the one
    # fuse_tuned gives from scratch, weight-0 members, the score threshold and soft-NMS's rescaling included
    from pipeline.fusion.table import fused_table
    from pipeline.fusion.tuned import fuse_tuned_rows

    table = make_table(seed=3)
    packings: dict = {}
    for weights, score_thr in [({"m0": 1.0, "m1": 1.0, "m2": 1.0}, 0.0), ({"m0": 2.0, "m1": 0.0, "m2": 1.0}, 0.2),
                               ({"m0": 1.0, "m1": 3.0, "m2": 1.0}, 0.0), ({"m0": 3.0, "m1": 0.0, "m2": 1.0}, 0.0),
                               ({"m0": 0.0, "m1": 0.0, "m2": 1.0}, 0.1)]:
        params = {"method": method, "weights": weights, "score_thr": score_thr}
        fused = fuse_tuned_rows(table, SIZES, params, SETS, GROUP, packings=packings)
        expected = fuse_tuned(table, SIZES, params, SETS, GROUP, name="e")
        pd.testing.assert_frame_equal(fused_table(fused.packed, fused.rows, "e", method),
                                      expected.reset_index(drop=True))
    assert set(packings) == {frozenset(), frozenset({"m1"}), frozenset({"m0", "m1"})}


@pytest.mark.parametrize("method", ["wbf", "soft_nms"])
def test_the_tuners_fusions_write_into_one_set_of_cached_slots_and_keep_their_own_rows(method, monkeypatch):
    # fresh output slots, one row per OOF row, cost page faults and huge-page stalls on every fusion: the tuner's
    # fusions (a shared packing) write into this thread's cached slots, so each one's rows must be copied out of
    # them before the next fusion overwrites them; a one-off fusion keeps fresh slots
    from pipeline.fusion import runner
    from pipeline.fusion.table import fused_table
    from pipeline.fusion.tuned import fuse_tuned_rows

    cached_calls = []
    real = runner.thread_output
    monkeypatch.setattr(runner, "thread_output", lambda n, n_img: cached_calls.append(n) or real(n, n_img))
    table = make_table(seed=5)
    packings: dict = {}
    every = [{"method": method, "weights": w} for w in
             ({"m0": 1.0, "m1": 1.0, "m2": 1.0}, {"m0": 3.0, "m1": 1.0, "m2": 2.0}, {"m0": 1.0, "m1": 0.0, "m2": 2.0})]
    fused = [fuse_tuned_rows(table, SIZES, params, SETS, GROUP, packings=packings) for params in every]
    assert len(cached_calls) == len(every)
    for params, rows in zip(every, fused):  # compared after every fusion has run
        assert (rows.rows.selection is None) == (method == "wbf")
        pd.testing.assert_frame_equal(fused_table(rows.packed, rows.rows, "e", method),
                                      fuse_tuned(table, SIZES, params, SETS, GROUP, name="e").reset_index(drop=True))
    assert len(cached_calls) == len(every)  # fuse_tuned: fresh slots
    runner.release_thread_output()
    assert getattr(runner._THREAD_LOCAL, "output", "absent") is None
    assert getattr(runner._THREAD_LOCAL, "rows", "absent") is None  # the dense-row buffers too


def test_rows_of_a_table_with_nothing_to_fuse_are_none():
    from pipeline.fusion.tuned import fuse_tuned_rows

    table = make_table(seed=3)
    only_m1 = table[table.model == "m1"]
    params = {"method": "wbf", "weights": {"m0": 1.0, "m1": 0.0, "m2": 1.0}}
    assert fuse_tuned_rows(only_m1, SIZES, params, SETS, GROUP, packings={}) is None
    assert len(fuse_tuned(only_m1, SIZES, params, SETS, GROUP, name="e")) == 0


@pytest.mark.parametrize("rule", [{"decay": "gaussian", "sigma": 0.1}, {"decay": "linear", "iou_thr": 0.3}])
def test_a_higher_soft_nms_thresh_is_derived_from_a_lower_ones_rows(rule):
    # the library runs its whole selection loop and drops the rows whose score at selection is <= thresh at the
    # end: the rows at a higher thresh are the lower one's whose selection score is above it, divided by the same
    # rescaling as the fusion divides thresh (weights {2, 0, 1}: the library's scores are a third of fuse_tuned's)
    from pipeline.fusion.tuned import derive_rows, fuse_tuned_rows

    table = make_table(seed=4)
    for weights in [None, {"m0": 2.0, "m1": 0.0, "m2": 1.0}]:
        base = {"method": "soft_nms", **rule, "thresh": 0.001, "weights": weights}
        fused = fuse_tuned_rows(table, SIZES, base, SETS, GROUP)
        counts = [len(fused.rows.image)]
        for thresh, score_thr in [(0.03, 0.0), (0.1, 0.0), (0.1, 0.4), (0.3, 0.0)]:
            params = base | {"thresh": thresh, "score_thr": score_thr}
            derived = derive_rows(fused, base, params, SETS)
            expected = fuse_tuned_rows(table, SIZES, params, SETS, GROUP)
            for mine, theirs in zip(derived.rows, expected.rows, strict=True):
                np.testing.assert_array_equal(mine, theirs)
            counts.append(len(derived.rows.image))
        assert counts[0] > counts[1] > counts[2] > counts[3] > 0 and counts[2] > counts[4] > 0


def test_only_a_higher_selection_threshold_is_derived():
    from pipeline.fusion.tuned import derive_rows, fuse_tuned_rows

    table = make_table(seed=4)
    base = {"method": "soft_nms", "sigma": 0.1, "thresh": 0.01, "weights": None}
    fused = fuse_tuned_rows(table, SIZES, base, SETS, GROUP)
    for params in [base | {"thresh": 0.001}, base | {"sigma": 0.2}, base | {"score_thr": -0.1},
                   base | {"weights": {"m0": 1.0, "m1": 2.0, "m2": 1.0}}, {"method": "nms", "weights": None}]:
        with pytest.raises(ValueError, match="cannot be derived"):
            derive_rows(fused, base, params, SETS)
    assert derive_rows(fused, base, base, SETS).rows is fused.rows  # nothing raised: the rows as they are


@pytest.mark.parametrize("backend", ["numba", "ensemble_boxes"])
@pytest.mark.parametrize("method", ["nms", "soft_nms", "wbf"])
def test_rows_by_score_are_each_images_rows_in_the_order_a_scorer_packs_them(method, backend):
    # the OOF tuner asks for each image's rows by descending score, equal scores in the rule's order (the order a
    # scorer packs rows in), so that its scorings take them as they come: the same rows, selection scores included
    from pipeline.fusion.tuned import fuse_tuned_rows
    from pipeline.metrics.packing import _offsets_if_packed

    table = make_table(seed=4)
    tied = table.assign(score=table.score.round(1))  # equal scores: they keep the rule's order
    params = {"method": method, "weights": {"m0": 1.0, "m1": 2.0, "m2": 1.0}}
    for preds in (table, tied):
        plain = fuse_tuned_rows(preds, SIZES, params, SETS, GROUP, backend=backend).rows
        rows = fuse_tuned_rows(preds, SIZES, params, SETS, GROUP, backend=backend, by_score=True).rows
        order = np.lexsort((-plain.values[4], plain.image))
        if method != "wbf":  # (WBF's own order is by score already)
            assert (order != np.arange(len(order))).any()
        np.testing.assert_array_equal(rows.image, plain.image[order])
        np.testing.assert_array_equal(rows.values, plain.values[:, order])
        np.testing.assert_array_equal(rows.label, plain.label[order])
        if plain.selection is not None:
            np.testing.assert_array_equal(rows.selection, plain.selection[order])
        assert len(_offsets_if_packed(rows.image, rows.values[4], 3)) == 4


@pytest.mark.parametrize("method", ["wbf", "nmw"])
@pytest.mark.parametrize("weights", [None, {"m0": 1.0, "m1": 1.0, "m2": 1.0}, {"m0": 1.0, "m1": 0.0, "m2": 1.0},
                                     {"m0": 2.0, "m1": 1.0, "m2": 1.0}])
def test_a_skip_threshold_grid_fused_together_gives_each_points_rows(weights, method):
    # the OOF tuner's WBF / NMW grid over skip_box_thr: one kernel pass when every kept weight is 1 (a member of weight
    # 0 left out), one fusion each otherwise -- the rows of each point as fusing it alone, on 2 threads and 1
    from pipeline.fusion.tuned import fuse_tuned_rows, fuse_tuned_rows_levels

    table = pd.concat([make_table(seed=s).assign(image_id=lambda d, s=s: d.image_id + str(s)) for s in range(4)])
    sizes = {f"{k}{s}": v for k, v in SIZES.items() for s in range(4)}
    every = [{"method": method, "iou_thr": 0.5, "skip_box_thr": v, "weights": weights, "score_thr": t}
             for v, t in [(0.05, 0.0), (0.0, 0.0), (0.3, 0.2), (0.05, 0.4)]]
    for packings in (None, {}):
        together = fuse_tuned_rows_levels(table, sizes, every, SETS, GROUP, packings=packings, by_score=True)
        for params, got in zip(every, together):
            ref = fuse_tuned_rows(table, sizes, params, SETS, GROUP, packings=packings, by_score=True)
            np.testing.assert_array_equal(got.rows.image, ref.rows.image)
            np.testing.assert_array_equal(got.rows.values, ref.rows.values)
            np.testing.assert_array_equal(got.rows.label, ref.rows.label)


TEST_SETS = [(m, f, "none") for m in ("m0", "m1", "m2") for f in (0, 1)]
TEST_GROUP = ("model", "fold", "tta")
WBF_FOLDS = {"iou_thr": 0.55, "skip_box_thr": 0.0, "conf_type": "avg"}


@pytest.mark.parametrize("method", ["wbf", "nms", "soft_nms", "nmw"])
def test_fold_fusion_fuses_each_members_folds_by_wbf_then_the_rule_over_member_sets(method):
    table = make_table(seed=7)
    plan = {m: WBF_FOLDS for m in ("m0", "m1", "m2")}
    params = {"method": method, "weights": {"m0": 2.0, "m1": 0.0, "m2": 1.0}, "fold_fusion": plan}
    fused = fuse_tuned(table, SIZES, params, TEST_SETS, TEST_GROUP, name="e")
    # by hand: m0's and m2's two folds each fused by WBF (m1 at weight 0: left out), then the rule over m0, m2
    by_member = pd.concat([fuse_predictions(table[table.model == m], SIZES, group_col="fold", sets=[0, 1],
                                            model_name=m, **WBF_FOLDS).assign(tta="none") for m in ("m0", "m2")],
                          ignore_index=True)
    expected = fuse_tuned(by_member, SIZES, {"method": method, "weights": {"m0": 2.0, "m2": 1.0}},
                          [("m0", "none"), ("m2", "none")], ("model", "tta"), name="e")
    pd.testing.assert_frame_equal(fused.reset_index(drop=True), expected.reset_index(drop=True))
    # and it is not what fusing every fold model as a set gives
    as_sets = fuse_tuned(table, SIZES, {k: v for k, v in params.items() if k != "fold_fusion"}, TEST_SETS,
                         TEST_GROUP, name="e")
    assert len(as_sets) != len(fused) or not np.allclose(as_sets.score.to_numpy(), fused.score.to_numpy())


def test_with_fold_fusion_k_copies_of_a_model_fuse_as_one_did_on_oof():
    # soft-NMS keeps a decayed copy (its own score returned) while its decayed score stays above thresh: three
    # identical fold models would come out as three rows per box on test where OOF, one fold model per image,
    # had one. Fused fold by fold first, test gets the rows OOF got
    one = make_table(seed=3, models=("m0",), folds=(0,))
    one = one.groupby("image_id").head(1)  # one box per image: no overlaps inside the model
    copies = pd.concat([one.assign(fold=k) for k in range(3)], ignore_index=True)
    params = {"method": "soft_nms", "weights": {"m0": 1.0}}
    oof_like = fuse_tuned(one, SIZES, params, [("m0", "none")], ("model", "tta"), name="e")
    sets = [("m0", k, "none") for k in range(3)]
    folds_first = fuse_tuned(copies, SIZES, params | {"fold_fusion": {"m0": WBF_FOLDS}}, sets, TEST_GROUP, name="e")
    as_sets = fuse_tuned(copies, SIZES, params, sets, TEST_GROUP, name="e")
    assert len(folds_first) == len(oof_like) and len(as_sets) == 3 * len(oof_like)
    np.testing.assert_allclose(folds_first[["x1", "y1", "x2", "y2", "score"]].to_numpy(),
                               oof_like[["x1", "y1", "x2", "y2", "score"]].to_numpy(), rtol=1e-5)


def test_fold_fusion_leaves_one_fold_model_as_predicted_and_other_sets_alone():
    table = make_table(seed=4)
    plan = {m: WBF_FOLDS for m in ("m0", "m1", "m2")}
    params = {"method": "nms", "fold_fusion": plan}
    # m1 has one test model (another tool's single `test`): its rows enter as they are, not fused over one set
    single = table[(table.model != "m1") | (table.fold == 0)]
    sets = [s for s in TEST_SETS if s[0] != "m1" or s[1] == 0]
    fused = fuse_tuned(single, SIZES, params, sets, TEST_GROUP, name="e")
    parts = [fuse_predictions(single[single.model == m], SIZES, group_col="fold", sets=[0, 1], model_name=m,
                              **WBF_FOLDS).assign(tta="none") for m in ("m0", "m2")]
    by_hand = pd.concat([parts[0], single[single.model == "m1"], parts[1]], ignore_index=True)
    expected = fuse_tuned(by_hand, SIZES, {"method": "nms"}, [("m0", "none"), ("m1", "none"), ("m2", "none")],
                          ("model", "tta"), name="e")
    pd.testing.assert_frame_equal(fused.reset_index(drop=True), expected.reset_index(drop=True))
    # OOF's sets (member, view) have no folds to fuse: fold_fusion changes nothing there
    oof = table[table.fold == 0]
    oof_sets = [(m, "none") for m in ("m0", "m1", "m2")]
    pd.testing.assert_frame_equal(fuse_tuned(oof, SIZES, params, oof_sets, ("model", "tta"), name="e"),
                                  fuse_tuned(oof, SIZES, {"method": "nms"}, oof_sets, ("model", "tta"), name="e"))
