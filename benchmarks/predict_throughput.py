"""Prediction throughput per model family and per number of TTA views, through the predict stage's own code.

For each family (``--families``; each found by its ``model.name`` among ``--config-dir``'s YAML files, by default
configs/demo) and each view set (``--views``, repeatable; default 1, 4 and 6 views), prints one markdown row:
family, input side, views, images/s, seconds per image, output rows per image and peak memory (CUDA: the peak
allocated by torch; CPU: the process's peak resident set, reset before each row through /proc/self/clear_refs).

What is timed is the body of ``pipeline.engine.predict_with_views`` for one loader batch: ``precision.images`` (uint8
to float on the device), ``predict_views`` under ``precision.autocast()`` (the views batched, ``predict.batch_size``
(image, view) pairs per model call, every box mapped back through its view's inverse), then ``to_table`` per
(image, view) and one ``normalise_predictions``: the prediction table the stage writes. Only the DataLoader is left
out: the images are synthetic uint8 batches made in memory at the input side (no disk, no decode, no resize;
``benchmarks/train_throughput.py --predict-views`` times the stage path with its loader). One warm-up batch per row
is run first and not counted (first calls: allocator, oneDNN/cuDNN choices, effdet's anchors per side).

Models are built as the configs say, at ``--size`` (default 384; families in ``--own-size``, default SSDlite, keep
their config's side because their default boxes are fractions of the side they were built for), with the offline
Lite0 backbone weights where the config names them (``--weights config``) or random init (``--weights random``);
nothing is downloaded. Heads are untrained either way, so detections per image are whatever the random head gives
above ``model.score_threshold``, capped by ``model.max_detections`` (the rows/img column shows it). A view set a
family refuses (SSDlite takes no scale views) gets a row that says so instead of a figure.

    # CPU, a quick look (2 families, 8 images each)
    python benchmarks/predict_throughput.py --images 8 --families fasterrcnn_timm,fcos_timm --threads 2
    # the whole grid on a GPU, bf16 autocast and channels_last as train.amp/channels_last=auto pick on CUDA
    python benchmarks/predict_throughput.py --device cuda --images 256 --batch 32
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline import checkpoint  # noqa: E402
from pipeline.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from pipeline.engine import Precision, resolve_precision, to_table  # noqa: E402
from pipeline.layout import empty_predictions, normalise_predictions  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.tta import check_views, predict_views  # noqa: E402
from train_throughput import device_name, pick_device, sync  # noqa: E402  (this folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FAMILIES = "fasterrcnn_timm,efficientdet,retinanet_timm,fcos_timm,ssdlite_timm"
DEFAULT_VIEWS = ["none", "none,hflip,vflip,rot90_2", "none,hflip,vflip,rot90_2,scale0.75,scale1.25"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=DEFAULT_FAMILIES, help="comma-separated model.name values")
    ap.add_argument("--config-dir", type=Path, default=REPO / "configs" / "demo",
                    help="where each family's config is found (the first *.yaml whose model.name is the family)")
    ap.add_argument("--size", type=int, default=384,
                    help="input side (model.image_size) of every family but those in --own-size")
    ap.add_argument("--own-size", default="ssdlite_timm",
                    help="comma-separated families that keep their config's image_size")
    ap.add_argument("--views", action="append", default=[], metavar="VIEWS",
                    help="comma-separated TTA views of one row (repeat for more; default: "
                         + " | ".join(DEFAULT_VIEWS) + ")")
    ap.add_argument("--images", type=int, default=32, help="timed images per row (after one warm-up batch)")
    ap.add_argument("--batch", type=int, help="predict.batch_size: images per loader batch and (image, view) pairs "
                                               "per model call (default: the family config's)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], help="train.amp (default: the config's, auto)")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], help="train.channels_last (default: config's)")
    ap.add_argument("--weights", choices=["config", "random"], default="config",
                    help="config: the config's offline backbone weights (Lite0); random: none at all")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override applied to every family")
    args = ap.parse_args(argv)
    if args.images < 1:
        ap.error("--images must be >= 1")
    return args


def find_configs(config_dir: Path) -> dict[str, Path]:
    """model.name -> the first config file (sorted) of ``config_dir`` that builds it."""
    found: dict[str, Path] = {}
    for path in sorted(config_dir.glob("*.yaml")):
        try:
            cfg = load_config(path)
        except ConfigError:  # base.yaml, ensemble.yaml: not a model config on their own
            continue
        if "model" in cfg.model_fields_set:
            found.setdefault(cfg.model.name, path)
    return found


def family_config(path: Path, family: str, args: argparse.Namespace) -> ExperimentConfig:
    overrides = [] if family in args.own_size.split(",") else [f"model.image_size={args.size}"]
    if args.weights == "random":
        overrides += ["model.backbone_weights=null", "model.pretrained=false"]
    if args.batch:
        overrides.append(f"predict.batch_size={args.batch}")
    if args.amp:  # quoted: YAML 1.1 reads a bare on/off as a boolean
        overrides.append(f"train.amp='{args.amp}'")
    if args.channels_last:
        overrides.append(f"train.channels_last='{args.channels_last}'")
    return load_config(path, overrides + list(args.overrides))


class PeakMemory:
    """Peak memory over a stretch of code: torch's peak allocation on CUDA; on CPU the process's peak resident
    set (VmHWM), which Linux resets when "5" is written to /proc/self/clear_refs. Where that fails the figure is
    the peak since the process started, and says so."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.since_start = device, False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            self.since_start = True

    def read(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB CUDA"
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                kib = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
        except (OSError, AttributeError):
            return "—"
        return f"{kib / 2**20:.2f} GiB RSS" + (" (process peak)" if self.since_start else "")


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, 3, S, S) uint8 on the CPU, as the loader yields them
    metas: list[dict]  # what EvalDataset writes for a square S x S original: id, width, height


def make_batches(n_images: int, batch_size: int, side: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n_images, batch_size):
        count = min(batch_size, n_images - start)
        images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=g)
        batches.append(Batch(images, [{"image_id": f"img{start + i}", "width": side, "height": side}
                                      for i in range(count)]))
    return batches


def predict_batch(model: torch.nn.Module, batch: Batch, cfg: ExperimentConfig, views: list[str],
                  precision: Precision) -> list[pd.DataFrame]:
    """One loader batch through the loop body of pipeline.engine.predict_with_views: its table frames."""
    with precision.autocast():
        per_image = predict_views(model, precision.images(batch.images), views, cfg.predict.batch_size)
    frames = []
    for detections, meta in zip(per_image, batch.metas):
        for view, det in detections.items():
            frames.append(to_table(det, meta, cfg.model.image_size, cfg.run, 0, view))
    return frames


def time_views(model: torch.nn.Module, cfg: ExperimentConfig, views: list[str], precision: Precision,
               batches: list[Batch], memory: PeakMemory) -> tuple[float, float, str]:
    """Seconds for ``batches`` (after one untimed warm-up batch), output rows per image, and peak memory."""
    predict_batch(model, batches[0], cfg, views, precision)  # warm-up, not counted
    sync(precision.device)
    memory.reset()
    t0 = time.perf_counter()
    frames = [f for batch in batches for f in predict_batch(model, batch, cfg, views, precision)]
    table = normalise_predictions(pd.concat(frames, ignore_index=True)) if any(len(f) for f in frames) \
        else empty_predictions()
    sync(precision.device)
    seconds = time.perf_counter() - t0
    n_images = sum(len(b.metas) for b in batches)
    return seconds, len(table) / n_images, memory.read()


def family_rows(family: str, path: Path, args: argparse.Namespace, device: torch.device,
                view_sets: list[list[str]]) -> Iterator[list[str]]:
    """One table row per view set: family, side, batch, views, images/s, s per image, rows/img, peak memory; a
    view set the model refuses gets "refused" and the reason in the last cell."""
    cfg = family_config(path, family, args)
    precision = resolve_precision(cfg.train, device)
    checkpoint.seed_everything(cfg.train.seed)
    n_classes = len(cfg.data.classes) if cfg.data.classes else 1
    model = create_model(cfg.model, n_classes).to(device).eval()
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    side, batch_size = cfg.model.image_size, cfg.predict.batch_size
    batches = make_batches(args.images, batch_size, side)
    memory = PeakMemory(device)
    for views in view_sets:
        head = [family, str(side), str(batch_size), f"{len(views)}: {', '.join(views)}"]
        try:
            check_views(model, views, side)
        except ValueError as exc:
            reason = str(exc).split(";")[0]  # the view, the side it gives and the rule the model states
            yield head + ["refused", "—", "—", reason if len(reason) <= 150 else reason[:149] + "…"]
            continue
        seconds, rows_per_image, peak = time_views(model, cfg, views, precision, batches, memory)
        yield head + [f"{args.images / seconds:.2f}", f"{seconds / args.images:.3f}", f"{rows_per_image:.0f}", peak]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    view_sets = [v.split(",") for v in (args.views or DEFAULT_VIEWS)]
    configs = find_configs(args.config_dir)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    missing = [f for f in families if f not in configs]
    if missing:
        raise SystemExit(f"error: no config in {args.config_dir} builds {missing}; found: {', '.join(sorted(configs))}")
    load = os.getloadavg()
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| setting | value |\n|---|---|")
    for key, value in [
        ("date", date.today().isoformat()), ("device", device_name(device)), ("torch", torch.__version__),
        ("torch threads", torch.get_num_threads()), ("load average at start (1/5/15 min)", "%.2f / %.2f / %.2f" % load),
        ("timed images per row", f"{args.images} (+ one warm-up batch)"), ("weights", args.weights),
        ("configs", ", ".join(f"{f}: {configs[f].name}" for f in families)),
    ]:
        print(f"| {key} | {value} |")
    print("\n| family | size | batch | views | images/s | s per image | rows/img | peak memory |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for family in families:
        for row in family_rows(family, configs[family], args, device, view_sets):
            print("| " + " | ".join(row) + " |", flush=True)  # as measured: a stopped run keeps its rows
    print(f"\nload average at end (1/5/15 min): {'%.2f / %.2f / %.2f' % os.getloadavg()}; precision: train.amp / "
          f"train.channels_last = {args.amp or 'config'} / {args.channels_last or 'config'} (auto: fp32 NCHW on CPU)")


if __name__ == "__main__":
    main()
