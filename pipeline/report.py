"""Error analysis of an ensemble's out-of-fold predictions: tables, pictures and one HTML page.

    python -m pipeline.report --config configs/demo/ensemble.yaml [--score-thr 0.3] [--n-worst 6] [--no-cam]

Counts and tables (the ensemble stage writes them into ``report/`` beside ``result.json``):

- :func:`per_image_scores`: one row per image with TP/FP/FN at IoU 0.5 and a per-image score, a badness measure a
  user can read whatever the competition metric is.
- :func:`per_threshold_breakdown`: precision, recall and TP/(TP+FP+FN) at each IoU threshold, pooled over images.
- :func:`worst_images_png`: a picture of the worst images, ground truth in green, predictions in red.
- :func:`write_ensemble_report`: all three into a folder (``worst_oof.png``, ``per_threshold.csv``,
  ``per_image.csv``); returns the breakdown as a dict.

Seeing why (:func:`write_html_report`, the command above; one self-contained page, ``report/index.html``, figures
embedded, opens in a browser with no server): per-class precision-recall curves at IoU 0.5 and 0.75 of every
member and the ensemble, a confusion matrix with background (missed / spurious), recall by object size and by
source, score threshold vs precision / recall / F1, the fold-by-fold scores, and the worst OOF images with the
Grad-CAM of their worst false positive and worst miss made by the fold model that predicted them
(:mod:`pipeline.cam`). It reads only the contract files: members' OOF predictions, the ensemble's fused OOF
predictions, the folds file and the dataset, plus the fold checkpoints for the heat maps.

Matching conventions are those of :mod:`pipeline.metrics.gwd`: predictions of an image taken by descending score
(stable), each matched greedily to the unmatched ground truth of highest IoU, a hit only if ``IoU > t`` (strict);
per image and threshold ``TP / (TP + FP + FN)``, 1 for an image with neither ground truth nor predictions. The
counts reuse the metric's numba matcher; the pairings the page needs (which box found which, for the confusion
matrix and recall by size) come from :func:`match`, the same rule with the partner recorded (a test holds the two
to the same counts). One difference from the GWD metric: matching here is **class-aware** (a prediction only
matches ground truth of its own label). For the counts it is done by translating the boxes of class ``c`` by
``c * K`` along x (``K`` a power of two wider than every box span), so boxes of different classes never overlap;
for single-class data nothing moves and the per-image score equals the GWD metric's per-image score (on the
predictions kept by ``score_thr``). A prediction table without a ``label`` column is matched class-agnostically.
Predictions with ``score >= score_thr`` are kept; predictions for images not listed are ignored.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.config import ConfigError, PredictConfig, add_config_args, config_from_args
from pipeline.data import load_dataset
from pipeline.data.images import read_image
from pipeline.data.table import AnnotationTable, DataError
from pipeline.external import load_external_oof
from pipeline.io import atomic_write, atomic_write_text
from pipeline.layout import (ENSEMBLE_REPORT, FoldsError, ensemble_dir, folds_path, fused_path, predictions_path,
                             read_folds, read_predictions)
from pipeline.metrics import Scorer, at_or_above, get_metric, gwd, score_at_best_threshold
from pipeline.metrics.gwd import box_areas, box_iou
from pipeline.metrics.packing import BOX_COLUMNS, pack_boxes, resolve_image_ids
from pipeline.metrics.voc import average_precision
from pipeline.visualize import draw_boxes, grid, save_png

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

IOU_GWD: tuple[float, ...] = tuple(float(t) for t in gwd.IOU_THRESHOLDS)  # 0.50 .. 0.75
IOU_COCO: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50 .. 0.95
GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
_BOX = list(BOX_COLUMNS)
_TITLE_H = 14
_LEGEND_H = 30


@dataclass(frozen=True)
class _Counts:
    ids: pd.Index  # scored image ids, in order
    thresholds: np.ndarray  # (T,)
    n_gt: np.ndarray  # (I,)
    n_pred: np.ndarray  # (I,)
    tp: np.ndarray  # (I, T) true positives per image and threshold
    ratio: np.ndarray  # (I, T) TP / (TP + FP + FN), GWD conventions


def _class_shift(*boxes: np.ndarray) -> float:
    """A power of two wider than the x-span of all boxes: shifting class ``c`` by ``c * K`` separates classes."""
    x = np.concatenate([b[:, [0, 2]].ravel() for b in boxes])
    span = float(x.max() - x.min()) if len(x) else 0.0
    return float(2.0 ** np.ceil(np.log2(span + 2.0)))


def _shifted_by_class(boxes: np.ndarray, labels: np.ndarray, shift: float) -> np.ndarray:
    """``boxes`` with class ``c`` moved by ``c * shift`` along x, so that only same-class boxes can overlap."""
    moved = boxes.copy()
    moved[:, [0, 2]] += (labels * shift)[:, None]
    return moved


def _kept(preds: pd.DataFrame, score_thr: float) -> pd.DataFrame:
    missing = [c for c in ["image_id", *_BOX, "score"] if c not in preds.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    return preds[preds.score >= score_thr]


def _labels(df: pd.DataFrame) -> np.ndarray:
    return df["label"].to_numpy(np.int64) if "label" in df.columns else np.zeros(len(df), dtype=np.int64)


def _counts(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None,
            thresholds: Sequence[float], score_thr: float) -> _Counts:
    index = resolve_image_ids(table, image_ids)
    preds, gt = _kept(preds, score_thr), table.boxes
    gt_boxes, pr_boxes = gt[_BOX].to_numpy(np.float64), preds[_BOX].to_numpy(np.float64)
    if np.isnan(pr_boxes).any():
        raise ValueError("prediction table has NaN coordinates")
    shift = _class_shift(gt_boxes, pr_boxes) if "label" in preds.columns else 0.0
    gt_labels, pr_labels = _labels(gt), _labels(preds)
    g = pack_boxes(index, gt.image_id, _shifted_by_class(gt_boxes, gt_labels, shift), np.ones(len(gt)), gt_labels)
    p = pack_boxes(index, preds.image_id, _shifted_by_class(pr_boxes, pr_labels, shift),
                   preds.score.to_numpy(np.float64), pr_labels)
    ths = np.asarray(thresholds, dtype=np.float64)
    ratio = np.stack([gwd.gwd_packed(g.boxes, g.offsets, p.boxes, p.offsets, ths[[t]]).per_image
                      for t in range(len(ths))], axis=1)
    n_gt, n_pred = np.diff(g.offsets), np.diff(p.offsets)
    # ratio = tp / (n_gt + n_pred - tp)  =>  tp = ratio * (n_gt + n_pred) / (1 + ratio); exact after rounding.
    tp = np.rint(ratio * (n_gt + n_pred)[:, None] / (1.0 + ratio)).astype(np.int64)
    return _Counts(index, ths, n_gt, n_pred, tp, ratio)


def per_image_scores(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None = None,
                     iou_thresholds: Sequence[float] = IOU_GWD, score_thr: float = 0.0) -> pd.DataFrame:
    """One row per image (order of ``image_ids``; default all images of ``table``): ``image_id, n_gt, n_pred,
    tp50, fp50, fn50`` (class-aware, IoU > 0.5) and ``score``, the mean over ``iou_thresholds`` of
    TP/(TP+FP+FN). Lower score = worse image."""
    ths = sorted(set(float(t) for t in iou_thresholds) | {0.5})
    c = _counts(table, preds, image_ids, ths, score_thr)
    tp50 = c.tp[:, ths.index(0.5)]
    used = [ths.index(float(t)) for t in dict.fromkeys(float(t) for t in iou_thresholds)]
    return pd.DataFrame({"image_id": list(c.ids), "n_gt": c.n_gt, "n_pred": c.n_pred, "tp50": tp50,
                         "fp50": c.n_pred - tp50, "fn50": c.n_gt - tp50, "score": c.ratio[:, used].mean(axis=1)})


def rank_worst(per_image: pd.DataFrame) -> pd.DataFrame:
    """``per_image`` worst first: lowest score, then most errors (FP + FN at IoU 0.5), then image id."""
    errors = per_image.fp50 + per_image.fn50
    order = np.lexsort((per_image.image_id.to_numpy(str), -errors.to_numpy(), per_image.score.to_numpy()))
    return per_image.iloc[order].reset_index(drop=True)


def _safe_div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), empty)


def per_threshold_breakdown(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None = None,
                            score_thr: float = 0.0, coco: bool = False) -> pd.DataFrame:
    """One row per IoU threshold (0.50..0.75; 0.50..0.95 with ``coco=True``), counts pooled over images:
    ``iou, tp, fp, fn, precision, recall, ratio`` (TP/(TP+FP+FN)) and ``mean_image_score`` (the mean over images
    of the per-image TP/(TP+FP+FN): the GWD metric's ``iou0.xx`` detail, class-aware here).
    Empty denominators: precision and recall 0, ratio 1 (nothing to find and nothing predicted)."""
    c = _counts(table, preds, image_ids, IOU_COCO if coco else IOU_GWD, score_thr)
    tp = c.tp.sum(axis=0)
    fp, fn = c.n_pred.sum() - tp, c.n_gt.sum() - tp
    mean_image = c.ratio.mean(axis=0) if len(c.ids) else np.zeros(len(c.thresholds))
    return pd.DataFrame({"iou": c.thresholds, "tp": tp, "fp": fp, "fn": fn,
                         "precision": _safe_div(tp, tp + fp, 0.0), "recall": _safe_div(tp, tp + fn, 0.0),
                         "ratio": _safe_div(tp, tp + fp + fn, 1.0), "mean_image_score": mean_image})


def _load(row: pd.Series) -> np.ndarray:
    """The image's pixels, or a grey canvas of its size when the file cannot be read (a report never fails)."""
    try:
        return read_image(row.path)
    except DataError:
        return np.full((max(int(row.height), 1), max(int(row.width), 1), 3), 96, dtype=np.uint8)


def _tile(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, title: str, tile: int) -> np.ndarray:
    """``image`` scaled into a ``tile`` square under a title band, GT boxes (width 2) then predictions on top."""
    h, w = image.shape[:2]
    s = min(tile / w, (tile - _TITLE_H) / h)
    scaled = np.asarray(Image.fromarray(image).resize((max(round(w * s), 1), max(round(h * s), 1)),
                                                      Image.Resampling.BILINEAR))
    scaled = draw_boxes(scaled, gt * s, colour=GT_COLOUR, width=2)
    scaled = draw_boxes(scaled, pred * s, colour=PRED_COLOUR, width=1)
    canvas = Image.new("RGB", (tile, tile), (0, 0, 0))
    canvas.paste(Image.fromarray(scaled), (0, _TITLE_H))
    ImageDraw.Draw(canvas).text((2, 1), title, fill=(255, 255, 255))
    return np.asarray(canvas)


def _legend(width: int, score_thr: float) -> Image.Image:
    legend = Image.new("RGB", (width, _LEGEND_H), (0, 0, 0))
    draw = ImageDraw.Draw(legend)
    draw.rectangle([4, 3, 12, 11], fill=GT_COLOUR)
    draw.text((16, 1), "ground truth", fill=(255, 255, 255))
    draw.rectangle([104, 3, 112, 11], fill=PRED_COLOUR)
    draw.text((116, 1), f"prediction, score >= {score_thr:.2f}", fill=(255, 255, 255))
    draw.text((4, 16), "title: image_id  score (mean TP/(TP+FP+FN) over IoU)  TP/FP/FN at IoU>0.5",
              fill=(200, 200, 200))
    return legend


def _worst_png(table: AnnotationTable, preds: pd.DataFrame, worst: pd.DataFrame, out: Path, score_thr: float,
               tile: int, columns: int) -> Path:
    images = table.images.set_index("image_id")
    gt_of = {i: g[_BOX].to_numpy(np.float64) for i, g in table.boxes.groupby("image_id")}
    kept = _kept(preds, score_thr)
    pred_of = {str(i): g[_BOX].to_numpy(np.float64) for i, g in kept.groupby(kept.image_id.astype(str))}
    empty = np.zeros((0, 4))
    tiles = [_tile(_load(images.loc[r.image_id]), gt_of.get(r.image_id, empty), pred_of.get(r.image_id, empty),
                   f"{r.image_id}  {r.score:.2f}  {r.tp50}/{r.fp50}/{r.fn50}", tile)
             for r in worst.itertuples()]
    columns = max(min(columns, len(tiles)), 1)
    body = grid(tiles, columns=columns, tile=tile)
    canvas = Image.new("RGB", (columns * tile, _LEGEND_H + body.height), (32, 32, 32))
    canvas.paste(_legend(canvas.width, score_thr), (0, 0))
    canvas.paste(body, (0, _LEGEND_H))
    return save_png(canvas, out)


def worst_images_png(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None, out: Path,
                     n: int = 12, score_thr: float = 0.3, tile: int = 384, columns: int = 4) -> Path:
    """A PNG grid of the ``n`` worst images (see :func:`rank_worst`; predictions with score >= ``score_thr``),
    ground truth green, predictions red, each tile titled ``image_id score TP/FP/FN``; a legend line on top.
    Size: ``min(columns, k) * tile`` wide, ``30 + ceil(k / columns) * tile`` high for ``k`` tiles."""
    worst = rank_worst(per_image_scores(table, preds, image_ids, score_thr=score_thr)).head(n)
    return _worst_png(table, preds, worst, Path(out), score_thr, tile, columns)


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as f:
        df.to_csv(f, index=False, lineterminator="\n")
    return path


def write_ensemble_report(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None,
                          out_dir: Path, score_thr: float, n_worst: int = 12) -> dict:
    """Write ``worst_oof.png``, ``per_threshold.csv`` and ``per_image.csv`` (worst first) into ``out_dir``;
    return ``{"score_thr", "n_images", "mean_image_score", "tp50", "fp50", "fn50", "per_threshold":
    {"0.50": {tp, fp, fn, precision, recall, ratio, mean_image_score}, ...}, "files": {name: path}}``."""
    out_dir = Path(out_dir)
    ranked = rank_worst(per_image_scores(table, preds, image_ids, score_thr=score_thr))
    breakdown = per_threshold_breakdown(table, preds, image_ids, score_thr=score_thr)
    files = {"per_image": _write_csv(ranked, out_dir / "per_image.csv"),
             "per_threshold": _write_csv(breakdown, out_dir / "per_threshold.csv"),
             "worst_png": _worst_png(table, preds, ranked.head(n_worst), out_dir / "worst_oof.png", score_thr,
                                     384, 4)}
    per_threshold = {f"{r.iou:.2f}": {k: (int(v) if k in ("tp", "fp", "fn") else float(v))
                                      for k, v in r._asdict().items() if k not in ("Index", "iou")}
                     for r in breakdown.itertuples()}
    return {"score_thr": float(score_thr), "n_images": len(ranked),
            "mean_image_score": float(ranked.score.mean()) if len(ranked) else 0.0,
            **{k: int(ranked[k].sum()) for k in ("tp50", "fp50", "fn50")},
            "per_threshold": per_threshold, "files": {k: str(v) for k, v in files.items()}}


# ------------------------------------------------------------------------------- pairings (who found whom)

@numba.njit(cache=True)
def _assign(gt_boxes, gt_labels, gt_offsets, pr_boxes, pr_labels, pr_offsets, thr, class_aware) -> np.ndarray:
    """For each prediction (descending score inside its image) the ground-truth row it takes, -1 if none: the
    GWD metric's rule (unmatched GT of highest IoU > thr, IoU ties to the lower GT row), with the partner kept."""
    gt_area, pr_area = box_areas(gt_boxes), box_areas(pr_boxes)
    partner = np.full(pr_boxes.shape[0], -1, dtype=np.int64)
    taken = np.zeros(gt_boxes.shape[0], dtype=np.bool_)
    for i in range(gt_offsets.shape[0] - 1):
        for p in range(pr_offsets[i], pr_offsets[i + 1]):
            best, best_iou = -1, thr
            for g in range(gt_offsets[i], gt_offsets[i + 1]):
                if taken[g] or (class_aware and gt_labels[g] != pr_labels[p]):
                    continue
                iou = box_iou(pr_boxes[p], gt_boxes[g], pr_area[p], gt_area[g])
                if iou > best_iou:
                    best, best_iou = g, iou
            if best >= 0:
                taken[best] = True
                partner[p] = best
    return partner


@dataclass(frozen=True)
class Matching:
    """The kept predictions and the ground truth of the scored images, each row with its partner at ``iou_thr``.

    ``preds``: ``image_id, x1, y1, x2, y2, score, label, gt_row`` (the row of ``gt`` it found; -1: a false
    positive), grouped by image, descending score inside an image. ``gt``: ``image_id, x1, y1, x2, y2, label, area,
    pred_row`` (the row of ``preds`` that found it; -1: a miss)."""

    iou_thr: float
    class_aware: bool
    preds: pd.DataFrame
    gt: pd.DataFrame


def match(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None = None,
          iou_thr: float = 0.5, score_thr: float = 0.0, class_aware: bool = True) -> Matching:
    """Pair predictions (``score >= score_thr``) with ground truth at ``iou_thr`` (strict ``>``), per image;
    ``class_aware=False`` lets a box find ground truth of any class (what a confusion matrix counts)."""
    index = resolve_image_ids(table, image_ids)
    kept, gt = _kept(preds, score_thr), table.boxes
    g = pack_boxes(index, gt.image_id, gt[_BOX].to_numpy(np.float64), np.ones(len(gt)), _labels(gt))
    p = pack_boxes(index, kept.image_id, kept[_BOX].to_numpy(np.float64), kept.score.to_numpy(np.float64),
                   _labels(kept))
    if np.isnan(p.boxes).any():
        raise ValueError("prediction table has NaN coordinates")
    partner = _assign(g.boxes, g.labels, g.offsets, p.boxes, p.labels, p.offsets, float(iou_thr), class_aware)
    found_by = np.full(len(g.boxes), -1, dtype=np.int64)
    found_by[partner[partner >= 0]] = np.flatnonzero(partner >= 0)
    ids = np.asarray(index, dtype=object)
    pred_df = pd.DataFrame({"image_id": ids[p.image], **dict(zip(_BOX, p.boxes.T)), "score": p.scores,
                            "label": p.labels, "gt_row": partner})
    wh = g.boxes[:, 2:] - g.boxes[:, :2]
    gt_df = pd.DataFrame({"image_id": ids[g.image], **dict(zip(_BOX, g.boxes.T)), "label": g.labels,
                          "area": wh[:, 0] * wh[:, 1], "pred_row": found_by})
    return Matching(float(iou_thr), class_aware, pred_df, gt_df)


def pr_curve(m: Matching, label: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Recall and precision of class ``label`` after each of its predictions (all images, descending score,
    stable), and its all-point AP (:func:`pipeline.metrics.voc.average_precision`; NaN without ground truth)."""
    p = m.preds[m.preds.label == label]
    tp = (p.gt_row.to_numpy() >= 0)[np.argsort(-p.score.to_numpy(), kind="stable")]
    n_gt = int((m.gt.label == label).sum())
    hits = np.cumsum(tp)
    recall = hits / n_gt if n_gt else np.zeros(len(tp))
    precision = hits / np.arange(1, len(tp) + 1)
    return recall, precision, average_precision(tp, n_gt)


def threshold_curve(m: Matching, thresholds: Sequence[float] | None = None) -> pd.DataFrame:
    """Pooled over classes and images, at each score threshold ``t`` (keep ``score >= t``): ``score_thr, tp, fp,
    fn, precision, recall, f1``. Exact from one matching: a prediction's partner never depends on the predictions
    of lower score (they come later in the greedy order), so dropping them changes no earlier pairing."""
    ths = np.round(np.linspace(0.0, 1.0, 101), 2) if thresholds is None else np.asarray(thresholds, dtype=float)
    order = np.argsort(m.preds.score.to_numpy(), kind="stable")
    scores, hit = m.preds.score.to_numpy()[order], (m.preds.gt_row.to_numpy() >= 0)[order]
    first = np.searchsorted(scores, ths, side="left")  # predictions first..end have score >= t
    hits_from = np.concatenate([np.cumsum(hit[::-1])[::-1], [0]])
    tp, n = hits_from[first], len(scores) - first
    n_gt = len(m.gt)
    precision, recall = _safe_div(tp, n, 0.0), _safe_div(tp, np.full_like(tp, n_gt), 0.0)
    both = precision + recall
    f1 = np.where(both > 0, 2 * precision * recall / np.where(both > 0, both, 1.0), 0.0)
    return pd.DataFrame({"score_thr": ths, "tp": tp, "fp": n - tp, "fn": n_gt - tp, "precision": precision,
                         "recall": recall, "f1": f1})


BACKGROUND = "background"


def confusion_matrix(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None = None,
                     iou_thr: float = 0.5, score_thr: float = 0.0) -> pd.DataFrame:
    """Counts by ground-truth class (rows) and predicted class (columns), from a class-agnostic matching at
    ``iou_thr``: a pair counts in its (true, predicted) cell, a ground truth nobody found in column
    ``background`` (missed), a prediction that found nothing in row ``background`` (spurious). The
    (background, background) cell is 0: nothing-on-nothing is not counted."""
    m = match(table, preds, image_ids, iou_thr, score_thr, class_aware=False)
    k = len(table.classes)
    counts = np.zeros((k + 1, k + 1), dtype=np.int64)
    paired = m.preds[m.preds.gt_row >= 0]
    np.add.at(counts, (m.gt.label.to_numpy()[paired.gt_row.to_numpy()], paired.label.to_numpy()), 1)
    np.add.at(counts, (np.full((m.preds.gt_row < 0).sum(), k), m.preds.label[m.preds.gt_row < 0].to_numpy()), 1)
    np.add.at(counts, (m.gt.label[m.gt.pred_row < 0].to_numpy(), np.full((m.gt.pred_row < 0).sum(), k)), 1)
    names = [*table.classes, BACKGROUND]
    return pd.DataFrame(counts, index=pd.Index(names, name="ground truth"), columns=pd.Index(names, name="predicted"))


SIZE_BUCKETS = (("small", 32.0), ("medium", 96.0), ("large", float("inf")))  # COCO's: sqrt(area) in pixels


def size_bucket(area: pd.Series) -> pd.Series:
    """COCO's object sizes from box areas in original pixels: small < 32², medium < 96², large the rest."""
    side = np.sqrt(area.to_numpy(np.float64))
    edges = [edge for _, edge in SIZE_BUCKETS]
    return pd.Series(np.array([name for name, _ in SIZE_BUCKETS])[np.searchsorted(edges, side, side="right")],
                     index=area.index)


def recall_by(m: Matching, groups: pd.Series) -> pd.DataFrame:
    """``group, n_gt, found, recall`` for the ground truth of ``m`` grouped by ``groups`` (one value per row of
    ``m.gt``), in order of first appearance of each group."""
    found = (m.gt.pred_row >= 0).astype(np.int64)
    out = found.groupby(groups.to_numpy(), sort=False).agg(["size", "sum"]).rename(
        columns={"size": "n_gt", "sum": "found"})
    out["recall"] = out.found / out.n_gt
    return out.rename_axis("group").reset_index()


def fold_scores(metric: str, table: AnnotationTable, folds: pd.DataFrame, predictions: dict[str, pd.DataFrame],
                thresholds: Sequence[float] = ()) -> pd.DataFrame:
    """The metric of each prediction table on each fold's images (the fold model that predicted them) and pooled:
    one row per fold plus ``pooled``, columns ``n_images`` and one per table. A thresholded metric (GWD, F2) reads
    each table at its best pooled threshold of ``thresholds`` (its folds at that one too), as the ensemble table
    does; the row ``score_thr`` holds them."""
    pooled = Scorer(metric, table, folds.image_id.tolist())
    best = {name: score_at_best_threshold(pooled, p, thresholds) for name, p in predictions.items()}
    cut = {name: thr for name, (_, thr) in best.items()}
    rows = []
    for fold in sorted(folds.fold.unique()):
        ids = folds.image_id[folds.fold == fold]
        scorer = Scorer(metric, table, ids.tolist())
        rows.append({"fold": fold, "n_images": len(ids),
                     **{name: scorer(at_or_above(p, cut[name])).score for name, p in predictions.items()}})
    rows.append({"fold": "pooled", "n_images": len(folds), **{name: r.score for name, (r, _) in best.items()}})
    if pooled.entry.thresholded:
        rows.append({"fold": "score_thr", "n_images": len(folds), **cut})
    return pd.DataFrame(rows).set_index("fold")


def worst_errors(m: Matching, image_id: str) -> tuple[pd.Series | None, pd.Series | None]:
    """The image's worst false positive (its highest-scored unpaired prediction) and worst miss (its largest
    unfound ground truth); None where it has none."""
    fps = m.preds[(m.preds.image_id == image_id) & (m.preds.gt_row < 0)]
    misses = m.gt[(m.gt.image_id == image_id) & (m.gt.pred_row < 0)]
    fp = fps.loc[fps.score.idxmax()] if len(fps) else None
    miss = misses.loc[misses.area.idxmax()] if len(misses) else None
    return fp, miss


# --------------------------------------------------------------------------------------- the HTML page

REPORT_HTML = "index.html"  # inside the ensemble's report/ folder, beside worst_oof.png and the CSVs
REPORT_SCORE_THR = 0.3  # the working threshold of the counts (confusion, recall, worst images); curves use all
CAM_TILE = 320
_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#222}"
        "table.t{border-collapse:collapse;margin:.5em 0 1em}table.t td,table.t th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}h2{border-bottom:1px solid #ccc;margin-top:1.6em}"
        ".note{color:#555;font-size:90%}figure{display:inline-block;margin:4px;vertical-align:top}"
        "figcaption{font-size:80%;max-width:" + str(CAM_TILE) + "px}")


class ReportError(RuntimeError):
    """A report asked for before the files it reads exist, or of a config that is not an ensemble's."""


def html_report_path(cfg: ExperimentConfig) -> Path:
    return ensemble_dir(cfg) / ENSEMBLE_REPORT / REPORT_HTML


@dataclass
class ReportInputs:
    """What the page is made of, read through :mod:`pipeline.layout` (see :func:`read_report_inputs`)."""

    cfg: ExperimentConfig
    table: AnnotationTable
    folds: pd.DataFrame
    fused: pd.DataFrame  # the ensemble's fused OOF predictions
    members: dict[str, ExperimentConfig] = field(default_factory=dict)  # run name -> member config
    member_oof: dict[str, pd.DataFrame] = field(default_factory=dict)  # run name -> OOF, its TTA views fused

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every member, then the ensemble (under its name)."""
        return {**self.member_oof, self.cfg.ensemble.name: self.fused}

    @property
    def image_ids(self) -> list[str]:
        return self.folds.image_id.tolist()


def read_report_inputs(cfg: ExperimentConfig,
                       external_oof: Mapping[str, pd.DataFrame] | None = None) -> ReportInputs:
    """The dataset, the folds file, the fused OOF predictions and each member's OOF predictions with its TTA views
    fused per fold as the member's own predict stage scores them (one view: that view); a member made by another
    tool (a predictions folder) is read as the ensemble reads it, or taken from ``external_oof`` (by name: the
    ensemble stage's, already read and checked, so its files are not read and their repairs not logged twice)."""
    if not cfg.ensemble.members:
        raise ReportError(f"{cfg.source}: ensemble.members is empty; the report explains an ensemble: pass its "
                          "ensemble.yaml")
    path = fused_path(cfg, "oof")
    if not path.exists():
        raise ReportError(f"{path} not found: run python -m pipeline.ensemble --config {cfg.source}")
    table = load_dataset(cfg.data, "train")
    inputs = ReportInputs(cfg, table, read_folds(folds_path(cfg)), read_predictions(path))
    for spec in cfg.ensemble.members:
        if spec.config is None:  # another tool's predictions: scored like ours, but no fold model to explain with
            name = str(spec.name)
            preds = (external_oof[name] if external_oof and name in external_oof
                     else load_external_oof(spec.predictions_folder, spec.format, name, table, inputs.folds,
                                            spec.coco_image_id))
            inputs.member_oof[name] = _views_fused(preds, table, cfg.predict, name)
            continue
        member = cfg.load_sibling(spec.config)
        member_path = predictions_path(member, "oof")
        if not member_path.exists():
            raise ReportError(f"{member_path} not found: run python -m pipeline.predict --config {member.source} "
                              "--split oof")
        preds = _views_fused(read_predictions(member_path), table, member.predict, member.run)
        inputs.members[member.run], inputs.member_oof[member.run] = member, preds
    return inputs


def _views_fused(preds: pd.DataFrame, table: AnnotationTable, p: PredictConfig, name: str) -> pd.DataFrame:
    """A member's OOF predictions with its TTA views fused per fold, as its predict stage scores them (one view:
    that view)."""
    from pipeline.fusion.views import fuse_views  # lazy: WBF is needed only for the page

    views = sorted(preds.tta.unique(), key=lambda v: (v != "none", v))
    if len(views) == 1:
        return preds
    return fuse_views(preds, table.images, views, name, **p.tta_wbf)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _figure_uri(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _array_uri(image: np.ndarray, max_side: int | None = None) -> str:
    pil = Image.fromarray(image)
    if max_side:
        pil.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _table(df: pd.DataFrame, index: bool = True) -> str:
    return df.to_html(float_format=lambda v: f"{v:.3f}", border=0, classes="t", na_rep="", index=index)


def _section(title: str, *parts: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n" + "\n".join(parts)


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _line_styles(names: list[str]) -> dict[str, dict]:
    """Members thin and dashed, the ensemble (last) thick and solid, one colour each."""
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    styles = {n: {"color": colours[i % len(colours)], "lw": 1.2, "ls": "--"} for i, n in enumerate(names[:-1])}
    styles[names[-1]] = {"color": "#d62728", "lw": 2.2, "ls": "-"}
    return styles


def _pr_section(inputs: ReportInputs, matchings: dict[float, dict[str, Matching]]) -> str:
    classes, names = inputs.table.classes, list(inputs.tables)
    styles, figures, ap = _line_styles(names), [], {}
    cols = min(len(classes), 4)
    rows = -(-len(classes) // cols)
    for thr, by_name in matchings.items():
        fig = _figure(3.6 * cols, 3.2 * rows)
        for c, cls in enumerate(classes):
            ax = fig.add_subplot(rows, cols, c + 1)
            for name, m in by_name.items():
                recall, precision, a = pr_curve(m, c)
                ap[(name, f"AP{round(thr * 100)} {cls}")] = a
                label = f"{name} AP {a:.3f}" if not np.isnan(a) else f"{name} (no ground truth)"
                ax.plot(recall, precision, label=label, **styles[name])
            ax.set(title=f"{cls} @ IoU {thr:.2f}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        figures.append(_img(_figure_uri(fig), f"precision-recall at IoU {thr:.2f}"))
    columns = [f"AP{round(thr * 100)} {cls}" for thr in matchings for cls in classes]
    table = pd.Series(ap).unstack().reindex(index=names, columns=columns)
    return _section("Precision-recall per class",
                    _note("Every prediction of the class over all OOF images, descending score; a hit if it takes "
                          "an unmatched ground truth of its class with IoU > t (greedy, as the GWD metric). AP is "
                          "the all-point area under the precision envelope. Members: each member's fold models "
                          "with their TTA views fused; thick red: the ensemble's fused OOF boxes."),
                    *figures, _table(table))


def _threshold_section(inputs: ReportInputs, matchings: dict[str, Matching]) -> str:
    names = list(inputs.tables)
    curves = {name: threshold_curve(m) for name, m in matchings.items()}
    ens = curves[names[-1]]
    fig = _figure(11, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    for column, colour in (("precision", "#1f77b4"), ("recall", "#2ca02c"), ("f1", "#d62728")):
        values = ens[column].where(ens.tp + ens.fp > 0) if column == "precision" else ens[column]  # no box: no P
        ax.plot(ens.score_thr, values, label=column, color=colour)
    best = ens.loc[ens.f1.idxmax()]
    ax.axvline(best.score_thr, color="#999", ls=":", label=f"best F1 {best.f1:.3f} at {best.score_thr:.2f}")
    ax.set(title=f"{names[-1]}: OOF, IoU > 0.5, class-aware", xlabel="score threshold", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    styles = _line_styles(names)
    for name, curve in curves.items():
        ax.plot(curve.score_thr, curve.f1, label=name, **styles[name])
    ax.set(title="F1 by score threshold", xlabel="score threshold", ylabel="F1", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    summary = pd.DataFrame([{"table": n, **c.loc[c.f1.idxmax()].to_dict()} for n, c in curves.items()])
    summary = summary.set_index("table")[["score_thr", "precision", "recall", "f1", "tp", "fp", "fn"]]
    return _section("Score threshold vs precision, recall, F1 (OOF)",
                    _note("Boxes with score >= threshold kept, pooled over classes and images. The best-F1 "
                          "threshold is a guide for metrics that count every box (F1, GWD); mAP prefers all boxes."),
                    _img(_figure_uri(fig), "score threshold curves"), _table(summary.astype({"tp": int, "fp": int,
                                                                                              "fn": int})))


def _confusion_section(inputs: ReportInputs, score_thr: float) -> str:
    cm = confusion_matrix(inputs.table, inputs.fused, inputs.image_ids, 0.5, score_thr)
    k = len(cm)
    fig = _figure(1.2 + 0.9 * k, 0.9 + 0.8 * k)
    ax = fig.add_subplot(1, 1, 1)
    share = cm.to_numpy() / np.maximum(cm.to_numpy().sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm.to_numpy()):
        if i < k - 1 or j < k - 1:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=9, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), [f"{c}\n(missed)" if c == BACKGROUND else c for c in cm.columns], fontsize=8)
    ax.set_yticks(range(k), [f"{c}\n(spurious)" if c == BACKGROUND else c for c in cm.index], fontsize=8)
    ax.set(xlabel="predicted", ylabel="ground truth", title=f"{inputs.cfg.ensemble.name}: IoU > 0.5")
    return _section("Confusion matrix with background",
                    _note(f"The ensemble's fused OOF boxes with score >= {score_thr:.2f}, matched to ground truth "
                          "of any class (IoU > 0.5, greedy by score). Off-diagonal: found the object, wrong class. "
                          "Column background: objects nobody found; row background: boxes on nothing. Colour: "
                          "share of the row."),
                    _img(_figure_uri(fig), "confusion matrix"), _table(cm))


def _recall_section(inputs: ReportInputs, score_thr: float) -> str:
    matchings = {n: match(inputs.table, p, inputs.image_ids, 0.5, score_thr) for n, p in inputs.tables.items()}
    source = inputs.table.images.set_index("image_id").source
    groupings = {"object size (COCO: sqrt(area) < 32 px small, < 96 px medium)": lambda m: size_bucket(m.gt.area),
                 "source": lambda m: m.gt.image_id.map(source).replace("", "(none)")}
    parts, fig = [], _figure(11, 3.4)
    for i, (title, groups_of) in enumerate(groupings.items()):
        by = {n: recall_by(m, groups_of(m)).set_index("group") for n, m in matchings.items()}
        first = next(iter(by.values()))
        table = pd.DataFrame({"n_gt": first.n_gt, **{n: r.recall for n, r in by.items()}})
        order = [b for b, _ in SIZE_BUCKETS] if title.startswith("object size") else sorted(table.index)
        table = table.reindex([g for g in order if g in table.index])
        ax = fig.add_subplot(1, 2, i + 1)
        width = 0.8 / max(len(by), 1)
        for j, (name, style) in enumerate(_line_styles(list(by)).items()):
            ax.bar(np.arange(len(table)) + j * width, table[name].fillna(0), width, label=name, color=style["color"])
        ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, [f"{g}\n(n={int(n)})" for g, n in table.n_gt.items()],
                      fontsize=8)
        ax.set(title=f"recall by {title.split(' (')[0]}", ylim=(0, 1.02))
        ax.legend(fontsize=7)
        parts.append(f"<h3>by {html.escape(title)}</h3>" + _table(table.astype({"n_gt": int})))
    return _section("Recall by object size and by source",
                    _note(f"Ground truth found by a box of its class with IoU > 0.5, boxes with score >= "
                          f"{score_thr:.2f}."), _img(_figure_uri(fig), "recall by size and source"), *parts)


def _fold_section(inputs: ReportInputs, scores: pd.DataFrame) -> str:
    """The :func:`fold_scores` table of every member and the ensemble, with each one's worst fold."""
    metric = get_metric(inputs.cfg.metric)
    per_fold = scores.drop(index=["pooled", "score_thr"], errors="ignore")
    lines = []
    for name in inputs.tables:
        values = per_fold[name].to_list()
        worst = per_fold.index[int(np.argmin([metric.gain(v, 0.0) for v in values]))]  # in its direction
        lines.append(f"{name}: worst fold {worst} ({per_fold.loc[worst, name]:.4f}), spread "
                     f"{max(values) - min(values):.4f}")
    direction = "higher" if metric.higher_is_better else "lower"
    return _section(f"Fold-by-fold {metric.name} ({direction} is better)",
                    _note("Each fold's images scored alone: the fold model that did not train on them (members), "
                          "the fused boxes of those images (ensemble). " + "; ".join(lines) + "."),
                    _table(scores.astype({"n_images": int})))


class _FoldModels:
    """The members' fold checkpoints, each loaded on first use; a fold's image is explained by the first member
    (ensemble order) whose model of that fold exists."""

    def __init__(self, members: dict[str, ExperimentConfig], n_classes: int, device) -> None:
        self.members, self.n_classes, self.device = members, n_classes, device
        self.loaded: dict[tuple[str, int], object] = {}
        self.missing: list[str] = []

    def get(self, fold: int):
        from pipeline.engine import MissingCheckpointError, load_fold_model

        for name, cfg in self.members.items():
            if (name, fold) not in self.loaded:
                try:
                    self.loaded[(name, fold)] = load_fold_model(cfg, fold, self.n_classes, self.device)
                except MissingCheckpointError as exc:
                    self.loaded[(name, fold)] = None
                    self.missing.append(str(exc))
            if self.loaded[(name, fold)] is not None:
                return name, self.loaded[(name, fold)]
        return None, None


def _explained(model, resize: str, image: np.ndarray, box: np.ndarray, label: int,
               colour: tuple[int, int, int]) -> tuple[str, str]:
    """(data URI of the heat map with the box drawn, which method made it and why); ``resize``: the model's."""
    from pipeline.cam import CamError, CamTarget, explain, overlay

    try:
        target = CamTarget(tuple(float(v) for v in box), int(label))
        heat, how = explain(model, image, "gradcam", target, resize), "Grad-CAM"
    except CamError:  # the model has no box of that class there: show where its features are instead
        heat = explain(model, image, "eigencam", resize=resize)
        how = "EigenCAM (the fold model has no box of this class here)"
    picture = draw_boxes(overlay(image, heat), box[None], colour=colour, width=max(2, image.shape[1] // 200))
    return _array_uri(picture, CAM_TILE), how


def _worst_row(inputs: ReportInputs, m: Matching, row, fold: int, models: _FoldModels | None) -> str:
    images = inputs.table.images.set_index("image_id")
    image = _load(images.loc[row.image_id])
    gt = m.gt[m.gt.image_id == row.image_id]
    pr = m.preds[m.preds.image_id == row.image_id]
    title = f"{row.image_id}  fold {fold}  {row.score:.2f}  {row.tp50}/{row.fp50}/{row.fn50}"
    tile = _tile(image, gt[_BOX].to_numpy(), pr[_BOX].to_numpy(), title, CAM_TILE)
    cells = [f"<figure>{_img(_array_uri(tile), title)}<figcaption>green: ground truth, red: fused boxes; score, "
             "TP/FP/FN at IoU 0.5</figcaption></figure>"]
    fp, miss = worst_errors(m, row.image_id)
    classes = inputs.table.classes
    for kind, err, colour in (("worst false positive", fp, PRED_COLOUR), ("worst miss", miss, GT_COLOUR)):
        if err is None:
            cells.append(f"<figure><figcaption>{kind}: none</figcaption></figure>")
            continue
        box = err[_BOX].to_numpy(np.float64)
        what = (f"{classes[int(err.label)]} {err.score:.2f}" if kind.endswith("positive") else
                f"{classes[int(err.label)]} {box[2] - box[0]:.0f}x{box[3] - box[1]:.0f} px")
        name, model = models.get(fold) if models is not None else (None, None)
        if model is None:
            why = "heat maps off" if models is None else "no fold checkpoint"
            cells.append(f"<figure><figcaption>{kind}: {html.escape(what)} ({why})</figcaption></figure>")
            continue
        uri, how = _explained(model, models.members[name].model.resize, image, box, int(err.label), colour)
        caption = f"{kind}: {what}; {how} of {name} fold {fold}"
        cells.append(f"<figure>{_img(uri, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "<div>" + "".join(cells) + "</div>"


def _worst_section(inputs: ReportInputs, score_thr: float, n_worst: int, cam: bool) -> str:
    m = match(inputs.table, inputs.fused, inputs.image_ids, 0.5, score_thr)
    ranked = rank_worst(per_image_scores(inputs.table, inputs.fused, inputs.image_ids, score_thr=score_thr))
    fold_of = inputs.folds.set_index("image_id").fold
    models = None
    if cam:
        from pipeline.cam import cam_device

        models = _FoldModels(inputs.members, len(inputs.table.classes), cam_device(inputs.cfg.train.device))
    rows = [_worst_row(inputs, m, r, int(fold_of[r.image_id]), models) for r in ranked.head(n_worst).itertuples()]
    notes = [f"The {n_worst} worst OOF images of the fused boxes (score >= {score_thr:.2f}), worst first: lowest "
             "mean TP/(TP+FP+FN) over IoU 0.50..0.75, then most errors. Heat maps: the fold model that predicted "
             "the image (it never trained on it). Worst false positive: its highest-scored box that found nothing; "
             "worst miss: its largest object nobody found. Grad-CAM differentiates the score of the model's own "
             "box of that class overlapping the marked box most (IoU > 0.5); where the model has none, EigenCAM "
             "(no target) shows what its features respond to."]
    if models is not None and models.missing:
        notes.append("Missing fold checkpoints: " + "; ".join(sorted(set(models.missing))))
    return _section("Worst OOF images", *map(_note, notes), *rows)


def write_html_report(cfg: ExperimentConfig, score_thr: float = REPORT_SCORE_THR, n_worst: int = 6,
                      cam: bool = True, out: Path | None = None,
                      external_oof: Mapping[str, pd.DataFrame] | None = None) -> Path:
    """One self-contained HTML page of error analysis for the ensemble of ``cfg`` (figures embedded as data
    URIs), written atomically to ``out`` (default ``runs/<experiment>/ensembles/<name>/report/index.html``).
    ``score_thr`` is the working threshold of the confusion matrix, recall and worst images (curves use every
    box); ``cam=False`` skips the heat maps (no fold model is loaded); ``external_oof``: see
    :func:`read_report_inputs`."""
    if n_worst < 0 or not 0.0 <= score_thr <= 1.0:
        raise ValueError(f"n_worst must be >= 0 and score_thr in [0, 1], got {n_worst} and {score_thr}")
    inputs = read_report_inputs(cfg, external_oof)
    metric = get_metric(cfg.metric)
    scores = fold_scores(metric.name, inputs.table, inputs.folds, inputs.tables, cfg.ensemble.tune.score_thr)
    head = (f"<h1>{html.escape(cfg.ensemble.name)}: OOF error analysis</h1>"
            + _note(f"{len(inputs.image_ids)} out-of-fold images of {cfg.data.name}, {cfg.folds.k} folds; metric "
                    f"{metric.name}: " + ", ".join(f"{n} {scores.loc['pooled', n]:.4f}" for n in inputs.tables)
                    + "."))
    breakdown = per_threshold_breakdown(inputs.table, inputs.fused, inputs.image_ids, score_thr=score_thr)
    matchings = {thr: {n: match(inputs.table, p, inputs.image_ids, thr) for n, p in inputs.tables.items()}
                 for thr in (0.5, 0.75)}
    sections = [head,
                _fold_section(inputs, scores),
                _section("Fused boxes by IoU threshold",
                         _note(f"score >= {score_thr:.2f}, class-aware, pooled over images"),
                         _table(breakdown, index=False)),
                _pr_section(inputs, matchings),
                _threshold_section(inputs, matchings[0.5]),
                _confusion_section(inputs, score_thr),
                _recall_section(inputs, score_thr),
                _worst_section(inputs, score_thr, n_worst, cam)]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(cfg.ensemble.name)} report</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    return atomic_write_text(out or html_report_path(cfg), page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One HTML page of error analysis of an ensemble's OOF predictions.")
    add_config_args(parser, demo="ensemble.yaml")
    parser.add_argument("--score-thr", type=float, default=REPORT_SCORE_THR,
                        help="working threshold of the confusion matrix, recall and worst images (default %(default)s)")
    parser.add_argument("--n-worst", type=int, default=6, help="worst OOF images shown (default %(default)s)")
    parser.add_argument("--no-cam", action="store_true", help="no heat maps (loads no fold model)")
    parser.add_argument("--out", type=Path, default=None, help="HTML path (default: the ensemble's report/index.html)")
    args = parser.parse_args(argv)
    try:
        path = write_html_report(config_from_args(args), args.score_thr, args.n_worst, not args.no_cam, args.out)
    except (ConfigError, DataError, FoldsError, ReportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


__all__ = ["BACKGROUND", "IOU_COCO", "IOU_GWD", "REPORT_SCORE_THR", "Matching", "ReportError", "ReportInputs",
           "confusion_matrix", "fold_scores", "html_report_path", "match", "per_image_scores",
           "per_threshold_breakdown", "pr_curve", "rank_worst", "read_report_inputs", "recall_by", "size_bucket",
           "threshold_curve", "worst_errors", "worst_images_png", "write_ensemble_report", "write_html_report"]


if __name__ == "__main__":
    sys.exit(main())
