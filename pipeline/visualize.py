"""Pictures a user checks by eye.

    python -m pipeline.visualize augment --config configs/demo/frcnn.yaml [--n 16] [--out runs/augment.png]

``augment`` draws a grid of augmented training samples with their boxes: what the model sees.
``draw_boxes`` / ``grid`` are shared with the ensemble's worst-OOF-images picture.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import ConfigError, add_config_args, load_config
from pipeline.data import DataError, load_dataset
from pipeline.io import atomic_write

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
    return save_png(grid(tiles, tile=cfg.model.image_size), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pictures of the data and the model's view of it.")
    sub = parser.add_subparsers(dest="command", required=True)
    aug = sub.add_parser("augment", help="a PNG grid of augmented training samples with their boxes")
    add_config_args(aug)
    aug.add_argument("--n", type=int, default=16)
    aug.add_argument("--epoch", type=int, default=0)
    aug.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        out = args.out or cfg.run_dir / "augment.png"
        print(f"wrote {augment_grid(cfg, args.n, out, args.epoch)}")
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
