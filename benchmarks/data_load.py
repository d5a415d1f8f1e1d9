"""How fast the annotation readers load: a GWD-sized CSV (vectorised bbox parsing and checks) and real BCCD.

    .venv/bin/python benchmarks/data_load.py [--boxes 50000] [--images 200] [--repeats 3]

Prints a table of seconds per load (best and median of the repeats). The CSV case is generated the way
tests/test_data_readers.py does (random boxes in 256 px PNGs, header-only image reads); BCCD is read in place from
../shared/data/bccd when it is there. Goals (not tests): the 50k-box CSV in under 3 s, BCCD trainval in under 2 s.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import load_dataset

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def gwd_csv(root: Path, n_images: int, n_boxes: int) -> DataConfig:
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    for i in range(n_images):
        Image.new("RGB", (256, 256), (90, 120, 30)).save(root / "train" / f"img{i}.png")
    xy = rng.uniform(0, 200, (n_boxes, 2)).round(1)
    wh = rng.uniform(1, 50, (n_boxes, 2)).round(1)
    pd.DataFrame({"image_id": [f"img{i}" for i in rng.integers(0, n_images, n_boxes)], "width": 256, "height": 256,
                  "bbox": [f"[{x}, {y}, {w}, {h}]" for (x, y), (w, h) in zip(xy, wh)], "source": "s"}
                 ).to_csv(root / "train.csv", index=False)
    return DataConfig(name="bench", format="gwd_csv", root=root, test_images=None, sample_submission=None,
                      test_csv=None)


def timed(fn, repeats: int) -> tuple[float, float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=50_000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = gwd_csv(Path(tmp), args.images, args.boxes)
        rows.append((f"gwd_csv, {args.boxes} boxes / {args.images} images", *timed(lambda: load_dataset(cfg), args.repeats)))
    if BCCD.is_dir():
        bccd = DataConfig(name="bccd", format="voc", root=BCCD, images="images", annotations="Annotations",
                          train_split="trainval", test_split="test", classes=["RBC", "WBC", "Platelets"])
        rows.append(("voc, BCCD trainval (292 images)", *timed(lambda: load_dataset(bccd), args.repeats)))
    print("| input | best s | median s |\n|---|---:|---:|")
    for name, best, median in rows:
        print(f"| {name} | {best:.3f} | {median:.3f} |")


if __name__ == "__main__":
    main()
