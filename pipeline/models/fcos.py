"""FCOS (torchvision: anchor-free, one point per feature cell, centre-ness) behind the Detector interface:
torchvision's `fcos_resnet50_fpn`, and `fcos_timm`, any timm backbone under the FPN that `fasterrcnn_timm` uses
with P6/P7 levels on top."""
from __future__ import annotations

from functools import partial
from typing import Any

from torchvision.models import detection
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead

from .base import config_value, register_model
# FCOS has one "anchor" per location: RetinaNet's class layer, builder and arguments serve it as they are
from .retinanet import build_torchvision_one_stage, group_norm, one_stage_kwargs
from .timm_fpn import LevelStrideAnchorGenerator, TimmFPNBackbone, body_mean_std, timm_body
from .torchvision_base import TorchvisionDetector, checked_options, constructor_options

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


def build_torchvision_fcos(name: str, cfg: Any, num_classes: int) -> TorchvisionDetector:
    """torchvision's FCOS `name` (a key of TORCHVISION_BUILDERS), registered under that name below."""
    return build_torchvision_one_stage(name, cfg, num_classes, TORCHVISION_BUILDERS[name], FCOS_OPTIONS,
                                       FCOSDetector)


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
    net = FCOS(backbone, num_classes, anchor_generator=points, head=head, **{**one_stage_kwargs(cfg, mean, std), **options})
    return FCOSDetector(net, num_classes, cfg.image_size, cfg.max_detections)
