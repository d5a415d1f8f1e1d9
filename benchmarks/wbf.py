"""Fusion speed: ``pipeline.fusion`` (numba) against ``ensemble_boxes`` 1.0.9 for every rule, ms per image, and
whole prediction tables through ``fuse_predictions``.

Run: ``python benchmarks/wbf.py [--rules wbf,nms,soft_nms_linear,soft_nms,nmw] [--images 5] [--lib-images 2]
[--labels 1] [--table-images 1000] [--table-lib-images 50] [--big-images 3000] [--big-sets 40] [--big-boxes 100]
[--big-repeats 2] [--seed 0]``.

Inputs (normalised coordinates, seeded with ``--seed``; one call = one image; ``--labels`` classes, default 1,
which puts every box in the same label group -- the most expensive case for every rule):

* **agreeing**: ``N = 0.8 * B`` objects (``B`` = boxes per set), widths and heights uniform in [0.02, 0.12] of the
  image, centres uniform. Every set sees each object with probability 0.9 (10 % misses) as the object's box plus
  Gaussian jitter of 5 % of its size on each coordinate, score ~ Beta(6, 2) (mean 0.75); the rest of its
  ``B`` boxes are false positives (random boxes of the same size distribution, score uniform in [0, 0.4]).
* **scattered** (low agreement): ``N = 0.2 * B`` objects, each seen by a set with probability 0.5 with jitter of 25 %
  of its size; ~90 % of each set's ``B`` boxes are false positives anywhere in the image; every score uniform in
  [0, 1]. Most boxes start their own cluster (or survive NMS), so the searches over kept boxes dominate.

Rules and parameters (the library's defaults): ``wbf`` (iou_thr 0.55, conf_type avg), ``nms`` (iou_thr 0.5),
``soft_nms_linear`` (``soft_nms(method=1)``: iou_thr 0.5, thresh 0.001), ``soft_nms`` (gaussian, sigma 0.5,
thresh 0.001), ``nmw`` (iou_thr 0.55). Scores are continuous random floats (no ties), so both backends must return
the same output; the "same" column checks it on the images the library ran: NMS and soft-NMS bit for bit (boxes,
scores, labels, order); WBF and NMW with boxes <= 1e-5 and scores <= 1e-6 (both round fused values to float32,
so two clusters can still tie, and the library leaves the order of tied rows undefined: those compare as a set).
The library is timed once over ``--lib-images`` images (NMW takes seconds per image), the drop-ins as the best of
3 runs of >= 0.2 s each over ``--images`` images, after a warm-up call (JIT cache). Speed-up = library ms / numba
ms, measured in this one run on these inputs. The machine's load average is printed: on a shared machine both
sides slow down, and the best-of-3 favours the drop-ins less than the library's single pass disfavours it.

The second table times ``fuse_predictions`` (WBF) on a whole prediction table (``--table-images`` images of
1024 x 1024 pixels, 10 sets x 100 boxes, the agreeing generator) against ``backend="ensemble_boxes"`` (the
library, image by image) on the first ``--table-lib-images`` images.

The third table is the whole-table case of the speed goal: ``--big-images`` images x ``--big-sets`` sets x
``--big-boxes`` boxes (3,000 x 40 x 100 = 12 M rows, agreeing, pixels, ``image_id`` and ``model`` as pandas' str
columns, rows ordered by image then set) through ``fuse_predictions`` for every rule: the best of
``--big-repeats`` calls, wall and CPU seconds (all threads), and the output checked against the library on the
first 20 images.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import ensemble_boxes as eb
import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.fusion import (fuse_predictions, nms, non_maximum_weighted, soft_nms, weighted_boxes_fusion)

CONFIGS = [(8, 100), (40, 100), (20, 300)]


class Rule(NamedTuple):
    """One benchmarked rule: the library's function, the drop-in, whether outputs must be bit-identical, and
    the ``fuse_predictions`` arguments of the same rule."""

    library: Callable
    ours: Callable
    exact: bool
    method: str
    params: dict


RULES = {
    "wbf": Rule(eb.weighted_boxes_fusion, weighted_boxes_fusion, False, "wbf", {}),
    "nms": Rule(eb.nms, nms, True, "nms", {}),
    "soft_nms_linear": Rule(lambda b, s, lab: eb.soft_nms(b, s, lab, method=1),
                            lambda b, s, lab: soft_nms(b, s, lab, method=1), True, "soft_nms", {"decay": "linear"}),
    "soft_nms": Rule(eb.soft_nms, soft_nms, True, "soft_nms", {}),
    "nmw": Rule(eb.non_maximum_weighted, non_maximum_weighted, False, "nmw", {}),
}


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    wh = rng.uniform(0.02, 0.12, (n, 2))
    xy = rng.uniform(0.0, 1.0, (n, 2)) * (1.0 - wh)
    return np.c_[xy, xy + wh]


def make_image(rng: np.random.Generator, n_sets: int, n_boxes: int, kind: str, n_labels: int = 1):
    """One image's inputs in the library's format: (boxes_list, scores_list, labels_list)."""
    if kind == "agreeing":
        n_obj, p_seen, jitter = int(0.8 * n_boxes), 0.9, 0.05
    elif kind == "scattered":
        n_obj, p_seen, jitter = int(0.2 * n_boxes), 0.5, 0.25
    else:
        raise ValueError(kind)
    objs = _random_boxes(rng, n_obj)
    obj_labels = rng.integers(0, n_labels, n_obj)
    size = np.c_[objs[:, 2] - objs[:, 0], objs[:, 3] - objs[:, 1], objs[:, 2] - objs[:, 0], objs[:, 3] - objs[:, 1]]
    boxes_list, scores_list, labels_list = [], [], []
    for _ in range(n_sets):
        seen = np.flatnonzero(rng.random(n_obj) < p_seen)[:n_boxes]
        tp = np.clip(objs[seen] + rng.normal(0.0, jitter, (len(seen), 4)) * size[seen], 0.0, 1.0)
        n_fp = n_boxes - len(seen)
        fp = _random_boxes(rng, n_fp)
        if kind == "agreeing":
            tp_s = rng.beta(6.0, 2.0, len(seen))  # mean 0.75, continuous: no ties
            fp_s = rng.uniform(0.0, 0.4, n_fp)
        else:
            tp_s = rng.uniform(0.0, 1.0, len(seen))
            fp_s = rng.uniform(0.0, 1.0, n_fp)
        boxes_list.append(np.r_[tp, fp])
        scores_list.append(np.r_[tp_s, fp_s])
        labels_list.append(np.r_[obj_labels[seen], rng.integers(0, n_labels, n_fp)])
    return boxes_list, scores_list, labels_list


def _canonical(boxes, scores, labels, group=None):
    """Rows sorted by (group, score desc, label, box): the order of tied scores is undefined in the library."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    group = np.zeros(len(scores)) if group is None else group
    k = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, -np.asarray(scores), group))
    return boxes[k], np.asarray(scores)[k], np.asarray(labels)[k]


def _same(a, b, atol_box: float = 1e-5, group_a=None, group_b=None) -> bool:
    """Equal outputs: boxes <= atol_box, scores <= 1e-6, labels equal; rows with tied scores in any order."""
    if len(a[1]) != len(b[1]):
        return False
    if len(a[1]) == 0:
        return True
    if not np.allclose(a[1], b[1], rtol=0, atol=1e-6):  # same score sequence (so same order up to ties)
        return False
    a = _canonical(*a, group=group_a)
    b = _canonical(*b, group=group_b)
    return (np.abs(a[0] - b[0]).max() <= atol_box and np.abs(a[1] - b[1]).max() <= 1e-6
            and np.array_equal(a[2], b[2]))


def _identical(a, b) -> bool:
    """Same boxes, scores and labels, in the same order, bit for bit."""
    return all(np.array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in zip(a, b))


def quiet(fn):
    """``fn`` with warnings and prints silenced, on deep copies (the library overwrites weighted score arrays)."""
    def call(*args):
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return fn(*copy.deepcopy(args))
    return call


def time_per_image(fn, images, repeats: int, min_seconds: float = 0.0) -> float:
    """Seconds per image: every image once (looped until ``min_seconds`` have passed); best of ``repeats``
    (the machine may be shared: the best run is the least disturbed one)."""
    best = float("inf")
    for _ in range(repeats):
        reps = 0
        t0 = time.perf_counter()
        while True:
            for img in images:
                fn(*img)
            reps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / (reps * len(images)))
    return best


def make_table(rng: np.random.Generator, n_images: int, n_sets: int, n_boxes: int, size: int = 1024) -> pd.DataFrame:
    """A prediction table in pixels: ``n_images`` agreeing images, set ``t`` = model ``m{t:02d}``."""
    ids, boxes, scores, labels, models = [], [], [], [], []
    for i in range(n_images):
        bl, sl, ll = make_image(rng, n_sets, n_boxes, "agreeing")
        for t in range(n_sets):
            ids.append(np.full(len(sl[t]), i))
            boxes.append(bl[t] * size)
            scores.append(sl[t])
            labels.append(ll[t])
            models.append(np.full(len(sl[t]), t))
    b = np.concatenate(boxes)
    names = np.array([f"img{i:05d}" for i in range(n_images)], dtype=object)
    model_names = np.array([f"m{t:02d}" for t in range(n_sets)], dtype=object)
    return pd.DataFrame({"image_id": names[np.concatenate(ids)], "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2],
                         "y2": b[:, 3], "score": np.concatenate(scores), "label": np.concatenate(labels),
                         "model": model_names[np.concatenate(models)], "fold": 0, "tta": "none"})


def make_big_table(rng: np.random.Generator, n_images: int, n_sets: int, n_boxes: int,
                   size: int = 1024) -> pd.DataFrame:
    """The agreeing generator, vectorised over images: ``n_images`` x ``n_sets`` x ``n_boxes`` rows in pixels,
    ordered by image then set (set ``t`` = model ``m{t:02d}``), string columns built through arrow."""
    n_obj = int(0.8 * n_boxes)
    wh = rng.uniform(0.02, 0.12, (n_images, n_obj, 2))
    xy = rng.uniform(0.0, 1.0, (n_images, n_obj, 2)) * (1.0 - wh)
    objs, obj_size = np.concatenate([xy, xy + wh], axis=2), np.concatenate([wh, wh], axis=2)
    seen = rng.random((n_images, n_sets, n_obj)) < 0.9
    tp = np.clip(objs[:, None] + rng.normal(0.0, 0.05, (n_images, n_sets, n_obj, 4)) * obj_size[:, None], 0, 1)
    fwh = rng.uniform(0.02, 0.12, (n_images, n_sets, n_boxes, 2))
    fxy = rng.uniform(0.0, 1.0, (n_images, n_sets, n_boxes, 2)) * (1.0 - fwh)
    boxes = np.concatenate([fxy, fxy + fwh], axis=3)
    scores = rng.uniform(0.0, 0.4, (n_images, n_sets, n_boxes))
    ii, tt, oo = np.nonzero(seen)  # each set's seen objects first, in object order, then false positives
    rank = (np.cumsum(seen, axis=2) - 1)[ii, tt, oo]
    boxes[ii, tt, rank] = tp[ii, tt, oo]
    scores[ii, tt, rank] = rng.beta(6.0, 2.0, (n_images, n_sets, n_obj))[ii, tt, oo]
    b = boxes.reshape(-1, 4) * size
    n = len(b)
    image = np.repeat(np.arange(n_images, dtype=np.int32), n_sets * n_boxes)
    model = np.tile(np.repeat(np.arange(n_sets, dtype=np.int32), n_boxes), n_images)

    def strings(codes: np.ndarray, names: list[str]) -> pd.api.extensions.ExtensionArray:
        return pd.array(pa.DictionaryArray.from_arrays(codes, names).cast(pa.large_string()), dtype="str")

    return pd.DataFrame({"image_id": strings(image, [f"img{i:05d}" for i in range(n_images)]),
                         "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2], "y2": b[:, 3], "score": scores.reshape(-1),
                         "label": np.zeros(n, np.int64), "model": strings(model, [f"m{t:02d}" for t in range(n_sets)]),
                         "fold": np.zeros(n, np.int64), "tta": strings(np.zeros(n, np.int32), ["none"])})


def same_table(mine: pd.DataFrame, ref: pd.DataFrame, exact: bool) -> bool:
    """Fused tables equal image by image (exact rules: bit for bit up to the pixel round trip)."""
    cols = ["x1", "y1", "x2", "y2"]
    if mine["image_id"].tolist() != ref["image_id"].tolist():
        return False
    if exact:
        return (np.allclose(mine[cols].to_numpy(), ref[cols].to_numpy(), rtol=0, atol=1e-9)
                and np.array_equal(mine["score"].to_numpy(), ref["score"].to_numpy())
                and np.array_equal(mine["label"].to_numpy(), ref["label"].to_numpy()))
    return _same((mine[cols].to_numpy(), mine["score"].to_numpy(), mine["label"].to_numpy()),
                 (ref[cols].to_numpy(), ref["score"].to_numpy(), ref["label"].to_numpy()), atol_box=1e-5 * 1024,
                 group_a=pd.factorize(mine["image_id"])[0], group_b=pd.factorize(ref["image_id"])[0])


def per_image_table(args: argparse.Namespace, rng: np.random.Generator, rules: list[str]) -> None:
    print("| rule | input | sets × boxes | ensemble_boxes ms/img | numba ms/img | speed-up | same |")
    print("|---|---|---|---:|---:|---:|---|")
    for name in rules:
        rule = RULES[name]
        lib = quiet(rule.library)
        for kind in ("agreeing", "scattered"):
            for n_sets, n_boxes in CONFIGS:
                images = [make_image(rng, n_sets, n_boxes, kind, args.labels) for _ in range(args.images)]
                lib_images = images[:args.lib_images]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    compare = _identical if rule.exact else _same
                    same = all(compare(lib(*img), rule.ours(*img)) for img in lib_images)
                    t_lib = time_per_image(lib, lib_images, repeats=1)
                    t_nb = time_per_image(rule.ours, images, repeats=3, min_seconds=0.2)
                print(f"| {name} | {kind} | {n_sets} × {n_boxes} | {t_lib * 1e3:.1f} | {t_nb * 1e3:.3f} | "
                      f"{t_lib / t_nb:.0f}× | {'yes' if same else 'NO'} |", flush=True)


def wbf_table(args: argparse.Namespace, rng: np.random.Generator) -> None:
    n_sets, n_boxes = 10, 100
    table = make_table(rng, args.table_images, n_sets, n_boxes)
    sizes = {f"img{i:05d}": (1024, 1024) for i in range(args.table_images)}
    fuse_predictions(table.head(2000), sizes)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = fuse_predictions(table, sizes)
        times.append(time.perf_counter() - t0)
    t_tab = min(times)
    sub_ids = {f"img{i:05d}" for i in range(min(args.table_lib_images, args.table_images))}
    sub = table[table["image_id"].isin(sub_ids)]
    t0 = time.perf_counter()
    ref = fuse_predictions(sub, sizes, backend="ensemble_boxes")
    t_lib = (time.perf_counter() - t0) / len(sub_ids)
    mine = out[out["image_id"].isin(sub_ids)].reset_index(drop=True)
    same = same_table(mine, ref, exact=False)
    print(f"\n`fuse_predictions` on a whole table: {args.table_images} images × {n_sets} sets × {n_boxes} boxes "
          f"({len(table):,} rows, agreeing), pixels in and out\n")
    print("| backend | images | total s | ms/img | speed-up | same |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| ensemble_boxes (image by image) | {len(sub_ids)} | {t_lib * len(sub_ids):.2f} | {t_lib * 1e3:.2f} | "
          "1× | — |")
    print(f"| numba (one call, {len(os.sched_getaffinity(0))} threads) | {args.table_images} | {t_tab:.3f} | "
          f"{t_tab / args.table_images * 1e3:.3f} | {t_lib / (t_tab / args.table_images):.0f}× | "
          f"{'yes' if same else 'NO'} |")


def big_table(args: argparse.Namespace, rng: np.random.Generator, rules: list[str]) -> None:
    table = make_big_table(rng, args.big_images, args.big_sets, args.big_boxes)
    sizes = {f"img{i:05d}": (1024, 1024) for i in range(args.big_images)}
    sub_ids = {f"img{i:05d}" for i in range(min(20, args.big_images))}
    sub = table[table["image_id"].isin(sub_ids)]
    print(f"\nWhole-table fusion: {args.big_images:,} images × {args.big_sets} sets × {args.big_boxes} boxes "
          f"({len(table):,} rows, agreeing, 1024 px), one `fuse_predictions` call per rule, "
          f"{len(os.sched_getaffinity(0))} threads; load average before: {os.getloadavg()[0]:.1f}\n")
    print("| rule | wall s (best) | CPU s (that call, all threads) | rows out | same (20 images vs library) |")
    print("|---|---:|---:|---:|---|")
    for name in rules:
        rule = RULES[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fuse_predictions(table.head(5000), sizes, method=rule.method, **rule.params)  # JIT cache
            best = (float("inf"), 0.0)
            for _ in range(args.big_repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                out = fuse_predictions(table, sizes, method=rule.method, **rule.params)
                best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
            ref = fuse_predictions(sub, sizes, method=rule.method, backend="ensemble_boxes", **rule.params)
        mine = out[out["image_id"].isin(sub_ids)].reset_index(drop=True)
        same = same_table(mine, ref, rule.exact)
        print(f"| {name} | {best[0]:.2f} | {best[1]:.2f} | {len(out):,} | {'yes' if same else 'NO'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {list(RULES)}")
    ap.add_argument("--images", type=int, default=5, help="images per configuration (drop-ins)")
    ap.add_argument("--lib-images", type=int, default=2, help="images per configuration for the library")
    ap.add_argument("--labels", type=int, default=1, help="number of classes")
    ap.add_argument("--table-images", type=int, default=1000, help="WBF table (0: skip)")
    ap.add_argument("--table-lib-images", type=int, default=50)
    ap.add_argument("--big-images", type=int, default=3000, help="whole-table case (0: skip)")
    ap.add_argument("--big-sets", type=int, default=40)
    ap.add_argument("--big-boxes", type=int, default=100)
    ap.add_argument("--big-repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        ap.error(f"unknown rules {unknown}; choose from {list(RULES)}")
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(args.seed)
    warm = make_image(rng, 3, 20, "agreeing", args.labels)
    for name in rules:
        RULES[name].ours(*warm)  # JIT (or cache load)
    print(f"CPUs available: {len(os.sched_getaffinity(0))}; load average: {os.getloadavg()[0]:.1f}; images per row: "
          f"{args.images} (library: {args.lib_images}); labels: {args.labels}\n")
    if args.images > 0:
        per_image_table(args, rng, rules)
    if args.table_images > 0 and "wbf" in rules:
        wbf_table(args, rng)
    if args.big_images > 0:
        big_table(args, rng, rules)


if __name__ == "__main__":
    main()
