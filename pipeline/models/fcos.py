"""FCOS (torchvision: anchor-free, one point per feature cell, centre-ness) behind the Detector interface:
torchvision's `fcos_resnet50_fpn`, and `fcos_timm`, any timm backbone under the FPN that `fasterrcnn_timm` uses
with P6/P7 levels on top."""
from __future__ import annotations

from functools import partial
from typing import Any

from torchvision.models import detection
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead

from .base import config_value, register_model
from .retinanet import group_norm, new_class_logits  # FCOS has one "anchor" per location: the same layer
from .timm_fpn import LevelStrideAnchorGenerator, TimmFPNBackbone, body_mean_std, timm_body
from .torchvision_base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchvisionDetector,
    checked_options,
    constructor_options,
    transform_kwargs,
)
from .weights import hub_download

TORCHVISION_BUILDERS = {"fcos_resnet50_fpn": detection.fcos_resnet50_fpn}
FCOS_OPTIONS = constructor_options(FCOS) - {"anchor_generator", "head"}
# options read by the timm builder itself; the rest go to torchvision's FCOS
TIMM_OPTIONS = ("out_indices", "fpn_channels", "backbone_args", "head_convs")


class FCOSDetector(TorchvisionDetector):
    """A torchvision FCOS: sigmoid class scores without a background class, so labels are 0-based inside too.

    Takes any width and height that are multiples of `size_multiple` (32) at predict time, like Faster R-CNN:
    its points follow the feature maps (and, for `fcos_timm`, step by each level's true stride at every size)."""

    head_prefixes = ("net.head.classification_head.cls_logits.",)
    label_offset = 0


def _fcos_kwargs(cfg: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    return dict(transform_kwargs(cfg.image_size, mean, std), detections_per_img=cfg.max_detections,
                score_thresh=cfg.score_threshold, nms_thresh=cfg.nms_iou)


def build_torchvision_fcos(name: str, cfg: Any, num_classes: int) -> FCOSDetector:
    """torchvision's FCOS `name` (a key of TORCHVISION_BUILDERS), registered under that name below."""
    builder = TORCHVISION_BUILDERS[name]
    options = checked_options(name, config_value(cfg, "options", {}), FCOS_OPTIONS | {"trainable_backbone_layers"})
    kwargs = {**_fcos_kwargs(cfg, IMAGENET_MEAN, IMAGENET_STD), **options}
    if cfg.pretrained:
        with hub_download(f"the COCO weights of {name}"):
            net = builder(weights="DEFAULT", **kwargs)
        new_class_logits(net.head, num_classes)  # everything else stays COCO-pretrained
    else:
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    return FCOSDetector(net, num_classes, cfg.image_size, cfg.max_detections)


for _name in TORCHVISION_BUILDERS:
    register_model(_name)(partial(build_torchvision_fcos, _name))


@register_model("fcos_timm")
def build_timm_fcos(cfg: Any, num_classes: int) -> FCOSDetector:
    """FCOS on a timm body: levels P3-P5 from `out_indices` (default strides 8, 16, 32) plus P6, P7. FCOS's
    points are anchors of side = the level's stride (its size ranges, 4x-8x the point size per level, rely on
    it), so there is no anchor option; GroupNorm heads with `head_convs` convs each (default 4)."""
    options = checked_options("fcos_timm", config_value(cfg, "options", {}), FCOS_OPTIONS | set(TIMM_OPTIONS))
    own = {k: options.pop(k) for k in TIMM_OPTIONS if k in options}
    body = timm_body(cfg, own.get("out_indices", (2, 3, 4)), own.get("backbone_args", {}))
    channels = int(own.get("fpn_channels", 256))
    backbone = TimmFPNBackbone(body, channels, extra="p6p7")
    points = LevelStrideAnchorGenerator([(s,) for s in backbone.strides], [(1.0,)] * len(backbone.strides),
                                        backbone.strides)
    convs, norm = int(own.get("head_convs", 4)), group_norm(channels)
    # FCOSHead hard-codes GroupNorm(32, C), which fails for a narrow FPN; its two parts take a norm layer, so build
    # it without convs and put in parts with the right norm
    head = FCOSHead(channels, 1, num_classes, num_convs=0)
    head.classification_head = FCOSClassificationHead(channels, 1, num_classes, convs, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(channels, 1, convs, norm_layer=norm)
    mean, std = body_mean_std(body)
    net = FCOS(backbone, num_classes, anchor_generator=points, head=head, **{**_fcos_kwargs(cfg, mean, std), **options})
    return FCOSDetector(net, num_classes, cfg.image_size, cfg.max_detections)
