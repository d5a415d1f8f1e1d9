"""The detector interface every model family implements, the registry of families, and the helpers they share.

A `Detector` keeps the raw network (`self.net`) apart from the loss and post-processing around it, so its
`state_dict` holds only the network's weights and loads into a fresh model of the same config.

A family is one module: its builder `(cfg, num_classes) -> Detector` registers itself with
`@register_model(name)`, and `pipeline.models` imports the module so the name is known to `create_model`.
`cfg` is any object with `pipeline.config.ModelConfig`'s fields (read them with `config_value` for defaults).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from pipeline.config import InputSize, canonical_size, input_wh

Target = dict[str, Tensor]
Detections = dict[str, Tensor]
Builder = Callable[[Any, int], "Detector"]

# model name (`model.name` in a config) -> builder; filled by the family modules through register_model
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator for a family's builder: `@register_model("yolo") def build(cfg, num_classes) -> Detector`."""
    def add(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = builder
        return builder
    return add


class Detector(nn.Module):
    """Input: float32 (B,3,H,W) RGB in [0,1], not normalised. Boxes are x1,y1,x2,y2 in input pixels and
    labels 0-based class indices, both in targets and in predictions.

    Subclasses set `net` and implement `_losses` and `_detect`; the public methods check inputs and fix
    the output format so every family behaves the same for the engine.

    Input sizes: `image_size` is the config's (an int for a square, else (width, height)); `input_wh` is its
    (width, height). `forward_loss` and `predict` take the sizes `accepts_size` allows (by default `image_size`
    only), which is what lets a TTA scale view run the model at another size, a quarter-turn view of a non-square
    input run it at (height, width), and multi-scale training (`train.multiscale`) train it at several; a family
    that can run at other sizes overrides `accepts_size` and `size_rule`. Boxes come back in the pixels of the
    images given to `predict`, and targets are in the pixels of the images given to `forward_loss`, whatever their
    size.
    """

    # state_dict key prefixes of the class-dependent head: a checkpoint trained with another number of
    # classes loads everything but these (see weights.load_model_state).
    head_prefixes: tuple[str, ...] = ()
    # input sides should be multiples of this (the deepest feature stride): TTA scale views round to it
    size_multiple: int = 32
    # submodules (get_submodule paths) that train.compile compiles: the heavy network of fixed-shape tensors, not
    # the loss and post-processing around it (target matching, proposals, NMS: data-dependent shapes)
    compiled_parts: tuple[str, ...] = ()

    def __init__(self, num_classes: int, image_size: InputSize, max_detections: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.image_size = canonical_size(image_size)
        self.input_wh = input_wh(image_size)
        self.max_detections = max_detections

    @property
    def backbone(self) -> nn.Module:
        """The ImageNet-style feature extractor that `backbone_weights` loads into."""
        raise NotImplementedError

    def accepts_size(self, size: InputSize) -> bool:
        """Whether `predict` takes images of `size`: a side (square) or (width, height)."""
        return input_wh(size) == self.input_wh

    @property
    def size_rule(self) -> str:
        """`accepts_size` in words, completing "it takes ..." in error messages."""
        return f"only its own {self.input_wh[0]}x{self.input_wh[1]} inputs (width x height)"

    def forward_loss(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """Individual losses plus "loss" (their sum), all scalars. Works in train mode and, for a validation
        loss, in eval mode (normalisation layers then use their running statistics)."""
        self._check_images(images)
        if len(targets) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(targets)} targets")
        losses = self._losses(images, [clean_target(t, self.num_classes) for t in targets])
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[Detections]:
        """Per image {"boxes" (M,4) float32, "scores" (M,) in [0,1], "labels" (M,) int64 0-based},
        M <= max_detections, sorted by score, boxes in the pixels of `images`. Always runs the network in
        eval mode."""
        self._check_images(images)
        with eval_mode(self):
            detections = self._detect(images)
        return [self._finish(d, images.shape[-1], images.shape[-2]) for d in detections]

    def forward(self, images: Tensor, targets: list[Target] | None = None) -> Any:
        # DDP and torch.compile only see `forward`: route to the losses when targets are given.
        if targets is not None:
            return self.forward_loss(images, targets)
        return self.predict(images)

    def _losses(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _detect(self, images: Tensor) -> list[Detections]:
        raise NotImplementedError

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or not self.accepts_size((images.shape[-1], images.shape[-2])):
            raise ValueError(f"{type(self).__name__} takes {self.size_rule}: expected images of shape (B, 3, H, W) "
                             f"with such a W x H, got {tuple(images.shape)}")

    def _finish(self, d: Detections, width: int, height: int | None = None) -> Detections:
        # Clamp to the width x height image (height None: a square) and cap the count here, once, so no family can
        # leak boxes outside the image.
        # A box squeezed to zero width or height by the clamp (an untrained regressor points outside the image)
        # is no detection: it would only be counted and skipped downstream by WBF and the submission writer.
        boxes = clamp_boxes(d["boxes"].float(), width, width if height is None else height)
        valid = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).flatten()
        keep = valid[torch.argsort(d["scores"][valid], descending=True)][: self.max_detections]
        return {
            "boxes": boxes[keep],
            "scores": d["scores"][keep].float(),
            "labels": d["labels"][keep].long(),
        }


def clean_target(target: Target, num_classes: int) -> Target:
    """Boxes as float (N,4) and labels as int64 (N,), without degenerate boxes; labels out of range (the
    usual cause: 1-based class ids) raise.

    A zero-width box (a crop edge, a rounding) makes torchvision raise mid-run and gives effdet a
    meaningless regression target; dropping it here keeps a rare data quirk from killing a long run.
    """
    boxes = torch.as_tensor(target["boxes"]).float().reshape(-1, 4)
    labels = torch.as_tensor(target["labels"]).long().reshape(-1)
    if boxes.shape[0] != labels.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {labels.shape[0]} labels")
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"labels must be 0-based class indices in [0, {num_classes}), got {labels.unique().tolist()}")
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[ok], "labels": labels[ok]}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, and afterwards every submodule's own flag back (an engine may keep some frozen
    layers in eval while training; `module.train(True)` would undo that)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def clamp_boxes(boxes: Tensor, width: float, height: float) -> Tensor:
    """(N, 4) x1, y1, x2, y2 boxes clamped to [0, width] x [0, height]."""
    limit = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), limit)


def check_divisible(image_size: InputSize, stride: int, name: str) -> None:
    """ValueError naming the side of `image_size` (a side or (width, height)) that `stride` does not divide."""
    width, height = input_wh(image_size)
    for axis, side in (("width", width), ("height", height)):
        if side % stride:
            lower, upper = side // stride * stride, (side // stride + 1) * stride
            what = "image_size" if width == height else f"image_size {axis} (of {width}x{height})"
            raise ValueError(
                f"{name}: {what} must be divisible by {stride} (its deepest feature stride), "
                f"got {side}; use {lower or upper} or {upper}"
            )


def sides_rule(multiple: int, own: tuple[int, int] | None = None, why: str = "") -> str:
    """`size_rule` of a family that takes any sides that are multiples of `multiple` (and `own`, its own size,
    when that is not): completes "it takes ..."."""
    extra = f"its own {own[0]}x{own[1]} or " if own is not None and (own[0] % multiple or own[1] % multiple) else ""
    return f"{extra}inputs whose width and height are each a multiple of {multiple}{why}"


def config_value(cfg: Any, name: str, default: Any) -> Any:
    """Read a ModelConfig field from any config object (pydantic model, dataclass, namespace)."""
    value = getattr(cfg, name, default)
    return default if value is None and default is not None else value
