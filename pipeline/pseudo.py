"""Stage: a pseudo-label round from an ensemble, with thresholds chosen on its out-of-fold predictions.

    python -m pipeline.pseudo --config configs/demo/ensemble.yaml --round 1 [--force]

Reads only files: the ensemble's ``result.json`` (members, the fusion tuned on OOF, its CV) and fused OOF
predictions, the folds file, the annotation tables, and the teacher's predictions on the source images
(``pseudo.sources``: the test split, whose labels are never read, and/or the ``data.unlabelled`` image folder).

Teacher (``pseudo.teacher``). ``fold`` (default): the labels for fold K's training set are the members' fold-K
models' predictions, fused over members x TTA views with the ensemble's tuned parameters, exactly as the fused OOF
predictions were made; those models never saw fold K's images, so a round-2 fold-K model learns nothing derived
from its own validation labels and its OOF score stays honest, round after round. ``ensemble``: every fold gets the
whole ensemble's fused predictions (``test_fused.parquet``), a stronger teacher whose labels carry every fold's
validation labels into every fold's training: the next round's CV is optimistic (the usual Kaggle recipe).

Boxes and images (thresholds from the fused OOF predictions, precision at IoU 0.5, class-aware, matched by
:func:`pipeline.report.match`): a box is a label when its fused score reaches the *label* threshold, the lowest
score whose OOF precision is at least ``pseudo.precision_target``; an image is kept when it has a label and at most
``pseudo.max_uncertain_fraction`` of its *likely* boxes (score at least the lowest one with OOF precision
``pseudo.likely_precision``) fall below the label threshold: many half-seen objects left unlabelled would teach
the student that they are background.

Writes ``runs/<experiment>/pseudo/round<N>/`` (:func:`pipeline.layout.pseudo_dir`): ``images.parquet`` (each image
with its ``teacher_fold``, ``pseudo_split`` and ``pseudo_round``), ``boxes.parquet`` (the annotation table's columns
plus ``pseudo_round``, ``teacher_fold``, ``score``) and ``meta.json`` (source ensemble and its CV, thresholds, counts, SHA-256 of the tables), and an MLflow
run (stage ``pseudo``) with the round, its source and its thresholds. A member config trains on it with
``train.pseudo: N`` (:func:`pipeline.pseudo_labels.fold_training_set`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import ConfigError, ExperimentConfig, MemberConfig, add_config_args, config_from_args
from pipeline.data import AnnotationTable, DataError, load_dataset
from pipeline.external import ExternalError, load_external_test
from pipeline.fusion import fuse_tuned
from pipeline.layout import (ALL_FOLDS, ENSEMBLE_RESULT, PSEUDO_META, FoldsError, ensemble_dir, folds_path,
                             fused_path, predictions_path, pseudo_dir, read_folds, read_predictions,
                             rows_of_views)
from pipeline.pseudo_labels import (PseudoLabelError, check_no_labelled_images, file_sha256, read_pseudo_meta,
                                    resolve_pseudo_dir, unlabelled_table, write_pseudo_table)
from pipeline.report import match, threshold_curve
from pipeline.tracking import stage_run

log = logging.getLogger(__name__)

MATCH_IOU = 0.5
CURVE_POINTS = np.round(np.arange(0.05, 1.0, 0.05), 2)  # the precision / recall curve meta.json keeps


# ------------------------------------------------------------------------------------------- the source ensemble


def read_ensemble_result(cfg: ExperimentConfig) -> dict[str, Any]:
    path = ensemble_dir(cfg) / ENSEMBLE_RESULT
    if not path.is_file():
        raise PseudoLabelError(f"{path} not found: run python -m pipeline.ensemble --config {cfg.source} first")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PseudoLabelError(f"{path}: not readable JSON ({exc}): run the ensemble stage again") from None
    if not cfg.ensemble.members:
        raise PseudoLabelError(f"{cfg.source}: ensemble.members is empty: pseudo-labels come from an ensemble's members")
    names = [member_name(cfg, spec) for spec in cfg.ensemble.members]
    if result.get("members") != names:
        raise PseudoLabelError(f"{path} was made for members {result.get('members')}, but {cfg.source} lists "
                               f"{names}: run the ensemble stage again")
    return result


def member_name(cfg: ExperimentConfig, spec: MemberConfig) -> str:
    """As the ensemble stage names it: a config's ``run``, or the ``name`` of another tool's predictions."""
    return str(spec.name) if spec.config is None else cfg.load_sibling(spec.config).run


def member_rounds(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Per member: the pseudo round it trained on (0: none) and that round's teacher; external members are
    taken as round 0 (their training is not ours to see)."""
    rounds = {}
    for spec in cfg.ensemble.members:
        if spec.config is None:
            rounds[str(spec.name)] = {"round": 0, "teacher": None}
            continue
        member_cfg = cfg.load_sibling(spec.config)
        folder = resolve_pseudo_dir(member_cfg)
        meta = read_pseudo_meta(folder) if folder is not None else {"round": 0, "teacher": None}
        rounds[member_cfg.run] = {"round": int(meta["round"]), "teacher": meta.get("teacher"),
                                  "folder": str(folder) if folder else None}
    return rounds


def check_round(round_number: int, rounds: dict[str, dict[str, Any]], teacher: str) -> None:
    """Round N is made by members trained on round N-1 (round 1: on labelled data only)."""
    made_from = max(r["round"] for r in rounds.values())
    if round_number != made_from + 1:
        listed = ", ".join(f"{m}: round {r['round']}" for m, r in rounds.items())
        raise PseudoLabelError(f"--round {round_number}: the ensemble's members trained on pseudo rounds ({listed}), "
                               f"so the round they make is {made_from + 1}")
    if teacher == "fold" and any(r["teacher"] == "ensemble" for r in rounds.values()):
        log.warning("teacher 'fold', but a member trained on a round labelled by the whole ensemble: its fold "
                    "models already saw every fold's labels, so this round's OOF honesty is that of the older round")


# ------------------------------------------------------------------------------------------- thresholds


def lowest_score_reaching(curve: pd.DataFrame, target: float, what: str) -> pd.Series:
    """The row of ``curve`` (``threshold_curve``) with the lowest score threshold whose precision >= ``target``."""
    ok = curve[(curve.precision >= target) & (curve.tp > 0)]
    if ok.empty:
        best = curve.loc[curve.precision.idxmax()] if len(curve) else None
        reached = f"the best is {best.precision:.3f} at score {best.score_thr:.4f}" if best is not None else "no boxes"
        raise PseudoLabelError(f"no score threshold reaches OOF precision {target} ({what}) at IoU {MATCH_IOU}: "
                               f"{reached}; lower it, or pseudo-label from a stronger ensemble")
    return ok.loc[ok.score_thr.idxmin()]


def choose_thresholds(table: AnnotationTable, fused_oof: pd.DataFrame, image_ids: list[str],
                      precision_target: float, likely_precision: float) -> dict[str, Any]:
    """The label and likely thresholds on the fused OOF predictions: exact, every distinct score is a candidate
    (a matching does not depend on the boxes below a threshold, so one matching gives every threshold)."""
    matching = match(table, fused_oof, image_ids, iou_thr=MATCH_IOU)
    curve = threshold_curve(matching, np.unique(matching.preds.score.to_numpy()))
    label = lowest_score_reaching(curve, precision_target, "pseudo.precision_target")
    likely = lowest_score_reaching(curve, likely_precision, "pseudo.likely_precision")
    shown = threshold_curve(matching, CURVE_POINTS)
    return {"label": float(label.score_thr), "likely": float(likely.score_thr), "iou": MATCH_IOU,
            "precision_target": precision_target, "likely_precision": likely_precision,
            "oof_at_label": {k: float(label[k]) for k in ("precision", "recall", "tp", "fp", "fn")},
            "oof_at_likely": {k: float(likely[k]) for k in ("precision", "recall", "tp", "fp", "fn")},
            "oof_curve": shown[["score_thr", "precision", "recall"]].to_dict("records")}


# ------------------------------------------------------------------------------------------- teacher predictions


def source_tables(cfg: ExperimentConfig, classes: list[str]) -> dict[str, AnnotationTable]:
    """The images to pseudo-label, per source; the test split's labels, if any, are dropped unread."""
    tables = {}
    for split in cfg.pseudo.sources:
        table = load_dataset(cfg.data, "test") if split == "test" else unlabelled_table(cfg.data, classes)
        if table.images.empty:
            raise PseudoLabelError(f"pseudo source {split!r} has no images")
        tables[split] = AnnotationTable(table.images, None, list(classes), table.report)
    if len(tables) == 2:
        both = sorted(set(tables["test"].images.image_id) & set(tables["unlabelled"].images.image_id))
        if both:
            raise PseudoLabelError(f"image id {both[0]!r} is both a test image and an unlabelled image "
                                   f"({len(both)} such ids): rename the unlabelled files")
    return tables


def member_predictions(cfg: ExperimentConfig, split: str, table: AnnotationTable,
                       folds: pd.DataFrame) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """(name, predictions of ``split``, TTA views) per member; the views are those the ensemble fused (the entry's
    ``views``, else every view its OOF predictions hold), and only their rows are kept."""
    out = []
    for spec in cfg.ensemble.members:
        if spec.config is None:
            if split != "test":
                raise PseudoLabelError(f"member {spec.name}: predictions of another tool exist for the test split "
                                       "only; pseudo-label the unlabelled folder from members of ours")
            folder = spec.predictions_folder
            preds = load_external_test(folder, spec.format, spec.name, table, folds, spec.coco_image_id)
            if preds is None:
                raise PseudoLabelError(f"member {spec.name}: no test predictions in {folder}")
            views = spec.chosen_views(preds.tta.unique(), folder)
            out.append((str(spec.name), rows_of_views(preds, views, str(spec.name)), views))
            continue
        member_cfg = cfg.load_sibling(spec.config)
        path = predictions_path(member_cfg, split)
        if not path.is_file():
            raise PseudoLabelError(f"{path} not found: predict {split} with {member_cfg.source} first")
        oof_path = predictions_path(member_cfg, "oof")
        oof_views = pd.read_parquet(oof_path, columns=["tta"]).tta.unique()
        views = spec.chosen_views(oof_views, oof_path)
        out.append((member_cfg.run, rows_of_views(read_predictions(path), views, member_cfg.run, oof_views), views))
    return out


def _fuse(preds: pd.DataFrame, sizes: pd.DataFrame, params: dict, sets: list, group_col: tuple[str, ...],
          backend: str) -> pd.DataFrame:
    """The ensemble's fusion with its tuned parameters (weight-0 members dropped, the rule, the score threshold)."""
    return fuse_tuned(preds, sizes, params, sets, group_col, name="pseudo", backend=backend)


def teacher_predictions(cfg: ExperimentConfig, result: dict, split: str, table: AnnotationTable,
                        folds: pd.DataFrame) -> pd.DataFrame:
    """The fused predictions that become labels, with a ``teacher_fold`` column (-1: the whole ensemble)."""
    images = table.images
    if cfg.pseudo.teacher == "ensemble" and split == "test":
        path = fused_path(cfg, "test")
        if not path.is_file():
            raise PseudoLabelError(f"{path} not found: the ensemble stage fuses test predictions when every member "
                                   "has them (python -m pipeline.predict --split test)")
        fused = read_predictions(path)
        return fused[fused.image_id.isin(set(images.image_id))].assign(teacher_fold=ALL_FOLDS)
    members = member_predictions(cfg, split, table, folds)
    stray = sorted(set().union(*(set(p.image_id) for _, p, _ in members)) - set(images.image_id))
    if stray:
        raise PseudoLabelError(f"the members' {split} predictions name image {stray[0]!r}, not in the {split} images "
                               f"({len(stray)} such): predict the {split} split again")
    return fuse_members(members, images[["image_id", "width", "height"]], result["params"], cfg.ensemble.wbf_backend,
                        cfg.pseudo.teacher, sorted(int(f) for f in folds.fold.unique()), split)


def fuse_members(members: list[tuple[str, pd.DataFrame, list[str]]], sizes: pd.DataFrame, params: dict,
                 backend: str, teacher: str, fold_ids: list[int], split: str) -> pd.DataFrame:
    """Members' predictions (name, table, views) fused with the ensemble's tuned ``params``. ``ensemble``: one WBF
    set per (member, fold, view), as the ensemble fuses test predictions; ``fold``: fold by fold, one set per
    (member, view), as it fuses OOF predictions, ``teacher_fold`` = the fold."""
    preds = pd.concat([p for _, p, _ in members], ignore_index=True)
    if teacher == "ensemble":
        sets = [(name, f, v) for name, p, views in members for f in sorted(p.fold.unique()) for v in views]
        return _fuse(preds, sizes, params, sets, ("model", "fold", "tta"), backend).assign(teacher_fold=ALL_FOLDS)
    out = []
    for fold in fold_ids:
        lacking = [name for name, p, _ in members if fold not in set(p.fold)]
        if lacking:
            raise PseudoLabelError(f"teacher 'fold': member(s) {lacking} have no fold-{fold} model predictions of "
                                   f"{split} (a model trained on every fold saw fold {fold}'s images); use "
                                   "pseudo.teacher: ensemble, or give per-fold predictions")
        sets = [(name, v) for name, _, views in members for v in views]
        part = preds[preds.fold == fold]
        out.append(_fuse(part, sizes, params, sets, ("model", "tta"), backend).assign(teacher_fold=fold))
    return pd.concat(out, ignore_index=True)


# ------------------------------------------------------------------------------------------- selection


def select(fused: pd.DataFrame, images: pd.DataFrame, teacher_folds: list[int], label_thr: float,
           likely_thr: float, max_uncertain_fraction: float, keep_empty: bool) -> pd.DataFrame:
    """Per (teacher fold, image): ``n_likely`` (boxes scoring >= ``likely_thr``), ``n_label`` (>= ``label_thr``),
    ``uncertain`` (the share of likely boxes below the label threshold) and ``verdict``: ``kept`` (a label and
    ``uncertain <= max_uncertain_fraction``; or no likely box and ``keep_empty``), ``empty`` (no likely box),
    ``uncertain`` (otherwise)."""
    grid = pd.MultiIndex.from_product([teacher_folds, images.image_id.tolist()], names=["teacher_fold", "image_id"])
    scores = fused.assign(likely=fused.score >= likely_thr, label=fused.score >= label_thr)
    counts = scores.groupby(["teacher_fold", "image_id"])[["likely", "label"]].sum().reindex(grid, fill_value=0)
    out = counts.rename(columns={"likely": "n_likely", "label": "n_label"}).astype(np.int64).reset_index()
    out["uncertain"] = np.where(out.n_likely > 0, (out.n_likely - out.n_label) / out.n_likely.clip(lower=1), 0.0)
    keep = (out.n_label > 0) & (out.uncertain <= max_uncertain_fraction)
    empty = out.n_likely == 0
    out["verdict"] = np.where(keep | (empty & keep_empty), "kept", np.where(empty, "empty", "uncertain"))
    return out


def label_boxes(fused: pd.DataFrame, kept: pd.DataFrame, images: pd.DataFrame, label_thr: float,
                repairs: dict[str, int]) -> pd.DataFrame:
    """The label boxes of the kept (teacher fold, image) pairs, clipped to the image (counted in ``repairs``; a box
    with no area left is dropped, counted)."""
    boxes = fused[fused.score >= label_thr].merge(kept[["teacher_fold", "image_id"]], on=["teacher_fold", "image_id"])
    boxes = boxes.merge(images[["image_id", "width", "height"]], on="image_id", how="left")
    xy = boxes[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    limits = np.stack([np.zeros(len(boxes)), np.zeros(len(boxes)), boxes.width, boxes.height], axis=1)
    clipped = np.stack([np.clip(xy[:, 0], 0, limits[:, 2]), np.clip(xy[:, 1], 0, limits[:, 3]),
                        np.clip(xy[:, 2], 0, limits[:, 2]), np.clip(xy[:, 3], 0, limits[:, 3])], axis=1)
    moved = (clipped != xy).any(axis=1)
    degenerate = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    repairs["clipped"] = repairs.get("clipped", 0) + int((moved & ~degenerate).sum())
    repairs["dropped_no_area"] = repairs.get("dropped_no_area", 0) + int(degenerate.sum())
    if moved.any():
        log.info("pseudo labels: %d box(es) clipped to their image, %d dropped with no area left",
                 int((moved & ~degenerate).sum()), int(degenerate.sum()))
    boxes[["x1", "y1", "x2", "y2"]] = clipped
    return boxes[~degenerate].sort_values(["teacher_fold", "image_id", "score"], ascending=[True, True, False])


def build_round(cfg: ExperimentConfig, result: dict, sources: dict[str, AnnotationTable], folds: pd.DataFrame,
                thresholds: dict, round_number: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(images, boxes, per-image verdicts, repairs) of the round, over every source."""
    p, images_out, boxes_out, verdicts, repairs = cfg.pseudo, [], [], [], {}
    for split, table in sources.items():
        images = table.images
        fused = teacher_predictions(cfg, result, split, table, folds)
        teacher_folds = [ALL_FOLDS] if p.teacher == "ensemble" else sorted(int(f) for f in folds.fold.unique())
        verdict = select(fused, images, teacher_folds, thresholds["label"], thresholds["likely"],
                         p.max_uncertain_fraction, p.keep_empty).assign(pseudo_split=split)
        kept = verdict[verdict.verdict == "kept"]
        images_out.append(kept[["teacher_fold", "image_id", "pseudo_split"]].merge(images, on="image_id"))
        boxes_out.append(label_boxes(fused, kept, images, thresholds["label"], repairs))
        verdicts.append(verdict)
    images = pd.concat(images_out, ignore_index=True).assign(pseudo_round=round_number)
    boxes = pd.concat(boxes_out, ignore_index=True).assign(pseudo_round=round_number)
    return images, boxes, pd.concat(verdicts, ignore_index=True), repairs


def count_table(verdicts: pd.DataFrame, boxes: pd.DataFrame) -> pd.DataFrame:
    """Per source and teacher fold: candidate images, kept, dropped as uncertain, dropped as empty, label boxes."""
    out = verdicts.groupby(["pseudo_split", "teacher_fold"]).verdict.value_counts().unstack(fill_value=0)
    out = out.reindex(columns=["kept", "uncertain", "empty"], fill_value=0)
    out.insert(0, "candidates", out.sum(axis=1))
    per = boxes.merge(verdicts[["teacher_fold", "image_id", "pseudo_split"]], on=["teacher_fold", "image_id"])
    out["boxes"] = per.groupby(["pseudo_split", "teacher_fold"]).size().reindex(out.index, fill_value=0)
    return out.rename(columns={"uncertain": "dropped_uncertain", "empty": "dropped_empty"}).reset_index()


# ------------------------------------------------------------------------------------------- the stage


def run(cfg: ExperimentConfig, round_number: int, force: bool = False) -> dict[str, Any]:
    """Make round ``round_number`` from the ensemble ``cfg`` describes; returns what ``meta.json`` holds."""
    out = pseudo_dir(cfg, round_number)
    if (out / PSEUDO_META).exists() and not force:
        raise PseudoLabelError(f"{out} already holds round {round_number}: pass --force to replace it (runs trained "
                               "on it will then refuse to resume: their labels changed)")
    result = read_ensemble_result(cfg)
    rounds = member_rounds(cfg)
    check_round(round_number, rounds, cfg.pseudo.teacher)
    train = load_dataset(cfg.data, "train")
    folds = read_folds(folds_path(cfg))
    oof_path = fused_path(cfg, "oof")
    if not oof_path.is_file():
        raise PseudoLabelError(f"{oof_path} not found: run python -m pipeline.ensemble --config {cfg.source}")
    thresholds = choose_thresholds(train, read_predictions(oof_path), folds.image_id.tolist(),
                                   cfg.pseudo.precision_target, cfg.pseudo.likely_precision)
    sources = source_tables(cfg, train.classes)
    for split, table in sources.items():
        check_no_labelled_images(table.images, train, folds, f"pseudo source {split!r}", folds_path(cfg))
    images, boxes, verdicts, repairs = build_round(cfg, result, sources, folds, thresholds, round_number)
    counts = count_table(verdicts, boxes)
    meta = {"round": round_number, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "teacher": cfg.pseudo.teacher, "sources": list(sources), "classes": list(train.classes),
            "source_ensemble": {"name": cfg.ensemble.name, "dir": str(ensemble_dir(cfg)), "config": str(cfg.source),
                                "metric": result.get("metric"), "oof": result.get("oof"),
                                "members": result["members"], "params": result["params"],
                                "mlflow_run_id": result.get("mlflow_run_id"),
                                "result_sha256": file_sha256(ensemble_dir(cfg) / ENSEMBLE_RESULT)},
            "member_rounds": rounds, "folds_file": str(folds_path(cfg)), "folds_sha256": file_sha256(folds_path(cfg)),
            "thresholds": thresholds,
            "image_rule": {"max_uncertain_fraction": cfg.pseudo.max_uncertain_fraction,
                           "keep_empty": cfg.pseudo.keep_empty},
            "counts": counts.to_dict("records"), "repairs": repairs,
            "source_repairs": {split: table.report.counts() for split, table in sources.items()},
            "n_images": int(images.image_id.nunique()), "n_image_rows": int(len(images)), "n_boxes": int(len(boxes))}
    meta_path = write_pseudo_table(out, images, boxes, meta)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    print_summary(meta, counts, out)
    if cfg.tracking.enabled:
        meta["mlflow_run_id"] = log_pseudo(cfg, meta, counts, out)
    return meta


def print_summary(meta: dict, counts: pd.DataFrame, out: Path) -> None:
    t, src = meta["thresholds"], meta["source_ensemble"]
    print(f"pseudo-label round {meta['round']} from ensemble {src['name']} (OOF {src['metric']} "
          f"{src['oof']:.4f}), teacher: {meta['teacher']}")
    print(f"label threshold {t['label']:.4f} (OOF precision {t['oof_at_label']['precision']:.3f}, recall "
          f"{t['oof_at_label']['recall']:.3f} at IoU {t['iou']}); likely threshold {t['likely']:.4f} (precision "
          f"{t['oof_at_likely']['precision']:.3f})")
    print(counts.to_string(index=False))
    print(f"wrote {out}: {meta['n_images']} images, {meta['n_boxes']} boxes")


def log_pseudo(cfg: ExperimentConfig, meta: dict, counts: pd.DataFrame, out: Path) -> str | None:
    """MLflow: the round, its source ensemble (name, CV, run id), the thresholds chosen and the counts."""
    src, t = meta["source_ensemble"], meta["thresholds"]
    tags = {"pipeline.pseudo_round": meta["round"], "pipeline.source_ensemble": src["name"],
            "pipeline.source_ensemble_run_id": src.get("mlflow_run_id"), "pipeline.pseudo_dir": str(out)}
    with stage_run(cfg, "pseudo", name=f"pseudo-round{meta['round']}", tags=tags, fallback_dir=out) as tracker:
        tracker.log_params({"pseudo.round": meta["round"], "pseudo.teacher": meta["teacher"],
                            "pseudo.sources": meta["sources"], "pseudo.source_ensemble": src["name"],
                            "pseudo.precision_target": t["precision_target"],
                            "pseudo.likely_precision": t["likely_precision"], **{
                                f"pseudo.{k}": v for k, v in meta["image_rule"].items()},
                            "pseudo.content_hash": meta["content_hash"]})
        tracker.log_metrics({"source_oof": src["oof"], "label_threshold": t["label"], "likely_threshold": t["likely"],
                             "oof_precision_at_label": t["oof_at_label"]["precision"],
                             "oof_recall_at_label": t["oof_at_label"]["recall"], "n_images": meta["n_images"],
                             "n_boxes": meta["n_boxes"], "n_candidates": int(counts.candidates.sum())})
        tracker.log_dict(meta, "pseudo_meta.json")
        tracker.log_dict(counts, "pseudo_counts.csv")
        return tracker.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a pseudo-label round from an ensemble's predictions on "
                                                 "unlabelled images (the test split, data.unlabelled).")
    add_config_args(parser, demo="ensemble.yaml")
    parser.add_argument("--round", type=int, required=True, help="the round to make: 1 from members trained on "
                        "labelled data only, N from members trained on round N-1")
    parser.add_argument("--force", action="store_true", help="replace an existing round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.round < 1:
            raise PseudoLabelError(f"--round must be >= 1, got {args.round}")
        run(config_from_args(args), args.round, force=args.force)
    except (ConfigError, DataError, FoldsError, PseudoLabelError, ExternalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
