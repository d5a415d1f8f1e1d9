"""Host time of the prediction table: one table per (image, view) against one per loader batch.

The predict stage, offline inference and validation turn each loader batch's detections into prediction rows in
original pixels. Built one DataFrame per (image, view) (``pipeline.engine.to_table``), that host work took about as
long per image as a small network's forward on a GPU; ``pipeline.engine.detections_table`` builds one table per
batch with the same rows. Prints a markdown table: ms per (image, view), per path, best of ``--repeats``.

    python benchmarks/prediction_table.py [--batch 32] [--views 4] [--boxes 100] [--batches 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.engine import detections_table, to_table  # noqa: E402

VIEWS = ["none", "hflip", "vflip", "rot90_2", "scale0.75", "scale1.25"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="images per loader batch")
    ap.add_argument("--views", type=int, default=4, choices=range(1, len(VIEWS) + 1), help="TTA views per image")
    ap.add_argument("--boxes", type=int, default=100, help="detections per image and view")
    ap.add_argument("--batches", type=int, default=8, help="loader batches per timed round")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    found = []
    for i in range(args.batch):
        meta = {"image_id": f"img{i:05d}", "width": 640, "height": 480}
        for view in VIEWS[:args.views]:
            xy = torch.rand(args.boxes, 2, generator=gen) * 400
            boxes = torch.cat([xy, xy + 10 + torch.rand(args.boxes, 2, generator=gen) * 100], dim=1)
            found.append(({"boxes": boxes, "scores": torch.rand(args.boxes, generator=gen),
                           "labels": torch.randint(0, 3, (args.boxes,), generator=gen)}, meta, view))

    def per_image() -> None:
        for det, meta, view in found:
            to_table(det, meta, 512, "m", 0, view)

    def per_batch() -> None:
        detections_table(found, 512, "m", 0)

    rows = []
    for label, run in (("one table per (image, view): to_table", per_image),
                       ("one table per loader batch: detections_table", per_batch)):
        best = min(_seconds(run, args.batches) for _ in range(args.repeats))
        rows.append((label, 1000 * best / (args.batches * len(found))))
    print(f"{args.batch} images a batch x {args.views} views x {args.boxes} boxes, {args.batches} batches a round, "
          f"best of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| path | ms per (image, view) |\n|---|---|")
    for label, ms in rows:
        print(f"| {label} | {ms:.3f} |")
    print(f"| ratio | {rows[0][1] / rows[1][1]:.1f}x |")


def _seconds(run, batches: int) -> float:
    t0 = time.perf_counter()
    for _ in range(batches):
        run()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
