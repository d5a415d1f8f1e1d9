"""Stage 4: fuse the members' predictions with WBF tuned on out-of-fold predictions.

    python -m pipeline.ensemble --config configs/demo/ensemble.yaml

Out-of-fold: every training image was predicted only by the fold model that did not see it, so each member has a
pooled OOF score and so does the fused ensemble. On OOF the stage tunes WBF's ``iou_thr`` and ``skip_box_thr``,
the member weights and a final score threshold against the competition metric (a deterministic coordinate search
over the configured grids, in the metric's own direction), then applies the chosen parameters to the test
predictions of all members x folds x TTA views.

Writes ``runs/<experiment>/ensembles/<name>/``: ``oof_fused.parquet``, ``test_fused.parquet`` (what the submission
stage turns into a file), ``result.json`` (members, chosen parameters, the score table) and ``report/``.

WBF sets: on OOF one set per (member, view); on test one per (member, fold, view), each with its member's weight.
A box every set agrees on keeps its averaged confidence in both, so the tuned score threshold carries over.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, ExperimentConfig, MemberConfig, add_config_args, config_from_args
from pipeline.data import DataError, load_dataset
from pipeline.external import ExternalError, load_external_oof, load_external_test
from pipeline.fusion import fuse_predictions
from pipeline.fusion.views import fuse_views
from pipeline.io import atomic_write_text
from pipeline.layout import (ENSEMBLE_REPORT, ENSEMBLE_RESULT, FoldsError, ensemble_dir, folds_path, fused_path,
                             predictions_path, read_folds, read_predictions, write_predictions)
from pipeline.metrics import MetricResult, Scorer, get_metric
from pipeline.report import write_ensemble_report, write_html_report
from pipeline.tracking import stage_run


REPORT_SCORE_THR = 0.3


class EnsembleError(RuntimeError):
    pass


@dataclass
class Member:
    name: str
    cfg: ExperimentConfig
    oof: pd.DataFrame
    test: pd.DataFrame | None
    views: list[str]


@dataclass
class FusionParams:
    iou_thr: float = 0.55
    skip_box_thr: float = 0.0
    score_thr: float = 0.0
    weights: dict[str, float] | None = None
    conf_type: str = "avg"


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
    return Member(member_cfg.run, member_cfg, oof, test, views_of(oof))


def external_member(cfg: ExperimentConfig, spec: MemberConfig) -> Member:
    """Another tool's predictions, checked, then treated exactly like a member of ours (its views as given)."""
    folder = Path(spec.predictions) if cfg.source is None else cfg.source.parent / spec.predictions
    if not folder.is_dir():
        raise EnsembleError(f"member {spec.name}: predictions folder {folder} not found")
    folds = read_folds(folds_path(cfg))
    oof = load_external_oof(folder, spec.format, spec.name, load_dataset(cfg.data, "train"), folds)
    test = load_external_test(folder, spec.format, spec.name, load_dataset(cfg.data, "test"), folds)
    return Member(spec.name, cfg, oof, test, views_of(oof))


def views_of(preds: pd.DataFrame) -> list[str]:
    return sorted(preds.tta.unique(), key=lambda v: (v != "none", v))


def fuse(preds: pd.DataFrame, sizes: pd.DataFrame, p: FusionParams, sets: list, group_col, backend: str,
         name: str) -> pd.DataFrame:
    """``preds`` fused with ``p``; sets are tuples whose first element is the member. A member of weight 0 is
    left out entirely (its boxes would otherwise still count in the cluster sizes)."""
    dropped = {m for m, w in (p.weights or {}).items() if w == 0}
    if dropped:
        sets = [s for s in sets if s[0] not in dropped]
        preds = preds[~preds.model.isin(dropped)]
    fused = fuse_predictions(preds, sizes, group_col=group_col, sets=sets, weights=p.weights, iou_thr=p.iou_thr,
                             skip_box_thr=p.skip_box_thr, conf_type=p.conf_type, model_name=name, backend=backend)
    return fused[fused.score >= p.score_thr] if p.score_thr > 0 else fused


def oof_sets(members: list[Member]) -> list[tuple[str, str]]:
    return [(m.name, v) for m in members for v in m.views]


def tune(members: list[Member], sizes: pd.DataFrame, scorer: Scorer, cfg: ExperimentConfig) -> tuple[FusionParams, float, int]:
    """Coordinate search in the metric's direction, from the best of {all members equal, each member alone}:
    (iou_thr, skip_box_thr), then member weights from {0..weight_steps} (0 drops a member), then both again,
    then the score threshold (which needs no new fusion). Every step includes the current point, so the result
    never scores below its start, nor below its best member alone. Deterministic; returns the params, their OOF
    score and the number of evaluations."""
    grid, names, metric = cfg.ensemble.tune, [m.name for m in members], get_metric(scorer.metric)
    oof = pd.concat([m.oof for m in members], ignore_index=True)
    sets, backend = oof_sets(members), cfg.ensemble.wbf_backend
    cache: dict[tuple, tuple[float, pd.DataFrame]] = {}

    def evaluate(p: FusionParams) -> float:
        key = (p.iou_thr, p.skip_box_thr, tuple(sorted((p.weights or {}).items())))
        if key not in cache:
            fused = fuse(oof, sizes, FusionParams(p.iou_thr, p.skip_box_thr, 0.0, p.weights, p.conf_type),
                         sets, ("model", "tta"), backend, "ensemble")
            cache[key] = (scorer(fused).score, fused)
        score, fused = cache[key]
        return score if p.score_thr == 0 else scorer(fused[fused.score >= p.score_thr]).score

    best = FusionParams(weights={n: 1.0 for n in names}, conf_type=cfg.ensemble.conf_type)
    fixed = [s.weight for s in cfg.ensemble.members]
    if any(v is not None for v in fixed):
        best.weights = {m.name: (s.weight if s.weight is not None else 1.0) for m, s in zip(members, cfg.ensemble.members)}
        weight_options = [best.weights]
    else:
        weight_options = member_weight_grid(names, grid.weight_steps)
        # start from the best of: all members equal, and each member alone, so that the tuned ensemble never
        # scores below its best member on OOF (a weak member can be switched off, not only down-weighted)
        starts = [best.weights] + ([{n: float(n == m) for n in names} for m in names] if len(names) > 1 else [])
        scores = [evaluate(FusionParams(**{**asdict(best), "weights": w})) for w in starts]
        best = FusionParams(**{**asdict(best), "weights": starts[metric.best_index(scores)]})

    def search(field_values: dict[str, list]) -> None:
        nonlocal best
        candidates = [dict(zip(field_values, combo)) for combo in itertools.product(*field_values.values())]
        scores = [evaluate(FusionParams(**{**asdict(best), **c})) for c in candidates]
        # in the metric's direction; ties: the earlier (simpler) candidate
        best = FusionParams(**{**asdict(best), **candidates[metric.best_index(scores)]})

    search({"iou_thr": grid.iou_thr, "skip_box_thr": grid.skip_box_thr})
    if len(weight_options) > 1:
        search({"weights": weight_options})
        search({"iou_thr": grid.iou_thr, "skip_box_thr": grid.skip_box_thr})
    search({"score_thr": sorted(set([0.0] + list(grid.score_thr)))})
    return best, evaluate(best), len(cache)


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


def member_rows(m: Member, train, oof_scorer: Scorer, test_scorer: Scorer | None, sizes_test, folds) -> list[dict]:
    """Per member: mean single-fold model, fold ensemble without and with TTA (OOF and, with labels, test)."""
    cfg, rows = m.cfg, []
    plain = m.oof[m.oof.tta == "none"] if "none" in m.views else m.oof[m.oof.tta == m.views[0]]
    per_fold = [Scorer(cfg.metric, train, folds.image_id[folds.fold == f].tolist())(plain)
                for f in sorted(folds.fold.unique())]
    row = {"row": f"{m.name}: mean single-fold model", **cells("oof", per_fold)}
    if test_scorer is not None and m.test is not None:
        test_plain = m.test[m.test.tta == plain.tta.iloc[0]] if len(plain) else m.test.iloc[:0]
        row |= cells("test", [test_scorer(test_plain[test_plain.fold == f]) for f in sorted(m.test.fold.unique())])
    rows.append(row)
    row = {"row": f"{m.name}: fold ensemble, no TTA", **cells("oof", [oof_scorer(plain)])}
    if test_scorer is not None and m.test is not None:
        folds_sets = sorted(m.test.fold.unique())
        fused = fuse_predictions(test_plain, sizes_test, group_col="fold", sets=folds_sets, model_name=m.name,
                                 iou_thr=cfg.predict.tta_iou_thr, conf_type=cfg.predict.tta_conf_type)
        row |= cells("test", [test_scorer(fused)])
    rows.append(row)
    if len(m.views) > 1:
        row = {"row": f"{m.name}: fold ensemble, TTA {'+'.join(m.views)}",
               **cells("oof", [oof_scorer(fuse_views(m.oof, train.images, m.views, m.name, iou_thr=cfg.predict.tta_iou_thr,
                                                    skip_box_thr=cfg.predict.tta_skip_box_thr,
                                                    conf_type=cfg.predict.tta_conf_type))])}
        if test_scorer is not None and m.test is not None:
            sets = [(f, v) for f in sorted(m.test.fold.unique()) for v in m.views]
            fused = fuse_predictions(m.test, sizes_test, group_col=("fold", "tta"), sets=sets, model_name=m.name,
                                     iou_thr=cfg.predict.tta_iou_thr, conf_type=cfg.predict.tta_conf_type)
            row |= cells("test", [test_scorer(fused)])
        rows.append(row)
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

    rows = [r for m in members for r in member_rows(m, train, oof_scorer, test_scorer, sizes_test, folds)]
    params, oof_score, evaluations = tune(members, train.images, oof_scorer, cfg)
    defaults = FusionParams(weights={m.name: 1.0 for m in members}, conf_type=cfg.ensemble.conf_type)
    oof_all = pd.concat([m.oof for m in members], ignore_index=True)
    default_oof = oof_scorer(fuse(oof_all, train.images, defaults, oof_sets(members), ("model", "tta"),
                                  cfg.ensemble.wbf_backend, "ensemble"))
    fused_oof = fuse(oof_all, train.images, params, oof_sets(members), ("model", "tta"), cfg.ensemble.wbf_backend,
                     cfg.ensemble.name)
    write_predictions(fused_oof, fused_path(cfg, "oof"))
    # The picture and breakdown at a working threshold: at the tuned one (often 0 for mAP) every box would be drawn.
    report = write_ensemble_report(train, fused_oof, folds.image_id.tolist(), ensemble_dir(cfg) / ENSEMBLE_REPORT,
                                   max(params.score_thr, REPORT_SCORE_THR))
    report["html"] = str(write_html_report(cfg, max(params.score_thr, REPORT_SCORE_THR)))
    result = {"ensemble": cfg.ensemble.name, "metric": cfg.metric, "members": [m.name for m in members],
              "kept": [m.name for m in members if (params.weights or {}).get(m.name, 1.0) > 0],
              "test_labelled": labelled, "params": asdict(params), "oof": oof_score, "report": report,
              "oof_defaults": default_oof.score, "evaluations": evaluations, "config": str(cfg.source)}
    # tune() keeps only the score; the tuned fusion is rescored once for the other cells
    full = {"row": "ensemble, WBF tuned on OOF", **cells("oof", [oof_scorer(fused_oof)])}
    default_row = {"row": "ensemble, ensemble-boxes defaults", **cells("oof", [default_oof])}
    if all(m.test is not None for m in members) and test_table is not None:
        fused_test = test_fusion(members, test_table.images, params, cfg.ensemble.wbf_backend, cfg.ensemble.name)
        result["test_fused"] = str(write_predictions(fused_test, fused_path(cfg, "test")))
        if test_scorer is not None:
            full |= cells("test", [test_scorer(fused_test)])
            default_row |= cells("test", [test_scorer(test_fusion(members, test_table.images, defaults,
                                                                  cfg.ensemble.wbf_backend, "defaults"))])
    rows += [default_row, full]
    result["table"] = rows
    if cfg.tracking.enabled:
        result["mlflow_run_id"] = log_ensemble(
            cfg, members=result["members"], fusion_params=result["params"], ensemble_score=oof_score,
            member_scores={r["row"]: r["oof"] for r in rows if "fold ensemble" in r["row"]})
    atomic_write_text(ensemble_dir(cfg) / ENSEMBLE_RESULT, json.dumps(result, indent=2))
    print_table(rows, cfg.metric, params, evaluations)
    return result


def log_ensemble(cfg: ExperimentConfig, *, members: list[str], fusion_params: dict, member_scores: dict[str, float],
                 ensemble_score: float) -> str | None:
    """MLflow: members, the fusion parameters chosen on OOF, each member's OOF score (``oof_<member>``) and the
    ensemble's (``oof_score``), and what fusing bought over the best member. Returns the run id (None when the
    store was unusable)."""
    with stage_run(cfg, "ensemble", name=cfg.ensemble.name, tags={"pipeline.members": ",".join(members)}) as tracker:
        tracker.log_params({"ensemble.members": list(members), "ensemble.metric": cfg.metric,
                            "fusion": dict(fusion_params)})
        tracker.log_metrics({"oof_score": ensemble_score} | {f"oof_{m}": s for m, s in member_scores.items()})
        if member_scores:  # in the metric's direction: positive means the ensemble beats its best member
            metric, scores = get_metric(cfg.metric), list(member_scores.values())
            tracker.log_metrics({"oof_gain_over_best_member": metric.gain(ensemble_score,
                                                                          scores[metric.best_index(scores)])})
        return tracker.run_id


def print_table(rows: list[dict], metric: str, params: FusionParams, evaluations: int) -> None:
    table = pd.DataFrame(rows).set_index("row")
    print(f"\n{metric} (OOF = pooled out-of-fold; test = hidden labels, never used for tuning)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    weights = ", ".join(f"{k}={v:g}" for k, v in (params.weights or {}).items())
    dropped = [k for k, v in (params.weights or {}).items() if v == 0]
    if dropped:
        weights += f"; dropped (weight 0, the ensemble scores better without): {', '.join(dropped)}"
    print(f"chosen: iou_thr={params.iou_thr}, skip_box_thr={params.skip_box_thr}, score_thr={params.score_thr}, "
          f"weights [{weights}], conf_type={params.conf_type} ({evaluations} fusions tried on OOF)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tune WBF on OOF predictions, fuse OOF and test predictions.")
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
