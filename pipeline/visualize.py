"""Pictures a user checks by eye: every plot of the project is drawn here, and only here.

    python -m pipeline.visualize augment --config configs/demo/frcnn.yaml [--n 16] [--out runs/augment.png]
    python -m pipeline.visualize curves runs/demo/frcnn_lite0/fold0/metrics.jsonl
    python -m pipeline.visualize cam --config configs/demo/frcnn.yaml --fold 0 --image ID [--box N | --class NAME]
                                     [--method gradcam|eigencam] [--out PNG]
    python -m pipeline.visualize predictions --config configs/demo/ensemble.yaml [--split test] [--n 16]

``augment`` draws a grid of augmented training samples with their boxes: what the model sees.
``cam`` shows where fold K's model looks for one of its detections (Grad-CAM, :mod:`pipeline.cam`) or overall
(EigenCAM) on an image of fold K's validation set (any other image is refused: that model trained on it).
``predictions`` draws the ensemble's fused test boxes on a spread of test images, a last look before submitting.
``draw_boxes`` / ``grid`` are shared with the ensemble's worst-OOF-images picture; ``plot_training_curves`` draws
a fold's ``curves.png`` (written by training whether or not tracking is on, and logged as an artifact when it is).
A library for the stages (its one command looks at data, it writes nothing another stage reads).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import ConfigError, add_config_args, config_from_args, input_wh
from pipeline.data import DataError, load_dataset, read_image
from pipeline.io import atomic_write
from pipeline.layout import FoldsError, ensemble_dir, folds_path, fused_path, read_folds, read_predictions, run_dir

PALETTE = [(0, 255, 0), (255, 64, 64), (64, 160, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255)]


def draw_boxes(image: np.ndarray, boxes, labels=None, colour=None, width: int = 1, scores=None) -> np.ndarray:
    """Boxes drawn on a copy of ``image`` (H,W,3 uint8); colour per label unless ``colour`` is given."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 4)):
        c = colour if colour is not None else PALETTE[int(labels[i]) % len(PALETTE) if labels is not None else 0]
        draw.rectangle([float(v) for v in box], outline=c, width=width)
        if scores is not None:
            draw.text((float(box[0]) + 1, float(box[1]) + 1), f"{scores[i]:.2f}", fill=c)
    return np.asarray(pil)


def grid(images: list[np.ndarray], columns: int = 4, tile: int = 256) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tile, rows * tile), (32, 32, 32))
    for i, image in enumerate(images):
        pil = Image.fromarray(image)
        pil.thumbnail((tile, tile))
        canvas.paste(pil, ((i % columns) * tile, (i // columns) * tile))
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")
    return Path(path)


def augment_grid(cfg, n: int, out: Path, epoch: int = 0) -> Path:
    from pipeline.dataset import TrainDataset, make_records

    table = load_dataset(cfg.data, "train")
    dataset = TrainDataset(make_records(table, table.images.image_id[:max(n, 4)]), cfg.model.image_size,
                           cfg.augment, cfg.train.seed)
    dataset.set_epoch(epoch)
    tiles = []
    for i in range(n):
        image, target, _ = dataset[i % len(dataset)]
        tiles.append(draw_boxes(image.permute(1, 2, 0).numpy(), target["boxes"].numpy(), target["labels"].numpy()))
    return save_png(grid(tiles, tile=max(input_wh(cfg.model.image_size))), out)


def _epoch_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _curve_points(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Per key, the (epoch, value) points of its finite numbers (text, None, NaN, inf left out)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(rows):
        epoch = row.get("epoch", i + 1)
        x = float(epoch) if isinstance(epoch, (int, float)) else float(i + 1)
        for name, value in row.items():
            if name == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(x)
                ys.append(float(value))
    return series


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """A PNG of the loss curves and the validation-metric curves of one fold's ``metrics.jsonl``.

    Tolerant: missing keys, missing epochs and unreadable lines are skipped; losses are every key with "loss" in
    its name, validation metrics the other ``val_*`` keys (plus ``score`` / ``map*``), lr on its own panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    series = _curve_points(_epoch_rows(Path(metrics_jsonl)) if Path(metrics_jsonl).is_file() else [])
    losses = {k: v for k, v in series.items() if "loss" in k}
    scores = {k: v for k, v in series.items()
              if k not in losses and (k.startswith("val") or "score" in k or k.startswith("map"))}
    if len(scores) > 6:  # the metric's details (val_iou0.50 ...) would bury the headline curve
        scores = {k: v for k, v in scores.items() if k in ("val_score", "best_score")} or scores
    lr = {k: v for k, v in series.items() if k == "lr" or k.startswith("lr_")}
    panels = [("loss", losses), ("validation metric", scores)] + ([("learning rate", lr)] if lr else [])
    fig = Figure(figsize=(5 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, curves) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        if curves:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(Path(metrics_jsonl).parent.name or str(metrics_jsonl), fontsize=10)
    fig.tight_layout()
    with atomic_write(out_png, "wb") as f:  # a viewer never sees half a PNG
        fig.savefig(f, format="png")
    return Path(out_png)


# ------------------------------------------------------------------------------ a detection's heat map

_TITLE_H = 16


def _titled(image: np.ndarray, title: str, tile: int) -> np.ndarray:
    """``image`` scaled into a ``tile`` square under a one-line title band."""
    pil = Image.fromarray(image)
    pil.thumbnail((tile, tile - _TITLE_H))
    canvas = Image.new("RGB", (tile, tile), (0, 0, 0))
    canvas.paste(pil, (0, _TITLE_H))
    ImageDraw.Draw(canvas).text((2, 2), title, fill=(255, 255, 255))
    return np.asarray(canvas)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def check_oof_image(folds, fold: int, image_id: str, source: Path) -> None:
    """Fold ``fold``'s model may explain ``image_id`` only if the image is in that fold's validation set."""
    if fold not in set(folds.fold):
        raise ValueError(f"fold {fold} is not in {source} (its folds: {sorted(set(folds.fold))})")
    where = folds.fold[folds.image_id == image_id]
    if where.empty:
        raise ValueError(f"image {image_id!r} is not in {source}: not a cross-validated training image (a test "
                         "image has no out-of-fold model)")
    if int(where.iloc[0]) != fold:
        raise ValueError(f"image {image_id!r} is in fold {int(where.iloc[0])}'s validation set, so fold {fold}'s "
                         f"model trained on it and its heat map would explain a memorised image: use --fold "
                         f"{int(where.iloc[0])}")


def pick_detection(found: dict, box: int | None, class_name: str | None, classes: list[str]) -> int:
    """Index of the detection to explain: ``box`` (0 = the best), else the best of ``class_name``, else the best."""
    n = len(found["scores"])
    if class_name is not None:
        if class_name not in classes:
            raise ValueError(f"unknown class {class_name!r}; the classes: {', '.join(classes)}")
        of_class = np.flatnonzero(found["labels"] == classes.index(class_name))
        if not len(of_class):
            raise ValueError(f"the model has no detection of class {class_name!r} in this image ({n} detections)")
        return int(of_class[0])  # detections come best first
    index = 0 if box is None else box
    if not 0 <= index < n:
        raise ValueError(f"--box {index}: the model has {n} detections in this image (0 = the best)")
    return index


def cam_png(cfg, fold: int, image_id: str, box: int | None = None, class_name: str | None = None,
            method: str = "gradcam", out: Path | None = None, show_thr: float = 0.3) -> Path:
    """Fold ``fold``'s model explaining one of its detections on its own OOF image ``image_id``: left the image
    with the model's boxes (score >= ``show_thr``, class colours) and the explained one in white, right the heat
    map over the image. Default ``out``: ``runs/<experiment>/<run>/cam/fold<K>_<image>_<method>.png``."""
    from pipeline.cam import CamTarget, cam_device, detections, explain, overlay
    from pipeline.engine import load_fold_model

    table = load_dataset(cfg.data, "train")
    check_oof_image(read_folds(folds_path(cfg)), fold, image_id, folds_path(cfg))
    paths = table.images.set_index("image_id").path
    if image_id not in paths.index:
        raise ValueError(f"image {image_id!r} is in {folds_path(cfg)} but not in the dataset {cfg.data.name}: "
                         "the folds file is stale (python -m pipeline.folds --config ... --force)")
    image = read_image(paths[image_id])
    model = load_fold_model(cfg, fold, len(table.classes), cam_device(cfg.train.device))
    found = detections(model, image, cfg.model.resize)
    target, what = None, "no target"
    if method == "gradcam" or box is not None or class_name is not None:  # eigencam: the box is only marked
        i = pick_detection(found, box, class_name, list(table.classes))
        target = CamTarget(tuple(float(v) for v in found["boxes"][i]), int(found["labels"][i]))
        what = (f"detection #{i}: {table.classes[target.label]} {found['scores'][i]:.2f}"
                + (" (marked, not a target)" if method == "eigencam" else ""))
    heat = explain(model, image, method, target, cfg.model.resize)
    width = max(1, image.shape[1] // 250)
    shown = found["scores"] >= show_thr
    left = draw_boxes(image, found["boxes"][shown], found["labels"][shown], width=width)
    right = overlay(image, heat)
    if target is not None:
        left = draw_boxes(left, np.asarray(target.box), colour=(255, 255, 255), width=2 * width)
        right = draw_boxes(right, np.asarray(target.box), colour=(255, 255, 255), width=2 * width)
    tile = max(image.shape[:2]) + _TITLE_H
    panels = [_titled(left, f"{image_id}: fold {fold} boxes >= {show_thr:.2f}, explained in white", tile),
              _titled(right, f"{method} of {cfg.run} fold {fold}, {what}", tile)]
    out = out or run_dir(cfg) / "cam" / f"fold{fold}_{_safe_name(image_id)}_{method}.png"
    return save_png(grid(panels, columns=2, tile=tile), out)


# ------------------------------------------------------------------- the submission's boxes, by eye

def _class_legend(classes: list[str], width: int, text: str) -> Image.Image:
    legend = Image.new("RGB", (width, 30), (0, 0, 0))
    draw = ImageDraw.Draw(legend)
    x = 4
    for c, name in enumerate(classes):
        draw.rectangle([x, 3, x + 8, 11], fill=PALETTE[c % len(PALETTE)])
        draw.text((x + 12, 1), name, fill=(255, 255, 255))
        x += 24 + 7 * len(name)
    draw.text((4, 16), text, fill=(200, 200, 200))
    return legend


def predictions_png(cfg, split: str = "test", n: int = 16, score_thr: float = 0.3, out: Path | None = None,
                    tile: int = 320) -> Path:
    """``n`` images of ``split`` spread over its sorted ids, with the ensemble's fused boxes (score >=
    ``score_thr``, class colours, scores written); on ``oof`` the ground truth in white beneath.
    Default ``out``: the ensemble folder's ``<split>_predictions.png``."""
    path = fused_path(cfg, split)
    if not cfg.ensemble.members:
        raise ValueError(f"{cfg.source}: not an ensemble config (ensemble.members is empty): pass ensemble.yaml")
    if not path.exists():
        raise ValueError(f"{path} not found: run python -m pipeline.ensemble --config {cfg.source}")
    table = load_dataset(cfg.data, "train" if split == "oof" else "test")
    preds = read_predictions(path)
    preds = preds[preds.score >= score_thr]
    ids = sorted(table.images.image_id)
    if not ids:
        raise ValueError(f"the {split} split of {cfg.data.name} has no images")
    ids = [ids[i] for i in dict.fromkeys(np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int))]
    images, gt = table.images.set_index("image_id"), table.boxes_by_image()
    tiles = []
    for image_id in ids:
        image = read_image(images.loc[image_id, "path"])
        width = max(1, image.shape[1] // 250)
        if split == "oof":
            image = draw_boxes(image, gt[image_id][:, :4], colour=(255, 255, 255), width=width)
        mine = preds[preds.image_id == image_id]
        image = draw_boxes(image, mine[["x1", "y1", "x2", "y2"]].to_numpy(), mine.label.to_numpy(), width=width,
                           scores=mine.score.to_numpy())
        tiles.append(_titled(image, f"{image_id}: {len(mine)} boxes", tile))
    columns = min(4, len(tiles))
    body = grid(tiles, columns=columns, tile=tile)
    canvas = Image.new("RGB", (body.width, 30 + body.height), (32, 32, 32))
    note = f"{cfg.ensemble.name} {split}: fused boxes with score >= {score_thr:.2f}" + (
        ", ground truth in white" if split == "oof" else "")
    canvas.paste(_class_legend(list(table.classes), body.width, note), (0, 0))
    canvas.paste(body, (0, 30))
    return save_png(canvas, out or ensemble_dir(cfg) / f"{split}_predictions.png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pictures of the data and the model's view of it.")
    sub = parser.add_subparsers(dest="command", required=True)
    aug = sub.add_parser("augment", help="a PNG grid of augmented training samples with their boxes")
    add_config_args(aug, demo="frcnn.yaml")
    aug.add_argument("--n", type=int, default=16)
    aug.add_argument("--epoch", type=int, default=0)
    aug.add_argument("--out", type=Path, default=None)
    curves = sub.add_parser("curves", help="plot a fold's metrics.jsonl (training writes curves.png itself)")
    curves.add_argument("metrics_jsonl", type=Path)
    curves.add_argument("--out", type=Path, help="PNG path (default: curves.png next to the file)")
    cam = sub.add_parser("cam", help="a fold model's heat map for one of its detections on its own OOF image")
    add_config_args(cam, demo="frcnn.yaml")
    cam.add_argument("--fold", type=int, required=True)
    cam.add_argument("--image", required=True, help="an image id of that fold's validation set")
    which = cam.add_mutually_exclusive_group()
    which.add_argument("--box", type=int, default=None, help="the model's N-th detection, 0 = the best (default)")
    which.add_argument("--class", dest="class_name", default=None, help="the best detection of this class")
    cam.add_argument("--method", choices=["gradcam", "eigencam"], default="gradcam")
    cam.add_argument("--out", type=Path, default=None)
    preds = sub.add_parser("predictions", help="images with the ensemble's fused boxes: a last look before submitting")
    add_config_args(preds, demo="ensemble.yaml")
    preds.add_argument("--split", choices=["test", "oof"], default="test")
    preds.add_argument("--n", type=int, default=16)
    preds.add_argument("--score-thr", type=float, default=0.3, help="boxes drawn from this score (default 0.3)")
    preds.add_argument("--out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "curves":
        if not args.metrics_jsonl.is_file():
            print(f"error: {args.metrics_jsonl} not found", file=sys.stderr)
            return 1
        out = plot_training_curves(args.metrics_jsonl, args.out or args.metrics_jsonl.with_name("curves.png"))
        print(f"wrote {out}")
        return 0
    errors: tuple[type[Exception], ...] = (ConfigError, DataError, FoldsError, ValueError)
    if args.command == "cam":  # lazy: the other commands need no model code (seconds of imports)
        from pipeline.engine import MissingCheckpointError

        errors += (MissingCheckpointError,)
    try:
        cfg = config_from_args(args)
        if args.command == "cam":
            out = cam_png(cfg, args.fold, args.image, args.box, args.class_name, args.method, args.out)
        elif args.command == "predictions":
            out = predictions_png(cfg, args.split, args.n, args.score_thr, args.out)
        else:
            out = augment_grid(cfg, args.n, args.out or run_dir(cfg) / "augment.png", args.epoch)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
