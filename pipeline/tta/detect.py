"""A model's detections under several views, batched, with every box mapped back to the input frame."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .ops import DEFAULT_SIZE_MULTIPLE
from .views import apply_view, invert_boxes, view_size

Detections = dict[str, Tensor]


@dataclass(frozen=True)
class InputSizes:
    """Which square inputs a model's ``predict`` takes: sides rounded to ``multiple`` by scale views,
    ``accepts(side)``, and the rule in words for errors."""

    multiple: int
    accepts: Callable[[int], bool]
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
        return InputSizes(multiple, lambda side: True, "inputs of any size (it sets supports_scale_tta = True)")
    own = getattr(model, "image_size", None)
    return InputSizes(multiple, lambda side: side == own, f"only its own {own}x{own} inputs "
                      "(it has no accepts_size and does not set supports_scale_tta = True)")


def check_views(model: Any, views: list[str], size: int | None = None, size_multiple: int | None = None) -> None:
    """Raise ValueError for an unknown or repeated view, or a view that gives the model a size it does not
    take. ``size`` is the side of the images before the views (default ``model.image_size``), ``size_multiple``
    the one scale views round to (default the model's)."""
    if not views:
        raise ValueError("no TTA views given; use ['none'] for plain prediction")
    repeated = sorted({v for v in views if views.count(v) > 1})
    if repeated:
        raise ValueError(f"TTA views repeated: {repeated}")
    size = size or model.image_size
    sizes = input_sizes(model)
    for view in views:
        side = view_size(view, size, size_multiple or sizes.multiple)  # parses: an unknown view raises here
        if not sizes.accepts(side):
            raise ValueError(
                f"TTA view {view!r} gives {type(model).__name__} {side}x{side} inputs (from {size}x{size}), but it "
                f"takes {sizes.rule}; remove {view!r} from predict.tta"
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
    ``size_multiple`` defaults to the model's own (``input_sizes(model).multiple``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"predict_views needs a (B, 3, S, S) batch, got {tuple(images.shape)}")
    size = images.shape[-1]
    multiple = size_multiple or input_sizes(model).multiple
    check_views(model, views, size, multiple)
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
