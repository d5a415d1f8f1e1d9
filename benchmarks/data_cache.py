"""Images per second into the model: from the original files vs from the pre-resized cache (pipeline.data.cache).

    .venv/bin/python benchmarks/data_cache.py [--size 512] [--samples 150] [--dicoms 12] [--workers 2]

Rows, one process and no loader workers unless said (the per-core rate; a DataLoader multiplies it by its workers):

- BCCD (640x480 JPEGs, read in place from ../shared/data/bccd) at ``--size`` with configs/bccd/effdet.yaml's full
  training augmentation (flips, rot90, HSV, brightness/contrast, the final resize), run by each engine
  (``augment.engine``: albumentations, and the fused engine of pipeline.fused_augment): the training sample
  (``TrainDataset``) from the JPEG, and from the cache (``TrainDataset(cache=...)``: the cached resized image, boxes
  scaled by the cache's exact scale, then the same augmentation); the evaluation input (``EvalDataset``) likewise.
- BCCD, the training loader as ``pipeline.train.make_loaders`` builds it (``DataLoader`` over ``TrainDataset``,
  shuffled, the config's batch size, ``--workers`` workers, collated uint8 batches), one timed pass after a warm-up
  pass (worker start-up not timed), without and with the cache, per engine.
- DICOM: generated 2000x2000 16-bit files with a window, decoded by ``read_image`` (pydicom, VOI LUT, min-max to 8
  bits) and fitted to the input, vs the same input from the cache; and the cache build rate (every core).

Goal (not a test): the training sample from the cache at least 3x the JPEG rate. The last lines compare the cache
with the fused engine against the JPEGs with albumentations (the loader before either existed).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.augment import fit_to_input
from pipeline.config import DataConfig, load_config
from pipeline.data import load_dataset, read_image
from pipeline.data.cache import ImageCache, build_cache
from pipeline.data.dicom import write_dicom
from pipeline.dataset import EvalDataset, TrainDataset, collate, make_records

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "data" / "bccd"


def rate(fn, n: int, repeats: int = 3) -> float:
    """Best images/s over ``repeats`` runs of ``fn(i)`` for i in range(n)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return n / best


def loader_rate(ds: TrainDataset, batch_size: int, workers: int) -> float:
    """Images/s of one pass of the training loader, after an untimed pass (starts the workers, warms the caches)."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        drop_last=True, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for _ in loader:
        pass
    start, n = time.perf_counter(), 0
    for images, _, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def bccd_rows(size: int, samples: int, workers: int, cache_dir: Path) -> list[tuple[str, float, float]]:
    cfg = load_config(REPO / "configs/bccd/effdet.yaml", [f"data.root={BCCD}", f"model.image_size={size}"])
    table = load_dataset(cfg.data)
    records = make_records(table, table.images.image_id[:samples])
    build_cache(table.images, cache_dir, "train", size, cfg.model.resize)
    cache = ImageCache.open(cache_dir, "train", size, cfg.model.resize, images=table.images)
    n, batch, rows = len(records), cfg.train.batch_size, []
    for engine in ("albumentations", "fused"):
        augment = cfg.augment.model_copy(update={"engine": engine})
        plain = TrainDataset(records, size, augment, seed=0, resize=cfg.model.resize)
        cached = TrainDataset(records, size, augment, seed=0, resize=cfg.model.resize, cache=cache)
        rows += [(f"BCCD train sample, {size} px, full augmentation, {engine} engine",
                  rate(plain.__getitem__, n), rate(cached.__getitem__, n)),
                 (f"BCCD training DataLoader, {size} px, batch {batch}, {workers} workers, {engine} engine",
                  loader_rate(plain, batch, workers), loader_rate(cached, batch, workers))]
    plain_eval = EvalDataset(records, size, cfg.model.resize)
    cached_eval = EvalDataset(records, size, cfg.model.resize, cache)
    return rows + [(f"BCCD eval input, {size} px", rate(plain_eval.__getitem__, n), rate(cached_eval.__getitem__, n))]


def dicom_rows(size: int, n_files: int, root: Path) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    ids = [f"x{i}" for i in range(n_files)]
    for image_id in ids:
        pixels = rng.integers(0, 65536, (2000, 2000), dtype=np.uint16)
        write_dicom(root / "train" / f"{image_id}.dicom", pixels, bits_stored=16, window=(30000, 40000))
    (root / "train.csv").write_text("image_id,x1,y1,x2,y2\n" + "".join(f"{i},10,10,90,90\n" for i in ids))
    data = DataConfig(name="dicom", format="csv", root=root, csv={
        "image_pattern": "train/{id}.dicom", "box_columns": ["x1", "y1", "x2", "y2"], "fixed_class": "x"})
    table = load_dataset(data)
    paths = table.images.path.tolist()
    decode = rate(lambda i: read_image(paths[i]), n_files, repeats=1)
    to_input = rate(lambda i: fit_to_input(read_image(paths[i]), size, "square"), n_files, repeats=1)
    start = time.perf_counter()
    build_cache(table.images, root / "cache", "train", size, "square")
    build = n_files / (time.perf_counter() - start)
    cache = ImageCache.open(root / "cache", "train", size, "square", images=table.images)
    from_cache = rate(lambda i: cache.input(ids[i]), n_files)
    return [
        ("DICOM 2000x2000 16-bit: decode to 8-bit RGB (read_image)", decode, float("nan")),
        (f"DICOM 2000x2000 16-bit: model input, {size} px", to_input, from_cache),
        (f"DICOM cache build (every core), {size} px", build, float("nan")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=150, help="BCCD images per timed pass")
    parser.add_argument("--dicoms", type=int, default=12, help="generated 2000x2000 DICOM files (0: no DICOM rows)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the training DataLoader row")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if BCCD.is_dir():
            rows += bccd_rows(args.size, args.samples, args.workers, Path(tmp) / "bccd_cache")
        else:
            print(f"BCCD not found at {BCCD}: its rows are skipped")
        if args.dicoms > 0:
            rows += dicom_rows(args.size, args.dicoms, Path(tmp) / "dicom")
    print("| input | from the files, images/s | from the cache, images/s | speed-up |\n|---|---:|---:|---:|")
    for name, files, cached in rows:
        cached_text = "-" if np.isnan(cached) else f"{cached:.1f}"
        speedup = "-" if np.isnan(cached) else f"{cached / files:.1f}x"
        print(f"| {name} | {files:.1f} | {cached_text} | {speedup} |")
    before = {name: files for name, files, _ in rows if name.endswith("albumentations engine")}
    for name, _, cached in rows:  # the goal: the cache with the fused engine vs the files as they were read
        if name.endswith("fused engine"):
            print(f"\n{name.replace(', fused engine', '')}: from the cache with the fused engine "
                  f"{cached / before[name.replace('fused', 'albumentations')]:.1f}x the files with albumentations")


if __name__ == "__main__":
    main()
