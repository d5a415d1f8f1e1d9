"""Stage 4: fuse the members' predictions with WBF tuned on out-of-fold predictions, then write the submission.

    python -m pipeline.ensemble --config configs/demo/ensemble.yaml [--no-submission]

Out-of-fold: every training image was predicted only by the fold model that did not see it, so each member has a
pooled OOF score and so does the fused ensemble. On OOF the stage tunes WBF's ``iou_thr`` and ``skip_box_thr``,
the member weights and a final score threshold against the competition metric (a seeded-free, deterministic
coordinate search over the configured grids), then applies the chosen parameters to the test predictions of all
members x folds x TTA views and writes a validated submission.

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

from pipeline.config import ConfigError, ExperimentConfig, add_config_args, load_config
from pipeline.data import DataError, load_dataset
from pipeline.folds import FoldsError, read_folds
from pipeline.io import atomic_write_text
from pipeline.metrics import MetricResult, Scorer
from pipeline.predict import fuse_views, predictions_path
from pipeline.predictions import read_predictions, write_predictions
from pipeline.report import write_ensemble_report
from pipeline.tracking import log_ensemble
from pipeline.wbf import fuse_predictions


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


def load_members(cfg: ExperimentConfig, config_path: Path, need_test: bool) -> list[Member]:
    if not cfg.ensemble.members:
        raise EnsembleError(f"{config_path}: ensemble.members is empty")
    members = []
    for spec in cfg.ensemble.members:
        member_cfg = load_config(config_path.parent / spec.config)
        if member_cfg.data.name != cfg.data.name or member_cfg.folds_path != cfg.folds_path:
            raise EnsembleError(f"member {spec.config} uses another dataset or fold file than {config_path}: "
                                "OOF predictions would not line up")
        paths = {s: predictions_path(member_cfg, s) for s in ("oof", "test")}
        for split, path in paths.items():
            if not path.exists() and (split == "oof" or need_test):
                raise EnsembleError(f"{path} not found: run python -m pipeline.predict --config "
                                    f"{config_path.parent / spec.config} --split {split}")
        oof = read_predictions(paths["oof"])
        test = read_predictions(paths["test"]) if paths["test"].exists() else None
        views = sorted(oof.tta.unique(), key=lambda v: (v != "none", v))
        members.append(Member(member_cfg.run, member_cfg, oof, test, views))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise EnsembleError(f"members must have distinct `run` names, got {names}")
    return members


def fuse(preds: pd.DataFrame, sizes: pd.DataFrame, p: FusionParams, sets: list, group_col, backend: str,
         name: str) -> pd.DataFrame:
    fused = fuse_predictions(preds, sizes, group_col=group_col, sets=sets, weights=p.weights, iou_thr=p.iou_thr,
                             skip_box_thr=p.skip_box_thr, conf_type=p.conf_type, model_name=name, backend=backend)
    return fused[fused.score >= p.score_thr] if p.score_thr > 0 else fused


def oof_sets(members: list[Member]) -> list[tuple[str, str]]:
    return [(m.name, v) for m in members for v in m.views]


def tune(members: list[Member], sizes: pd.DataFrame, scorer: Scorer, cfg: ExperimentConfig) -> tuple[FusionParams, float, int]:
    """Coordinate search: (iou_thr, skip_box_thr) with equal weights, then weights, then both again, then the
    score threshold (which needs no new fusion). Deterministic; returns the params, their OOF score and the
    number of evaluations."""
    grid, names = cfg.ensemble.tune, [m.name for m in members]
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
    fixed = {s.config: s.weight for s in cfg.ensemble.members}
    weight_options = [
        dict(zip(names, w)) for w in itertools.product(range(1, grid.weight_steps + 1), repeat=len(names))
        if np.gcd.reduce(w) == 1  # (2, 2) fuses exactly like (1, 1)
    ] if len(names) > 1 and not any(v is not None for v in fixed.values()) else [best.weights]
    if any(v is not None for v in fixed.values()):
        best.weights = {m.name: (s.weight if s.weight is not None else 1.0) for m, s in zip(members, cfg.ensemble.members)}

    def search(field_values: dict[str, list]) -> None:
        nonlocal best
        candidates = [dict(zip(field_values, combo)) for combo in itertools.product(*field_values.values())]
        scored = [(evaluate(FusionParams(**{**asdict(best), **c})), i) for i, c in enumerate(candidates)]
        top = max(scored, key=lambda t: (t[0], -t[1]))  # ties: the earlier (simpler) candidate
        best = FusionParams(**{**asdict(best), **candidates[top[1]]})

    search({"iou_thr": grid.iou_thr, "skip_box_thr": grid.skip_box_thr})
    if len(weight_options) > 1:
        search({"weights": [{k: float(v) for k, v in w.items()} for w in weight_options]})
        search({"iou_thr": grid.iou_thr, "skip_box_thr": grid.skip_box_thr})
    search({"score_thr": sorted(set([0.0] + list(grid.score_thr)))})
    return best, evaluate(best), len(cache)


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
               **cells("oof", [oof_scorer(fuse_views(m.oof, train.images, cfg, m.views))])}
        if test_scorer is not None and m.test is not None:
            sets = [(f, v) for f in sorted(m.test.fold.unique()) for v in m.views]
            fused = fuse_predictions(m.test, sizes_test, group_col=("fold", "tta"), sets=sets, model_name=m.name,
                                     iou_thr=cfg.predict.tta_iou_thr, conf_type=cfg.predict.tta_conf_type)
            row |= cells("test", [test_scorer(fused)])
        rows.append(row)
    return rows


def ensemble_dir(cfg: ExperimentConfig) -> Path:
    return cfg.runs_dir / cfg.experiment / "ensembles" / cfg.ensemble.name


def run(config_path: Path, overrides: list[str], write_submission: bool = True) -> dict:
    cfg = load_config(config_path, overrides)
    train = load_dataset(cfg.data, "train")
    folds = read_folds(cfg.folds_path)
    members = load_members(cfg, Path(config_path), need_test=write_submission)
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
    out_dir = ensemble_dir(cfg)
    fused_oof = fuse(oof_all, train.images, params, oof_sets(members), ("model", "tta"), cfg.ensemble.wbf_backend,
                     cfg.ensemble.name)
    write_predictions(fused_oof, out_dir / "oof_fused.parquet")
    # The picture and breakdown at a working threshold: at the tuned one (often 0 for mAP) every box would be drawn.
    report = write_ensemble_report(train, fused_oof, folds.image_id.tolist(), out_dir / "report",
                                   max(params.score_thr, REPORT_SCORE_THR))
    result = {"ensemble": cfg.ensemble.name, "metric": cfg.metric, "members": [m.name for m in members],
              "test_labelled": labelled,
              "params": asdict(params), "oof": oof_score, "report": report, "oof_defaults": default_oof.score, "evaluations": evaluations}
    # tune() keeps only the score; the tuned fusion is rescored once for the other cells
    full = {"row": "ensemble, WBF tuned on OOF", **cells("oof", [oof_scorer(fused_oof)])}
    default_row = {"row": "ensemble, ensemble-boxes defaults", **cells("oof", [default_oof])}
    if all(m.test is not None for m in members) and test_table is not None:
        fused_test = test_fusion(members, test_table.images, params, cfg.ensemble.wbf_backend, cfg.ensemble.name)
        write_predictions(fused_test, out_dir / "test_fused.parquet")
        if test_scorer is not None:
            full |= cells("test", [test_scorer(fused_test)])
            default_row |= cells("test", [test_scorer(test_fusion(members, test_table.images, defaults,
                                                                  cfg.ensemble.wbf_backend, "defaults"))])
        if write_submission:
            result["submission"] = str(submit(cfg, fused_test, test_table, result))
    rows += [default_row, full]
    result["table"] = rows
    if cfg.tracking.enabled:
        result["mlflow_run_id"] = log_ensemble(
            cfg, members=result["members"], fusion_params=asdict(params), ensemble_score=oof_score,
            member_scores={r["row"]: r["oof"] for r in rows if "fold ensemble" in r["row"]}, metric=cfg.metric)
    if "submission" in result:
        register(cfg, Path(result["submission"]), result, config_path)
    atomic_write_text(out_dir / "result.json", json.dumps(result, indent=2))
    print_table(rows, cfg.metric, params, evaluations)
    return result


def submit(cfg: ExperimentConfig, fused_test: pd.DataFrame, test_table, result: dict) -> Path:
    from pipeline.submission import submission_path, write_submission

    sample = cfg.data.root / cfg.data.sample_submission if cfg.data.sample_submission else None
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in test_table.images.itertuples()}
    path = submission_path(cfg.submission.dir, cfg.ensemble.name, format=cfg.submission.format)
    write_submission(fused_test, test_table.images.image_id.tolist(), path, cfg.submission.format,
                     test_table.classes, sample_submission=sample if sample and sample.exists() else None,
                     image_sizes=sizes, coord_decimals=cfg.submission.coord_decimals)
    print(f"wrote {path} (validated)")
    return path


def register(cfg: ExperimentConfig, path: Path, result: dict, config_path: Path) -> None:
    """The sidecar ``<file>.meta.json`` and the ledger row: which ensemble made this file, with what CV."""
    from pipeline.leaderboard import register_submission
    from pipeline.submission import content_hash

    meta = {"file": str(path), "created": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
            "ensemble": cfg.ensemble.name, "members": result["members"], "cv": result["oof"], "metric": cfg.metric,
            "format": cfg.submission.format, "content_hash": content_hash(path), "config": str(config_path),
            "mlflow_run_id": result.get("mlflow_run_id")}
    atomic_write_text(path.with_name(path.name + ".meta.json"), json.dumps(meta, indent=2))
    register_submission(meta, cfg.tracking, experiment=cfg.experiment,
                        ledger_dir=cfg.submission.dir)


def print_table(rows: list[dict], metric: str, params: FusionParams, evaluations: int) -> None:
    table = pd.DataFrame(rows).set_index("row")
    print(f"\n{metric} (OOF = pooled out-of-fold; test = hidden labels, never used for tuning)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    weights = ", ".join(f"{k}={v:g}" for k, v in (params.weights or {}).items())
    print(f"chosen: iou_thr={params.iou_thr}, skip_box_thr={params.skip_box_thr}, score_thr={params.score_thr}, "
          f"weights [{weights}], conf_type={params.conf_type} ({evaluations} fusions tried on OOF)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tune WBF on OOF predictions, fuse test predictions, submit.")
    add_config_args(parser)
    parser.add_argument("--no-submission", action="store_true", help="tune and report only")
    args = parser.parse_args(argv)
    try:
        run(Path(args.config), args.overrides, write_submission=not args.no_submission)
    except (ConfigError, DataError, FoldsError, EnsembleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
