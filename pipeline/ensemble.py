"""Stage 4: fuse the members' predictions with a fusion rule tuned on out-of-fold predictions.

    python -m pipeline.ensemble --config configs/demo/ensemble.yaml [--set ensemble.method=auto]

Out-of-fold: every training image was predicted only by the fold model that did not see it, so each member has a
pooled OOF score and so does the fused ensemble. On OOF the stage tunes the rule's parameters (``ensemble.method``:
``wbf`` -- ``iou_thr`` x ``skip_box_thr`` from ``ensemble.tune`` --, ``nms``, ``soft_nms``, ``nmw`` -- their grids in
:data:`pipeline.fusion.FUSION_METHODS`), the member weights and a score threshold (searched first and again
last) against the competition metric (a deterministic coordinate search, in the metric's own direction), then
applies the chosen parameters to the test predictions of all members x folds x TTA views. ``auto`` tunes every
rule and keeps the best on OOF; the table prints each rule's tuned OOF (and test, when labelled) so the user sees
what the choice of rule is worth.

Writes ``runs/<experiment>/ensembles/<name>/``: ``oof_fused.parquet``, ``test_fused.parquet`` (what the submission
stage turns into a file), ``result.json`` (members, chosen rule and parameters, the score table) and ``report/``.

Fusion sets: on OOF one set per (member, view), one fold model's predictions of each image. On test, for a rule
that averages its sets (WBF), every (member, fold, view) is a set, each with its member's weight: a box every set
agrees on keeps its averaged confidence, so the tuned score threshold carries over. For the others (NMS, soft-NMS,
NMW: a box keeps one box's own score, and fold models as sets would add a copy per fold) each member x view's fold
models are first fused by WBF into one set (the member's ``predict.tta_*``: its "fold ensemble"), so the rule fuses
the member x view sets it was tuned on (``ensemble.fold_fusion``; NMS and soft-NMS scores are rescaled for the
weights' sum, :func:`pipeline.fusion.fuse_tuned`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.compile_clock import compile_clock
from pipeline.config import ConfigError, ExperimentConfig, MemberConfig, add_config_args, config_from_args
from pipeline.data import DataError, load_dataset
from pipeline.external import ExternalError, load_external_oof, load_external_test
from pipeline.fusion import FUSION_METHODS, fuse_predictions, fuse_tuned
from pipeline.fusion.tuned import TunedRows, derive_rows, fuse_tuned_rows, fuse_tuned_rows_levels
from pipeline.fusion.rules import get_rule
from pipeline.fusion.runner import release_thread_output
from pipeline.fusion.views import fuse_views
from pipeline.io import atomic_write_text
from pipeline.layout import (ENSEMBLE_REPORT, ENSEMBLE_RESULT, FoldsError, empty_predictions, ensemble_dir,
                             folds_path, fused_path, predictions_path, read_folds, read_predictions,
                             rows_of_views, write_predictions)
from pipeline.metrics import Metric, MetricResult, Scorer, at_or_above, get_metric, score_at_best_threshold
from pipeline.report import write_ensemble_report, write_html_report
from pipeline.tracking import stage_run


REPORT_SCORE_THR = 0.3
# A TTA view alone scoring this much below its member's plain view on OOF is flagged (a wrong view or inverse
# shows as a large loss; an honest view of the same model costs about a point at most on BCCD).
VIEW_GAP_WARN = 0.015
# a member whose WBF over its own one set merges more than this share of its rows is named (fold_ensemble_cells)
OWN_OVERLAP_WARN = 0.1
log = logging.getLogger(__name__)


class EnsembleError(RuntimeError):
    pass


@dataclass
class Member:
    name: str
    cfg: ExperimentConfig
    oof: pd.DataFrame
    test: pd.DataFrame | None
    views: list[str]
    pseudo: int | str | None = None  # the pseudo-label round its training added (train.pseudo); None: round 0


@dataclass
class FusionParams:
    """A point of the search: the fusion rule, its parameters, the member weights and the final score threshold."""

    method: str = "wbf"
    rule: dict[str, Any] = field(default_factory=dict)  # the rule's parameters; its library defaults fill the rest
    score_thr: float = 0.0
    weights: dict[str, float] | None = None
    # test only: {member: WBF parameters} fusing each member x view's fold models first (ensemble.fold_fusion)
    fold_fusion: dict[str, dict[str, Any]] | None = None

    def record(self) -> dict[str, Any]:
        """Flat, as ``result.json`` stores it and :func:`pipeline.fusion.fuse_tuned` reads it."""
        return {"method": self.method, **get_rule(self.method).resolve(self.rule), "score_thr": self.score_thr,
                "weights": self.weights, **({"fold_fusion": self.fold_fusion} if self.fold_fusion else {})}


def fold_fusion_plan(members: list[Member], cfg: ExperimentConfig, p: FusionParams) -> dict[str, dict[str, Any]] | None:
    """How test's fold models enter fusion ``p`` (``ensemble.fold_fusion``): each member's WBF over them, its
    ``predict.tta_*`` (the fusion of its "fold ensemble" rows; another tool's members: the ensemble config's), or
    None -- every fold model a set of the rule -- with ``sets``, and with ``auto`` for a rule that averages its
    sets (:attr:`~pipeline.fusion.rules.FusionRule.averages_sets`)."""
    setting = cfg.ensemble.fold_fusion
    rule = get_rule(p.method)
    if setting == "sets" or (setting == "auto" and rule.averages_sets(rule.resolve(p.rule))):
        return None
    return {m.name: m.cfg.predict.tta_wbf for m in members}


def load_members(cfg: ExperimentConfig, need_test: bool) -> list[Member]:
    """Each member's OOF / test predictions: a config of ours (relative to the ensemble's file, same overrides)
    or a folder of another tool's predictions on our folds (read and checked by pipeline.external)."""
    if not cfg.ensemble.members:
        raise EnsembleError(f"{cfg.source}: ensemble.members is empty")
    members = [config_member(cfg, spec, need_test) if spec.config is not None else external_member(cfg, spec)
               for spec in cfg.ensemble.members]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise EnsembleError(f"members must have distinct names (`run` of a config, `name` of predictions), got {names}")
    return members


def config_member(cfg: ExperimentConfig, spec: MemberConfig, need_test: bool) -> Member:
    member_cfg = cfg.load_sibling(spec.config)
    if member_cfg.data.name != cfg.data.name or folds_path(member_cfg) != folds_path(cfg):
        raise EnsembleError(f"member {spec.config} uses another dataset or fold file than {cfg.source}: "
                            "OOF predictions would not line up")
    paths = {s: predictions_path(member_cfg, s) for s in ("oof", "test")}
    for split, path in paths.items():
        if not path.exists() and (split == "oof" or need_test):
            raise EnsembleError(f"{path} not found: run python -m pipeline.predict --config "
                                f"{member_cfg.source} --split {split}")
    oof = read_predictions(paths["oof"])
    test = read_predictions(paths["test"]) if paths["test"].exists() else None
    views = spec.chosen_views(oof.tta.unique(), paths["oof"])
    return Member(member_cfg.run, member_cfg, *only_views(oof, test, views, member_cfg.run), views,
                  member_cfg.train.pseudo)


def external_member(cfg: ExperimentConfig, spec: MemberConfig) -> Member:
    """Another tool's predictions, checked, then treated exactly like a member of ours (its views as given)."""
    folder = spec.predictions_folder
    if not folder.is_dir():
        raise EnsembleError(f"member {spec.name}: predictions folder {folder} not found (a relative path is read "
                            "from the working directory, as data.root is)")
    folds = read_folds(folds_path(cfg))
    oof = load_external_oof(folder, spec.format, spec.name, load_dataset(cfg.data, "train"), folds, spec.coco_image_id)
    test = load_external_test(folder, spec.format, spec.name, load_dataset(cfg.data, "test"), folds,
                              spec.coco_image_id)
    views = spec.chosen_views(oof.tta.unique(), folder)
    return Member(spec.name, cfg, *only_views(oof, test, views, spec.name), views)


def only_views(oof: pd.DataFrame, test: pd.DataFrame | None, views: list[str],
               name: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The member's rows of ``views`` only; test views its OOF predictions lack are left out, logged."""
    tuned = oof.tta.unique()
    return rows_of_views(oof, views, name), None if test is None else rows_of_views(test, views, name, tuned)


def fuse(preds: pd.DataFrame, sizes: pd.DataFrame, p: FusionParams, sets: list, group_col, backend: str,
         name: str) -> pd.DataFrame:
    """``preds`` fused with ``p`` (sets are tuples whose first element is the member): the one fusion the
    ensemble, pseudo-labelling and offline inference share, :func:`pipeline.fusion.fuse_tuned`."""
    return fuse_tuned(preds, sizes, p.record(), sets, group_col, name=name, backend=backend)


def oof_sets(members: list[Member]) -> list[tuple[str, str]]:
    return [(m.name, v) for m in members for v in m.views]


def rule_grid(method: str, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The candidate parameters of a rule: WBF's from ``ensemble.tune`` (``iou_thr`` x ``skip_box_thr``, with the
    configured ``conf_type``), every other rule's from its grid in the registry (``FusionRule.candidates``)."""
    rule = get_rule(method)
    if method != "wbf":
        return rule.candidates()
    grid = cfg.ensemble.tune
    return [rule.resolve({"iou_thr": i, "skip_box_thr": s, "conf_type": cfg.ensemble.conf_type})
            for i, s in itertools.product(grid.iou_thr, grid.skip_box_thr)]


def start_params(method: str, members: list[Member], cfg: ExperimentConfig) -> FusionParams:
    """The rule's library defaults (WBF with the configured ``conf_type``), weights fixed in the config or 1."""
    rule = get_rule(method).resolve({"conf_type": cfg.ensemble.conf_type} if method == "wbf" else {})
    fixed = [s.weight for s in cfg.ensemble.members]
    if any(v is not None for v in fixed):
        return FusionParams(method, rule, weights={m.name: (w if w is not None else 1.0) for m, w in zip(members, fixed)})
    return FusionParams(method, rule, weights={m.name: 1.0 for m in members})


def tune(members: list[Member], sizes: pd.DataFrame, scorer: Scorer, cfg: ExperimentConfig,
         method: str = "wbf", oof: pd.DataFrame | None = None,
         packings: dict | None = None) -> tuple[FusionParams, float, int]:
    """Coordinate search for rule ``method`` in the metric's direction, from the best of {all members equal, each
    member alone} (each at its own best score threshold; when a member alone wins, all members equal are given a
    rule search too before the two are compared): the score threshold, the rule's parameters, member
    weights from {0..weight_steps} (0 drops a member), the rule's parameters again, the score threshold again. A
    threshold needs no new fusion (it re-scores a fusion's rows; a metric with ``score_by_threshold`` -- GWD, COCO,
    VOC -- scores all of them in one pass), and searching it first means weights and rule are judged at a useful
    threshold: with a metric that counts every false positive (GWD), a member's low-scoring boxes would otherwise
    make adding it look bad.
    Every step includes the current point, so the result never scores below its start, nor below its best member
    alone. Deterministic; returns the params, their OOF score and the number of fusions (rule parameters x weights)
    evaluated. ``oof`` (the members' OOF rows concatenated) and ``packings`` (its packings,
    :func:`~pipeline.fusion.tuned.fuse_tuned_rows`) may be shared by the calls of several rules: neither depends on
    the rule."""
    grid, names, metric = cfg.ensemble.tune, [m.name for m in members], get_metric(scorer.metric)
    oof = pd.concat([m.oof for m in members], ignore_index=True) if oof is None else oof
    packings = {} if packings is None else packings  # the OOF table packed once per subset of members
    sets, backend = oof_sets(members), cfg.ensemble.wbf_backend
    scores: dict[tuple, float] = {}  # (fusion, score threshold) -> score; a fusion is (rule parameters, weights)
    held = HeldRows(metric)
    thresholds = sorted(set([0.0] + list(grid.score_thr)))

    def fuse_once(p: FusionParams) -> TunedRows | None:
        return fuse_tuned_rows(oof, sizes, replace(p, score_thr=0.0).record(), sets, ("model", "tta"),
                               backend=backend, packings=packings, by_score=True)

    # the compiled backend gives each row's score at selection, from which a rule search derives its options'
    # higher selection thresholds (soft-NMS's thresh) without fusing again
    def fuse_together(ps: list[FusionParams]) -> list[TunedRows | None]:
        return fuse_tuned_rows_levels(oof, sizes, [replace(p, score_thr=0.0).record() for p in ps], sets,
                                      ("model", "tta"), packings=packings, by_score=True)

    shared = SharedSelection(fuse_once, sets, held, fuse_together) if backend == "numba" else None
    fused_rows = fuse_once if shared is None else shared

    def evaluate(p: FusionParams) -> float:
        key = point_key(p)
        if (key, p.score_thr) not in scores:
            fused = held.rows(key) if held.holds(key) else fused_rows(p)
            scores[key, p.score_thr] = score_rows(scorer, fused, p.score_thr)
            held.offer(key, scores[key, p.score_thr], fused)
        return scores[key, p.score_thr]

    def score_thresholds(p: FusionParams, options: list[float], every_metric: bool = False) -> None:
        # a metric that scores every threshold from one pass (GWD, COCO, VOC) scores a search's options at once
        # (elsewhere one threshold's rows, fewer than all of them, cost less than the pass -- unless every option
        # is wanted now, ``every_metric``: the scorer then scores each option's rows of the one fusion apart)
        key = point_key(p)
        missing = [t for t in options if (key, t) not in scores]
        if missing and (every_metric or (metric.score_by_threshold is not None and len(missing) > 1)):
            fused = held.rows(key) if held.holds(key) else fused_rows(p)
            scores.update(zip([(key, t) for t in missing], score_rows_by_threshold(scorer, fused, missing)))
            held.offer(key, scores[key, options[metric.best_index([scores[key, t] for t in options])]], fused)

    def at_best_threshold(p: FusionParams) -> FusionParams:
        # ties: the lower threshold
        score_thresholds(p, thresholds, every_metric=True)
        return replace(p, score_thr=thresholds[metric.best_index([scores[point_key(p), t] for t in thresholds])])

    best = start_params(method, members, cfg)

    def search(field_name: str, options: list) -> None:
        nonlocal best
        if shared is not None and field_name == "rule":
            shared.plan([replace(best, rule=o) for o in options])
        if field_name == "score_thr":
            score_thresholds(best, options)
        scores = [evaluate(replace(best, **{field_name: o})) for o in options]
        if shared is not None:
            shared.plan([])
        # in the metric's direction; ties: the earlier (simpler, or current) option
        best = replace(best, **{field_name: options[metric.best_index(scores)]})

    rules = rule_grid(method, cfg)

    def rule_options() -> list[dict[str, Any]]:
        # a configured grid may leave out the current rule parameters (the library's defaults at the start): they
        # are tried last, so ties keep the grid's order and the search never steps down
        return rules if best.rule in rules else rules + [best.rule]

    weights_free = len(names) > 1 and all(s.weight is None for s in cfg.ensemble.members)
    if weights_free:
        # start from the best of: all members equal, and each member alone, so that the tuned ensemble never
        # scores below its best member on OOF (a weak member can be switched off, not only down-weighted). Each is
        # judged at its own best score threshold: fusions of different sizes score on different scales (WBF's
        # average divides a box found by one member of four by four), so under a metric that counts every false
        # positive (GWD) the best member alone and all members together peak at different thresholds; compared
        # at one, the search kept one member of four (OOF 0.923 where all four score 0.992: tuning_speed.py
        # --views 1) and no later step could add the others back at that threshold
        equal = at_best_threshold(best)
        held.pin(point_key(equal))  # the rule search from all members (below) starts from these rows
        starts = [equal] + [at_best_threshold(replace(best, weights={n: float(n == m) for n in names}))
                            for m in names]
        best = starts[metric.best_index([evaluate(p) for p in starts])]
        if best != starts[0]:
            # a member alone beat all of them at the rule's defaults, which may be what keeps them apart (soft-NMS's
            # default sigma 0.5 lets each member's copy of a box survive, a false positive under GWD: all four score
            # 0.31 there, 0.98 at sigma 0.05, tuning_speed.py --views 1): the rule is searched from all members too,
            # and they are the start if they then beat the member alone
            alone, best = best, starts[0]
            search("rule", rule_options())
            if not metric.better(evaluate(best), evaluate(alone)):
                best = alone
        held.unpin()
    search("score_thr", thresholds)
    search("rule", rule_options())
    if weights_free:
        search_weights(search, lambda: best, names, grid.weight_steps)
        search("rule", rule_options())
    search("score_thr", thresholds)
    return best, evaluate(best), len({key for key, _ in scores})


def point_key(p: FusionParams) -> tuple:
    """What one fusion depends on: the rule's parameters and the weights (not the score threshold)."""
    return p.method, tuple(sorted(p.rule.items())), tuple(sorted((p.weights or {}).items()))


class SharedSelection:
    """The tuner's fusions during a rule search: each option fused at the lowest value of each selection threshold
    (:attr:`~pipeline.fusion.rules.FusionRule.selection_thresholds`, soft-NMS's ``thresh``) among the options that
    differ from it only there, the others' rows derived from that fusion (:func:`~pipeline.fusion.tuned.derive_rows`:
    the same rows as fusing them) -- soft-NMS's grids fuse once per ``sigma`` and per ``iou_thr``, not once per
    point. Holds one base fusion at a time (a grid's options sharing one come one after another), and for the
    search's length the bases whose rows the tuner held when it was planned (``best``; the current point is
    usually one, and a better option found first would make the tuner let it go): they are not fused again.
    Options that differ only in the rule's ``level_param`` (WBF's ``skip_box_thr``) are fused together on the first
    request for one of them (``fuse_levels``: one kernel pass when every kept weight is 1,
    :func:`~pipeline.fusion.tuned.fuse_tuned_rows_levels`), the tuner's held points left out, and held while the
    search asks for them. With no plan, or for an option that shares nothing, it fuses as it is asked."""

    def __init__(self, fuse: Callable[[FusionParams], TunedRows | None], sets: list,
                 best: HeldRows | None = None,
                 fuse_levels: Callable[[list[FusionParams]], list[TunedRows | None]] | None = None) -> None:
        self.fuse, self.sets, self.best, self.fuse_levels = fuse, sets, best, fuse_levels
        self.level_group: dict[tuple, list[FusionParams]] = {}  # point -> the options fused with it
        self.level_rows: dict[tuple, TunedRows | None] = {}  # the last group fused, by point
        self.base_of: dict[tuple, FusionParams] = {}
        self.held: tuple[tuple, TunedRows | None] | None = None
        self.ready: dict[tuple, TunedRows | None] = {}  # bases the tuner held when the search was planned

    def plan(self, options: list[FusionParams]) -> None:
        """The options of the next search (empty: none; the base fusions held are let go)."""
        self.base_of, self.held, self.ready = {}, None, {}
        self._plan_levels(options)
        lowest: dict[tuple, dict[str, float]] = {}
        group_of: dict[tuple, tuple] = {}
        for p in options:
            names = get_rule(p.method).selection_thresholds
            rule = get_rule(p.method).resolve(p.rule)
            group = point_key(replace(p, rule={k: v for k, v in rule.items() if k not in names}))
            low = lowest.setdefault(group, {k: rule[k] for k in names})
            for k in names:
                low[k] = min(low[k], rule[k])
            group_of[point_key(p)] = group
        for p in options:
            self.base_of[point_key(p)] = replace(p, rule={**get_rule(p.method).resolve(p.rule),
                                                          **lowest[group_of[point_key(p)]]}, score_thr=0.0)
        if self.best is not None:
            self.ready = {k: self.best.rows(k) for k in {point_key(b) for b in self.base_of.values()}
                          if self.best.holds(k)}

    def _plan_levels(self, options: list[FusionParams]) -> None:
        self.level_group, self.level_rows = {}, {}
        if self.fuse_levels is None:
            return
        groups: dict[tuple, list[FusionParams]] = {}
        for p in options:
            name = get_rule(p.method).level_param
            if name is not None and not (self.best is not None and self.best.holds(point_key(p))):
                rule = get_rule(p.method).resolve(p.rule)
                group = point_key(replace(p, rule={k: v for k, v in rule.items() if k != name}))
                groups.setdefault(group, []).append(p)
        for members in groups.values():
            if len(members) > 1:
                self.level_group.update({point_key(p): members for p in members})

    def __call__(self, p: FusionParams) -> TunedRows | None:
        members = self.level_group.get(point_key(p))
        if members is not None and self.fuse_levels is not None:
            if point_key(p) not in self.level_rows:
                fused = self.fuse_levels(members)
                self.level_rows = {point_key(q): rows for q, rows in zip(members, fused)}
            return self.level_rows[point_key(p)]
        base = self.base_of.get(point_key(p))
        if base is None or not get_rule(p.method).selection_thresholds:
            return self.fuse(p)
        key = point_key(base)
        if key in self.ready:
            rows = self.ready[key]
        else:
            if self.held is None or self.held[0] != key:
                self.held = (key, self.fuse(base))
            rows = self.held[1]
        if rows is None:
            return None
        return derive_rows(rows, base.record(), replace(p, score_thr=0.0).record(), self.sets)


def score_rows(scorer: Scorer, fused: TunedRows | None, score_thr: float = 0.0) -> float:
    """The score of a fusion's rows (None: nothing fused), those under ``score_thr`` left out: the same number as
    scoring ``fuse_tuned``'s table, without building it."""
    if fused is None:
        return scorer(empty_predictions()).score
    rows = fused.rows if score_thr <= 0 else fused.rows.take(fused.rows.values[4] >= score_thr)
    return scorer.score_rows(fused.packed.image_ids, rows.image, rows.values[:4].T, rows.values[4], rows.label).score


def score_rows_by_threshold(scorer: Scorer, fused: TunedRows | None, thresholds: list[float]) -> list[float]:
    """:func:`score_rows` at each score threshold, from one pass when the metric can."""
    if fused is None:
        return [score_rows(scorer, None)] * len(thresholds)
    rows = fused.rows
    return scorer.score_rows_by_threshold(fused.packed.image_ids, rows.image, rows.values[:4].T, rows.values[4],
                                          rows.label, thresholds)


class HeldRows:
    """The fused rows of the best-scoring fusions seen so far (all of them, on a tie), for the score-threshold
    search, which starts from the best point found: holding every fusion would take gigabytes on a large OOF table
    (a point not held, such as a rule grid's winner scoring below an earlier point, is fused again). A pinned
    point's rows are held until :meth:`unpin`, whatever scores better."""

    def __init__(self, metric: Metric) -> None:
        self.metric: Metric = metric
        self.score: float | None = None
        self.held: dict[tuple, TunedRows | None] = {}
        self.pinned: dict[tuple, TunedRows | None] = {}

    def pin(self, key: tuple) -> None:
        """Hold ``key``'s rows (when held now) until :meth:`unpin`."""
        if key in self.held:
            self.pinned[key] = self.held[key]

    def unpin(self) -> None:
        self.pinned = {}

    def offer(self, key: tuple, score: float, fused: TunedRows | None) -> None:
        if self.score is None or self.metric.better(score, self.score):
            self.score, self.held = score, {key: fused}
        elif score == self.score:
            self.held[key] = fused

    def holds(self, key: tuple) -> bool:
        return key in self.held or key in self.pinned

    def rows(self, key: tuple) -> TunedRows | None:
        return self.held[key] if key in self.held else self.pinned[key]


def tune_rules(members: list[Member], sizes: pd.DataFrame, scorer: Scorer,
               cfg: ExperimentConfig) -> tuple[str, dict[str, tuple[FusionParams, float, int]]]:
    """``ensemble.method`` tuned, or with ``auto`` every registered rule: ``(the chosen rule, {rule: tune()})``.
    ``auto`` keeps the best tuned OOF score; a tie goes to the earlier rule in the registry (WBF first)."""
    methods = list(FUSION_METHODS) if cfg.ensemble.method == "auto" else [cfg.ensemble.method]
    oof, packings = pd.concat([m.oof for m in members], ignore_index=True), {}
    tuned = {method: tune(members, sizes, scorer, cfg, method, oof, packings) for method in methods}
    release_thread_output()  # the tuner's fusions wrote into cached slots, one row per OOF row: not needed now
    return methods[get_metric(scorer.metric).best_index([tuned[m][1] for m in methods])], tuned


# ensemble.nested "auto" scores the tuning out of fold when that should take at most this many seconds: k tunings,
# each on the other folds' (k - 1) / k of the OOF images, about k - 1 times the tuning on all of them
NESTED_AUTO_S = 60.0


def nested_decision(setting: bool | str, tuning_s: float, n_folds: int) -> tuple[bool, str]:
    """Whether the stage scores the tuning out of fold (``ensemble.nested``), and a line saying so ("" when the
    setting is plain false). ``tuning_s``: the tuning's seconds without numba's compiling
    (:mod:`pipeline.compile_clock`), which the nested tunings will not repeat."""
    estimate = (n_folds - 1) * tuning_s
    if setting is False:
        return False, ""
    if setting is True:
        return True, f"ensemble.nested: the tuning scored out of fold ({n_folds} tunings, ~{estimate:.0f} s)"
    if estimate <= NESTED_AUTO_S:
        return True, (f"ensemble.nested auto: the tuning scored out of fold ({n_folds} tunings, ~{estimate:.0f} s; "
                      f"auto runs it up to {NESTED_AUTO_S:.0f} s)")
    return False, (f"ensemble.nested auto: the out-of-fold score of the tuning skipped (~{estimate:.0f} s, "
                   f"{n_folds - 1} x the tuning's {tuning_s:.0f} s; auto runs it up to {NESTED_AUTO_S:.0f} s): "
                   "--set ensemble.nested=true runs it")


def nested_oof(members: list[Member], train, folds: pd.DataFrame, cfg: ExperimentConfig) -> dict[int, pd.DataFrame]:
    """The tuned ensemble on images its tuning never saw: for each fold, the whole search (:func:`tune_rules`, every
    rule with ``auto``) on the other folds' OOF images, and its choice fuses this fold's images (fusion is per
    image, so the fold's rows are what those parameters give there); each fold's fused rows."""
    fused = {}
    for k in sorted(folds.fold.unique()):
        seen = set(folds.image_id[folds.fold != k])
        tuning = [replace(m, oof=m.oof[m.oof.image_id.isin(seen)]) for m in members]
        held = [replace(m, oof=m.oof[~m.oof.image_id.isin(seen)]) for m in members]
        chosen, tuned = tune_rules(tuning, train.images, Scorer(cfg.metric, train, sorted(seen)), cfg)
        fused[int(k)] = fuse(pd.concat([m.oof for m in held], ignore_index=True), train.images, tuned[chosen][0],
                             oof_sets(held), ("model", "tta"), cfg.ensemble.wbf_backend, cfg.ensemble.name)
    return fused


def fold_scores(by_fold: dict[int, pd.DataFrame], train, folds: pd.DataFrame, metric: str) -> list[MetricResult]:
    """Each fold's rows scored on that fold's images alone, as a test split is scored: one set of parameters, one
    calibration of the scores. (Pooled, folds fused with different member weights mix score scales, which costs a
    pooled AP what no single fusion loses: on the demo the nested choices scored within 0.004 of the tuned ones on
    every fold, and 0.5248 against 0.5900 pooled.)"""
    return [Scorer(metric, train, folds.image_id[folds.fold == k].tolist())(rows) for k, rows in by_fold.items()]


# Up to this many weight vectors every one is tried (two or three members); more members are searched one
# member's weight at a time (the full grid of four members at 4 steps is ~560 fusions per pass).
FULL_WEIGHT_GRID = 64
WEIGHT_SWEEPS = 3


def search_weights(search: Callable[[str, list], None], current: Callable[[], FusionParams], names: list[str],
                   steps: int) -> None:
    """Member weights from {0..steps}: every ratio when there are few, else member by member (current value
    first, so a tie keeps it), sweeping until a sweep changes nothing."""
    if (steps + 1) ** len(names) <= FULL_WEIGHT_GRID:
        search("weights", member_weight_grid(names, steps))
        return
    for _ in range(WEIGHT_SWEEPS):
        before = current().weights
        for name in names:
            now = current().weights
            options = [now] + [now | {name: float(w)} for w in range(steps + 1) if w != now[name]]
            search("weights", [o for o in options if any(o.values())])
        if current().weights == before:
            return


def member_weight_grid(names: list[str], steps: int) -> list[dict[str, float]]:
    """Member weights from {0..steps}: 0 drops a member; not all 0; one per ratio ((2, 2) fuses like (1, 1))."""
    if len(names) < 2:
        return [{n: 1.0 for n in names}]
    return [dict(zip(names, map(float, w))) for w in itertools.product(range(steps + 1), repeat=len(names))
            if any(w) and np.gcd.reduce(w) == 1]


def test_fusion(members: list[Member], sizes: pd.DataFrame, p: FusionParams, backend: str, name: str) -> pd.DataFrame:
    test = pd.concat([m.test for m in members], ignore_index=True)
    folds = {m.name: sorted(m.test.fold.unique()) for m in members}
    sets = [(m.name, f, v) for m in members for f in folds[m.name] for v in m.views]
    return fuse(test, sizes, p, sets, ("model", "fold", "tta"), backend, name)


def cells(split: str, results: list[MetricResult]) -> dict[str, float]:
    """A table row's cells for one split: the metric, averaged over ``results``, and next to COCO mAP its mAP50
    (the number Kaggle write-ups quote beside it)."""
    row = {split: float(np.mean([r.score for r in results]))}
    if results and all(r.name == "coco_map" for r in results):
        row[f"{split} map50"] = float(np.mean([r.details["map50"] for r in results]))
    return row


def oof_cells(scorer: Scorer, preds: pd.DataFrame, thresholds: Sequence[float]) -> tuple[dict[str, float], float]:
    """A row's OOF cells and the confidence threshold they were read at: for a ``thresholded`` metric (GWD, F2: a
    false positive costs score) the row's best of ``thresholds`` -- as the tuned ensemble is read at its tuned
    threshold, so that neither side is judged with boxes its submission would cut -- with a ``score_thr`` cell;
    every box for the others. The row's test cell is read at the same threshold, never at test's own best."""
    result, score_thr = score_at_best_threshold(scorer, preds, thresholds)
    return cells("oof", [result]) | ({"score_thr": score_thr} if scorer.entry.thresholded else {}), score_thr


def fold_ensemble_cells(m: Member, views: list[str], train, oof_scorer: Scorer, test_scorer: Scorer | None,
                        sizes_test, thresholds: Sequence[float] = (), warn_overlap: bool = False) -> dict[str, float]:
    """OOF (and, with labels, test) cells of member ``m``'s fold ensemble over ``views``, fused by WBF with the
    member's TTA settings (``predict.tta_*``) on both sides -- OOF fold by fold over its views, test over its
    folds x views --, read as :func:`oof_cells` reads them. One view is fused on OOF too, over its one set: a
    model whose own boxes overlap above ``tta_iou_thr`` (YOLO's ``conf=0.001`` output) has them averaged on test,
    where their scores sink, so its threshold is read on that scale (BCCD, GWD: yolov8n's OOF as predicted was
    best at 0.4, where its fused test read 0.023; fused on OOF too, best at 0.1, test 0.465). With
    ``warn_overlap``, a member whose one-set fusion merges more than ``OWN_OVERLAP_WARN`` of its rows is named.
    One view of a single test model (another tool's ``test``) is no fold ensemble: OOF as predicted, no test cell
    (that model's score is the member's single-fold row)."""
    wbf = m.cfg.predict.tta_wbf
    oof = m.oof[m.oof.tta.isin(views)]
    one_model = m.test is not None and len(views) == 1 and m.test.fold.nunique() == 1 < m.oof.fold.nunique()
    fused_oof = oof if one_model else fuse_views(oof, train.images, views, m.name, **wbf)
    if warn_overlap and len(views) == 1 and len(oof) and 1 - len(fused_oof) / len(oof) > OWN_OVERLAP_WARN:
        log.warning("%s: WBF at iou_thr %.2f merges %.0f %% of its own %s OOF boxes (boxes of one class from one "
                    "model overlapping above it: an NMS at a looser IoU, or low-score duplicates). Its fold ensemble "
                    "averages their scores into its boxes', and so does any WBF or NMW fusion with it: a "
                    "skip_box_thr drops the low scores first (ensemble.tune.skip_box_thr for the ensemble, "
                    "predict.tta_skip_box_thr for these rows), a stricter NMS in the tool that made them the "
                    "duplicates", m.name, wbf["iou_thr"], 100 * (1 - len(fused_oof) / len(oof)), views[0])
    row, score_thr = oof_cells(oof_scorer, fused_oof, thresholds)
    if test_scorer is not None and m.test is not None and not one_model:
        test, folds = m.test[m.test.tta.isin(views)], sorted(m.test.fold.unique())
        if len(views) == 1:
            fused = fuse_predictions(test, sizes_test, group_col="fold", sets=folds, model_name=m.name, **wbf)
        else:
            fused = fuse_predictions(test, sizes_test, group_col=("fold", "tta"), model_name=m.name,
                                     sets=[(f, v) for f in folds for v in views], **wbf)
        row |= cells("test", [test_scorer(at_or_above(fused, score_thr))])
    return row


def plain_view(m: Member) -> str:
    """The view a member's single-model rows use: ``none`` when it was predicted, else its first view."""
    return "none" if "none" in m.views else m.views[0]


def member_rows(m: Member, train, oof_scorer: Scorer, test_scorer: Scorer | None, sizes_test, folds,
                thresholds: Sequence[float] = ()) -> list[dict]:
    """Per member: mean single-fold model, fold ensemble without TTA, with TTA, and with TTA but no scale views
    when it has both kinds (OOF and, with labels, test; for a thresholded metric each at its best OOF threshold of
    ``thresholds``, a single-fold model at its own fold's, :func:`oof_cells`). The second row is always the plain
    view's fold ensemble (:func:`view_rows` takes its cells)."""
    cfg = m.cfg
    name = m.name if m.pseudo is None else f"{m.name} (pseudo round {m.pseudo})"
    plain = m.oof[m.oof.tta == plain_view(m)]
    per_fold = {f: score_at_best_threshold(Scorer(cfg.metric, train, folds.image_id[folds.fold == f].tolist()), plain,
                                           thresholds) for f in sorted(folds.fold.unique())}
    row = {"row": f"{name}: mean single-fold model", **cells("oof", [r for r, _ in per_fold.values()])}
    if test_scorer is not None and m.test is not None:
        test_plain = m.test[m.test.tta == plain_view(m)]
        test_folds = sorted(m.test.fold.unique())
        mean_thr = float(np.mean([t for _, t in per_fold.values()]))  # one test model (another tool's) reads at it
        at = {f: per_fold[f][1] if len(test_folds) > 1 and f in per_fold else mean_thr for f in test_folds}
        row |= cells("test", [test_scorer(at_or_above(test_plain[test_plain.fold == f], at[f])) for f in test_folds])
    rows = [row]
    score = partial(fold_ensemble_cells, m, train=train, oof_scorer=oof_scorer, test_scorer=test_scorer,
                    sizes_test=sizes_test, thresholds=thresholds)
    rows.append({"row": f"{name}: fold ensemble, no TTA", **score([plain_view(m)], warn_overlap=True)})
    if len(m.views) > 1:
        from pipeline.tta import is_scale_view  # the TTA registry imports torch: only for members with views
        rows.append({"row": f"{name}: fold ensemble, TTA {'+'.join(m.views)}", **score(m.views)})
        unscaled = [v for v in m.views if not is_scale_view(v)]
        if 1 < len(unscaled) < len(m.views):
            rows.append({"row": f"{name}: fold ensemble, TTA without scale views {'+'.join(unscaled)}",
                         **score(unscaled)})
    return rows


def view_rows(m: Member, train, oof_scorer: Scorer, test_scorer: Scorer | None, sizes_test,
              thresholds: Sequence[float] = (), plain: dict | None = None) -> list[dict]:
    """Each TTA view of member ``m`` alone (fold ensemble; OOF, and test with labels; :func:`oof_cells`) and its
    OOF gain over the plain view, in the metric's direction. A view scoring more than ``VIEW_GAP_WARN`` below the
    plain view is flagged: a view is the same model on a transformed image, so a large loss points at the view or
    its inverse. ``plain``: the plain view's cells when the caller has them (:func:`member_rows`' "fold ensemble,
    no TTA" row, the same fusion and scoring), taken rather than computed again."""
    if len(m.views) < 2:
        return []
    metric = get_metric(m.cfg.metric)

    def view_cells(v: str) -> dict:
        if v == plain_view(m) and plain is not None:
            return {k: value for k, value in plain.items() if k != "row"}
        return fold_ensemble_cells(m, [v], train, oof_scorer, test_scorer, sizes_test, thresholds)

    rows = [{"member": m.name, "view": v, **view_cells(v)}
            for v in [plain_view(m)] + [v for v in m.views if v != plain_view(m)]]
    from pipeline.tta import is_scale_view  # the TTA registry imports torch: only for members with views
    for row in rows:
        row["oof gain"] = float(metric.gain(row["oof"], rows[0]["oof"]))
        if row["oof gain"] < -VIEW_GAP_WARN:
            # measured on BCCD (4 families): one-size models' scale views kept box centres (within 2 px) but sized
            # boxes 3-31% toward the training size, 4-28 points below `none`; fused, they still added up to 0.7
            why = (" or the model, trained at one input size, sizes objects toward it (train.multiscale trains it "
                   "at the view's sizes)" if is_scale_view(row["view"]) else "")
            log.warning("%s: view %s scores %.4f OOF, %.4f below its %s view (more than %.3f): check the view and "
                        "its inverse%s; the member's entry can leave it out (views: [...])", m.name, row["view"],
                        row["oof"], -row["oof gain"], rows[0]["view"], VIEW_GAP_WARN, why)
    return rows


def run(cfg: ExperimentConfig) -> dict:
    """Tune on OOF, fuse OOF and test, write the ensemble folder; returns what ``result.json`` holds."""
    train = load_dataset(cfg.data, "train")
    folds = read_folds(folds_path(cfg))
    members = load_members(cfg, need_test=False)
    oof_scorer = Scorer(cfg.metric, train, folds.image_id.tolist())
    test_table = load_dataset(cfg.data, "test") if any(m.test is not None for m in members) else None
    labelled = test_table is not None and len(test_table.boxes) > 0
    test_scorer = Scorer(cfg.metric, test_table) if labelled else None
    sizes_test = test_table.images if test_table is not None else None

    grid = cfg.ensemble.tune.score_thr  # a thresholded metric reads each row at its best OOF threshold of it
    by_member = [member_rows(m, train, oof_scorer, test_scorer, sizes_test, folds, grid) for m in members]
    rows = [r for member_table in by_member for r in member_table]
    views = [r for m, member_table in zip(members, by_member)  # member_rows' second row: its plain view's cells
             for r in view_rows(m, train, oof_scorer, test_scorer, sizes_test, grid, plain=member_table[1])]
    with compile_clock() as compiling:  # a first run compiles the kernels: the nested tunings would not
        tuning_start = time.perf_counter()
        chosen, tuned = tune_rules(members, train.images, oof_scorer, cfg)
        tuning_s = time.perf_counter() - tuning_start - compiling()
    # how test's fold models enter each rule's fusion: recorded with its tuned parameters
    tuned = {m: (replace(p, fold_fusion=fold_fusion_plan(members, cfg, p)), *rest) for m, (p, *rest) in tuned.items()}
    run_nested, nested_line = nested_decision(cfg.ensemble.nested, tuning_s, folds.fold.nunique())
    methods, params, oof_score = list(tuned), tuned[chosen][0], tuned[chosen][1]
    evaluations = sum(t[2] for t in tuned.values())
    backend, oof_all = cfg.ensemble.wbf_backend, pd.concat([m.oof for m in members], ignore_index=True)
    fused_oof = {m: fuse(oof_all, train.images, tuned[m][0], oof_sets(members), ("model", "tta"), backend,
                         cfg.ensemble.name) for m in methods}
    write_predictions(fused_oof[chosen], fused_path(cfg, "oof"))
    # The picture and breakdown at a working threshold: at the tuned one (often 0 for mAP) every box would be drawn.
    report = write_ensemble_report(train, fused_oof[chosen], folds.image_id.tolist(),
                                   ensemble_dir(cfg) / ENSEMBLE_REPORT, max(params.score_thr, REPORT_SCORE_THR))
    external = {m.name: m.oof for m, spec in zip(members, cfg.ensemble.members) if spec.config is None}
    report["html"] = str(write_html_report(cfg, max(params.score_thr, REPORT_SCORE_THR), external_oof=external))
    result = {"ensemble": cfg.ensemble.name, "metric": cfg.metric, "members": [m.name for m in members],
              "kept": [m.name for m in members if (params.weights or {}).get(m.name, 1.0) > 0],
              "pseudo_rounds": {m.name: m.pseudo for m in members},
              "test_labelled": labelled, "method": chosen, "params": params.record(), "oof": oof_score,
              "report": report, "evaluations": evaluations, "config": str(cfg.source)}
    # the defaults row: WBF as ensemble-boxes calls it, every member weight 1 (thresholded metrics: at its best)
    defaults = FusionParams(rule={"conf_type": cfg.ensemble.conf_type}, weights={m.name: 1.0 for m in members})
    defaults = replace(defaults, fold_fusion=fold_fusion_plan(members, cfg, defaults))
    default_cells, default_thr = oof_cells(oof_scorer, fuse(oof_all, train.images, defaults, oof_sets(members),
                                                            ("model", "tta"), backend, "ensemble"), grid)
    result["oof_defaults"] = default_cells["oof"]
    default_row = {"row": "ensemble, ensemble-boxes defaults", **default_cells}
    # tune() keeps only the score; each rule's tuned fusion is rescored once for the other cells
    rule_rows = {m: {"row": f"ensemble, {get_rule(m).label} tuned on OOF"
                            + (" (chosen)" if len(methods) > 1 and m == chosen else ""),
                     **cells("oof", [oof_scorer(fused_oof[m])]),
                     **({"score_thr": tuned[m][0].score_thr} if oof_scorer.entry.thresholded else {})}
                 for m in methods}
    if all(m.test is not None for m in members) and test_table is not None:
        for method in methods:
            fused_test = test_fusion(members, test_table.images, tuned[method][0], backend, cfg.ensemble.name)
            if method == chosen:
                result["test_fused"] = str(write_predictions(fused_test, fused_path(cfg, "test")))
            if test_scorer is not None:
                rule_rows[method] |= cells("test", [test_scorer(fused_test)])
        if test_scorer is not None:
            default_row |= cells("test", [test_scorer(at_or_above(test_fusion(members, test_table.images, defaults,
                                                                              backend, "defaults"), default_thr))])
    if len(methods) > 1:
        result["rules"] = {m: {"params": tuned[m][0].record(), "oof": tuned[m][1], "evaluations": tuned[m][2],
                               **({"test": rule_rows[m]["test"]} if "test" in rule_rows[m] else {})}
                           for m in methods}
    rows += [default_row, *rule_rows.values()]
    if nested_line:
        print(nested_line)
    if run_nested:  # no test cell: on test the one tuning on all the OOF images is what runs
        # both rows a mean of per-fold scores (fold_scores): the gap between them is what the tuning fitted
        row_fold = fused_oof[chosen].image_id.map(folds.set_index("image_id").fold)
        tuned_by_fold = {int(k): fused_oof[chosen][row_fold == k] for k in sorted(folds.fold.unique())}
        tuned_mean = cells("oof", fold_scores(tuned_by_fold, train, folds, cfg.metric))
        nested = cells("oof", fold_scores(nested_oof(members, train, folds, cfg), train, folds, cfg.metric))
        rows += [{"row": "ensemble, tuned on OOF, mean of per-fold scores", **tuned_mean},
                 {"row": "ensemble, tuned on the other folds (nested), mean of per-fold scores", **nested}]
        result["nested_oof"], result["oof_fold_mean"] = nested["oof"], tuned_mean["oof"]
    result["table"], result["views"] = rows, views
    if cfg.tracking.enabled:
        result["mlflow_run_id"] = log_ensemble(
            cfg, members=result["members"], fusion_params=result["params"], ensemble_score=oof_score,
            member_scores={r["row"]: r["oof"] for r in rows if "fold ensemble" in r["row"]},
            nested_score=result.get("nested_oof"))
    atomic_write_text(ensemble_dir(cfg) / ENSEMBLE_RESULT, json.dumps(result, indent=2))
    print_table(rows, cfg.metric, params, evaluations)
    print_views(views)
    if (edge := threshold_at_grid_top(params.score_thr, cfg.ensemble.tune.score_thr, oof_scorer.entry)) is not None:
        log.warning(edge)
    return result


def threshold_at_grid_top(score_thr: float, grid: Sequence[float], metric: Metric) -> str | None:
    """A warning when a thresholded metric's tuned threshold is the grid's highest (the best may lie above it),
    else None; a ranking metric's threshold stays 0."""
    if not metric.thresholded or not grid or score_thr <= 0 or score_thr < max(grid):
        return None
    return (f"the tuned score_thr {score_thr:g} is the highest of ensemble.tune.score_thr: a higher one may score "
            f"better under {metric.name}; add higher thresholds to the grid")


def log_ensemble(cfg: ExperimentConfig, *, members: list[str], fusion_params: dict, member_scores: dict[str, float],
                 ensemble_score: float, nested_score: float | None = None) -> str | None:
    """MLflow: members, the fusion parameters chosen on OOF, each member's OOF score (``oof_<member>``) and the
    ensemble's (``oof_score``; ``oof_nested_score``: the tuning scored out of fold, when it ran), and what fusing
    bought over the best member. Returns the run id (None when the store was unusable)."""
    with stage_run(cfg, "ensemble", name=cfg.ensemble.name, tags={"pipeline.members": ",".join(members)}) as tracker:
        tracker.log_params({"ensemble.members": list(members), "ensemble.metric": cfg.metric,
                            "fusion": dict(fusion_params)})
        tracker.log_metrics({"oof_score": ensemble_score, "oof_nested_score": nested_score}  # None: not logged
                            | {f"oof_{m}": s for m, s in member_scores.items()})
        if member_scores:  # in the metric's direction: positive means the ensemble beats its best member
            metric, scores = get_metric(cfg.metric), list(member_scores.values())
            tracker.log_metrics({"oof_gain_over_best_member": metric.gain(ensemble_score,
                                                                          scores[metric.best_index(scores)])})
        return tracker.run_id


def print_table(rows: list[dict], metric: str, params: FusionParams, evaluations: int) -> None:
    table = pd.DataFrame(rows).set_index("row")
    print(f"\n{metric} (OOF = pooled out-of-fold; test = hidden labels, never used for tuning)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))  # "-": a cell the row has not
    weights = ", ".join(f"{k}={v:g}" for k, v in (params.weights or {}).items())
    dropped = [k for k, v in (params.weights or {}).items() if v == 0]
    if dropped:
        weights += f"; dropped (weight 0, the ensemble scores better without): {', '.join(dropped)}"
    rule = ", ".join(f"{k}={v}" for k, v in get_rule(params.method).resolve(params.rule).items())
    print(f"chosen: {get_rule(params.method).label} ({rule}), score_thr={params.score_thr}, weights [{weights}] "
          f"({evaluations} fusions tried on OOF)")
    if params.fold_fusion:
        print("test: each member x view's fold models fused by WBF first (its predict.tta_*; ensemble.fold_fusion), "
              "then the rule over member x view sets, as on OOF")


def print_views(views: list[dict]) -> None:
    """Each member's TTA views alone (fold ensemble), the first one of each member its plain view."""
    if views:
        print("\neach TTA view alone (fold ensemble); oof gain: over the member's plain view, flagged below "
              f"-{VIEW_GAP_WARN}")
        print(pd.DataFrame(views).set_index(["member", "view"]).to_string(float_format=lambda v: f"{v:.4f}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tune fusion on OOF predictions, fuse OOF and test predictions.")
    add_config_args(parser, demo="ensemble.yaml")
    args = parser.parse_args(argv)
    try:
        run(config_from_args(args))
    except (ConfigError, DataError, FoldsError, EnsembleError, ExternalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
