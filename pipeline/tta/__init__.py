"""Test-time augmentation: views of a square image batch and the exact box maps between their frames.

Views (the names configs use in ``predict.tta``):

- ``none``; ``hflip`` (mirror left-right); ``vflip`` (mirror top-bottom); ``transpose`` (swap x and y);
- ``rot90_1``, ``rot90_2``, ``rot90_3``: ``k`` quarter turns with ``torch.rot90(images, k, dims=(-2, -1))``, i.e.
  **counter-clockwise as the image is displayed** (row 0 at the top): the top-right corner goes to the top-left.
  A point ``(x, y)`` goes to ``(y, S - x)`` for one turn.
- ``scale<f>`` (e.g. ``scale0.8``, ``scale1.25``): bilinear resize (``align_corners=False``, no antialias, the
  same sampling as OpenCV's ``INTER_LINEAR``) to ``S' = m * round(S * f / m)`` (halves up, at least ``m``),
  where ``m`` is the model's ``size_multiple`` (32 for Faster R-CNN, 128 for EfficientDet). The box map uses the
  realised ratio ``S' / S``, not ``f``, so it stays exact after the rounding.
- compositions joined by ``+``, applied left to right: ``hflip+rot90_1`` flips, then turns.

Coordinates are continuous pixel coordinates: pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)``, a box
``x1, y1, x2, y2`` covers ``[x1, x2) x [y1, y2)`` and the image is ``[0, S] x [0, S]``. So a flip maps
``x -> S - x`` (not ``S - 1 - x``), and ``invert_boxes(forward_boxes(b)) == b`` up to float rounding.

Each op is one entry of the registry in ``ops.py`` (apply, map a point, inverse, output size); ``views.py``
composes them and ``detect.py`` runs a model through views. A model states which input sides its ``predict``
takes (``Detector.size_multiple``, ``accepts_size``, ``size_rule``); a view that gives it any other side is an
error that names the view, the side and the rule.
"""
from __future__ import annotations

from .detect import InputSizes, check_views, input_sizes, predict_views
from .ops import DEFAULT_SIZE_MULTIPLE, TTAOp, register_op, scaled_size
from .views import BASIC_VIEWS, apply_view, forward_boxes, invert_boxes, is_scale_view, parse_view, view_size

__all__ = [
    "BASIC_VIEWS", "DEFAULT_SIZE_MULTIPLE", "InputSizes", "TTAOp", "apply_view", "check_views",
    "forward_boxes", "input_sizes", "invert_boxes", "is_scale_view", "parse_view", "predict_views",
    "register_op", "scaled_size", "view_size",
]
