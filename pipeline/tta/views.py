"""Views: ``+``-joined compositions of registered ops, applied to images and mapped exactly onto boxes.

Nothing here knows a particular op: every fact about one comes from its registry entry (``ops.py``).

A ``size`` argument is an input size as configs write it: an int for a square side, or a (width, height) pair.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from pipeline.config import canonical_size, input_wh

from .ops import DEFAULT_SIZE_MULTIPLE, Size, TTAOp, basic_views, known_spellings, parse_op

# the fixed view names of the ops registered in ops.py (a scale view is a template: scale<f>)
BASIC_VIEWS: tuple[str, ...] = basic_views()

Boxes = TypeVar("Boxes", Tensor, np.ndarray)


def parse_view(view: str) -> tuple[TTAOp, ...]:
    """The operations of ``view``, in the order they are applied to the image."""
    return tuple(_parse_part(part.strip(), view) for part in view.split("+"))


def _parse_part(part: str, view: str) -> TTAOp:
    try:
        op = parse_op(part)
        reason = ""
    except ValueError as exc:  # a known op with a bad value, e.g. scale0
        op, reason = None, f": {exc}"
    if op is None:
        raise ValueError(
            f"unknown TTA view {view!r} (part {part!r}{reason}); known: {', '.join(known_spellings())} "
            "and compositions joined by '+' (e.g. hflip+rot90_1)"
        )
    return op


def is_scale_view(view: str) -> bool:
    """Whether ``view`` can change the input size (it has a scale op, even one rounded back to the size)."""
    return any(op.changes_size for op in parse_view(view))


def _sizes(ops: tuple[TTAOp, ...], size: int | Sequence[int], size_multiple: int) -> list[Size]:
    # sizes[i] is the (width, height) before op i; sizes[-1] that of the viewed image
    sizes = [input_wh(size)]
    for op in ops:
        sizes.append(op.out_size(sizes[-1], size_multiple))
    return sizes


def view_wh(view: str, size: int | Sequence[int], size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> Size:
    """The (width, height) of the image that ``view`` makes from one of ``size``."""
    return _sizes(parse_view(view), size, size_multiple)[-1]


def view_size(view: str, size: int | Sequence[int], size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> int | Size:
    """The size of the image that ``view`` makes from one of ``size``: its side when it is square, else its
    (width, height). A quarter turn of a W x H image is H x W; a scale rounds each side to ``size_multiple``."""
    return canonical_size(view_wh(view, size, size_multiple))


def apply_view(images: Tensor, view: str, size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> Tensor:
    """``images`` (B, C, H, W) as seen through ``view``: (B, C, H', W'), the same size unless the view scales,
    turns a quarter or transposes (which give (B, C, W, H) for a non-square batch)."""
    if images.ndim != 4:
        raise ValueError(f"apply_view needs a (B, C, H, W) batch of images, got {tuple(images.shape)}")
    ops = parse_view(view)
    sizes = _sizes(ops, (images.shape[-1], images.shape[-2]), size_multiple)
    for op, new_size in zip(ops, sizes[1:]):
        images = op.apply(images, new_size)
    return images.contiguous()


def _map_boxes(boxes: Boxes, op: TTAOp, s_in: Size, s_out: Size) -> Boxes:
    # Map both corners, then re-sort them: a flip or turn swaps which corner is the top-left one.
    xa, ya = op.map_points(boxes[:, 0], boxes[:, 1], s_in, s_out)
    xb, yb = op.map_points(boxes[:, 2], boxes[:, 3], s_in, s_out)
    if isinstance(boxes, Tensor):
        return torch.stack([torch.minimum(xa, xb), torch.minimum(ya, yb),
                            torch.maximum(xa, xb), torch.maximum(ya, yb)], dim=1)
    return np.stack([np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb), np.maximum(ya, yb)], axis=1)


def _check_boxes(boxes: Boxes) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4) x1, y1, x2, y2, got shape {tuple(boxes.shape)}")


def forward_boxes(boxes: Boxes, view: str, size: int | Sequence[int],
                  size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> Boxes:
    """Boxes of an input of ``size`` (a side, or (width, height)) mapped into the frame of
    ``apply_view(images, view)``."""
    _check_boxes(boxes)
    ops = parse_view(view)
    sizes = _sizes(ops, size, size_multiple)
    for i, op in enumerate(ops):
        boxes = _map_boxes(boxes, op, sizes[i], sizes[i + 1])
    return boxes


def invert_boxes(boxes: Boxes, view: str, size: int | Sequence[int],
                 size_multiple: int = DEFAULT_SIZE_MULTIPLE) -> Boxes:
    """Boxes predicted on ``apply_view(images, view)`` mapped back to the pixels of the input of ``size`` (a side,
    or (width, height))."""
    _check_boxes(boxes)
    ops = parse_view(view)
    sizes = _sizes(ops, size, size_multiple)
    for i in reversed(range(len(ops))):
        boxes = _map_boxes(boxes, ops[i].inverse(), sizes[i + 1], sizes[i])
    return boxes
