"""Tuning on OOF: a deterministic, monotone search that finds the better member."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, MemberConfig, load_config
from pipeline.data.table import AnnotationTable
from pipeline.ensemble import (VIEW_GAP_WARN, FusionParams, Member, fold_fusion_plan, fuse, member_rows, oof_sets,
                               print_table, tune, view_rows)
from pipeline.fusion import fuse_predictions
from pipeline.fusion.views import fuse_views
from pipeline.metrics import Scorer, at_or_above, get_metric, score_at_best_threshold


def synthetic(n_images=30, seed=0):
    rng = np.random.default_rng(seed)
    images = pd.DataFrame({"image_id": [f"i{i}" for i in range(n_images)], "path": "x", "width": 200, "height": 100})
    gt, good, bad = [], [], []
    for image_id in images.image_id:
        for _ in range(int(rng.integers(1, 6))):
            x, y, w, h, label = rng.uniform(0, 150), rng.uniform(0, 60), rng.uniform(10, 40), rng.uniform(10, 30), int(rng.integers(0, 2))
            gt.append((image_id, x, y, x + w, y + h, label))
            j = rng.normal(0, 1.5, 4)  # a good model: small jitter, confident
            good.append((image_id, x + j[0], y + j[1], x + w + j[2], y + h + j[3], rng.uniform(0.6, 0.95), label))
        for _ in range(4):  # a poor model: mostly noise
            x, y = rng.uniform(0, 150), rng.uniform(0, 60)
            bad.append((image_id, x, y, x + 30, y + 20, rng.uniform(0.3, 0.9), int(rng.integers(0, 2))))
    table = AnnotationTable(images, pd.DataFrame(gt, columns=["image_id", "x1", "y1", "x2", "y2", "label"]), ["a", "b"])
    cols = ["image_id", "x1", "y1", "x2", "y2", "score", "label"]

    def preds(rows, name):
        return pd.DataFrame(rows, columns=cols).assign(model=name, fold=0, tta="none")

    return table, preds(good, "good"), preds(bad, "bad")


def good_and_bad(cfg, good, bad) -> list[Member]:
    """The two synthetic members, their weights free, as the ensemble stage would load them."""
    cfg.ensemble.members = [MemberConfig(config="good.yaml"), MemberConfig(config="bad.yaml")]
    return [Member("good", cfg, good, None, ["none"]), Member("bad", cfg, bad, None, ["none"])]


def good_alone(scorer, table, good) -> float:
    """The good member fused alone with the library's defaults: the score no tuned ensemble may fall below."""
    return scorer(fuse(good, table.images, FusionParams(weights={"good": 1.0}), [("good", "none")],
                       ("model", "tta"), "numba", "e")).score


@pytest.mark.slow
def test_tuning_is_monotone_deterministic_and_favours_the_better_member():
    table, good, bad = synthetic()
    cfg = load_config("configs/demo/ensemble.yaml")
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("coco_map", table)
    params, score, evaluations = tune(members, table.images, scorer, cfg)
    defaults = FusionParams(weights={"good": 1.0, "bad": 1.0})
    oof = pd.concat([good, bad])
    default_score = scorer(fuse(oof, table.images, defaults, oof_sets(members), ("model", "tta"), "numba", "e")).score
    assert score >= default_score  # every search step includes the current point
    assert params.weights["good"] > params.weights["bad"]
    assert evaluations > 1
    again = tune(members, table.images, scorer, cfg)
    assert again[0] == params and again[1] == score


def test_fixed_member_weights_are_not_tuned():
    table, good, bad = synthetic(12)
    cfg = load_config("configs/demo/ensemble.yaml")
    cfg.ensemble.members = [MemberConfig(config="good.yaml", weight=1.0), MemberConfig(config="bad.yaml", weight=5.0)]
    members = [Member("good", cfg, good, None, ["none"]), Member("bad", cfg, bad, None, ["none"])]
    params, _, _ = tune(members, table.images, Scorer("coco_map", table), cfg)
    assert params.weights == {"good": 1.0, "bad": 5.0}


def test_cells_average_the_metric_and_add_map50_only_for_coco_map():
    from pipeline.ensemble import cells
    from pipeline.metrics import MetricResult

    folds = [MetricResult("coco_map", 0.4, {"map50": 0.8}), MetricResult("coco_map", 0.6, {"map50": 0.9})]
    assert cells("oof", folds) == pytest.approx({"oof": 0.5, "oof map50": 0.85})
    assert cells("test", [MetricResult("gwd", 0.7, {"iou0.50": 0.9})]) == {"test": 0.7}


def test_the_tuner_follows_a_lower_is_better_metric(mean_confidence_metric):
    # mean summed confidence per image: the lowest comes from giving the noisy member the least weight and the
    # highest score threshold, the opposite of what a "higher is better" search would choose
    table, good, bad = synthetic(12)
    cfg = load_config("configs/demo/ensemble.yaml", ["metric=mean_confidence"])
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("mean_confidence", table)
    params, score, _ = tune(members, table.images, scorer, cfg)
    # no box left is the lowest score; of the thresholds that leave none, ties go to the lowest
    grid = sorted(cfg.ensemble.tune.score_thr)
    assert score == 0.0 and params.score_thr > 0 and grid[grid.index(params.score_thr) - 1] < params.score_thr
    fused = fuse(pd.concat([good, bad]), table.images, replace(params, score_thr=0.0), oof_sets(members),
                 ("model", "tta"), "numba", "e")
    assert (fused.score < params.score_thr).all() and (fused.score >= grid[grid.index(params.score_thr) - 1]).any()
    defaults = FusionParams(weights={"good": 1.0, "bad": 1.0})
    default_score = scorer(fuse(pd.concat([good, bad]), table.images, defaults, oof_sets(members),
                                ("model", "tta"), "numba", "e")).score
    assert score <= default_score


def test_the_tuner_drops_a_member_that_only_hurts():
    # the noise member adds only false positives: the best ensemble is the good member alone
    table, good, bad = synthetic(12, seed=3)
    cfg = load_config("configs/demo/ensemble.yaml")
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("coco_map", table)
    params, score, _ = tune(members, table.images, scorer, cfg)
    alone = good_alone(scorer, table, good)
    assert score >= alone
    assert params.weights["bad"] == 0.0


@pytest.mark.parametrize("method", ["wbf", "nms"])
def test_the_tuned_score_is_the_tables_score_whether_or_not_the_rows_were_held(method, monkeypatch):
    # the tuner scores fused rows, never tables, and keeps only the best fusions' rows for the threshold search;
    # its score must be the score of the table fuse_tuned makes, and re-fusing a point it did not hold must not
    # change anything
    from pipeline import ensemble

    table, good, bad = synthetic(10, seed=2)
    cfg = load_config("configs/demo/ensemble.yaml", [f"ensemble.method={method}", "ensemble.tune.weight_steps=1"])
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("coco_map", table)
    calls, scored = [], []  # scored: each scoring of a fusion's rows (one threshold, or a search's all at once)
    fuse_rows, score_rows = ensemble.fuse_tuned_rows, ensemble.score_rows
    by_threshold, fuse_levels = ensemble.score_rows_by_threshold, ensemble.fuse_tuned_rows_levels
    monkeypatch.setattr(ensemble, "fuse_tuned_rows", lambda *a, **k: calls.append(1) or fuse_rows(*a, **k))
    monkeypatch.setattr(ensemble, "fuse_tuned_rows_levels",  # WBF's skip_box_thr grid: its points fused together
                        lambda *a, **k: calls.extend([1] * len(a[2])) or fuse_levels(*a, **k))
    monkeypatch.setattr(ensemble, "score_rows", lambda *a, **k: scored.append(1) or score_rows(*a, **k))
    monkeypatch.setattr(ensemble, "score_rows_by_threshold", lambda *a: scored.append(1) or by_threshold(*a))
    params, score, fusions = tune(members, table.images, scorer, cfg, method)
    assert len(calls) == fusions < len(scored)  # every threshold scored from held rows
    fused = fuse(pd.concat([good, bad]), table.images, params, oof_sets(members), ("model", "tta"), "numba", "e")
    assert scorer(fused).score == score
    monkeypatch.setattr(ensemble.HeldRows, "holds", lambda self, key: False)
    calls.clear(), scored.clear()
    assert tune(members, table.images, scorer, cfg, method) == (params, score, fusions)
    assert len(scored) > fusions and len(calls) > fusions  # nothing held: points are fused again
    if method == "nms":  # each (fusion, threshold) scored fuses again (WBF fuses a skip_box_thr grid together)
        assert len(calls) == len(scored)


@pytest.mark.slow  # two whole searches (make test); the kernel's exactness is a fast test of its own
@pytest.mark.parametrize("method", ["wbf", "nmw"])
def test_skip_thresholds_are_fused_together_and_tune_the_same(method, monkeypatch):
    # at weights 1 the rule search fuses each iou_thr's skip_box_thr options in one kernel pass (WBF, NMW)
    # (fuse_tuned_rows_levels): the same tuned point and OOF score as fusing every point, in fewer passes
    from pipeline import ensemble
    from pipeline.fusion.tuned import fuse_tuned_rows

    table, good, bad = synthetic(10, seed=2)
    cfg = load_config("configs/demo/ensemble.yaml", [f"ensemble.method={method}", "ensemble.tune.weight_steps=1"])
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("coco_map", table)
    passes, together = [], []
    fuse_rows, fuse_levels = ensemble.fuse_tuned_rows, ensemble.fuse_tuned_rows_levels
    monkeypatch.setattr(ensemble, "fuse_tuned_rows", lambda *a, **k: passes.append(1) or fuse_rows(*a, **k))
    monkeypatch.setattr(ensemble, "fuse_tuned_rows_levels",
                        lambda *a, **k: passes.append(1) or together.append(len(a[2])) or fuse_levels(*a, **k))
    shared = tune(members, table.images, scorer, cfg, method)
    n_shared = len(passes)
    assert together and min(together) >= 2  # the skip grid came in groups
    passes.clear()
    monkeypatch.setattr(ensemble, "fuse_tuned_rows_levels", lambda preds, sizes, every, sets, group, **k: [
        passes.append(1) or fuse_tuned_rows(preds, sizes, p, sets, group, **k) for p in every])
    assert tune(members, table.images, scorer, cfg, method) == shared
    assert n_shared < len(passes)


def test_soft_nms_thresholds_are_derived_not_fused_and_tune_the_same(monkeypatch):
    # the rule search fuses each (decay, sigma | iou_thr) once, at the grid's lowest thresh, and derives the higher
    # thresh from the rows' selection scores: the same tuned point and OOF score as fusing every point
    from pipeline import ensemble

    table, good, bad = synthetic(10, seed=2)
    cfg = load_config("configs/demo/ensemble.yaml", ["ensemble.method=soft_nms", "ensemble.tune.weight_steps=1"])
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("coco_map", table)
    calls = []  # the parameters of each fusion run
    fuse_rows = ensemble.fuse_tuned_rows
    monkeypatch.setattr(ensemble, "fuse_tuned_rows",
                        lambda *a, **k: calls.append(repr(sorted(a[2].items()))) or fuse_rows(*a, **k))
    shared = tune(members, table.images, scorer, cfg, "soft_nms")
    n_shared = len(calls)
    assert len(set(calls)) == n_shared  # no point fused twice (the start point's rows were held for its search)
    monkeypatch.setattr(ensemble.SharedSelection, "plan", lambda self, options: None)  # every point fused
    calls.clear()
    assert tune(members, table.images, scorer, cfg, "soft_nms") == shared
    assert len(calls) == shared[2]
    # the first rule search: 10 pairs of thresh (0.001, 0.01), each pair fused once
    assert len(ensemble.rule_grid("soft_nms", cfg)) == 20 and n_shared <= shared[2] - 10
    fused = fuse(pd.concat([good, bad]), table.images, shared[0], oof_sets(members), ("model", "tta"), "numba", "e")
    assert scorer(fused).score == shared[1]


def one_class_tables(images: pd.DataFrame, gt: list, preds: dict[str, list]):
    """The annotation table of one class ``a`` from ``(image_id, x1, y1, x2, y2, 0)`` rows, and each member's OOF
    table (one view) from its ``(image_id, x1, y1, x2, y2, score)`` rows."""
    table = AnnotationTable(images, pd.DataFrame(gt, columns=["image_id", "x1", "y1", "x2", "y2", "label"]), ["a"])
    cols = ["image_id", "x1", "y1", "x2", "y2", "score"]
    return table, {m: pd.DataFrame(r, columns=cols).assign(label=0, model=m, fold=0, tta="none")
                   for m, r in preds.items()}


def detectors_with_false_positives(n_images=40, n_members=3, seed=0):
    """Members that each find most objects (jittered, confident) among many low-scoring false positives: under a
    metric that counts every false positive (GWD), one member alone wins at score threshold 0, while the members
    together, above a threshold, find what each misses."""
    rng = np.random.default_rng(seed)
    images = pd.DataFrame({"image_id": [f"i{i}" for i in range(n_images)], "path": "x", "width": 400, "height": 400})
    gt, preds = [], {f"m{k}": [] for k in range(n_members)}
    for image_id in images.image_id:
        objs = rng.uniform(0, 360, (int(rng.integers(5, 15)), 2))
        gt += [(image_id, x, y, x + 30, y + 30, 0) for x, y in objs]
        for k in range(n_members):
            for x, y in objs[rng.random(len(objs)) < 0.8]:
                j = rng.normal(0, 1.5, 4)
                box = (x + j[0], y + j[1], x + 30 + j[2], y + 30 + j[3])
                preds[f"m{k}"].append((image_id, *box, rng.uniform(0.5, 1)))
            for x, y in rng.uniform(0, 360, (10, 2)):
                preds[f"m{k}"].append((image_id, x, y, x + 30, y + 30, rng.uniform(0, 0.3)))
    return one_class_tables(images, gt, preds)


def tuned_with_false_positives(metric: str):
    """:func:`detectors_with_false_positives` tuned under ``metric`` with weights 0 or 1."""
    table, preds = detectors_with_false_positives()
    cfg = load_config("configs/demo/ensemble.yaml", [f"metric={metric}", "ensemble.tune.weight_steps=1"])
    cfg.ensemble.members = [MemberConfig(config=f"{m}.yaml") for m in preds]
    members = [Member(m, cfg, p, None, ["none"]) for m, p in preds.items()]
    scorer = Scorer(metric, table)
    return table, preds, scorer, *tune(members, table.images, scorer, cfg)[:2]


def test_weights_are_tuned_at_a_useful_score_threshold():
    # the threshold is searched before the weights: at threshold 0 every member's false positives make adding it
    # look bad, and a search that judged weights there kept one member (the old order, rule -> weights -> rule ->
    # threshold: m0 alone, 0.794 here; searching the threshold first: all three, 0.959)
    table, preds, scorer, params, score = tuned_with_false_positives("gwd")
    alone = max(scorer(fuse(p, table.images, FusionParams(weights={m: 1.0}, score_thr=t), [(m, "none")],
                            ("model", "tta"), "numba", "e")).score for m, p in preds.items() for t in (0.0, 0.3))
    assert all(w > 0 for w in params.weights.values()) and params.score_thr > 0
    assert score > alone + 0.05


def test_the_reef_metric_tunes_a_confidence_threshold_on_oof():
    # gbr_f2 counts every box, as GWD does: the tuner's threshold search (one matching for all thresholds) drops the
    # low-scoring false positives and beats the same fusion with every box kept
    table, preds, scorer, params, score = tuned_with_false_positives("gbr_f2")
    every_box = scorer(fuse(pd.concat(preds.values(), ignore_index=True), table.images,
                            replace(params, score_thr=0.0), [(m, "none") for m in preds], ("model", "tta"), "numba",
                            "e")).score
    assert params.score_thr > 0 and score > every_box + 0.05


def confident_members_among_false_positives(n_images=40, n_members=4, n_boxes=60, seed=0):
    """Members of one view, each a detector's top ``n_boxes`` per image: every object found with probability 0.9
    (5 % jitter, score ~ Beta(6, 2)), the rest false positives anywhere, scores uniform in [0, 0.4] -- the
    benchmark's GWD-like table (benchmarks/tuning_speed.py) in small."""
    rng = np.random.default_rng(seed)
    side = 512.0
    images = pd.DataFrame({"image_id": [f"i{i}" for i in range(n_images)], "path": "x", "width": 512, "height": 512})

    def random_boxes(n):
        wh = rng.uniform(15, 60, (n, 2))
        xy = rng.uniform(0, 1, (n, 2)) * (side - wh)
        return np.c_[xy, xy + wh]

    gt, preds = [], {f"m{k}": [] for k in range(n_members)}
    for image_id in images.image_id:
        objects = random_boxes(int(rng.integers(10, 30)))
        gt += [(image_id, *b, 0) for b in objects]
        for k in range(n_members):
            found = objects[rng.random(len(objects)) < 0.9]
            size = (found[:, 2:] - found[:, :2])[:, [0, 1, 0, 1]]
            boxes = np.clip(found + rng.normal(0, 0.05, found.shape) * size, 0, side)
            preds[f"m{k}"] += [(image_id, *b, s) for b, s in zip(boxes, rng.beta(6, 2, len(boxes)))]
            false = random_boxes(n_boxes - len(found))
            preds[f"m{k}"] += [(image_id, *b, s) for b, s in zip(false, rng.uniform(0, 0.4, len(false)))]
    return one_class_tables(images, gt, preds)


def gwd_ensemble(table, preds: dict[str, pd.DataFrame], *overrides: str):
    """The demo ensemble config under GWD, the one-view members ``preds`` as the ensemble stage loads them, and the
    scorer."""
    cfg = load_config("configs/demo/ensemble.yaml", ["metric=gwd", *overrides])
    cfg.ensemble.members = [MemberConfig(config=f"{m}.yaml") for m in preds]
    return cfg, [Member(m, cfg, p, None, ["none"]) for m, p in preds.items()], Scorer("gwd", table)


def best_over_thresholds(cfg, scorer, table, frame: pd.DataFrame, params: FusionParams, sets: list) -> float:
    """``frame`` fused with ``params``, scored at its best score threshold of the tuning grid."""
    return max(scorer(fuse(frame, table.images, replace(params, score_thr=t), sets, ("model", "tta"), "numba",
                           "e")).score for t in cfg.ensemble.tune.score_thr)


def test_the_start_compares_all_members_and_each_alone_each_at_its_best_score_threshold():
    # one member alone peaks at a higher score threshold (0.4: above its false positives) than the four together
    # (0.2: WBF's average divides a box only one member found by four); compared at one threshold, the search
    # started from a single member and never recovered (here 0.987 against 0.992 for all four at weight 1)
    table, preds = confident_members_among_false_positives()
    cfg, members, scorer = gwd_ensemble(table, preds)
    params, score, _ = tune(members, table.images, scorer, cfg)
    oof = pd.concat(preds.values(), ignore_index=True)
    together = best_over_thresholds(cfg, scorer, table, oof, FusionParams(weights={m: 1.0 for m in preds}),
                                    oof_sets(members))
    alone = max(best_over_thresholds(cfg, scorer, table, p, FusionParams(weights={m: 1.0}), [(m, "none")])
                for m, p in preds.items())
    assert together > alone + 0.05
    assert score >= together
    assert all(w > 0 for w in params.weights.values())


def test_when_a_member_alone_wins_the_start_the_rule_is_searched_from_all_members_too():
    # soft-NMS at its default sigma (0.5) keeps every member's copy of a box, false positives under GWD: one member
    # alone beats all of them there, and a search started from it never tried a narrow sigma with all members
    table, preds = confident_members_among_false_positives()
    # thresholds up to 0.5: above them one member alone cuts the false positives too, which is not this case
    cfg, members, scorer = gwd_ensemble(table, preds, "ensemble.tune.score_thr=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]")
    oof = pd.concat(preds.values(), ignore_index=True)
    default = {"iou_thr": 0.5, "sigma": 0.5, "thresh": 0.001, "decay": "gaussian"}
    everyone = FusionParams("soft_nms", default, weights={m: 1.0 for m in preds})
    alone = max(best_over_thresholds(cfg, scorer, table, p, replace(everyone, weights={m: 1.0}), [(m, "none")])
                for m, p in preds.items())
    assert best_over_thresholds(cfg, scorer, table, oof, everyone, oof_sets(members)) < alone
    narrow = best_over_thresholds(cfg, scorer, table, oof, replace(everyone, rule={**default, "sigma": 0.05}),
                                  oof_sets(members))
    assert narrow > alone + 0.02
    params, score, _ = tune(members, table.images, scorer, cfg, "soft_nms")
    assert score >= narrow and sum(w > 0 for w in params.weights.values()) > 1


@pytest.mark.parametrize("weights_free", [True, False])
def test_a_metric_scoring_every_threshold_at_once_scores_a_threshold_search_in_one_pass(weights_free, monkeypatch):
    # GWD scores all of a fusion's thresholds from one pass: each fusion is scored once -- the start's (all
    # members, each alone) at every threshold, the others at the current one -- and a threshold search over a
    # point not yet scored at every threshold is one more pass; the tuner tunes exactly as when every threshold is
    # scored apart
    import dataclasses

    from pipeline import ensemble

    table, preds = detectors_with_false_positives(n_images=20, seed=1)
    cfg = load_config("configs/demo/ensemble.yaml", ["metric=gwd", "ensemble.tune.weight_steps=1"])
    cfg.ensemble.members = [MemberConfig(config=f"{m}.yaml", weight=None if weights_free else 1.0) for m in preds]
    members = [Member(m, cfg, p, None, ["none"]) for m, p in preds.items()]
    scorer = Scorer("gwd", table)
    at_once, apart = [], []
    by_threshold, score_rows = ensemble.score_rows_by_threshold, ensemble.score_rows
    monkeypatch.setattr(ensemble, "score_rows_by_threshold", lambda *a: at_once.append(1) or by_threshold(*a))
    monkeypatch.setattr(ensemble, "score_rows", lambda *a: apart.append(1) or score_rows(*a))
    tuned = tune(members, table.images, scorer, cfg)
    n_start = len(members) + 1 if weights_free else 0
    assert n_start <= len(at_once) <= n_start + 2 and len(at_once) + len(apart) <= tuned[2] + 2
    n_apart = len(apart)
    gwd = ensemble.get_metric("gwd")
    monkeypatch.setattr(ensemble, "get_metric", lambda name: dataclasses.replace(gwd, score_by_threshold=None))
    at_once.clear(), apart.clear()
    assert tune(members, table.images, scorer, cfg) == tuned
    # only the start scores every threshold (the scorer then scores each apart); with fixed weights the first
    # threshold search scores its 7 thresholds apart (with free weights the start scored them)
    assert len(at_once) == n_start and len(apart) >= n_apart + (0 if weights_free else 6)


def test_a_grid_without_the_starting_rule_never_steps_down():
    # a configured grid whose only point drops every box (skip_box_thr above every score): the library's defaults
    # the search starts from must stay a candidate, so the tuned ensemble never scores below its start
    table, good, bad = synthetic(10, seed=4)
    cfg = load_config("configs/demo/ensemble.yaml", ["ensemble.tune.iou_thr=[0.6]", "ensemble.tune.skip_box_thr=[0.99]",
                                                     "ensemble.tune.weight_steps=1"])
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("coco_map", table)
    params, score, _ = tune(members, table.images, scorer, cfg)
    alone = good_alone(scorer, table, good)
    assert alone > 0.3 and score >= alone
    assert params.rule["skip_box_thr"] == 0.0


def test_held_rows_are_those_of_every_best_fusion_so_far():
    from pipeline.ensemble import HeldRows
    from pipeline.metrics import get_metric

    held = HeldRows(get_metric("gwd"))
    held.offer("a", 0.5, "rows a")
    held.offer("b", 0.4, "rows b")
    assert held.holds("a") and not held.holds("b")
    held.offer("c", 0.5, "rows c")  # a tie: both kept, either may end up the tuner's point
    assert held.rows("a") == "rows a" and held.rows("c") == "rows c"
    held.offer("d", 0.6, "rows d")
    assert held.holds("d") and not held.holds("a") and not held.holds("c")
    lower = HeldRows(get_metric("gwd").__class__(**{**get_metric("gwd").__dict__, "higher_is_better": False}))
    lower.offer("a", 0.5, 1)
    lower.offer("b", 0.4, 2)
    assert lower.holds("b") and not lower.holds("a")


def test_weight_grid_has_zero_and_one_entry_per_ratio():
    from pipeline.ensemble import member_weight_grid

    grid = member_weight_grid(["a", "b"], 2)
    assert {"a": 0.0, "b": 1.0} in grid and {"a": 1.0, "b": 0.0} in grid and {"a": 0.0, "b": 0.0} not in grid
    assert {"a": 2.0, "b": 2.0} not in grid and {"a": 1.0, "b": 2.0} in grid
    assert member_weight_grid(["a"], 3) == [{"a": 1.0}]


@pytest.mark.slow
def test_auto_tunes_every_rule_and_keeps_the_best_on_oof():
    from pipeline.ensemble import tune_rules
    from pipeline.fusion import FUSION_METHODS

    table, good, bad = synthetic(10, seed=1)
    cfg = load_config("configs/demo/ensemble.yaml", ["ensemble.method=auto", "ensemble.tune.weight_steps=1"])
    members = good_and_bad(cfg, good, bad)
    scorer = Scorer("coco_map", table)
    chosen, tuned = tune_rules(members, table.images, scorer, cfg)
    assert list(tuned) == list(FUSION_METHODS)
    scores = {m: t[1] for m, t in tuned.items()}
    assert scores[chosen] == max(scores.values()) and chosen == next(m for m in tuned if scores[m] == scores[chosen])
    for method, (params, score, _) in tuned.items():
        assert params.method == method and params.record()["method"] == method
        # the recorded score is the score of fusing with the recorded params (what test and the bundle use)
        fused = fuse(pd.concat([good, bad]), table.images, params, oof_sets(members), ("model", "tta"), "numba", "e")
        assert scorer(fused[fused.score >= params.score_thr]).score == pytest.approx(score)
    from pipeline.fusion import runner
    assert runner._THREAD_LOCAL.output is None  # the tuner's cached output slots are let go
    # one rule asked for: only that rule
    single = load_config("configs/demo/ensemble.yaml", ["ensemble.method=nmw", "ensemble.tune.weight_steps=1"])
    single.ensemble.members = cfg.ensemble.members
    assert tune_rules(members, table.images, scorer, single)[0] == "nmw"


def test_many_members_are_weighted_one_at_a_time_and_never_below_the_best_alone():
    from pipeline import ensemble

    table, good, bad = synthetic(10, seed=3)
    noise = [bad.assign(model=f"bad{k}", x1=bad.x1 + k, x2=bad.x2 + k) for k in range(3)]
    cfg = load_config("configs/demo/ensemble.yaml", ["ensemble.tune.weight_steps=2"])
    cfg.ensemble.members = [MemberConfig(config=f"{n}.yaml") for n in ["good", "bad0", "bad1", "bad2"]]
    members = [Member("good", cfg, good, None, ["none"])] + [Member(f"bad{k}", cfg, b, None, ["none"])
                                                              for k, b in enumerate(noise)]
    assert 3 ** 4 > ensemble.FULL_WEIGHT_GRID  # this case takes the member-by-member search
    scorer = Scorer("coco_map", table)
    params, score, evaluations = tune(members, table.images, scorer, cfg)
    alone = good_alone(scorer, table, good)
    assert score >= alone and params.weights["good"] > 0
    assert [params.weights[f"bad{k}"] for k in range(3)] == [0.0, 0.0, 0.0]
    assert evaluations < 3 ** 4  # fewer fusions than the full grid would take


def views_member(table, good, cfg):
    """A member predicted under none, hflip (the same boxes: an exact view), scale0.75 (boxes shifted 6 px: a
    view whose inverse is wrong) and on test by two folds."""
    shifted = good.assign(x1=good.x1 + 6, x2=good.x2 + 6)
    oof = pd.concat([good.assign(tta="none"), good.assign(tta="hflip"), shifted.assign(tta="scale0.75")],
                    ignore_index=True)
    test = pd.concat([oof.assign(fold=0), oof.assign(fold=1)], ignore_index=True)
    return Member("m", cfg, oof, test, ["none", "hflip", "scale0.75"])


def test_each_view_is_scored_alone_and_a_view_far_below_the_plain_one_is_flagged(caplog):
    table, good, _ = synthetic(12)
    cfg = load_config("configs/demo/ensemble.yaml")
    member, scorer = views_member(table, good, cfg), Scorer("coco_map", table)
    with caplog.at_level("WARNING", logger="pipeline.ensemble"):
        rows = view_rows(member, table, scorer, scorer, table.images)
    by_view = {r["view"]: r for r in rows}
    assert [r["view"] for r in rows] == ["none", "hflip", "scale0.75"]
    # one view is fused over its one set on OOF too (its folds are on test): the synthetic objects overlap
    one_set = fuse_views(good, table.images, ["none"], "m", iou_thr=cfg.predict.tta_iou_thr,
                         skip_box_thr=cfg.predict.tta_skip_box_thr, conf_type=cfg.predict.tta_conf_type)
    assert by_view["none"]["oof"] == pytest.approx(scorer(one_set).score) != pytest.approx(scorer(good).score)
    assert by_view["hflip"]["oof gain"] == 0.0  # identical boxes: no gap, no warning
    # on test each view's folds are fused: identical views score identically, the shifted one lower
    assert by_view["hflip"]["test"] == by_view["none"]["test"] > by_view["scale0.75"]["test"]
    assert by_view["scale0.75"]["oof gain"] < -VIEW_GAP_WARN
    flagged = [r.getMessage() for r in caplog.records]
    assert len(flagged) == 1 and "scale0.75" in flagged[0] and "inverse" in flagged[0]
    assert "train.multiscale" in flagged[0]  # a scale view: the one-size training is the other suspect
    assert "views: [...]" in flagged[0]  # and the way to leave it out without predicting again


def test_the_view_table_takes_the_plain_view_from_the_member_rows_and_fuses_only_the_other_views(monkeypatch):
    from pipeline import ensemble
    table, good, _ = synthetic(12)
    cfg = load_config("configs/demo/ensemble.yaml")
    member, scorer = views_member(table, good, cfg), Scorer("coco_map", table)
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": 0})
    member_table = member_rows(member, table, scorer, scorer, table.images, folds, [0.0, 0.3])
    assert member_table[1]["row"] == "m: fold ensemble, no TTA"
    from_scratch = view_rows(member, table, scorer, scorer, table.images, [0.0, 0.3])
    fused_views = []
    real = ensemble.fold_ensemble_cells
    monkeypatch.setattr(ensemble, "fold_ensemble_cells", lambda m, views, *a, **k: fused_views.append(views)
                        or real(m, views, *a, **k))
    taken = view_rows(member, table, scorer, scorer, table.images, [0.0, 0.3], plain=member_table[1])
    assert taken == from_scratch
    assert fused_views == [["hflip"], ["scale0.75"]]  # the plain view ("none") is not fused and scored again


def test_members_with_scale_views_get_a_row_without_them():
    table, good, _ = synthetic(12)
    cfg = load_config("configs/demo/ensemble.yaml")
    member, scorer = views_member(table, good, cfg), Scorer("coco_map", table)
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": 0})
    rows = {r["row"]: r for r in member_rows(member, table, scorer, None, table.images, folds)}
    unscaled = rows["m: fold ensemble, TTA without scale views none+hflip"]
    full = rows["m: fold ensemble, TTA none+hflip+scale0.75"]
    assert "test" not in unscaled
    assert unscaled["oof"] > full["oof"]  # the broken view costs the full TTA, not the unscaled one
    no_scale = Member("n", cfg, member.oof[member.oof.tta != "scale0.75"], None, ["none", "hflip"])
    assert not any("without scale" in r["row"] for r in member_rows(no_scale, table, scorer, None, table.images,
                                                                      folds))


def test_under_a_thresholded_metric_each_row_is_read_at_its_best_oof_threshold_and_test_at_the_same():
    # GWD counts every false positive: scored with every box a member would look worse than the tuned ensemble,
    # which is read at its tuned threshold; each row is read at its own best OOF threshold, test at that one too
    table, good, _ = synthetic(24, seed=3)
    rng = np.random.default_rng(0)
    noise = good.assign(x1=good.x1 + 60, x2=good.x2 + 60, score=rng.uniform(0.05, 0.25, len(good)))
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": np.arange(24) % 3})
    oof = pd.concat([good, noise], ignore_index=True)
    oof = oof.assign(fold=oof.image_id.map(folds.set_index("image_id").fold))
    cfg = load_config("configs/demo/ensemble.yaml", ["metric=gwd"])
    m = Member("m", cfg, oof, pd.concat([oof.assign(fold=k) for k in range(3)], ignore_index=True), ["none"])
    scorer, grid = Scorer("gwd", table), [0.1, 0.3]
    rows = {r["row"]: r for r in member_rows(m, table, scorer, scorer, table.images, folds, grid)}
    every_box = {r["row"]: r for r in member_rows(m, table, scorer, scorer, table.images, folds)}
    ens = rows["m: fold ensemble, no TTA"]
    one_set = fuse_views(oof, table.images, ["none"], "m", iou_thr=0.55, skip_box_thr=0.0, conf_type="avg")
    assert ens["score_thr"] == 0.3 and ens["oof"] == pytest.approx(scorer(one_set[one_set.score >= 0.3]).score)
    assert ens["oof"] > every_box["m: fold ensemble, no TTA"]["oof"] == pytest.approx(scorer(one_set).score)
    assert ens["test"] > every_box["m: fold ensemble, no TTA"]["test"]  # the OOF threshold cuts test's noise too
    single = rows["m: mean single-fold model"]
    by_fold = [max(Scorer("gwd", table, folds.image_id[folds.fold == k].tolist())(oof[oof.score >= t]).score
                   for t in (0.0, *grid)) for k in range(3)]
    assert single["oof"] == pytest.approx(np.mean(by_fold)) and "score_thr" not in single
    coco, m = Scorer("coco_map", table), replace(m, cfg=load_config("configs/demo/ensemble.yaml"))  # ranks boxes
    assert member_rows(m, table, coco, None, table.images, folds, grid) == member_rows(m, table, coco, None,
                                                                                        table.images, folds)
    assert not any("score_thr" in r for r in member_rows(m, table, coco, None, table.images, folds, grid))


def test_a_one_view_fold_ensemble_reads_its_oof_through_the_fusion_its_test_gets(caplog):
    # YOLO's conf=0.001 output keeps low-score duplicates of a box: WBF over the folds averages them into the box's
    # score on test. Read as predicted, OOF put the threshold above the duplicates (0.5), where every fused test box
    # fell under it (BCCD: 0.023 against 0.47); fused over its one set, OOF reads the scale test gets
    table, good, _ = synthetic(24, seed=3)
    rng = np.random.default_rng(1)
    dups = [good.assign(x1=good.x1 + rng.uniform(-1, 1, len(good)), x2=good.x2 + rng.uniform(-1, 1, len(good)),
                        score=rng.uniform(0.2, 0.4, len(good))) for _ in range(5)]
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": np.arange(24) % 3})
    oof = pd.concat([good, *dups], ignore_index=True)
    oof = oof.assign(fold=oof.image_id.map(folds.set_index("image_id").fold))
    test = pd.concat([oof.assign(fold=k) for k in range(3)], ignore_index=True)
    m = Member("yolo", load_config("configs/demo/ensemble.yaml", ["metric=gwd"]), oof, test, ["none"])
    scorer, grid = Scorer("gwd", table), [0.1, 0.3, 0.5]
    with caplog.at_level("WARNING", logger="pipeline.ensemble"):
        row = {r["row"]: r for r in member_rows(m, table, scorer, scorer, table.images, folds, grid)}[
            "yolo: fold ensemble, no TTA"]
    fused_test = fuse_predictions(test, table.images, group_col="fold", sets=[0, 1, 2], iou_thr=0.55)
    assert score_at_best_threshold(scorer, oof, grid)[1] == 0.5  # as predicted: above the duplicates
    assert row["score_thr"] < 0.5 and row["test"] == pytest.approx(scorer(at_or_above(fused_test,
                                                                                      row["score_thr"])).score)
    assert row["test"] > 2 * scorer(at_or_above(fused_test, 0.5)).score  # what the as-predicted threshold gave
    merged = [r.getMessage() for r in caplog.records if "merges" in r.getMessage()]
    assert len(merged) == 1 and merged[0].startswith("yolo:") and "tta_skip_box_thr" in merged[0]


def test_a_member_with_one_test_model_has_no_fold_ensemble_test_cell(capsys):
    # another tool's predictions may come with one `test` model (fold 0) for several OOF folds: the single model's
    # test score is the "mean single-fold model" row; a "fold ensemble" test cell would name one model an ensemble
    table, good, _ = synthetic(12)
    cfg = load_config("configs/demo/ensemble.yaml")
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": np.arange(12) % 3})
    oof = good.assign(fold=good.image_id.map(folds.set_index("image_id").fold))
    scorer = Scorer("coco_map", table)
    one = Member("ext", cfg, oof, good.assign(fold=0), ["none"])
    rows = {r["row"]: r for r in member_rows(one, table, scorer, scorer, table.images, folds)}
    assert rows["ext: mean single-fold model"]["test"] == pytest.approx(scorer(good).score)
    assert "test" not in rows["ext: fold ensemble, no TTA"] and "oof" in rows["ext: fold ensemble, no TTA"]
    two = Member("ext2", cfg, pd.concat([oof, oof.assign(tta="hflip")]),
                 pd.concat([good, good.assign(tta="hflip")]).assign(fold=0), ["none", "hflip"])
    assert all("test" not in r for r in view_rows(two, table, scorer, scorer, table.images))  # a view alone: one model
    assert "test" in {r["row"]: r for r in member_rows(two, table, scorer, scorer, table.images,
                                                        folds)}["ext2: fold ensemble, TTA none+hflip"]
    per_fold = Member("ours", cfg, oof, pd.concat([good.assign(fold=k) for k in range(3)]), ["none"])
    assert "test" in {r["row"]: r for r in member_rows(per_fold, table, scorer, scorer, table.images,
                                                        folds)}["ours: fold ensemble, no TTA"]
    print_table(list(rows.values()), "coco_map", FusionParams("wbf"), 1)
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("ext: fold ensemble, no TTA"))
    assert "NaN" not in line and line.split()[-2:] == ["-", "-"]  # test and test map50: no cell, said so


def views_config(tmp_path, tiny_data, views, test_views=("hflip", "none", "scale1.25")) -> "ExperimentConfig":
    """An ensemble of one member whose OOF predictions hold none, hflip and scale1.25 (its test predictions
    ``test_views``), its entry naming ``views``."""
    import yaml

    from conftest import FRCNN_TINY, write_config_dir
    from pipeline.layout import predictions_path, write_predictions

    folder = write_config_dir(tmp_path, tiny_data, {"m": FRCNN_TINY})
    tree = yaml.safe_load((folder / "ensemble.yaml").read_text())
    tree["ensemble"]["members"] = [{"config": "m.yaml", "views": views}]
    (folder / "ensemble.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(folder / "ensemble.yaml")
    for split, tta in (("oof", ["hflip", "none", "scale1.25"]), ("test", list(test_views))):
        preds = pd.DataFrame({"image_id": "a", "x1": 1.0, "y1": 1.0, "x2": 9.0, "y2": 9.0, "score": 0.5,
                              "label": 0, "model": "m", "fold": 0, "tta": tta})
        write_predictions(preds, predictions_path(cfg.load_sibling("m.yaml"), split))
    return cfg


def test_a_members_entry_keeps_only_the_views_it_names(tmp_path, tiny_data):
    from pipeline.config import ConfigError
    from pipeline.ensemble import load_members

    (member,) = load_members(views_config(tmp_path / "a", tiny_data, ["scale1.25", "none"]), need_test=True)
    assert member.views == ["none", "scale1.25"]
    assert sorted(member.oof.tta) == sorted(member.test.tta) == ["none", "scale1.25"]
    assert list(member.oof.index) == [0, 1]
    (member,) = load_members(views_config(tmp_path / "b", tiny_data, None), need_test=True)
    assert member.views == ["none", "hflip", "scale1.25"] and len(member.test) == 3
    with pytest.raises(ConfigError, match=r"member m.yaml \(.*oof.parquet\): views \['vflip'\] were not predicted"):
        load_members(views_config(tmp_path / "c", tiny_data, ["vflip"]), need_test=True)


def test_test_views_that_were_never_tuned_are_left_out_and_logged(tmp_path, tiny_data, caplog):
    from pipeline.ensemble import load_members

    cfg = views_config(tmp_path, tiny_data, None, test_views=("none", "vflip", "hflip", "vflip"))
    with caplog.at_level("WARNING", logger="pipeline.layout"):
        (member,) = load_members(cfg, need_test=True)
    assert sorted(member.test.tta) == ["hflip", "none"] and list(member.test.index) == [0, 1]
    assert "member m: predictions of views ['vflip'] that its OOF predictions lack are left out" in caplog.text


def test_nested_tuning_fuses_each_fold_with_what_the_other_folds_chose(monkeypatch):
    # ensemble.nested: the tuned score picks the best of many fusions on the very images that score it; the nested
    # row tunes on k-1 folds and fuses the k-th, so no image is fused with parameters its own boxes helped choose
    import pipeline.ensemble as ensemble_module
    from pipeline.ensemble import nested_oof

    table, good, bad = synthetic(24)
    cfg = load_config("configs/demo/ensemble.yaml", ["ensemble.tune.weight_steps=1", "ensemble.method=wbf"])
    members = good_and_bad(cfg, good, bad)
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": np.arange(24) % 3})
    calls, real_tune = [], ensemble_module.tune_rules

    def recording(tuning, sizes, scorer, config):
        calls.append((set(scorer.image_ids), set().union(*(set(m.oof.image_id) for m in tuning))))
        return real_tune(tuning, sizes, scorer, config)

    monkeypatch.setattr(ensemble_module, "tune_rules", recording)
    by_fold = nested_oof(members, table, folds, cfg)
    assert sorted(by_fold) == [0, 1, 2]
    for k, rows in by_fold.items():  # each fold's rows are its own images', fused with its own choice
        assert set(rows.image_id) <= set(folds.image_id[folds.fold == k])
    fused = pd.concat(by_fold.values(), ignore_index=True)
    assert len(calls) == 3
    for k, (scored, tuned_on) in enumerate(calls):
        fold_k = set(folds.image_id[folds.fold == k])
        assert scored == set(table.images.image_id) - fold_k and tuned_on <= scored  # fold k never seen
    assert set(fused.image_id) <= set(table.images.image_id) and len(set(fused.image_id)) > 12
    scorer = Scorer("coco_map", table, folds.image_id.tolist())
    assert scorer(fused).score > scorer(bad).score  # a real fusion of each fold, not an empty table


def test_fold_scores_read_each_fold_alone_so_a_fold_on_another_score_scale_costs_nothing():
    # nested tuning may weight members differently per fold, which rescales that fold's fused scores: scored
    # pooled, the folds' boxes interleave by score and the AP drops though no fold's ranking changed
    from pipeline.ensemble import fold_scores

    table, good, _ = synthetic(24, seed=1)
    folds = pd.DataFrame({"image_id": table.images.image_id, "fold": np.arange(24) % 2})
    noisy = pd.concat([good, good.assign(x1=good.x1 + 50, x2=good.x2 + 50, score=good.score - 0.3)])
    fold_of = noisy.image_id.map(folds.set_index("image_id").fold)
    by_fold = {0: noisy[fold_of == 0], 1: noisy[fold_of == 1].assign(score=lambda d: d.score * 0.4)}
    same_scale = {0: noisy[fold_of == 0], 1: noisy[fold_of == 1]}
    per_fold = [r.score for r in fold_scores(by_fold, table, folds, "coco_map")]
    assert per_fold == pytest.approx([r.score for r in fold_scores(same_scale, table, folds, "coco_map")])
    pooled = Scorer("coco_map", table)
    assert pooled(pd.concat(by_fold.values())).score < pooled(noisy).score - 0.02


def test_a_tuned_threshold_at_the_top_of_the_grid_is_flagged_for_a_thresholded_metric():
    from pipeline.ensemble import threshold_at_grid_top

    gwd, coco, grid = get_metric("gwd"), get_metric("coco_map"), [0.0, 0.5, 0.9]
    assert "0.9 is the highest of ensemble.tune.score_thr" in threshold_at_grid_top(0.9, grid, gwd)
    assert threshold_at_grid_top(0.5, grid, gwd) is None and threshold_at_grid_top(0.9, grid, coco) is None
    assert threshold_at_grid_top(0.0, [0.0], gwd) is None  # a grid of 0 alone: nothing above to try


def test_nested_auto_runs_when_k_minus_one_tunings_fit_a_minute_and_says_so_either_way():
    from pipeline.ensemble import NESTED_AUTO_S, nested_decision

    assert nested_decision(False, 1.0, 5) == (False, "")
    run, line = nested_decision(True, 100.0, 5)
    assert run and "5 tunings, ~400 s" in line
    run, line = nested_decision("auto", NESTED_AUTO_S / 4, 5)  # 4 x 15 s
    assert run and "ensemble.nested auto: the tuning scored out of fold (5 tunings, ~60 s" in line
    run, line = nested_decision("auto", NESTED_AUTO_S / 4 + 0.1, 5)
    assert not run and "skipped (~60 s, 4 x the tuning's 15 s" in line and "--set ensemble.nested=true" in line
    assert nested_decision("auto", NESTED_AUTO_S / 2, 3)[0] and not nested_decision("auto", NESTED_AUTO_S / 2, 4)[0]
    cfg = load_config("configs/demo/ensemble.yaml")
    assert cfg.ensemble.nested == "auto"
    assert load_config("configs/demo/ensemble.yaml", ["ensemble.nested=false"]).ensemble.nested is False
    with pytest.raises(ConfigError, match="nested"):
        load_config("configs/demo/ensemble.yaml", ["ensemble.nested=sometimes"])


def test_fold_fusion_plan_is_each_members_tta_wbf_for_rules_that_do_not_average_their_sets():
    cfg = load_config("configs/demo/ensemble.yaml")
    table, good, bad = synthetic(6)
    own = load_config("configs/demo/ensemble.yaml", ["predict.tta_iou_thr=0.7", "predict.tta_conf_type=max"])
    members = [Member("good", own, good, None, ["none"]), Member("ext", cfg, bad, None, ["none"])]
    plan = {"good": {"iou_thr": 0.7, "skip_box_thr": 0.0, "conf_type": "max"},
            "ext": {"iou_thr": 0.55, "skip_box_thr": 0.0, "conf_type": "avg"}}
    # auto: a rule keeping one box's own score gets the fold models fused first; WBF's average needs not
    for method in ("nms", "soft_nms", "nmw"):
        assert fold_fusion_plan(members, cfg, FusionParams(method)) == plan, method
    assert fold_fusion_plan(members, cfg, FusionParams("wbf")) is None
    assert fold_fusion_plan(members, cfg, FusionParams("wbf", {"conf_type": "max"})) == plan  # a max is no average
    forced = load_config("configs/demo/ensemble.yaml", ["ensemble.fold_fusion=wbf"])
    assert fold_fusion_plan(members, forced, FusionParams("wbf")) == plan
    as_sets = load_config("configs/demo/ensemble.yaml", ["ensemble.fold_fusion=sets"])
    assert fold_fusion_plan(members, as_sets, FusionParams("nms")) is None
    assert FusionParams("nms", fold_fusion=plan).record()["fold_fusion"] == plan
    assert "fold_fusion" not in FusionParams("nms").record()  # OOF's fusions, and files of "sets"
