"""Test-time augmentation: views of a square image batch and the exact box maps between their frames.

Views (the names configs use in ``predict.tta``):

- ``none``; ``hflip`` (mirror left-right); ``vflip`` (mirror top-bottom); ``transpose`` (swap x and y);
- ``rot90_1``, ``rot90_2``, ``rot90_3``: ``k`` quarter turns with ``torch.rot90(images, k, dims=(-2, -1))``, i.e.
  **counter-clockwise as the image is displayed** (row 0 at the top): the top-right corner goes to the top-left.
  A point ``(x, y)`` goes to ``(y, S - x)`` for one turn.
- ``scale<f>`` (e.g. ``scale0.8``, ``scale1.25``): bilinear resize (``align_corners=False``, no antialias, the
  same sampling as OpenCV's ``INTER_LINEAR``) to ``S' = m * round(S * f / m)`` (halves up, at least ``m``),
  where ``m`` is the model's ``size_multiple`` (default 32; EfficientDet needs 128). The box map uses the
  realised ratio ``S' / S``, not ``f``, so it stays exact after the rounding.
- compositions joined by ``+``, applied left to right: ``hflip+rot90_1`` flips, then turns.

Coordinates are continuous pixel coordinates: pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)``, a box
``x1, y1, x2, y2`` covers ``[x1, x2) x [y1, y2)`` and the image is ``[0, S] x [0, S]``. So a flip maps
``x -> S - x`` (not ``S - 1 - x``), and ``invert_boxes(forward_boxes(b)) == b`` up to float rounding.

A model takes other input sizes only if it says so with ``supports_scale_tta = True``; without it a scale view is
an error that names the view (EfficientDet's anchors are built for its own size; torchvision's Faster R-CNN with
``min_size = max_size = S`` resizes every input back to ``S``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_SIZE_MULTIPLE = 32
BASIC_VIEWS = ("none", "hflip", "vflip", "rot90_1", "rot90_2", "rot90_3", "transpose")
_SCALE = re.compile(r"scale(\d+(?:\.\d+)?|\.\d+)")

Boxes = TypeVar("Boxes", Tensor, np.ndarray)
Detections = dict[str, Tensor]


@dataclass(frozen=True)
class _Op:
    kind: str  # "none", "hflip", "vflip", "transpose", "rot90", "scale"
    k: int = 0  # quarter turns, for "rot90"
    factor: float = 1.0  # requested factor, for "scale"


def _parse_part(part: str, view: str) -> _Op:
    if part in ("none", "hflip", "vflip", "transpose"):
        return _Op(part)
    if part in ("rot90_1", "rot90_2", "rot90_3"):
        return _Op("rot90", k=int(part[-1]))
    match = _SCALE.fullmatch(part)
    if match and float(match.group(1)) > 0:
        return _Op("scale", factor=float(match.group(1)))
    raise ValueError(
        f"unknown TTA view {view!r} (part {part!r}); known: {', '.join(BASIC_VIEWS)}, scale<f> (e.g. scale0.8) "
        "and compositions joined by '+' (e.g. hflip+rot90_1)"
    )


def parse_view(view: str) -> tuple[_Op, ...]:
    """The operations of ``view``, in the order they are applied to the image."""
    return tuple(_parse_part(part.strip(), view) for part in view.split("+"))


def is_scale_view(view: str) -> bool:
    return any(op.kind == "scale" for op in parse_view(view))


def scaled_size(size: int, factor: float, size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> int:
    """``size * factor`` to the nearest multiple of ``size_multiple`` (halves round up), at least one multiple."""
    # half up, not Python's half-to-even: scale1.25 of 64 (80, 2.5 multiples of 32) should enlarge, to 96
    return max(size_multiple, int(size * factor / size_multiple + 0.5) * size_multiple)


def _sizes(ops: tuple[_Op, ...], size: int, size_multiple: int) -> list[int]:
    # sizes[i] is the side before op i; sizes[-1] the side of the viewed image
    sizes = [size]
    for op in ops:
        sizes.append(scaled_size(sizes[-1], op.factor, size_multiple) if op.kind == "scale" else sizes[-1])
    return sizes


def view_size(view: str, size: int, size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> int:
    """The side of the image that ``view`` makes from a ``size`` x ``size`` one."""
    return _sizes(parse_view(view), size, size_multiple)[-1]


# ------------------------------------------------------------------------------------------------- images


def _apply_op(images: Tensor, op: _Op, new_size: int) -> Tensor:
    if op.kind == "hflip":
        return images.flip(-1)
    if op.kind == "vflip":
        return images.flip(-2)
    if op.kind == "transpose":
        return images.transpose(-1, -2)
    if op.kind == "rot90":
        return torch.rot90(images, op.k, dims=(-2, -1))
    if op.kind == "scale" and new_size != images.shape[-1]:
        return F.interpolate(images, size=(new_size, new_size), mode="bilinear", align_corners=False,
                             antialias=False)
    return images


def apply_view(images: Tensor, view: str, size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> Tensor:
    """``images`` (B, C, S, S) as seen through ``view``: (B, C, S', S'), S' = S unless the view scales."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"apply_view needs a (B, C, S, S) batch of square images, got {tuple(images.shape)}")
    ops = parse_view(view)
    sizes = _sizes(ops, images.shape[-1], size_multiple)
    for op, new_size in zip(ops, sizes[1:]):
        images = _apply_op(images, op, new_size)
    return images.contiguous()


# -------------------------------------------------------------------------------------------------- boxes


def _point_map(op: _Op, x: Boxes, y: Boxes, s_in: int, s_out: int) -> tuple[Boxes, Boxes]:
    """Where the point (x, y) of the s_in frame lands in the s_out frame under ``op``."""
    if op.kind == "hflip":
        return s_in - x, y
    if op.kind == "vflip":
        return x, s_in - y
    if op.kind == "transpose":
        return y, x
    if op.kind == "rot90":  # k counter-clockwise quarter turns, each (x, y) -> (y, S - x)
        return [(x, y), (y, s_in - x), (s_in - x, s_in - y), (s_in - y, x)][op.k]
    if op.kind == "scale" and s_in != s_out:
        return x * s_out / s_in, y * s_out / s_in
    return x, y


def _inverse(op: _Op) -> _Op:
    # flips and the transpose are their own inverses; the scale inverse comes from swapping the sizes
    return _Op("rot90", k=(4 - op.k) % 4) if op.kind == "rot90" else op


def _map_boxes(boxes: Boxes, op: _Op, s_in: int, s_out: int) -> Boxes:
    # Map both corners, then re-sort them: a flip or turn swaps which corner is the top-left one.
    xa, ya = _point_map(op, boxes[:, 0], boxes[:, 1], s_in, s_out)
    xb, yb = _point_map(op, boxes[:, 2], boxes[:, 3], s_in, s_out)
    if isinstance(boxes, Tensor):
        return torch.stack([torch.minimum(xa, xb), torch.minimum(ya, yb),
                            torch.maximum(xa, xb), torch.maximum(ya, yb)], dim=1)
    return np.stack([np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb), np.maximum(ya, yb)], axis=1)


def _check_boxes(boxes: Boxes) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4) x1, y1, x2, y2, got shape {tuple(boxes.shape)}")


def forward_boxes(boxes: Boxes, view: str, size: int, size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> Boxes:
    """Boxes of the ``size`` x ``size`` input mapped into the frame of ``apply_view(images, view)``."""
    _check_boxes(boxes)
    ops = parse_view(view)
    sizes = _sizes(ops, size, size_multiple)
    for i, op in enumerate(ops):
        boxes = _map_boxes(boxes, op, sizes[i], sizes[i + 1])
    return boxes


def invert_boxes(boxes: Boxes, view: str, size: int, size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> Boxes:
    """Boxes predicted on ``apply_view(images, view)`` mapped back to the ``size`` x ``size`` input's pixels."""
    _check_boxes(boxes)
    ops = parse_view(view)
    sizes = _sizes(ops, size, size_multiple)
    for i in reversed(range(len(ops))):
        boxes = _map_boxes(boxes, _inverse(ops[i]), sizes[i + 1], sizes[i])
    return boxes


# -------------------------------------------------------------------------------------------------- model


def check_views(model: Any, views: list[str], size: int | None = None) -> None:
    """Raise ValueError for an unknown or repeated view, or a scale view the model cannot take."""
    if not views:
        raise ValueError("no TTA views given; use ['none'] for plain prediction")
    repeated = sorted({v for v in views if views.count(v) > 1})
    if repeated:
        raise ValueError(f"TTA views repeated: {repeated}")
    for view in views:
        if is_scale_view(view) and not getattr(model, "supports_scale_tta", False):
            side = size or getattr(model, "image_size", "S")
            raise ValueError(
                f"TTA view {view!r} changes the input size, but {type(model).__name__} takes only its own "
                f"{side}x{side} inputs (it does not set supports_scale_tta = True); remove {view!r} from predict.tta"
            )


def _invert_detections(det: Detections, view: str, size: int, size_multiple: int) -> Detections:
    boxes = invert_boxes(det["boxes"].detach().float().cpu().reshape(-1, 4), view, size, size_multiple)
    return {
        # the model clamps to its frame; clamp again so float rounding of a scale cannot leave [0, S]
        "boxes": boxes.clamp(0, size),
        "scores": det["scores"].detach().float().cpu().reshape(-1),
        "labels": det["labels"].detach().long().cpu().reshape(-1),
    }


@torch.no_grad()
def predict_views(model: Any, images: Tensor, views: list[str], batch_size: int,
                  size_multiple: int | None = None) -> list[dict[str, Detections]]:
    """Per image, per view (in the order of ``views``): the model's detections on that view, with boxes mapped
    back to the input frame of ``images`` (B, 3, S, S). Results are CPU tensors (boxes float32, labels int64).

    A call to ``model.predict`` takes at most ``batch_size`` (image, view) items: whole images with all their
    views when the views fit in ``batch_size`` (so one image's views are in one batch), else full batches that
    split an image's views. Views that change the size batch apart, since one batch is one tensor.
    ``size_multiple`` defaults to the model's attribute of that name, else 32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"predict_views needs a (B, 3, S, S) batch, got {tuple(images.shape)}")
    size = images.shape[-1]
    check_views(model, views, size)
    multiple = size_multiple or getattr(model, "size_multiple", DEFAULT_SIZE_MULTIPLE)
    groups: dict[int, list[tuple[int, str]]] = {}
    for i in range(images.shape[0]):
        for view in views:
            groups.setdefault(view_size(view, size, multiple), []).append((i, view))
    found: dict[tuple[int, str], Detections] = {}
    for items in groups.values():
        per_image = len(items) // images.shape[0]  # the group's views; items are image-major
        step = batch_size // per_image * per_image if per_image <= batch_size else batch_size
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            batch = torch.cat([apply_view(images[i:i + 1], view, multiple) for i, view in chunk])
            detections = model.predict(batch)
            if len(detections) != len(chunk):
                raise ValueError(f"{type(model).__name__}.predict returned {len(detections)} results "
                                 f"for {len(chunk)} images")
            for (i, view), det in zip(chunk, detections):
                found[i, view] = _invert_detections(det, view, size, multiple)
    return [{view: found[i, view] for view in views} for i in range(images.shape[0])]
