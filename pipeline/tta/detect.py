"""A model's detections under several views, batched, with every box mapped back to the input frame."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from pipeline.config import input_wh, size_text

from .ops import DEFAULT_SIZE_MULTIPLE, Size
from .views import apply_view, invert_boxes, parse_view, view_wh

Detections = dict[str, Tensor]


@dataclass(frozen=True)
class InputSizes:
    """Which inputs a model's ``predict`` takes: sides rounded to ``multiple`` by scale views,
    ``accepts((width, height))``, and the rule in words for errors."""

    multiple: int
    accepts: Callable[[Size], bool]
    rule: str


def input_sizes(model: Any) -> InputSizes:
    """A ``pipeline.models.Detector`` (anything with ``accepts_size``) states its own rule (``size_multiple``,
    ``accepts_size``, ``size_rule``). A stand-in with only
    ``predict`` and ``image_size`` (the tests' doubles) takes its own size, or any size if it sets
    ``supports_scale_tta = True``."""
    if hasattr(model, "accepts_size"):
        return InputSizes(model.size_multiple, model.accepts_size, model.size_rule)
    multiple = getattr(model, "size_multiple", DEFAULT_SIZE_MULTIPLE)
    if getattr(model, "supports_scale_tta", False):
        return InputSizes(multiple, lambda size: True, "inputs of any size (it sets supports_scale_tta = True)")
    own = input_wh(model.image_size)
    return InputSizes(multiple, lambda size: input_wh(size) == own, f"only its own {own[0]}x{own[1]} inputs "
                      "(it has no accepts_size and does not set supports_scale_tta = True)")


def check_views(model: Any, views: list[str], size: int | Sequence[int] | None = None,
                size_multiple: int | None = None) -> None:
    """Raise ValueError for an unknown or repeated view, or a view that gives the model a size it does not
    take. ``size`` is the size of the images before the views (a side or (width, height); default
    ``model.image_size``), ``size_multiple`` the one scale views round to (default the model's).

    A quarter turn or transpose of a non-square W x H input shows the model H x W images: allowed when the model
    takes that size (a Faster R-CNN whose sides are multiples of 32), else this error says so."""
    if not views:
        raise ValueError("no TTA views given; use ['none'] for plain prediction")
    repeated = sorted({v for v in views if views.count(v) > 1})
    if repeated:
        raise ValueError(f"TTA views repeated: {repeated}")
    wh = input_wh(size if size is not None else model.image_size)
    sizes = input_sizes(model)
    for view in views:
        out = view_wh(view, wh, size_multiple or sizes.multiple)  # parses: an unknown view raises here
        if not sizes.accepts(out):
            # an odd number of quarter turns / transposes: the view is H x W
            swapped = wh[0] != wh[1] and sum(op.swaps_axes for op in parse_view(view)) % 2 == 1
            why = (f"; {view!r} swaps the width and height of the non-square {size_text(wh)} input "
                   "(a quarter turn or transpose)") if swapped else ""
            raise ValueError(
                f"TTA view {view!r} gives {type(model).__name__} {out[0]}x{out[1]} inputs (width x height, from "
                f"{wh[0]}x{wh[1]}), but it takes {sizes.rule}{why}; remove {view!r} from predict.tta"
            )


def _invert_detections(det: Detections, view: str, size: Size, size_multiple: int) -> Detections:
    boxes = invert_boxes(det["boxes"].detach().float().cpu().reshape(-1, 4), view, size, size_multiple)
    # the model clamps to its frame; clamp again so float rounding of a scale cannot leave [0, W] x [0, H]
    limit = torch.tensor([size[0], size[1], size[0], size[1]], dtype=boxes.dtype)
    return {
        "boxes": torch.minimum(boxes.clamp(min=0), limit),
        "scores": det["scores"].detach().float().cpu().reshape(-1),
        "labels": det["labels"].detach().long().cpu().reshape(-1),
    }


@torch.no_grad()
def predict_views(model: Any, images: Tensor, views: list[str], batch_size: int,
                  size_multiple: int | None = None) -> list[dict[str, Detections]]:
    """Per image, per view (in the order of ``views``): the model's detections on that view, with boxes mapped
    back to the input frame of ``images`` (B, 3, H, W). Results are CPU tensors (boxes float32, labels int64).

    A call to ``model.predict`` takes at most ``batch_size`` (image, view) items: whole images with all their
    views when the views fit in ``batch_size`` (so one image's views are in one batch), else full batches that
    split an image's views. Views that change the size (scales; quarter turns of a non-square batch) batch apart,
    since one batch is one tensor. ``size_multiple`` defaults to the model's own (``input_sizes(model).multiple``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4:
        raise ValueError(f"predict_views needs a (B, 3, H, W) batch, got {tuple(images.shape)}")
    size = (images.shape[-1], images.shape[-2])
    multiple = size_multiple or input_sizes(model).multiple
    check_views(model, views, size, multiple)
    groups: dict[Size, list[tuple[int, str]]] = {}
    for i in range(images.shape[0]):
        for view in views:
            groups.setdefault(view_wh(view, size, multiple), []).append((i, view))
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
