"""Stage 3: every fold model of a run predicts its out-of-fold images or the test images, under TTA views.

    python -m pipeline.predict --config configs/demo/frcnn.yaml --split oof  [--tta none,hflip,vflip]
    python -m pipeline.predict --config configs/demo/frcnn.yaml --split test
    python -m pipeline.predict --config configs/demo/frcnn.yaml --split unlabelled   # data.unlabelled's images

Writes ``runs/<experiment>/<run>/predictions/<split>.parquet``: the prediction table with one row per box for
every fold model and every view (``fold`` and ``tta`` columns), boxes mapped back through each view's exact
inverse into original-image pixels. Views are fused later (the ensemble stage), so nothing is lost here.
For ``oof`` each fold's model sees only the images of its own fold: no image is predicted by a model that
trained on it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from pipeline import distributed as dist
from pipeline.config import ConfigError, ExperimentConfig, add_config_args, config_from_args
from pipeline.data import DataError, load_dataset
from pipeline.data.cache import open_cache
from pipeline.dataset import make_records
from pipeline.engine import MissingCheckpointError, load_fold_model, predict_with_views, resolve_precision
from pipeline.fusion.views import fuse_views
from pipeline.layout import (FoldsError, empty_predictions, folds_path, normalise_predictions, predictions_path,
                             read_folds, write_predictions)
from pipeline.metrics import Scorer, score_at_best_threshold
from pipeline.pseudo_labels import unlabelled_table
from pipeline.tracking import model_key, stage_run
from pipeline.tta import check_views


def run(cfg: ExperimentConfig, split: str, views: list[str], fold_list: list[int] | None = None) -> Path:
    device = dist.init_from_env(cfg.train.device)
    precision = resolve_precision(cfg.train, device)
    train_table = load_dataset(cfg.data, "train")
    folds = read_folds(folds_path(cfg))
    fold_list = fold_list if fold_list is not None else sorted(folds.fold.unique())
    if split == "oof":
        table = train_table
    elif split == "test":
        table = load_dataset(cfg.data, "test")
    else:  # images nobody labelled (data.unlabelled), a pseudo-label source
        table = unlabelled_table(cfg.data, train_table.classes)
    # pre-resized inputs (data.cache_dir): the oof images are the train split's; unlabelled images are never cached
    cache, cache_line = open_cache(cfg, "train" if split == "oof" else "test", table.images) \
        if split != "unlabelled" else (None, "")
    if cache_line:
        print(cache_line)
    frames = []
    for fold in fold_list:
        t0 = time.perf_counter()
        model = load_fold_model(cfg, fold, len(train_table.classes), device)
        check_views(model, views, cfg.model.image_size)
        ids = folds.image_id[folds.fold == fold] if split == "oof" else table.images.image_id
        preds = predict_with_views(model, make_records(table, ids), cfg, views, fold, precision, cache)
        frames.append(preds)
        print(f"fold {fold}: {len(ids)} images x {len(views)} views -> {len(preds)} boxes "
              f"in {time.perf_counter() - t0:.1f} s")
    preds = normalise_predictions(pd.concat(frames, ignore_index=True)) if frames else empty_predictions()
    path = write_predictions(preds, predictions_path(cfg, split))
    print(f"wrote {path}")
    scores = report_oof(cfg, train_table, folds[folds.fold.isin(fold_list)], preds, views) if split == "oof" else {}
    if cfg.tracking.enabled:
        log_prediction(cfg, split, views, path, preds, scores)
    return path


def log_prediction(cfg: ExperimentConfig, split: str, views: list[str], path: Path, preds: pd.DataFrame,
                   scores: dict[str, float]) -> str | None:
    """MLflow, a child of the model's parent run: split, TTA views, the table written, and for ``oof`` the
    score of each view and of the views fused. Returns the run id."""
    with stage_run(cfg, "predict", name=f"predict-{split}", parent=model_key(cfg),
                   tags={"pipeline.split": split}) as tracker:
        tracker.log_params({"predict.run": cfg.run, "predict.split": split, "predict.tta": list(views),
                            "predict.files": [str(path)], **{f"oof_{k}": v for k, v in scores.items()}})
        tracker.log_metrics({f"{split}_score": scores.get("tta_wbf", scores.get(views[0])),
                             "n_images": preds.image_id.nunique(), "n_boxes": len(preds)})
        return tracker.run_id


def report_oof(cfg, table, folds: pd.DataFrame, preds: pd.DataFrame, views: list[str]) -> dict[str, float]:
    """Pooled OOF score of each view alone and of the views fused: does TTA help this model? A thresholded metric
    (GWD, F2) reads each at its best threshold of ``ensemble.tune.score_thr``: fusing views rescales the scores,
    so read with every box the comparison would be of score distributions, not of boxes."""
    scorer = Scorer(cfg.metric, table, folds.image_id.tolist())
    tables = {view: preds[preds.tta == view] for view in views}
    if len(views) > 1:
        tables["tta_wbf"] = fuse_views(preds, table.images, views, cfg.run, **cfg.predict.tta_wbf)
    scores = {}
    for name, rows in tables.items():
        result, score_thr = score_at_best_threshold(scorer, rows, cfg.ensemble.tune.score_thr)
        scores[name] = result.score
        at = f" at score >= {score_thr:g}" if scorer.entry.thresholded else ""
        print(f"OOF {cfg.metric} {name:>12}: {result.score:.4f}{at}")
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict OOF or test images with every fold model and TTA views.")
    add_config_args(parser, demo="frcnn.yaml")
    parser.add_argument("--split", choices=["oof", "test", "unlabelled"], required=True)
    parser.add_argument("--tta", default=None, help="comma-separated views (default: predict.tta from the config)")
    parser.add_argument("--folds", default=None, help="comma-separated folds (default: all)")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        views = args.tta.split(",") if args.tta else list(cfg.predict.tta)
        fold_list = [int(f) for f in args.folds.split(",")] if args.folds else None
        run(cfg, args.split, views, fold_list)
    except (ConfigError, DataError, FoldsError, MissingCheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
