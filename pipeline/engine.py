"""The training step and evaluation, in the style of torchvision's references/detection engine.py.

``train_one_epoch`` runs one epoch and returns its stats; ``predict`` turns a loader into a prediction table in
original-image pixels; ``evaluate`` scores that table with the competition metric. ``load_fold_model`` and
``predict_with_views`` are what every stage that runs a trained fold model shares (prediction, and any later
stage that explains or re-runs a fold's model).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import checkpoint, distributed as dist
from pipeline.config import ExperimentConfig, InputSize, ModelConfig, TrainConfig, input_wh
from pipeline.dataset import EvalDataset, collate
from pipeline.layout import BEST_CHECKPOINT, PREDICTION_COLUMNS, empty_predictions, fold_dir, normalise_predictions
from pipeline.models import Detector, create_model
from pipeline.tta import predict_views

if TYPE_CHECKING:
    from pipeline.data.cache import ImageCache


class NonFiniteLossError(RuntimeError):
    pass


class MissingCheckpointError(RuntimeError):
    """A fold model asked for before it was trained; the message says which command makes it."""


@dataclass
class Precision:
    """How tensors meet the device: autocast dtype (None: fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float().div_(255.0)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    cuda = device.type == "cuda"
    if cfg.amp == "off" or (cfg.amp == "auto" and not cuda):
        amp = None
    elif cfg.amp == "fp16":
        amp = torch.float16
    elif cfg.amp == "bf16" or (cuda and torch.cuda.is_bf16_supported()):
        amp = torch.bfloat16
    else:
        amp = torch.float16
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    return Precision(device, amp, channels_last)


def compile_options(cfg: TrainConfig) -> dict[str, str]:
    """``torch.compile``'s arguments for ``train.compile`` (none when off): the backend, and the mode unless it is
    torch's default."""
    if not cfg.compile:
        return {}
    mode = cfg.compile if isinstance(cfg.compile, str) and cfg.compile != "default" else None
    return {"backend": cfg.compile_backend} | ({"mode": mode} if mode else {})


def compile_network(model: Detector, cfg: TrainConfig) -> list[str]:
    """``train.compile``: ``torch.compile`` the parts of ``model`` its family names (``compiled_parts``: the network
    without its loss and post-processing), in place (``nn.Module.compile``), so the state_dict keeps its keys and a
    checkpoint loads into a model that was never compiled. Returns the parts compiled (none when off)."""
    options = compile_options(cfg)
    if not options:
        return []
    parts = list(model.compiled_parts)
    if not parts:
        raise ValueError(f"train.compile: {type(model).__name__} names no part to compile (compiled_parts)")
    for path in parts:
        model.get_submodule(path).compile(**options)
    return parts


def eager_network():
    """A context in which a network compiled by ``train.compile`` runs eagerly: the compile is for the training
    steps; validating or writing the OOF with it would compile the eval graph, and again for the last batch's size
    (minutes on a GPU for one pass). ``torch.compiler.set_stance`` came with torch 2.6; before it, no-op."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class LossModule(nn.Module):
    """``forward`` = the detector's losses, so DistributedDataParallel can wrap it and sync gradients."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        return self.detector.forward_loss(images, targets)


# Steps between reads of the losses on the host. Reading a loss waits for the device to finish every step queued
# so far; read each step, the host then launches the next forward into an idle GPU instead of queueing it behind the
# current backward, which costs a small network most (EfficientDet-Lite0 at batch 32 ran 0.88x its bare loop, D0
# 1.00x, 2026-11-30 H200). A non-finite loss is still found and named by its step, at most this many steps later,
# before any checkpoint is written.
LOSS_READ_EVERY = 25


class LossesRead:
    """An epoch's step losses, kept on the device and read on the host a window of steps at a time (one wait for
    the device a window, :data:`LOSS_READ_EVERY`): their sums for the epoch's means, and the first non-finite total
    loss raised as :class:`NonFiniteLossError` with its epoch, step and global step."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.names, self.sums, self.steps = epoch, [], [], 0
        self._pending: list[tuple[torch.Tensor, int, int]] = []  # (the step's losses stacked, step, global step)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, losses: dict[str, torch.Tensor], step: int, global_step: int) -> None:
        if not self.names:
            self.names, self.sums = list(losses), [0.0] * len(losses)
        self._pending.append((torch.stack([losses[k].detach().float() for k in self.names]), step, global_step))

    def read(self) -> float:
        """Reads the pending steps (raising at a non-finite loss); returns the epoch's mean loss so far."""
        if self._pending:
            values = torch.stack([v for v, _, _ in self._pending]).cpu().numpy()
            total = self.names.index("loss")
            for row, (_, step, global_step) in zip(values, self._pending):
                if not np.isfinite(row[total]):
                    raise NonFiniteLossError(
                        f"loss is {float(row[total])} at epoch {self.epoch}, step {step} (global step {global_step}): "
                        f"{ {k: round(float(v), 4) for k, v in zip(self.names, row)} }; the best checkpoint is "
                        "untouched. Try a lower train.lr, train.amp=off, or check the boxes of this batch.")
                for c, value in enumerate(row):  # in step order, as floats: the sums of one step at a time
                    self.sums[c] += float(value)
            self.steps += len(self._pending)
            self._pending = []
        return self.sums[self.names.index("loss")] / max(self.steps, 1) if self.names else 0.0

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(self.steps, 1) for k, v in zip(self.names, self.sums)}


def train_one_epoch(
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema,
    loader: Iterable,
    precision: Precision,
    cfg: TrainConfig,
    epoch: int,
    global_step: int,
    on_step: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], int]:
    """One epoch; returns mean losses, lr and throughput, and the new global optimizer step."""
    loss_module.train()
    losses_read = LossesRead(epoch)
    n_images, start, first_step_s = 0, time.perf_counter(), 0.0
    steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch * cfg.grad_accum)
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}", leave=False, disable=None if cfg.progress and dist.is_main() else True)  # None: off when not a terminal
    optimizer.zero_grad(set_to_none=True)
    try:
        for i, (images, targets, _) in enumerate(bar):
            if i >= steps:
                break
            images = precision.images(images)
            targets = [{k: v.to(precision.device) for k, v in t.items()} for t in targets]
            accumulate = (i + 1) % cfg.grad_accum != 0 and i + 1 < steps
            sync = contextlib.nullcontext() if not accumulate or not hasattr(loss_module, "no_sync") else loss_module.no_sync()
            with sync:
                with precision.autocast():
                    losses = loss_module(images, targets)
                losses_read.add(losses, i, global_step)
                scaler.scale(losses["loss"] / cfg.grad_accum).backward()
            if not accumulate:
                if cfg.clip_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(loss_module.parameters(), cfg.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                if ema is not None:
                    ema.update(unwrap(loss_module).detector, step=global_step)
                if on_step is not None:
                    on_step(global_step)
            n_images += images.shape[0]
            if i == 0 and cfg.compile:  # a compiled network's first step compiles it (again for a new shape or mode)
                losses_read.read()  # waits for the step: the timing holds
                first_step_s = time.perf_counter() - start
            if losses_read.pending >= LOSS_READ_EVERY:
                bar.set_postfix(loss=f"{losses_read.read():.3f}")
    except NonFiniteLossError:
        raise
    except Exception:
        losses_read.read()  # a non-finite loss in the steps before a failure is what to name: it raises first
        raise
    losses_read.read()
    elapsed = time.perf_counter() - start
    stats = losses_read.means()
    stats.update(lr=optimizer.param_groups[0]["lr"], train_images_per_s=n_images * dist.world_size() / elapsed)
    if cfg.compile and losses_read.steps:
        stats["first_step_s"] = first_step_s
    return stats, global_step


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module


@torch.no_grad()
def predict(detector: nn.Module, loader: Iterable, precision: Precision, size: InputSize,
            model_name: str = "", fold: int = -1, tta: str = "none", progress: bool = False) -> pd.DataFrame:
    """Prediction table (original-image pixels) for every image of ``loader`` (inputs of ``size``: a side or
    (width, height)); resize is inverted per axis."""
    detector.eval()
    frames = []
    with eager_network():
        for images, _, metas in tqdm(loader, desc="predict", leave=False, disable=None if progress else True):
            with precision.autocast():
                outputs = detector.predict(precision.images(images))
            frames.append(detections_table([(out, meta, tta) for out, meta in zip(outputs, metas)], size,
                                           model_name, fold))
    frames = [f for f in frames if len(f)]
    return normalise_predictions(pd.concat(frames, ignore_index=True)) if frames else empty_predictions()


def to_table(out: dict, meta: dict, size: InputSize, model_name: str, fold: int, tta: str) -> pd.DataFrame:
    """One image's detections (input pixels of an input of ``size``: a side or (width, height)) as prediction rows
    in original pixels."""
    return detections_table([(out, meta, tta)], size, model_name, fold)


def detections_table(found: list[tuple[dict, dict, str]], size: InputSize, model_name: str,
                     fold: int) -> pd.DataFrame:
    """Prediction rows in original pixels for many ``(detections, meta, view)`` at once, in their order: the rows
    :func:`to_table` gives each, concatenated, number for number. One copy to the host per field and one table for
    a whole loader batch: a table per image and view took 25x the host time (benchmarks/prediction_table.py), time
    in which the GPU waits."""
    if not found:
        return pd.DataFrame({c: [] for c in PREDICTION_COLUMNS})
    counts = np.array([d["boxes"].reshape(-1, 4).shape[0] for d, _, _ in found], dtype=np.int64)
    boxes = torch.cat([d["boxes"].detach().float().reshape(-1, 4) for d, _, _ in found]).cpu().numpy()
    scores = torch.cat([d["scores"].detach().float().reshape(-1) for d, _, _ in found]).cpu().numpy()
    labels = torch.cat([d["labels"].detach().reshape(-1).long() for d, _, _ in found]).cpu().numpy()
    metas = [m for _, m, _ in found]
    boxes, keep = input_to_original(boxes, {
        key: np.repeat(np.array([m.get(key, default) for m in metas], dtype=np.float64), counts)[:, None]
        for key, default in (("width", 0), ("height", 0), ("content_width", input_wh(size)[0]),
                             ("content_height", input_wh(size)[1]))}, size)
    return pd.DataFrame({
        "image_id": np.repeat(np.array([m["image_id"] for m in metas], dtype=object), counts)[keep],
        "x1": boxes[keep, 0], "y1": boxes[keep, 1], "x2": boxes[keep, 2], "y2": boxes[keep, 3],
        "score": scores[keep], "label": labels[keep], "model": model_name, "fold": fold,
        "tta": np.repeat(np.array([v for _, _, v in found], dtype=object), counts)[keep],
    })[PREDICTION_COLUMNS]


def input_to_original(boxes: np.ndarray, meta: dict, size: InputSize) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) from input pixels to original pixels, and which of them to keep.

    The image fills the top-left ``content_width`` x ``content_height`` of the input (the meta's, default the whole
    input of ``size``, a side or (width, height): a square resize; less along one axis for a letterbox, whose rest
    is padding). Boxes are clipped to the content, then scaled per axis by original / content, the exact inverse of
    the resize. A box that lies in the padding is clipped to zero width or height and not kept: padding never
    produces a box."""
    width, height = input_wh(size)
    # scalars for one image, or (N, 1) columns of each row's own (detections_table): the same operations either way
    cw, ch = meta.get("content_width", width), meta.get("content_height", height)
    out = boxes.astype(np.float64, copy=True)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, cw) * (meta["width"] / cw)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, ch) * (meta["height"] / ch)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, keep


def load_model_checkpoint(path: str | Path, model_cfg: ModelConfig, num_classes: int,
                          device: torch.device) -> Detector:
    """The weights of the checkpoint at ``path`` (its ``model`` entry: a fold's ``best.pt``, or a bundle's weights
    file, fp32 or fp16) in the architecture ``model_cfg`` describes, in eval mode on ``device``."""
    # The checkpoint holds every weight: build the bare architecture, never touch a hub or a backbone file.
    bare = model_cfg.model_copy(update={"pretrained": False, "backbone_weights": None, "init_checkpoint": None})
    model = create_model(bare, num_classes)
    model.load_state_dict(checkpoint.load(path)["model"])  # fp16 tensors are cast into the fp32 parameters
    return model.to(device).eval()


def load_fold_model(cfg: ExperimentConfig, fold: int, num_classes: int, device: torch.device) -> Detector:
    """Fold ``fold``'s best checkpoint in eval mode on ``device``."""
    path = fold_dir(cfg, fold) / BEST_CHECKPOINT
    if not path.exists():
        raise MissingCheckpointError(f"{path} not found: train fold {fold} first "
                                     f"(python -m pipeline.train --config ... --fold {fold})")
    return load_model_checkpoint(path, cfg.model, num_classes, device)


def predict_with_views(model: Detector, records: list, cfg: ExperimentConfig, views: list[str], fold: int,
                       precision: Precision, cache: ImageCache | None = None) -> pd.DataFrame:
    """Prediction table for ``records`` under every TTA view (original-image pixels, one ``tta`` value per view).
    ``cache``: pre-resized inputs of the records' images (``EvalDataset``: bit-identical to reading the files)."""
    size = cfg.model.image_size
    loader = DataLoader(EvalDataset(records, size, cfg.model.resize, cache), batch_size=cfg.predict.batch_size,
                        num_workers=cfg.train.num_workers, collate_fn=collate)
    frames = []
    for images, _, metas in tqdm(loader, desc=f"fold {fold}", leave=False, disable=None if cfg.train.progress else True):
        with precision.autocast():
            per_image = predict_views(model, precision.images(images), views, cfg.predict.batch_size)
        frames.append(detections_table([(det, meta, view) for detections, meta in zip(per_image, metas)
                                        for view, det in detections.items()], size, cfg.run, fold))
    frames = [f for f in frames if len(f)]
    return normalise_predictions(pd.concat(frames, ignore_index=True)) if frames else empty_predictions()
