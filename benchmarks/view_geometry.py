"""Where a TTA view puts its boxes, compared with the plain view of the same model on the same images.

    .venv/bin/python benchmarks/view_geometry.py runs/<experiment>/<run>/predictions/oof.parquet [--score 0.5]

Prints one row per view: boxes above ``--score``, how many match a ``none`` box of the same image (best IoU > 0.3),
their median IoU, the median ratio of the view's box width and height to the matched ``none`` box's, and the median
shift of the box centre in original pixels. A wrong inverse moves centres by many pixels or scales them from the
image origin; a model trained at one input size keeps the centres but sizes objects toward its training size
(width / height ratios above 1 for scale views below 1, below 1 for scale views above 1).
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from pipeline.layout import read_predictions

COLS = ["x1", "y1", "x2", "y2"]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def view_row(plain: pd.DataFrame, view: pd.DataFrame) -> dict:
    """Matched pairs (each plain box to its best view box) of one view against the plain view."""
    pairs = []
    for image_id, a in plain.groupby("image_id"):
        b = view[view.image_id == image_id]
        if len(b):
            a_xy, b_xy = a[COLS].to_numpy(float), b[COLS].to_numpy(float)
            iou = iou_matrix(a_xy, b_xy)
            ok = iou.max(1) > 0.3
            pairs.append((a_xy[ok], b_xy[iou.argmax(1)[ok]], iou.max(1)[ok]))
    if not pairs:
        return {"boxes": len(view), "matched": 0}
    a_xy, b_xy, iou = (np.concatenate(p) for p in zip(*pairs))
    size = lambda x: x[:, 2:] - x[:, :2]  # noqa: E731
    centre = lambda x: (x[:, 2:] + x[:, :2]) / 2  # noqa: E731
    ratio, shift = np.median(size(b_xy) / size(a_xy), 0), np.median(centre(b_xy) - centre(a_xy), 0)
    return {"boxes": len(view), "matched": len(iou), "median IoU": np.median(iou), "width ratio": ratio[0],
            "height ratio": ratio[1], "centre dx px": shift[0], "centre dy px": shift[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="a prediction table with a tta column (oof.parquet or test.parquet)")
    parser.add_argument("--score", type=float, default=0.5, help="boxes at or above this score (default 0.5)")
    args = parser.parse_args()
    preds = read_predictions(args.predictions)
    preds = preds[preds.score >= args.score]
    plain = preds[preds.tta == "none"]
    rows = {v: view_row(plain, preds[preds.tta == v]) for v in sorted(set(preds.tta) - {"none"})}
    print(pd.DataFrame(rows).T.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
