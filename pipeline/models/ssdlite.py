"""SSDlite (torchvision: one-stage, default boxes, depthwise heads) behind the Detector interface: torchvision's
MobileNetV3-Large SSDlite (`ssdlite320_mobilenet_v3_large`) and `ssdlite_timm`, the same extra layers and heads
on any timm backbone (so the offline Lite0 weights work).

Input size: SSD's default boxes are fractions of the input side (0.2 to 0.95 of it by default), so the network
is built for `model.image_size` (torchvision fixes 320; any side works here) and takes only that size. At
another side its boxes would grow with the image, so a TTA scale view would not show the network its objects
at another scale: `accepts_size` refuses every other side and scale views are an error for this family.

Square only: a non-square `model.image_size` is refused when the model is built (`check_square`). torchvision's
SSDlite320 is a fixed 320 x 320 network, and its default boxes are fractions of each side, so on a W x H input a
"square" default box would be W/H times wider than high: the box shapes it was designed (and pretrained) with would
change with the input's aspect. Use a square image_size with `model.resize: letterbox` to keep the image's ratio.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Sequence

from torch import Tensor, nn
from torchvision.models import detection
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import (
    SSDLiteClassificationHead,
    SSDLiteHead,
    _extra_block,
    _mobilenet_extractor,
    _normal_init,
)
from torchvision.models.mobilenetv3 import mobilenet_v3_large

from pipeline.config import input_wh

from .base import config_value, register_model
from .timm_fpn import body_mean_std, timm_body
from .torchvision_base import TorchvisionDetector, checked_options, constructor_options
from .weights import hub_download

SSD_OPTIONS = constructor_options(SSD) - {"anchor_generator", "size", "head"}
# default boxes and extra layers: torchvision's SSDlite320 choices
BOX_OPTIONS = ("min_ratio", "max_ratio")
TIMM_OPTIONS = ("out_indices", "extra_channels", "backbone_args")
EXTRA_CHANNELS = (512, 256, 256, 128)
NORM_LAYER = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
TORCHVISION_MEAN_STD = ([0.5] * 3, [0.5] * 3)  # what torchvision's SSDlite320 normalises with


class SSDliteDetector(TorchvisionDetector):
    """A torchvision SSD with SSDlite heads: softmax scores with background class 0 inside, 0-based labels
    outside. Takes only its own image_size (see the module docstring)."""

    head_prefixes = ("net.head.classification_head.",)
    label_offset = 1
    own_size_reason = ("SSD's default boxes are fractions of the input side: at another side they grow with the "
                       "image, so a scale view would not show the network objects at another scale")

    def __init__(self, net: SSD, num_classes: int, image_size: int, max_detections: int) -> None:
        super().__init__(net, num_classes, image_size, max_detections)
        self.size_multiple = 32  # SSD pads nothing; scale views would round like the other families' (and fail)

    @property
    def backbone(self) -> nn.Module:
        extractor = self.net.backbone
        return extractor.body if hasattr(extractor, "body") else extractor.features


class TimmSSDLiteExtractor(nn.Module):
    """The timm body's last feature maps (default strides 16 and 32) plus SSDlite's extra layers, each halving
    the map: six maps in all by default, as torchvision's MobileNetV3 extractor gives."""

    def __init__(self, body: nn.Module, extra_channels: Sequence[int]) -> None:
        super().__init__()
        self.body = body
        channels = [int(c) for c in body.feature_info.channels()]
        blocks, previous = [], channels[-1]
        for out in extra_channels:
            blocks.append(_extra_block(previous, int(out), NORM_LAYER))
            previous = int(out)
        self.extra = nn.ModuleList(blocks)
        _normal_init(self.extra)
        self.out_channels = channels + [int(c) for c in extra_channels]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps = list(self.body(x))
        for block in self.extra:
            maps.append(block(maps[-1]))
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def _ssd_kwargs(cfg: Any, options: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    kwargs = dict(image_mean=list(mean), image_std=list(std), detections_per_img=cfg.max_detections,
                  score_thresh=cfg.score_threshold, nms_thresh=cfg.nms_iou, topk_candidates=300)
    return {**kwargs, **options}


def _default_boxes(levels: int, box_options: dict[str, Any]) -> DefaultBoxGenerator:
    return DefaultBoxGenerator([[2, 3] for _ in range(levels)], min_ratio=float(box_options.get("min_ratio", 0.2)),
                               max_ratio=float(box_options.get("max_ratio", 0.95)))


def check_square(name: str, cfg: Any) -> int:
    """The side of `cfg.image_size`; ValueError naming the family and the rule for a non-square size."""
    width, height = input_wh(cfg.image_size)
    if width != height:
        raise ValueError(
            f"{name}: model.image_size [{width}, {height}] is not square, and SSDlite takes square inputs only: its "
            "default boxes are fractions of each input side, so on a non-square input every default box would "
            f"stretch with the aspect ratio (torchvision's SSDlite320 is a fixed square network). Use a square "
            f"image_size (e.g. {max(width, height)}) with model.resize: letterbox to keep the images' aspect ratio")
    return width


def _fixed_to(net: SSD, side: int) -> SSD:
    """torchvision builds SSDlite for 320 px; its default boxes are relative, so only the transform needs the size."""
    net.transform.fixed_size = (side, side)
    net.transform.min_size, net.transform.max_size = (side,), side
    return net


@register_model("ssdlite320_mobilenet_v3_large")
def build_torchvision_ssdlite(cfg: Any, num_classes: int) -> SSDliteDetector:
    """torchvision's SSDlite MobileNetV3-Large at `image_size`. Without `pretrained` it is assembled from
    torchvision's own parts: the builder ties the reduced tail to its hub weights, and `backbone_weights` (a
    torchvision mobilenet_v3_large ImageNet file) needs the full tail. `options: {reduced_tail: ...}` overrides."""
    name = "ssdlite320_mobilenet_v3_large"
    check_square(name, cfg)
    options = checked_options(name, config_value(cfg, "options", {}), SSD_OPTIONS | set(BOX_OPTIONS) | {"reduced_tail"},
                              transform=False)
    boxes = {k: options.pop(k) for k in BOX_OPTIONS if k in options}
    reduced_tail = bool(options.pop("reduced_tail", not cfg.backbone_weights))
    kwargs = _ssd_kwargs(cfg, options, *TORCHVISION_MEAN_STD)
    if cfg.pretrained:
        if boxes or "reduced_tail" in config_value(cfg, "options", {}):
            raise ValueError(f"{name}: pretrained COCO weights fix the default boxes and the tail; drop "
                             f"{sorted(boxes) + ['reduced_tail']} from options")
        with hub_download(f"the COCO weights of {name}"):
            net = detection.ssdlite320_mobilenet_v3_large(weights="DEFAULT", **kwargs)
        out_channels = det_utils.retrieve_out_channels(net.backbone, (cfg.image_size, cfg.image_size))
        net.head.classification_head = SSDLiteClassificationHead(
            out_channels, net.anchor_generator.num_anchors_per_location(), num_classes + 1, NORM_LAYER)
    else:
        mobilenet = mobilenet_v3_large(weights=None, norm_layer=NORM_LAYER, reduced_tail=reduced_tail)
        _normal_init(mobilenet)  # torchvision's init for an SSDlite trained without ImageNet weights
        extractor = _mobilenet_extractor(mobilenet, 6, NORM_LAYER)
        out_channels = det_utils.retrieve_out_channels(extractor, (cfg.image_size, cfg.image_size))
        anchors = _default_boxes(len(out_channels), boxes)
        head = SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_classes + 1, NORM_LAYER)
        net = SSD(extractor, anchors, (cfg.image_size, cfg.image_size), num_classes + 1, head=head, **kwargs)
    return SSDliteDetector(_fixed_to(net, cfg.image_size), num_classes, cfg.image_size, cfg.max_detections)


@register_model("ssdlite_timm")
def build_timm_ssdlite(cfg: Any, num_classes: int) -> SSDliteDetector:
    """SSDlite on a timm body: its feature maps at `out_indices` (default (3, 4): strides 16 and 32) and
    `extra_channels` extra layers (default 512, 256, 256, 128), one default-box level per map, boxes from
    `min_ratio` to `max_ratio` of the side (default 0.2-0.95, torchvision's; lower min_ratio for small objects)."""
    check_square("ssdlite_timm", cfg)
    options = checked_options("ssdlite_timm", config_value(cfg, "options", {}),
                              SSD_OPTIONS | set(BOX_OPTIONS) | set(TIMM_OPTIONS), transform=False)
    own = {k: options.pop(k) for k in TIMM_OPTIONS if k in options}
    boxes = {k: options.pop(k) for k in BOX_OPTIONS if k in options}
    body = timm_body(cfg, own.get("out_indices", (3, 4)), own.get("backbone_args", {}))
    extractor = TimmSSDLiteExtractor(body, own.get("extra_channels", EXTRA_CHANNELS))
    anchors = _default_boxes(len(extractor.out_channels), boxes)
    head = SSDLiteHead(extractor.out_channels, anchors.num_anchors_per_location(), num_classes + 1, NORM_LAYER)
    net = SSD(extractor, anchors, (cfg.image_size, cfg.image_size), num_classes + 1, head=head,
              **_ssd_kwargs(cfg, options, *body_mean_std(body)))
    return SSDliteDetector(_fixed_to(net, cfg.image_size), num_classes, cfg.image_size, cfg.max_detections)
