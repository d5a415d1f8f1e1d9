"""Stage 2: train one model on all folds but K, validate on fold K.

    python -m pipeline.train --config configs/demo/frcnn.yaml --fold 0 [--resume] [--set train.epochs=3]
    python -m pipeline.train --config configs/demo/frcnn.yaml --fold all      # every fold, then the pooled OOF score
    torchrun --nproc_per_node 4 -m pipeline.train --config ... --fold 0       # DDP

Writes ``runs/<experiment>/<run>/fold<K>/``: config.yaml (resolved), last.pt, best.pt, metrics.jsonl (one JSON
line per epoch), oof.parquet (the best checkpoint's predictions on fold K, original-image pixels).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import checkpoint, distributed as dist
from pipeline.config import ConfigError, ExperimentConfig, add_config_args, load_config
from pipeline.data import DataError, load_dataset
from pipeline.data.table import AnnotationTable
from pipeline.dataset import EvalDataset, TrainDataset, collate, make_records
from pipeline.engine import LossModule, NonFiniteLossError, Precision, evaluate, predict, resolve_precision, train_one_epoch
from pipeline.folds import FoldsError, read_folds
from pipeline.io import atomic_write_text
from pipeline.models import create_model
from pipeline.predictions import read_predictions, write_predictions
from pipeline.tracking import log_train_result, plot_training_curves, train_run

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    pass


def fold_dir(cfg: ExperimentConfig, fold: int) -> Path:
    return cfg.run_dir / f"fold{fold}"


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-d tensors), as every modern detector recipe does.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine down to ``min_lr_ratio`` x lr, per optimizer step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_loaders(cfg: ExperimentConfig, table: AnnotationTable, train_ids, val_ids):
    size = cfg.model.image_size
    train_ds = TrainDataset(make_records(table, train_ids), size, cfg.augment, cfg.train.seed)
    # DistributedSampler also on one process: its shuffle is a function of (seed, epoch), which resume relies on.
    sampler = DistributedSampler(train_ds, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    workers = cfg.train.num_workers
    train_loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
                              collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True)
    val_records = make_records(table, val_ids)[dist.rank()::dist.world_size()]
    val_loader = DataLoader(EvalDataset(val_records, size), batch_size=cfg.predict.batch_size,
                            num_workers=workers, collate_fn=collate)
    return train_ds, sampler, train_loader, val_loader


def validate(model, val_loader, precision: Precision, cfg: ExperimentConfig, table, val_ids, fold: int):
    """Predictions of every rank's shard gathered; the score computed once, on every rank alike."""
    preds = predict(model, val_loader, precision, cfg.model.image_size, cfg.run, fold)
    preds = pd.concat(dist.gather_objects(preds), ignore_index=True)
    return preds, evaluate(cfg.metric, table, preds, val_ids)


# The sections that decide the trained weights; prediction, ensemble, submission and tracking settings may change
# between a run and its resume.
TRAINING_SECTIONS = ("metric", "data", "folds", "model", "augment", "train")


def config_fingerprint(cfg: ExperimentConfig) -> dict:
    """What must match between a run and its resume (epochs may grow; workers and progress bars may change)."""
    d = cfg.model_dump(mode="json")
    for key in ("epochs", "num_workers", "progress"):
        d["train"].pop(key)
    return {k: d[k] for k in TRAINING_SECTIONS}


def same_training(saved: dict, cfg: ExperimentConfig) -> bool:
    current = config_fingerprint(cfg)
    return {k: saved.get(k) for k in current} == current


def train_fold(cfg: ExperimentConfig, table: AnnotationTable, folds: pd.DataFrame, fold: int,
               resume: bool = False) -> dict:
    out = fold_dir(cfg, fold)
    device = dist.init_from_env(cfg.train.device)
    precision = resolve_precision(cfg.train, device)
    val_ids = folds.image_id[folds.fold == fold].tolist()
    train_ids = folds.image_id[folds.fold != fold].tolist()
    if not val_ids:
        raise TrainError(f"fold {fold} is not in the folds file (folds: {sorted(folds.fold.unique())})")

    last_path = out / "last.pt"
    state = None
    if last_path.exists():
        if not resume:
            raise TrainError(f"{out} already holds a run: pass --resume to continue it, or delete the folder")
        state = checkpoint.load(last_path)
        if not same_training(state["config"], cfg):
            raise TrainError(f"{out}: the config differs from the run being resumed; use another `run:` name")
        finished = state["epoch"] + 1 >= cfg.train.epochs or state["stopped"]
        if finished and (out / "oof.parquet").exists() and "summary" in state:
            print(f"fold {fold}: already trained ({state['epoch'] + 1} epochs), OOF written; nothing to do")
            return state["summary"]
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", cfg.to_yaml())

    checkpoint.seed_everything(cfg.train.seed)
    model = create_model(cfg.model, num_classes=len(table.classes)).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_ds, sampler, train_loader, val_loader = make_loaders(cfg, table, train_ids, val_ids)
    steps_per_epoch = math.ceil(min(len(train_loader), cfg.train.max_steps_per_epoch or 10**9) / cfg.train.grad_accum)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.amp_dtype == torch.float16)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    loss_module = LossModule(model)
    if dist.is_enabled():
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, global_step, best, stale = 0, 0, {"score": -math.inf, "epoch": -1}, 0
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, global_step, best, stale = state["epoch"] + 1, state["global_step"], state["best"], state["stale"]
        checkpoint.set_rng_state(state["rng"])
        if state["stopped"]:  # stopped early, killed before its OOF was written: go straight to the OOF
            start_epoch = cfg.train.epochs
        print(f"fold {fold}: resuming after epoch {state['epoch']} (global step {global_step})")

    kill_at = int(os.environ.get("PIPELINE_TEST_KILL_AT_STEP", "0"))  # tests: die mid-run like a killed job

    def on_step(step: int) -> None:
        if kill_at and step == kill_at:
            os._exit(137)

    # Rank 0 alone logs; a store that is down never stops training (pipeline.tracking falls back to a file).
    logging_here = dist.is_main() and cfg.tracking.enabled
    with (train_run(cfg, fold, fallback_dir=out) if logging_here else contextlib.nullcontext()) as tracker:
        eval_model = ema.module if ema is not None else model
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            stats, global_step = train_one_epoch(loss_module, optimizer, scheduler, scaler, ema, train_loader,
                                                 precision, cfg.train, epoch, global_step, on_step)
            row = {"epoch": epoch, **stats}
            if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
                _, result = validate(eval_model, val_loader, precision, cfg, table, val_ids, fold)
                row.update(val_score=result.score, **{f"val_{k}": v for k, v in result.details.items()})
                if result.score > best["score"]:
                    best, stale = {"score": result.score, "epoch": epoch}, 0
                    if dist.is_main():
                        checkpoint.save({"model": eval_model.state_dict(), "epoch": epoch, "score": result.score,
                                         "metric": cfg.metric, "config": cfg.model_dump(mode="json")}, out / "best.pt")
                else:
                    stale += 1
            row.update(best_score=best["score"], best_epoch=best["epoch"], epoch_time_s=time.perf_counter() - t0)
            stop = cfg.train.patience is not None and stale >= cfg.train.patience
            if dist.is_main():
                checkpoint.save({
                    "model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "global_step": global_step, "best": best,
                    "stale": stale, "rng": checkpoint.rng_state(), "config": config_fingerprint(cfg), "stopped": stop,
                }, last_path)
                if tracker is not None:
                    tracker.log_epoch(row)
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({"fold": fold, **{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}}))
            if stop:
                print(f"fold {fold}: early stop after epoch {epoch} ({stale} validations without improvement)")
                break

        summary = write_oof(cfg, table, val_ids, fold, model, val_loader, precision, best)
        if tracker is not None:
            plot_training_curves(out / "metrics.jsonl", out / "curves.png")
            log_train_result(tracker, best_score=best["score"], best_epoch=best["epoch"],
                             checkpoints={"best": out / "best.pt", "last": last_path}, metrics_jsonl=out / "metrics.jsonl")
        if dist.is_main():
            state = checkpoint.load(last_path)
            state["summary"] = summary
            checkpoint.save(state, last_path)
    dist.barrier()
    return summary


def write_oof(cfg, table, val_ids, fold, model, val_loader, precision, best) -> dict:
    """The best checkpoint predicts fold K: the fold's out-of-fold predictions."""
    out = fold_dir(cfg, fold)
    dist.barrier()
    model.load_state_dict(checkpoint.load(out / "best.pt")["model"])
    preds, result = validate(model, val_loader, precision, cfg, table, val_ids, fold)
    summary = {"fold": fold, "best_epoch": best["epoch"], "oof_score": result.score, "metric": cfg.metric,
               "n_images": len(val_ids), "n_boxes": len(preds)}
    if dist.is_main():
        write_predictions(preds.assign(model=cfg.run, fold=fold, tta="none"), out / "oof.parquet")
        print(json.dumps({"fold": fold, "oof": result.score, **result.details}))
    return summary


def pooled_oof_score(cfg: ExperimentConfig, table: AnnotationTable, folds: pd.DataFrame):
    """Every image scored by the one model that did not train on it."""
    frames = [read_predictions(fold_dir(cfg, f) / "oof.parquet") for f in sorted(folds.fold.unique())]
    return evaluate(cfg.metric, table, pd.concat(frames, ignore_index=True), folds.image_id.tolist())


def run(cfg: ExperimentConfig, fold: str, resume: bool) -> None:
    table = load_dataset(cfg.data, "train")
    folds = read_folds(cfg.folds_path)
    missing = set(folds.image_id) - set(table.images.image_id)
    if missing:
        raise TrainError(f"{cfg.folds_path} names images the dataset lacks, e.g. {sorted(missing)[:3]}")
    fold_list = sorted(folds.fold.unique()) if fold == "all" else [int(fold)]
    for k in fold_list:
        train_fold(cfg, table, folds, int(k), resume)
    if fold == "all" and dist.is_main():
        result = pooled_oof_score(cfg, table, folds)
        print(f"pooled OOF {cfg.metric}: {result.score:.4f} over {len(folds)} images ({len(fold_list)} folds)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one model on one fold (or all folds).")
    add_config_args(parser)
    parser.add_argument("--fold", required=True, help="fold number, or 'all'")
    parser.add_argument("--resume", action="store_true", help="continue a killed or finished run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(load_config(args.config, args.overrides), args.fold, args.resume)
    except (ConfigError, DataError, FoldsError, TrainError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
