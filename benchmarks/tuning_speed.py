"""OOF tuning speed: how many fusions a minute :func:`pipeline.ensemble.tune` tries on a GWD-sized table, and where
one tuning step's time goes.

Run: ``python benchmarks/tuning_speed.py [--images 3373] [--members 4] [--views 4] [--boxes 100] [--metric gwd]
[--rules wbf] [--folds 5] [--seed 0] [--fixed-weights] [--set KEY=VALUE ...]``.

Input (seeded, generated in memory): Global Wheat's training split as ``pipeline`` would hold it -- ``--images``
images of 1024 x 1024 px (3,373 in GWD), 20 to 70 ground-truth boxes each (GWD averages ~44 wheat heads), one class,
the images spread over ``--folds`` folds -- and ``--members`` members x ``--views`` TTA views of out-of-fold
predictions, ``--boxes`` boxes per image and view (a detector's top-k): member ``k`` finds each object with
probability 0.95 - 0.05 k, as the object's box plus Gaussian jitter of 5 % of its size on each coordinate, score
~ Beta(6, 2); the rest of its boxes are false positives of the same sizes, score uniform in [0, 0.4].

For each rule of ``--rules``, ``tune()`` runs exactly as the ensemble stage calls it (the search grid of
``configs/demo/ensemble.yaml``, ``--set ensemble.tune.iou_thr=[0.5,0.6]`` etc. to change it): wall seconds,
fusions tried (points of the search, each a complete fused OOF table scored), how many passes of the rule's
kernel they took (the others' rows derived from another fusion's -- soft-NMS's higher ``thresh`` -- or fused in one
pass with others -- WBF's and NMW's ``skip_box_thr`` grid at weights 1: :class:`pipeline.ensemble.SharedSelection`),
fusions a minute, and how many members the tuned weights keep. The
tuner may settle on fewer members (with ``--views 1`` soft-NMS keeps one member of four);
``--fixed-weights`` gives every member weight 1 in the config, so that every fusion is of all members (the search
is then the rule grid and the score threshold). Then one step on the same table is timed in its two parts, as the
tuner runs them, the median of three: the fusion (``pipeline.fusion.tuned.fuse_tuned_rows`` from scratch:
packing, the compiled rule, the dense rows, each image's by score as the tuner asks for them; the tuner packs once
per subset of members) and the scoring of its rows (``pipeline.ensemble.score_rows``: grouping them by scored image
where they are not already, the metric's kernel; no table is built). The
machine's load average is printed: compare runs made in the same conditions only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import ensemble
from pipeline.config import MemberConfig, load_config
from pipeline.data.table import AnnotationTable
from pipeline.ensemble import Member, oof_sets, score_rows, start_params, tune
from pipeline.fusion import tuned
from pipeline.fusion.tuned import fuse_tuned_rows
from pipeline.metrics import Scorer

SIZE = 1024


def _strings(codes: np.ndarray, names: list[str]) -> pd.api.extensions.ExtensionArray:
    """pandas' str column (arrow-backed) from integer codes, as the stages' parquet reads give it."""
    return pd.array(pa.DictionaryArray.from_arrays(codes.astype(np.int32), names).cast(pa.large_string()),
                    dtype="str")


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    wh = rng.uniform(0.02, 0.12, (n, 2)) * SIZE
    xy = rng.uniform(0.0, 1.0, (n, 2)) * (SIZE - wh)
    return np.c_[xy, xy + wh]


def make_ground_truth(rng: np.random.Generator, n_images: int) -> tuple[AnnotationTable, np.ndarray]:
    """The annotation table and, per image, its number of boxes."""
    ids = [f"img{i:05d}" for i in range(n_images)]
    counts = rng.integers(20, 71, n_images)
    boxes = _random_boxes(rng, int(counts.sum()))
    images = pd.DataFrame({"image_id": ids, "path": "x", "width": SIZE, "height": SIZE})
    gt = pd.DataFrame({"image_id": np.repeat(ids, counts), "x1": boxes[:, 0], "y1": boxes[:, 1],
                       "x2": boxes[:, 2], "y2": boxes[:, 3], "label": 0})
    return AnnotationTable(images, gt, ["wheat"]), counts


def make_member(rng: np.random.Generator, table: AnnotationTable, counts: np.ndarray, fold: np.ndarray, k: int,
                n_views: int, n_boxes: int) -> pd.DataFrame:
    """Member ``k``'s OOF predictions: ``n_views`` views of ``n_boxes`` boxes per image (see the module docstring),
    rows ordered by image, then view."""
    gt = table.boxes[["x1", "y1", "x2", "y2"]].to_numpy()
    size = np.c_[gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]][:, [0, 1, 0, 1]]
    n_img = len(counts)
    image_of_gt = np.repeat(np.arange(n_img), counts)
    img, view, boxes, scores = [], [], [], []
    for v in range(n_views):
        found = np.flatnonzero(rng.random(len(gt)) < 0.95 - 0.05 * k)
        per_image = np.bincount(image_of_gt[found], minlength=n_img)
        rank = np.arange(len(found)) - np.repeat(np.cumsum(per_image) - per_image, per_image)
        found = found[rank < n_boxes]  # a detector's top-k: at most n_boxes per image
        n_fp = n_boxes - np.minimum(per_image, n_boxes)
        img += [image_of_gt[found], np.repeat(np.arange(n_img), n_fp)]
        boxes += [np.clip(gt[found] + rng.normal(0.0, 0.05, (len(found), 4)) * size[found], 0, SIZE),
                  _random_boxes(rng, int(n_fp.sum()))]
        scores += [rng.beta(6.0, 2.0, len(found)), rng.uniform(0.0, 0.4, int(n_fp.sum()))]
        view += [np.full(len(found) + int(n_fp.sum()), v)]
    img, view, boxes, scores = np.concatenate(img), np.concatenate(view), np.concatenate(boxes), np.concatenate(scores)
    order = np.lexsort((view, img))
    img, view, boxes, scores = img[order], view[order], boxes[order], scores[order]
    return pd.DataFrame({"image_id": _strings(img, list(table.images.image_id)), "x1": boxes[:, 0],
                         "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3], "score": scores, "label": 0,
                         "model": _strings(np.zeros(len(img), np.int32), [f"m{k}"]), "fold": fold[img],
                         "tta": _strings(view, [f"v{v}" for v in range(n_views)])})


def median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3373)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--boxes", type=int, default=100, help="boxes per image and view")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--metric", default="gwd")
    ap.add_argument("--rules", default="wbf", help="comma-separated: wbf, nms, soft_nms, nmw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed-weights", action="store_true", help="every member weight 1, not tuned")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(args.seed)
    table, counts = make_ground_truth(rng, args.images)
    fold = rng.integers(0, args.folds, args.images)
    cfg = load_config("configs/demo/ensemble.yaml", args.set)
    cfg.ensemble.members = [MemberConfig(config=f"m{k}.yaml", weight=1.0 if args.fixed_weights else None)
                            for k in range(args.members)]
    members = []
    for k in range(args.members):
        oof = make_member(rng, table, counts, fold, k, args.views, args.boxes)
        members.append(Member(f"m{k}", cfg, oof, None, [f"v{v}" for v in range(args.views)]))
    oof_all = pd.concat([m.oof for m in members], ignore_index=True)
    scorer = Scorer(args.metric, table)
    print(f"CPUs available: {len(os.sched_getaffinity(0))}; load average: {os.getloadavg()[0]:.1f}; "
          f"{args.images:,} images, {args.members} members x {args.views} views x {args.boxes} boxes = "
          f"{len(oof_all):,} OOF rows; metric {args.metric}\n")
    print("| rule | fusions tried | kernel passes | tune() s | fusions a minute | members kept | tuned OOF "
          "| one fusion s | its scoring s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    kernel_runs = []  # each pass of a rule's kernel over the table (one point, or a skip_box_thr grid at once)
    fuse_one, fuse_levels = tuned.fuse_packed, tuned.fuse_packed_levels
    tuned.fuse_packed = lambda *a, **k: kernel_runs.append(1) or fuse_one(*a, **k)
    tuned.fuse_packed_levels = lambda *a, **k: kernel_runs.append(1) or fuse_levels(*a, **k)
    for method in [r for r in args.rules.split(",") if r]:
        # compile (or load from numba's cache) every kernel a step runs -- the rule, packing, the scoring -- before
        # timing: on a fresh checkout the first tune() would otherwise time the compilation too
        warm = fuse_tuned_rows(oof_all.head(5000), table.images, start_params(method, members, cfg).record(),
                               oof_sets(members), ("model", "tta"))
        score_rows(scorer, warm), score_rows(scorer, warm, 0.1)
        kernel_runs.clear()
        t0 = time.perf_counter()
        params, score, n_fusions = tune(members, table.images, scorer, cfg, method)
        seconds = time.perf_counter() - t0
        n_passes = len(kernel_runs)
        n_kept = sum(w > 0 for w in params.weights.values())
        record = start_params(method, members, cfg).record()

        def fuse_rows():
            return fuse_tuned_rows(oof_all, table.images, record, oof_sets(members), ("model", "tta"), by_score=True)

        fused = fuse_rows()
        t_fuse = median_seconds(fuse_rows)
        t_score = median_seconds(lambda: score_rows(scorer, fused))
        print(f"| {method} | {n_fusions} | {n_passes} | {seconds:.1f} | {60 * n_fusions / seconds:.0f} | "
              f"{n_kept} of {len(members)} | {score:.4f} | {t_fuse:.3f} | {t_score:.3f} |", flush=True)


if __name__ == "__main__":
    main()
