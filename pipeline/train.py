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
from typing import Any, Iterator

import pandas as pd
import torch
from timm.utils import ModelEmaV3
from pydantic import BaseModel
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import checkpoint, distributed as dist
from pipeline.config import ConfigError, ExperimentConfig, add_config_args, config_from_args
from pipeline.data import DataError, load_dataset
from pipeline.data.cache import open_cache
from pipeline.data.table import AnnotationTable
from pipeline.dataset import EvalDataset, MultiScaleBatchSampler, TrainDataset, collate, make_records
from pipeline.engine import (LossModule, NonFiniteLossError, Precision, compile_network, compile_options,
                             predict, resolve_precision, train_one_epoch)
from pipeline.io import atomic_write_text
from pipeline.layout import (BEST_CHECKPOINT, CURVES_PNG, EPOCH_LOG, FOLD_OOF, LAST_CHECKPOINT, RESOLVED_CONFIG, FoldsError,
                             fold_dir, folds_path, read_folds, read_predictions, write_predictions)
from pipeline.metrics import MetricResult, Scorer, get_metric, score_at_best_threshold
from pipeline.models import create_model
from pipeline.pseudo_labels import PseudoLabelError, fold_training_set, pseudo_table_hash
from pipeline.tracking import Tracker, model_key, stage_run
from pipeline.visualize import plot_training_curves

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    pass


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
    size, resize = cfg.model.image_size, cfg.model.resize
    cache, cache_line = open_cache(cfg, "train", table.images)  # data.cache_dir unset: (None, "")
    if cache_line and dist.is_main():
        print(cache_line)
    train_ds = TrainDataset(make_records(table, train_ids), size, cfg.augment, cfg.train.seed, resize=resize,
                            cache=cache)
    # DistributedSampler also on one process: its shuffle is a function of (seed, epoch), which resume relies on.
    sampler = DistributedSampler(train_ds, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    workers, pin = cfg.train.num_workers, torch.cuda.is_available()
    if cfg.train.multiscale:  # one side per batch, drawn from (seed, epoch, batch): a resume sees the same sides
        batches = MultiScaleBatchSampler(sampler, cfg.train.batch_size, True, cfg.train.multiscale, cfg.train.seed)
        train_loader = DataLoader(train_ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                  pin_memory=pin)
    else:
        train_loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
                                  collate_fn=collate, pin_memory=pin, drop_last=True)
    val_records = make_records(table, val_ids)[dist.rank()::dist.world_size()]
    val_loader = DataLoader(EvalDataset(val_records, size, resize, cache), batch_size=cfg.predict.batch_size,
                            num_workers=workers, collate_fn=collate)
    return train_ds, sampler, train_loader, val_loader


def validate(model, val_loader, precision: Precision, cfg: ExperimentConfig, table, val_ids, fold: int):
    """Predictions of every rank's shard gathered; the score computed once, on every rank alike. Returns the
    predictions, the score and the confidence threshold it was read at: for a metric where a false positive costs
    score (``Metric.thresholded``: GWD, F2) the best of the ensemble tuner's ``score_thr`` grid, as a submission
    is cut at a tuned threshold (scored with every box, a checkpoint that finds more boxes at low scores would
    lose); 0 -- every box -- for the others."""
    preds = predict(model, val_loader, precision, cfg.model.image_size, cfg.run, fold)
    preds = pd.concat(dist.gather_objects(preds), ignore_index=True)
    return preds, *score_at_best_threshold(Scorer(cfg.metric, table, val_ids), preds, cfg.ensemble.tune.score_thr)


# The sections that decide the trained weights; prediction, ensemble, submission and tracking settings may change
# between a run and its resume.
TRAINING_SECTIONS = ("metric", "data", "folds", "model", "augment", "train")


# Settings inside TRAINING_SECTIONS that are no part of the fingerprint, compared by content or not at all: a
# checkpoint written before they were left out may hold them, and they are dropped from it too.
NOT_FINGERPRINTED = {
    # pseudo: a pseudo-label round counts by its content (the "pseudo" hash), not by its name; compile: a speed
    # setting (the same network, compiled or not)
    "train": ("pseudo", "compile", "compile_backend"),
    # unlabelled: a pseudo-label source only, never read by training; cache_dir: where pre-resized copies of the
    # same images are read from, a speed setting that may come and go between a run and its resume
    "data": ("unlabelled", "cache_dir"),
}


def config_fingerprint(cfg: ExperimentConfig) -> dict:
    """What must match between a run and its resume (epochs may grow; workers, progress bars and the image cache
    may change). A pseudo-label round counts by its content, not by how it is named."""
    d = cfg.model_dump(mode="json")
    for key in ("epochs", "num_workers", "progress"):
        d["train"].pop(key)
    for section, keys in NOT_FINGERPRINTED.items():
        for key in keys:
            d[section].pop(key, None)
    return {k: d[k] for k in TRAINING_SECTIONS} | {"pseudo": pseudo_table_hash(cfg)}  # None without a round


def same_training(saved: dict, cfg: ExperimentConfig) -> bool:
    """``saved`` (a checkpoint's fingerprint) matches ``cfg``. A setting added to the config after the checkpoint
    was written matches when ``cfg`` leaves it at its default: a new release must not orphan older runs."""
    current = config_fingerprint(cfg)
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    saved.setdefault("pseudo", None)
    for section, values in current.items():
        if not isinstance(values, dict) or not isinstance(saved.get(section), dict):
            continue
        for key in NOT_FINGERPRINTED.get(section, ()):
            saved[section].pop(key, None)
        fields = type(getattr(cfg, section)).model_fields
        for key in values.keys() - saved[section].keys():
            if key in fields and values[key] == _as_json(fields[key].get_default(call_default_factory=True)):
                saved[section][key] = values[key]
    return {k: saved.get(k) for k in current} == current


def _as_json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value) if isinstance(value, Path) else value


def resume_state(cfg: ExperimentConfig, out: Path, resume: bool) -> dict | None:
    """The state of the run in ``out`` to continue, or None for a fresh one."""
    last_path = out / LAST_CHECKPOINT
    if not checkpoint.has_checkpoint(last_path):
        return None
    if not resume:
        raise TrainError(f"{out} already holds a run: pass --resume to continue it, or delete the folder")
    # an unreadable last.pt falls back to last.prev.pt, one epoch earlier (said on stderr)
    state = checkpoint.load_for_resume(last_path, repair=dist.is_main())
    if not same_training(state["config"], cfg):
        raise TrainError(f"{out}: the config differs from the run being resumed; use another `run:` name")
    return state


def finished(state: dict, cfg: ExperimentConfig) -> bool:
    return state["epoch"] + 1 >= cfg.train.epochs or state["stopped"]


def restore(state: dict, model, ema, optimizer, scheduler, scaler) -> None:
    """Weights, EMA, optimizer, scheduler, scaler and RNG as they were after the checkpoint's epoch."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])


def train_fold(cfg: ExperimentConfig, table: AnnotationTable, folds: pd.DataFrame, fold: int,
               resume: bool = False) -> dict:
    out = fold_dir(cfg, fold)
    device = dist.init_from_env(cfg.train.device)
    precision = resolve_precision(cfg.train, device)
    table, train_ids, val_ids = fold_training_set(cfg, table, folds, fold)  # + a pseudo-label round's images
    if not val_ids:
        raise TrainError(f"fold {fold} is not in the folds file (folds: {sorted(folds.fold.unique())})")

    last_path = out / LAST_CHECKPOINT
    state = resume_state(cfg, out, resume)
    if state is not None and finished(state, cfg) and (out / FOLD_OOF).exists() and "summary" in state:
        print(f"fold {fold}: already trained ({state['epoch'] + 1} epochs), OOF written; nothing to do")
        return state["summary"]
    epoch_rows: list[dict] = []  # metrics.jsonl's rows, also kept in last.pt: a kill between the two loses none
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stray_temp_files(out)  # half-written temp files of a killed run
        epoch_rows = checkpoint.restore_epoch_log(out / EPOCH_LOG, state)
        atomic_write_text(out / RESOLVED_CONFIG, cfg.to_yaml())

    checkpoint.seed_everything(cfg.train.seed)
    try:
        model = create_model(cfg.model, num_classes=len(table.classes)).to(device)
    except ValueError as exc:  # a size or option the family refuses: the usual one-line error, not a traceback
        raise TrainError(f"{cfg.source}: model {cfg.model.name!r}: {exc}") from exc
    refused = [side for side in cfg.train.multiscale or [] if not model.accepts_size(side)]
    if refused:
        raise TrainError(f"train.multiscale {refused}: {cfg.model.name} takes {model.size_rule}")
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_ds, sampler, train_loader, val_loader = make_loaders(cfg, table, train_ids, val_ids)
    steps_per_epoch = math.ceil(min(len(train_loader), cfg.train.max_steps_per_epoch or 10**9) / cfg.train.grad_accum)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.amp_dtype == torch.float16)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    compiled = compile_network(model, cfg.train)  # after the EMA copy: a copy of a compiled module calls the original
    if compiled and dist.is_main():
        options = compile_options(cfg.train)
        print(f"fold {fold}: torch.compile of {', '.join(compiled)} ({options['backend']}, mode "
              f"{options.get('mode', 'default')}): the first step compiles")
    loss_module = LossModule(model)
    if dist.is_enabled():
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, global_step, best, stale = 0, 0, {"score": get_metric(cfg.metric).worst, "epoch": -1}, 0
    if state is not None:
        restore(state, model, ema, optimizer, scheduler, scaler)
        start_epoch, global_step, best, stale = state["epoch"] + 1, state["global_step"], state["best"], state["stale"]
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
        metric = get_metric(cfg.metric)
        if tracker is not None:  # a resumed run is a new MLflow run: give it the epochs before the kill too
            for previous_row in epoch_rows:
                tracker.log_epoch(previous_row)
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            stats, global_step = train_one_epoch(loss_module, optimizer, scheduler, scaler, ema, train_loader,
                                                 precision, cfg.train, epoch, global_step, on_step)
            row = {"epoch": epoch, **stats}
            if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
                _, result, score_thr = validate(eval_model, val_loader, precision, cfg, table, val_ids, fold)
                row.update(val_score=result.score, **{f"val_{k}": v for k, v in result.details.items()})
                if metric.thresholded:
                    row["val_score_thr"] = score_thr
                if metric.better(result.score, best["score"]):  # in the metric's own direction
                    best, stale = {"score": result.score, "epoch": epoch}, 0
                    if dist.is_main():
                        checkpoint.save({"model": eval_model.state_dict(), "epoch": epoch, "score": result.score,
                                         "metric": cfg.metric, "config": cfg.model_dump(mode="json")},
                                        out / BEST_CHECKPOINT)
                else:
                    stale += 1
            row.update(best_score=best["score"], best_epoch=best["epoch"], epoch_time_s=time.perf_counter() - t0)
            stop = cfg.train.patience is not None and stale >= cfg.train.patience
            if dist.is_main():
                # Order for a kill at any instant: last.pt (holding this row) first, then metrics.jsonl, then
                # MLflow; a resume restores the log from last.pt and re-logs its rows.
                epoch_rows.append(row)
                checkpoint.save({
                    "model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "global_step": global_step, "best": best,
                    "stale": stale, "rng": checkpoint.rng_state(), "config": config_fingerprint(cfg), "stopped": stop,
                    "epoch_rows": epoch_rows,
                }, last_path, keep_previous=True)
                log_epoch(out, fold, row, tracker)
            if stop:
                print(f"fold {fold}: early stop after epoch {epoch} ({stale} validations without improvement)")
                break

        summary = write_oof(cfg, table, val_ids, fold, model, val_loader, precision, best)
        if dist.is_main():
            finish_fold(out, summary, best, tracker)
    dist.barrier()
    return summary


def log_epoch(out: Path, fold: int, row: dict, tracker: Tracker | None) -> None:
    """One epoch's stats: a line of ``metrics.jsonl``, then MLflow when on, and a JSON line on stdout."""
    with open(out / EPOCH_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if tracker is not None:
        tracker.log_epoch(row)
    print(json.dumps({"fold": fold, **{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}}))


def finish_fold(out: Path, summary: dict, best: dict, tracker: Tracker | None) -> None:
    """The curves picture (always), MLflow when on, and the summary kept in ``last.pt`` (what makes a re-run of a
    finished fold a no-op)."""
    with contextlib.suppress(Exception):  # a plot must never fail the fold
        plot_training_curves(out / EPOCH_LOG, out / CURVES_PNG)
    if tracker is not None:
        log_fold_result(tracker, out, best)
    state = checkpoint.load(out / LAST_CHECKPOINT)
    state["summary"] = summary
    checkpoint.save(state, out / LAST_CHECKPOINT, keep_previous=True)


def log_fold_result(tracker: Tracker, out: Path, best: dict) -> None:
    """MLflow, end of a fold: best score and epoch, checkpoint paths as tags (too big to copy), the epoch log and
    the curves picture as artifacts."""
    # at the best epoch's step: the per-epoch rows carry best_score too, and this point must not bend the curve
    tracker.log_metrics({"best_score": best["score"], "best_epoch": best["epoch"]}, step=best["epoch"])
    tracker.set_tags({f"pipeline.checkpoint.{name}": str((out / file).resolve())
                      for name, file in (("best", BEST_CHECKPOINT), ("last", LAST_CHECKPOINT))})
    for artifact in (out / EPOCH_LOG, out / CURVES_PNG):
        if artifact.is_file():
            tracker.log_artifact(artifact)


@contextlib.contextmanager
def train_run(cfg: ExperimentConfig, fold: int, *, fallback_dir: Path | None = None) -> Iterator[Tracker]:
    """MLflow: the run of one training fold, a child of the model's parent run, with the resolved config as
    params (git commit and dirty flag are tagged by the tracker)."""
    with stage_run(cfg, "train", name=f"fold{fold}", parent=model_key(cfg), tags={"pipeline.fold": fold},
                   fallback_dir=fallback_dir) as tracker:
        tracker.log_params(cfg.model_dump(mode="json"))
        yield tracker


def write_oof(cfg, table, val_ids, fold, model, val_loader, precision, best) -> dict:
    """The best checkpoint predicts fold K: the fold's out-of-fold predictions."""
    out = fold_dir(cfg, fold)
    dist.barrier()
    model.load_state_dict(checkpoint.load(out / BEST_CHECKPOINT)["model"])
    preds, result, score_thr = validate(model, val_loader, precision, cfg, table, val_ids, fold)
    at = {"oof_score_thr": score_thr} if get_metric(cfg.metric).thresholded else {}
    summary = {"fold": fold, "best_epoch": best["epoch"], "oof_score": result.score, **at, "metric": cfg.metric,
               "n_images": len(val_ids), "n_boxes": len(preds)}
    if dist.is_main():
        write_predictions(preds.assign(model=cfg.run, fold=fold, tta="none"), out / FOLD_OOF)
        print(json.dumps({"fold": fold, "oof": result.score, **at, **result.details}))
    return summary


def pooled_oof_score(cfg: ExperimentConfig, table: AnnotationTable, folds: pd.DataFrame) -> tuple[MetricResult, float]:
    """Every image scored by the one model that did not train on it; the threshold as :func:`validate` reads it."""
    frames = [read_predictions(fold_dir(cfg, f) / FOLD_OOF) for f in sorted(folds.fold.unique())]
    return score_at_best_threshold(Scorer(cfg.metric, table, folds.image_id.tolist()),
                                   pd.concat(frames, ignore_index=True), cfg.ensemble.tune.score_thr)


def run(cfg: ExperimentConfig, fold: str, resume: bool) -> None:
    table = load_dataset(cfg.data, "train")
    folds = read_folds(folds_path(cfg))
    missing = set(folds.image_id) - set(table.images.image_id)
    if missing:
        raise TrainError(f"{folds_path(cfg)} names images the dataset lacks, e.g. {sorted(missing)[:3]}")
    fold_list = sorted(folds.fold.unique()) if fold == "all" else [int(fold)]
    for k in fold_list:
        train_fold(cfg, table, folds, int(k), resume)
    if fold == "all" and dist.is_main():
        result, score_thr = pooled_oof_score(cfg, table, folds)
        at = f" at score >= {score_thr:g}" if get_metric(cfg.metric).thresholded else ""
        print(f"pooled OOF {cfg.metric}: {result.score:.4f}{at} over {len(folds)} images ({len(fold_list)} folds)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one model on one fold (or all folds).")
    add_config_args(parser, demo="frcnn.yaml")
    parser.add_argument("--fold", required=True, help="fold number, or 'all'")
    parser.add_argument("--resume", action="store_true", help="continue a killed or finished run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(config_from_args(args), args.fold, args.resume)
    except (ConfigError, DataError, FoldsError, TrainError, NonFiniteLossError, checkpoint.CheckpointError,
            PseudoLabelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
