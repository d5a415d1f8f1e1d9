"""Test-time augmentation: views of an image batch and the exact box maps between their frames.

Views (the names configs use in ``predict.tta``):

- ``none``; ``hflip`` (mirror left-right); ``vflip`` (mirror top-bottom); ``transpose`` (swap x and y);
- ``rot90_1``, ``rot90_2``, ``rot90_3``: ``k`` quarter turns with ``torch.rot90(images, k, dims=(-2, -1))``, i.e.
  **counter-clockwise as the image is displayed** (row 0 at the top): the top-right corner goes to the top-left.
  A point ``(x, y)`` of a W x H image goes to ``(y, W - x)`` for one turn.
- ``scale<f>`` (e.g. ``scale0.8``, ``scale1.25``): bilinear resize (``align_corners=False``, no antialias, the
  same sampling as OpenCV's ``INTER_LINEAR``) of each side ``S`` to ``S' = m * round(S * f / m)`` (halves up, at
  least ``m``), where ``m`` is the model's ``size_multiple`` (32 for Faster R-CNN, 128 for EfficientDet). The box
  map uses each axis's realised ratio ``S' / S``, not ``f``, so it stays exact after the rounding.
- compositions joined by ``+``, applied left to right: ``hflip+rot90_1`` flips, then turns.

Non-square inputs (``model.image_size: [W, H]``): flips and ``rot90_2`` keep W x H; ``scale<f>`` scales both sides
by ``f``, each rounded to ``m`` on its own; ``rot90_1``, ``rot90_3`` and ``transpose`` (and compositions holding an
odd number of them) show the model an H x W image. That is allowed when the model takes H x W (Faster R-CNN,
RetinaNet, FCOS and EfficientDet take any sides that are multiples of their ``size_multiple``); otherwise
``check_views`` refuses the view, naming it, both sizes and the model's rule.

Coordinates are continuous pixel coordinates: pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)``, a box
``x1, y1, x2, y2`` covers ``[x1, x2) x [y1, y2)`` and the image is ``[0, W] x [0, H]``. So a flip maps
``x -> W - x`` (not ``W - 1 - x``), and ``invert_boxes(forward_boxes(b)) == b`` up to float rounding. Sizes are
given as configs write them (an int for a square, else (width, height)); ops see (width, height) pairs.

Each op is one entry of the registry in ``ops.py`` (apply, map a point, inverse, output size); ``views.py``
composes them and ``detect.py`` runs a model through views. A model states which input sizes its ``predict``
takes (``Detector.size_multiple``, ``accepts_size((width, height))``, ``size_rule``); a view that gives it any
other size is an error that names the view, the size and the rule.
"""
from __future__ import annotations

from .detect import InputSizes, check_views, input_sizes, predict_views
from .ops import DEFAULT_SIZE_MULTIPLE, TTAOp, register_op, scaled_size
from .views import (BASIC_VIEWS, apply_view, forward_boxes, invert_boxes, is_scale_view, parse_view, view_size,
                    view_wh)

__all__ = [
    "BASIC_VIEWS", "DEFAULT_SIZE_MULTIPLE", "InputSizes", "TTAOp", "apply_view", "check_views",
    "forward_boxes", "input_sizes", "invert_boxes", "is_scale_view", "parse_view", "predict_views",
    "register_op", "scaled_size", "view_size", "view_wh",
]
