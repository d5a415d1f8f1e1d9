"""Error analysis of a prediction table (typically the fused OOF predictions of an ensemble).

- :func:`per_image_scores`: one row per image with TP/FP/FN at IoU 0.5 and a per-image score, a badness measure a
  user can read whatever the competition metric is.
- :func:`per_threshold_breakdown`: precision, recall and TP/(TP+FP+FN) at each IoU threshold, pooled over images.
- :func:`worst_images_png`: a picture of the worst images, ground truth in green, predictions in red.
- :func:`write_ensemble_report`: all three into a folder (``worst_oof.png``, ``per_threshold.csv``,
  ``per_image.csv``); returns the breakdown as a dict.

Matching conventions are those of :mod:`pipeline.metrics.gwd` (the same numba matcher is reused): predictions of an
image taken by descending score (stable), each matched greedily to the unmatched ground truth of highest IoU, a hit
only if ``IoU > t`` (strict); per image and threshold ``TP / (TP + FP + FN)``, 1 for an image with neither ground
truth nor predictions. One difference: matching here is **class-aware** (a prediction only matches ground truth of
its own label), while the GWD metric ignores labels. It is done by translating the boxes of class ``c`` by
``c * K`` along x (``K`` a power of two wider than every box span), so boxes of different classes never overlap;
for single-class data nothing moves and the per-image score equals the GWD metric's per-image score (on the
predictions kept by ``score_thr``). A prediction table without a ``label`` column is matched class-agnostically.
Predictions with ``score >= score_thr`` are kept; predictions for images not listed are ignored.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.data.images import read_image
from pipeline.data.table import AnnotationTable, DataError
from pipeline.io import atomic_write
from pipeline.metrics import _resolve_ids, gwd
from pipeline.visualize import draw_boxes, grid, save_png

IOU_GWD: tuple[float, ...] = tuple(float(t) for t in gwd.IOU_THRESHOLDS)  # 0.50 .. 0.75
IOU_COCO: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50 .. 0.95
GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
_BOX = ["x1", "y1", "x2", "y2"]
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


def _pack(index: pd.Index, image_id: pd.Series, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
          shift: float) -> tuple[np.ndarray, np.ndarray]:
    image = index.get_indexer(image_id.astype(str))
    keep = image >= 0
    boxes = boxes[keep].copy()
    boxes[:, [0, 2]] += (labels[keep] * shift)[:, None]
    order, offsets = gwd.group_by_image(image[keep].astype(np.int64), scores[keep], len(index))
    return np.ascontiguousarray(boxes[order]), offsets


def _kept(preds: pd.DataFrame, score_thr: float) -> pd.DataFrame:
    missing = [c for c in ["image_id", *_BOX, "score"] if c not in preds.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    return preds[preds.score >= score_thr]


def _labels(df: pd.DataFrame) -> np.ndarray:
    return df["label"].to_numpy(np.int64) if "label" in df.columns else np.zeros(len(df), dtype=np.int64)


def _counts(table: AnnotationTable, preds: pd.DataFrame, image_ids: Sequence[str] | None,
            thresholds: Sequence[float], score_thr: float) -> _Counts:
    index = _resolve_ids(table, image_ids)
    preds, gt = _kept(preds, score_thr), table.boxes
    gt_boxes, pr_boxes = gt[_BOX].to_numpy(np.float64), preds[_BOX].to_numpy(np.float64)
    if np.isnan(pr_boxes).any():
        raise ValueError("prediction table has NaN coordinates")
    shift = _class_shift(gt_boxes, pr_boxes) if "label" in preds.columns else 0.0
    g, g_off = _pack(index, gt.image_id, gt_boxes, _labels(gt), np.ones(len(gt)), shift)
    p, p_off = _pack(index, preds.image_id, pr_boxes, _labels(preds), preds.score.to_numpy(np.float64), shift)
    ths = np.asarray(thresholds, dtype=np.float64)
    ratio = np.stack([gwd.gwd_packed(g, g_off, p, p_off, ths[[t]]).per_image for t in range(len(ths))], axis=1)
    n_gt, n_pred = np.diff(g_off), np.diff(p_off)
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


__all__ = ["IOU_COCO", "IOU_GWD", "per_image_scores", "per_threshold_breakdown", "rank_worst", "worst_images_png",
           "write_ensemble_report"]
