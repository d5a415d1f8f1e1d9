"""The embedded default dataset: generated, deterministically from a seed, in the Kaggle Global Wheat layout.

``root/train/<id>.jpg`` + ``root/train.csv`` (image_id,width,height,bbox,source,label — GWD's columns plus a
``label`` column because the objects come in several classes), ``root/test/<id>.jpg``,
``root/sample_submission.csv`` and ``root/test_labels.csv`` (the hidden labels of the test images, in the
train.csv format, for local leaderboard scoring).

What makes it a fair small benchmark: several object classes (filled discs, filled squares, rings) on textured
backgrounds, unlabelled distractors, object counts from none (empty images) to crowded, overlap and occlusion,
a 4x range of object scale, and several "sources" with different photometric styles (colour cast, contrast,
blur, noise) so that per-source folds and TTA matter. Small enough for a tiny detector to learn on CPU.

    python -m pipeline.data.synthetic --root data/demo [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from pipeline.config import SyntheticConfig
from pipeline.io import atomic_write_text

# One photometric style per source: background base colour, object palette shift, contrast, blur, noise.
_STYLES = [
    {"bg": (150, 120, 80), "contrast": 1.0, "blur": 0.0, "noise": 6.0},
    {"bg": (60, 70, 95), "contrast": 0.8, "blur": 0.8, "noise": 10.0},
    {"bg": (135, 135, 130), "contrast": 0.55, "blur": 1.2, "noise": 4.0},
    {"bg": (90, 130, 90), "contrast": 0.9, "blur": 0.4, "noise": 8.0},
]
_CLASS_COLOURS = [(235, 60, 50), (60, 200, 235), (245, 225, 70), (200, 90, 230)]
MARKER_FILE = ".synthetic.json"


def _background(rng: np.random.Generator, size: int, style: dict) -> np.ndarray:
    """Base colour + low-frequency blotches + stripes + pixel noise: a texture, not a flat field."""
    coarse = rng.normal(0, 25, (size // 32 + 2, size // 32 + 2, 3)).astype(np.float32)
    blotches = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
        dtype=np.float32,
    ) - 128.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = 10.0 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    img = np.asarray(style["bg"], np.float32) + blotches + stripes[..., None]
    return img


def _draw_object(img: np.ndarray, cls: int, cx: float, cy: float, r: float, colour: np.ndarray) -> None:
    size = img.shape[0]
    x0, x1 = int(max(0, np.floor(cx - r - 1))), int(min(size, np.ceil(cx + r + 1)))
    y0, y1 = int(max(0, np.floor(cy - r - 1))), int(min(size, np.ceil(cy + r + 1)))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    if cls == 0:  # filled disc
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif cls == 1:  # filled square
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    elif cls == 2:  # ring
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    else:  # diamond
        mask = np.abs(xx - cx) + np.abs(yy - cy) <= r
    img[y0:y1, x0:x1][mask] = colour


def _distractor(rng: np.random.Generator, img: np.ndarray) -> None:
    """An unlabelled line segment: texture the detector must learn to ignore."""
    size = img.shape[0]
    p = rng.uniform(0, size, 2)
    d = rng.normal(0, 1, 2)
    d /= np.linalg.norm(d) + 1e-9
    length = rng.uniform(15, 60)
    t = np.linspace(0, length, int(length * 2))
    pts = (p[None, :] + t[:, None] * d[None, :]).astype(int)
    pts = pts[(pts >= 0).all(1) & (pts < size).all(1)]
    img[pts[:, 1], pts[:, 0]] = rng.uniform(30, 230, 3)


def _object_count(rng: np.random.Generator, max_objects: int) -> int:
    kind = rng.choice(4, p=[0.1, 0.3, 0.35, 0.25])  # empty, sparse, medium, crowded
    lo, hi = [(0, 0), (1, 4), (5, max(6, max_objects // 2)), (max(6, max_objects // 2), max_objects)][kind]
    return int(rng.integers(lo, hi + 1))


def make_image(rng: np.random.Generator, cfg: SyntheticConfig, source: int) -> tuple[np.ndarray, list[tuple]]:
    """One image and its boxes [(x1, y1, x2, y2, class_index)]. Later objects occlude earlier ones."""
    size, style = cfg.image_size, _STYLES[source % len(_STYLES)]
    img = _background(rng, size, style)
    for _ in range(int(rng.integers(0, 4))):
        _distractor(rng, img)
    boxes = []
    n_classes = len(cfg.classes)
    for _ in range(_object_count(rng, cfg.max_objects)):
        cls = int(rng.integers(0, n_classes))
        r = float(np.exp(rng.uniform(np.log(size / 36), np.log(size / 10))))  # 3.6x scale range
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)  # may be cut by the border a little
        colour = np.asarray(_CLASS_COLOURS[cls % len(_CLASS_COLOURS)], np.float32)
        colour = colour + rng.normal(0, 12, 3)
        _draw_object(img, cls, cx, cy, r, colour)
        x1, y1 = max(0.0, cx - r), max(0.0, cy - r)
        x2, y2 = min(float(size), cx + r), min(float(size), cy + r)
        boxes.append((round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1), cls))
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * style["contrast"] + mean
    img = img + rng.normal(0, style["noise"], img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if style["blur"] > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(style["blur"]))
    return np.asarray(pil), boxes


def _write_split(rng, cfg: SyntheticConfig, root: Path, split: str, n: int) -> pd.DataFrame:
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image_id = f"{split}_{i:04d}"
        source = int(rng.integers(0, cfg.sources))
        pixels, boxes = make_image(rng, cfg, source)
        Image.fromarray(pixels).save(root / split / f"{image_id}.jpg", quality=92)
        for x1, y1, x2, y2, cls in boxes:
            bbox = f"[{x1}, {y1}, {round(x2 - x1, 1)}, {round(y2 - y1, 1)}]"
            rows.append((image_id, cfg.image_size, cfg.image_size, bbox, f"source{source}", cfg.classes[cls]))
    return pd.DataFrame(rows, columns=["image_id", "width", "height", "bbox", "source", "label"])


def generate(root: str | Path, cfg: SyntheticConfig | None = None) -> Path:
    """Write the dataset under ``root`` (overwriting the generated files). Same seed and sizes → same files."""
    cfg = cfg or SyntheticConfig()
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    train = _write_split(rng, cfg, root, "train", cfg.n_train)
    test = _write_split(rng, cfg, root, "test", cfg.n_test)
    atomic_write_text(root / "train.csv", train.to_csv(index=False))
    atomic_write_text(root / "test_labels.csv", test.to_csv(index=False))
    test_ids = [f"test_{i:04d}" for i in range(cfg.n_test)]
    sample = pd.DataFrame({"image_id": test_ids, "PredictionString": ""})
    atomic_write_text(root / "sample_submission.csv", sample.to_csv(index=False))
    atomic_write_text(root / MARKER_FILE, json.dumps(cfg.model_dump(), sort_keys=True))
    return root


def ensure_generated(root: str | Path, cfg: SyntheticConfig) -> bool:
    """Generate under ``root`` unless the files there were made with this exact config. True if it generated."""
    marker = Path(root) / MARKER_FILE
    if marker.exists() and json.loads(marker.read_text()) == cfg.model_dump():
        return False
    generate(root, cfg)
    return True


def fingerprint(root: str | Path) -> str:
    """SHA-256 over every generated file: equal fingerprints mean byte-identical datasets."""
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate(args.root, SyntheticConfig(seed=args.seed))
    print(f"wrote {root} (fingerprint {fingerprint(root)[:12]})")


if __name__ == "__main__":
    main()
