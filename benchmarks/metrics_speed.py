"""Metric speed: ms per image at 45 GT x 100 predictions per image over 1000 images (after JIT warm-up).

Run: ``python benchmarks/metrics_speed.py [--images 1000] [--gt 45] [--preds 100] [--repeat 20]``.
Prints a markdown table. "Scorer call" is the full path a tuning loop pays (prediction table -> packed arrays ->
metric); "kernel" is the numba GWD kernel alone on pre-packed arrays. COCO mAP has two rows more on the same
packed arrays: the compiled evaluator the scorer uses and faster-coco-eval (its oracle), with their scores.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from pipeline.data.table import AnnotationTable
from pipeline.metrics import Scorer, pack_predictions
from pipeline.metrics.coco import CocoEvaluator, CompiledCocoEvaluator
from pipeline.metrics.gwd import gwd_packed


def synthetic(n_images: int, n_gt: int, n_pred: int, seed: int = 0) -> tuple[AnnotationTable, pd.DataFrame]:
    """1024x1024 images, wheat-sized boxes; predictions: jittered copies of every GT plus random boxes."""
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"img{i:05d}" for i in range(n_images)], n_gt)
    xy = rng.uniform(0, 900, (len(ids), 2))
    gt = np.c_[xy, xy + rng.uniform(30, 120, (len(ids), 2))]
    n_fp = n_pred - n_gt
    fp_xy = rng.uniform(0, 900, (n_images * n_fp, 2))
    fp = np.c_[fp_xy, fp_xy + rng.uniform(30, 120, (len(fp_xy), 2))]
    pred = np.r_[gt + rng.normal(0, 6, gt.shape), fp]
    pred_ids = np.r_[ids, np.repeat([f"img{i:05d}" for i in range(n_images)], n_fp)]
    images = pd.DataFrame({"image_id": pd.unique(ids), "path": "x.jpg", "width": 1024, "height": 1024})
    boxes = pd.DataFrame({"image_id": ids, "x1": gt[:, 0], "y1": gt[:, 1], "x2": gt[:, 2], "y2": gt[:, 3], "label": 0})
    preds = pd.DataFrame({"image_id": pred_ids, "x1": pred[:, 0], "y1": pred[:, 1], "x2": pred[:, 2],
                          "y2": pred[:, 3], "score": rng.random(len(pred)), "label": 0})
    return AnnotationTable(images, boxes, ["wheat"]), preds.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (JIT, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--gt", type=int, default=45)
    ap.add_argument("--preds", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    gt, preds = synthetic(args.images, args.gt, args.preds)
    rows = []
    gwd = Scorer("gwd", gt)
    p = pack_predictions(preds, gwd.index, 1, class_aware=False)
    kernel = best_seconds(lambda: gwd_packed(gwd.gt.boxes, gwd.gt.offsets, p.boxes, p.offsets), args.repeat)
    rows.append(("gwd", "kernel (packed arrays)", kernel, gwd(preds).score))
    rows.append(("gwd", "Scorer call", best_seconds(lambda: gwd(preds), args.repeat), gwd(preds).score))
    for metric, repeat in (("voc_map50", args.repeat), ("coco_map", max(3, args.repeat // 5))):
        scorer = Scorer(metric, gt)
        rows.append((metric, "Scorer call", best_seconds(lambda: scorer(preds), repeat), scorer(preds).score))
    coco = Scorer("coco_map", gt)
    p = pack_predictions(preds, coco.index, 1, class_aware=True)
    for name, evaluator in (("compiled (pipeline.metrics.coco_kernel)", CompiledCocoEvaluator),
                            ("faster-coco-eval", CocoEvaluator)):
        ev = evaluator(coco.gt, len(coco.index), coco.classes)
        rows.append(("coco_map", f"{name}, packed", best_seconds(lambda: ev(p), max(3, args.repeat // 5)),
                     ev(p)["map"]))
    t0 = time.perf_counter()
    Scorer("coco_map", gt)
    rows.append(("coco_map", "Scorer build (GT, once)", time.perf_counter() - t0, float("nan")))
    print(f"{args.images} images x {args.gt} GT x {args.preds} predictions, median of repeats after warm-up\n")
    print("| metric | path | total ms | ms / image | score |")
    print("|---|---|---:|---:|---:|")
    for metric, path, seconds, score in rows:
        print(f"| {metric} | {path} | {seconds * 1e3:.1f} | {seconds * 1e3 / args.images:.4f} | {score:.4f} |")


if __name__ == "__main__":
    main()
