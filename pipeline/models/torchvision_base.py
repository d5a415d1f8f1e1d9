"""What the torchvision-built families (Faster R-CNN, RetinaNet, FCOS, SSDlite) share behind the Detector
interface: their `GeneralizedRCNNTransform`, the label offset of a background class, the switch to losses for a
validation loss in eval mode, and option checking.

torchvision's detectors take a list of images, run them through a transform (normalise, resize to
min_size/max_size or a fixed size, pad to `size_divisible`) and map their boxes back to the pixels of the images
they were given. It scales an H x W image by min(min_size / min(H, W), max_size / max(H, W)); built with
min_size = the shorter and max_size = the longer side of `image_size` (both the side for a square), that scale is 1
for the loader's images and they pass as they are. `TorchvisionDetector` sets both to the sides of each call's
images, so a TTA scale view runs at its own size, a quarter turn of a non-square input at H x W, and a multi-scale
training batch at its size. A transform that resizes every input to one size (other min_size/max_size, or
`fixed_size` as SSD uses) would undo a scale view, so such a net takes its own size only.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterable, Iterator

from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from pipeline.config import InputSize, input_wh

from .base import Detections, Detector, Target, sides_rule

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
    compiled_parts = ("net.backbone",)  # body and FPN (or SSD's extractor); the heads' proposals and NMS stay eager
    # why a net whose transform resizes every input takes only its own size (completes "only its own SxS inputs")
    own_size_reason = ("its min_size/max_size/fixed_size options make the transform resize every input to one "
                       "size, which would undo a scale view")

    def __init__(self, net: nn.Module, num_classes: int, image_size: InputSize, max_detections: int) -> None:
        super().__init__(num_classes, image_size, max_detections)
        self.net = net
        transform: GeneralizedRCNNTransform = net.transform
        self.size_multiple = int(transform.size_divisible)
        # as the builders make it: the loader's W x H images pass the transform unresized
        short, long = sorted(self.input_wh)
        self._keeps_input_size = (transform.fixed_size is None and tuple(transform.min_size) == (short,)
                                  and transform.max_size == long)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone.body

    def accepts_size(self, size: InputSize) -> bool:
        width, height = input_wh(size)
        if (width, height) == self.input_wh:
            return True
        m = self.size_multiple
        return self._keeps_input_size and width > 0 and height > 0 and width % m == 0 and height % m == 0

    @property
    def size_rule(self) -> str:
        w, h = self.input_wh
        if not self._keeps_input_size:
            return f"only its own {w}x{h} inputs ({self.own_size_reason})"
        return sides_rule(self.size_multiple, own=(w, h))

    def _losses(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        targets = [{"boxes": t["boxes"].to(images.device), "labels": t["labels"].to(images.device) + self.label_offset}
                   for t in targets]
        parts = [self.net, self.net.transform] + [getattr(self.net, name) for name in self.loss_parts]
        size = (images.shape[-1], images.shape[-2])
        with training_flag(parts), at_input_size(self.net.transform, size, self._keeps_input_size):
            return dict(self.net(list(images), targets))

    def _detect(self, images: Tensor) -> list[Detections]:
        with at_input_size(self.net.transform, (images.shape[-1], images.shape[-2]), enabled=self._keeps_input_size):
            detections = self.net(list(images))
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - self.label_offset}
                for d in detections]


@contextlib.contextmanager
def at_input_size(transform: GeneralizedRCNNTransform, size: InputSize, enabled: bool) -> Iterator[None]:
    """The transform resizes each image by min(min_size / its shorter side, max_size / its longer side); built
    with the sides of image_size, it leaves the loader's images as they are. For this call set min_size and
    max_size to the shorter and longer side of `size` (a side or (width, height)), so a TTA view or a multi-scale
    training batch of another size runs at that size instead of being resized back to image_size (at image_size
    nothing changes). Boxes need no map back: the transform maps targets into, and detections out of, its own
    frame."""
    if not enabled:
        yield
        return
    short, long = sorted(input_wh(size))
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (short,), long
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


def transform_kwargs(image_size: InputSize, mean: Iterable[float], std: Iterable[float]) -> dict[str, Any]:
    # min_size, max_size = the shorter and the longer side of the input: the loader already resized to W x H, and
    # the transform's scale min(min_size / min(H, W), max_size / max(H, W)) is then 1: it must not resize again
    short, long = sorted(input_wh(image_size))
    return dict(min_size=short, max_size=long, image_mean=list(mean), image_std=list(std))
