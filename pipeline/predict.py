"""Stage 3: every fold model of a run predicts its out-of-fold images or the test images, under TTA views.

    python -m pipeline.predict --config configs/demo/frcnn.yaml --split oof  [--tta none,hflip,vflip]
    python -m pipeline.predict --config configs/demo/frcnn.yaml --split test

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
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import checkpoint, distributed as dist
from pipeline.config import ConfigError, ExperimentConfig, add_config_args, load_config
from pipeline.data import DataError, load_dataset
from pipeline.dataset import EvalDataset, collate, make_records
from pipeline.engine import resolve_precision, to_table
from pipeline.folds import FoldsError, read_folds
from pipeline.metrics import Scorer
from pipeline.models import create_model
from pipeline.predictions import empty_predictions, normalise_predictions, write_predictions
from pipeline.tracking import log_prediction
from pipeline.train import fold_dir
from pipeline.tta import check_views, predict_views
from pipeline.wbf import fuse_predictions


class PredictError(RuntimeError):
    pass


def predictions_path(cfg: ExperimentConfig, split: str) -> Path:
    return cfg.run_dir / "predictions" / f"{split}.parquet"


def load_fold_model(cfg: ExperimentConfig, fold: int, num_classes: int, device: torch.device):
    path = fold_dir(cfg, fold) / "best.pt"
    if not path.exists():
        raise PredictError(f"{path} not found: train fold {fold} first "
                           f"(python -m pipeline.train --config ... --fold {fold})")
    # The checkpoint holds every weight: build the bare architecture, never touch a hub or a backbone file.
    bare = cfg.model.model_copy(update={"pretrained": False, "backbone_weights": None, "init_checkpoint": None})
    model = create_model(bare, num_classes)
    model.load_state_dict(checkpoint.load(path)["model"])
    return model.to(device).eval()


def predict_images(model, records, cfg: ExperimentConfig, views: list[str], fold: int, precision) -> pd.DataFrame:
    """Prediction table for ``records`` under every view (original-image pixels)."""
    size = cfg.model.image_size
    loader = DataLoader(EvalDataset(records, size), batch_size=cfg.predict.batch_size,
                        num_workers=cfg.train.num_workers, collate_fn=collate)
    frames = []
    for images, _, metas in tqdm(loader, desc=f"fold {fold}", leave=False, disable=None if cfg.train.progress else True):
        with precision.autocast():
            per_image = predict_views(model, precision.images(images), views, cfg.predict.batch_size)
        for detections, meta in zip(per_image, metas):
            for view, det in detections.items():
                frames.append(to_table(det, meta, size, cfg.run, fold, view))
    frames = [f for f in frames if len(f)]
    return normalise_predictions(pd.concat(frames, ignore_index=True)) if frames else empty_predictions()


def fuse_views(preds: pd.DataFrame, sizes: pd.DataFrame, cfg: ExperimentConfig, views: list[str]) -> pd.DataFrame:
    """One model's TTA views fused with WBF, per fold (a fold's views are the sets)."""
    out = []
    for fold, part in preds.groupby("fold"):
        fused = fuse_predictions(part, sizes, group_col="tta", sets=views, iou_thr=cfg.predict.tta_iou_thr,
                                 skip_box_thr=cfg.predict.tta_skip_box_thr, conf_type=cfg.predict.tta_conf_type,
                                 model_name=cfg.run)
        out.append(fused.assign(fold=fold))
    return normalise_predictions(pd.concat(out, ignore_index=True)) if out else empty_predictions()


def run(cfg: ExperimentConfig, split: str, views: list[str], fold_list: list[int] | None = None) -> Path:
    device = dist.init_from_env(cfg.train.device)
    precision = resolve_precision(cfg.train, device)
    train_table = load_dataset(cfg.data, "train")
    folds = read_folds(cfg.folds_path)
    fold_list = fold_list if fold_list is not None else sorted(folds.fold.unique())
    table = train_table if split == "oof" else load_dataset(cfg.data, "test")
    frames = []
    for fold in fold_list:
        t0 = time.perf_counter()
        model = load_fold_model(cfg, fold, len(train_table.classes), device)
        check_views(model, views, cfg.model.image_size)
        ids = folds.image_id[folds.fold == fold] if split == "oof" else table.images.image_id
        preds = predict_images(model, make_records(table, ids), cfg, views, fold, precision)
        frames.append(preds)
        print(f"fold {fold}: {len(ids)} images x {len(views)} views -> {len(preds)} boxes "
              f"in {time.perf_counter() - t0:.1f} s")
    preds = normalise_predictions(pd.concat(frames, ignore_index=True)) if frames else empty_predictions()
    path = write_predictions(preds, predictions_path(cfg, split))
    print(f"wrote {path}")
    scores = report_oof(cfg, train_table, folds[folds.fold.isin(fold_list)], preds, views) if split == "oof" else {}
    if cfg.tracking.enabled:
        log_prediction(cfg, split=split, tta_views=views, files=[path], n_images=preds.image_id.nunique(),
                       n_boxes=len(preds), score=scores.get("tta_wbf", scores.get(views[0])),
                       extra={f"oof_{k}": v for k, v in scores.items()})
    return path


def report_oof(cfg, table, folds: pd.DataFrame, preds: pd.DataFrame, views: list[str]) -> dict[str, float]:
    """Pooled OOF score of each view alone and of the views fused: does TTA help this model?"""
    scorer = Scorer(cfg.metric, table, folds.image_id.tolist())
    scores = {view: scorer(preds[preds.tta == view]).score for view in views}
    if len(views) > 1:
        scores["tta_wbf"] = scorer(fuse_views(preds, table.images, cfg, views)).score
    for name, value in scores.items():
        print(f"OOF {cfg.metric} {name:>12}: {value:.4f}")
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict OOF or test images with every fold model and TTA views.")
    add_config_args(parser)
    parser.add_argument("--split", choices=["oof", "test"], required=True)
    parser.add_argument("--tta", default=None, help="comma-separated views (default: predict.tta from the config)")
    parser.add_argument("--folds", default=None, help="comma-separated folds (default: all)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        views = args.tta.split(",") if args.tta else list(cfg.predict.tta)
        fold_list = [int(f) for f in args.folds.split(",")] if args.folds else None
        run(cfg, args.split, views, fold_list)
    except (ConfigError, DataError, FoldsError, PredictError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
