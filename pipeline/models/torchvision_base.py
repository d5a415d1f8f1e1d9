"""What the torchvision-built families (Faster R-CNN, RetinaNet, FCOS, SSDlite) share behind the Detector
interface: their `GeneralizedRCNNTransform`, the label offset of a background class, the switch to losses for a
validation loss in eval mode, and option checking.

torchvision's detectors take a list of images, run them through a transform (normalise, resize to
min_size/max_size or a fixed size, pad to `size_divisible`) and map their boxes back to the pixels of the images
they were given. Built with min_size = max_size = image_size, the transform leaves the loader's square images as
they are; `TorchvisionDetector` sets both to the side of each `predict` call, so a TTA scale view runs at its own
size (and a multi-scale training batch trains at its size). A transform that resizes every input to one size
(other min_size/max_size, or `fixed_size` as SSD uses) would undo a scale view, so such a net takes its own
size only.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterable, Iterator

from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .base import Detections, Detector, Target

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# options every torchvision detector hands to its GeneralizedRCNNTransform
TRANSFORM_OPTIONS = frozenset({"size_divisible", "fixed_size"})


class TorchvisionDetector(Detector):
    """A torchvision detection network (`net.transform` a GeneralizedRCNNTransform) with 0-based labels outside.

    `label_offset` is 1 for nets with a background class 0 inside (Faster R-CNN, SSD) and 0 for sigmoid heads
    without one (RetinaNet, FCOS). `loss_parts` names the submodules of `net` whose `training` flag switches
    torchvision from detections to losses (besides `net` and `net.transform`).
    """

    label_offset: int = 1
    loss_parts: tuple[str, ...] = ()
    # why a net whose transform resizes every input takes only its own size (completes "only its own SxS inputs")
    own_size_reason = ("its min_size/max_size/fixed_size options make the transform resize every input to one "
                       "size, which would undo a scale view")

    def __init__(self, net: nn.Module, num_classes: int, image_size: int, max_detections: int) -> None:
        super().__init__(num_classes, image_size, max_detections)
        self.net = net
        transform: GeneralizedRCNNTransform = net.transform
        self.size_multiple = int(transform.size_divisible)
        # as the builders make it: the loader's S x S images pass the transform unresized
        self._keeps_input_size = (transform.fixed_size is None and tuple(transform.min_size) == (image_size,)
                                  and transform.max_size == image_size)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone.body

    def accepts_size(self, side: int) -> bool:
        if not self._keeps_input_size:
            return side == self.image_size
        return side == self.image_size or (side > 0 and side % self.size_multiple == 0)

    @property
    def size_rule(self) -> str:
        s = self.image_size
        if not self._keeps_input_size:
            return f"only its own {s}x{s} inputs ({self.own_size_reason})"
        own = "" if s % self.size_multiple == 0 else f"its own {s}x{s} or "
        return f"{own}square inputs whose side is a multiple of {self.size_multiple}"

    def _losses(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        targets = [{"boxes": t["boxes"].to(images.device), "labels": t["labels"].to(images.device) + self.label_offset}
                   for t in targets]
        parts = [self.net, self.net.transform] + [getattr(self.net, name) for name in self.loss_parts]
        with training_flag(parts), at_input_size(self.net.transform, images.shape[-1], self._keeps_input_size):
            return dict(self.net(list(images), targets))

    def _detect(self, images: Tensor) -> list[Detections]:
        with at_input_size(self.net.transform, images.shape[-1], enabled=self._keeps_input_size):
            detections = self.net(list(images))
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - self.label_offset}
                for d in detections]


@contextlib.contextmanager
def at_input_size(transform: GeneralizedRCNNTransform, side: int, enabled: bool) -> Iterator[None]:
    """The transform resizes each image to min_size/max_size; built with both = image_size, it leaves the
    loader's images as they are. For this call set both to `side`, so a TTA view or a multi-scale training batch
    of another size runs at that size instead of being resized back to image_size (at image_size nothing
    changes). Boxes need no map back: the transform maps targets into, and detections out of, its own frame."""
    if not enabled:
        yield
        return
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (side,), side
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


@contextlib.contextmanager
def training_flag(parts: Iterable[nn.Module]) -> Iterator[None]:
    """torchvision returns losses only when `training` is set. For a validation loss in eval mode, set it on
    the detection parts alone (not their children), so BatchNorm keeps its running statistics untouched."""
    parts = list(parts)
    modes = [p.training for p in parts]
    for p in parts:
        p.training = True
    try:
        yield
    finally:
        for p, mode in zip(parts, modes):
            p.training = mode


def constructor_options(cls: type) -> frozenset[str]:
    """The keyword arguments of a torchvision detector class, for checking config options by name: the classes
    hand unknown kwargs to their transform, which silently ignores them."""
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self", "backbone", "num_classes", "kwargs"}


def checked_options(name: str, options: dict[str, Any], allowed: Iterable[str],
                    transform: bool = True) -> dict[str, Any]:
    """`options` if every name is in `allowed` (plus the transform's, unless the class sets those itself)."""
    allowed = frozenset(allowed) | (TRANSFORM_OPTIONS if transform else frozenset())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown options {unknown}; known: {', '.join(sorted(allowed))}")
    return dict(options)


def transform_kwargs(image_size: int, mean: Iterable[float], std: Iterable[float]) -> dict[str, Any]:
    # min_size = max_size = S: the loader already resized to S x S, the transform must not resize again
    return dict(min_size=image_size, max_size=image_size, image_mean=list(mean), image_std=list(std))
