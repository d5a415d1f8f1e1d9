"""RetinaNet (torchvision: focal loss, one-stage, anchors) behind the Detector interface: torchvision's
`retinanet_resnet50_fpn_v2`, and `retinanet_timm`, any timm backbone under the FPN that `fasterrcnn_timm` uses
with RetinaNet's P6/P7 levels on top."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

from torch import nn
from torchvision.models import detection
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from .base import config_value, register_model
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

TORCHVISION_BUILDERS = {"retinanet_resnet50_fpn_v2": detection.retinanet_resnet50_fpn_v2}
RETINANET_OPTIONS = constructor_options(RetinaNet) - {"anchor_generator", "head", "proposal_matcher"}
# options read by the timm builder itself; the rest go to torchvision's RetinaNet
TIMM_OPTIONS = ("out_indices", "fpn_channels", "anchor_sizes", "aspect_ratios", "backbone_args", "head_norm",
                "box_loss")
BOX_LOSSES = ("giou", "l1", "smooth_l1", "ciou", "diou")
PRIOR_PROBABILITY = 0.01  # RetinaNet's initial foreground probability of every anchor (focal loss paper)


class RetinaNetDetector(TorchvisionDetector):
    """A torchvision RetinaNet: sigmoid class scores without a background class, so labels are 0-based inside too.

    Takes any width and height that are multiples of `size_multiple` (32) at predict time, like Faster R-CNN:
    anchors follow the feature maps (and, for `retinanet_timm`, step by each level's true stride at every size)."""

    head_prefixes = ("net.head.classification_head.cls_logits.",)
    label_offset = 0


def one_stage_kwargs(cfg: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """The constructor arguments RetinaNet and FCOS share: the input transform and the post-processing."""
    return dict(transform_kwargs(cfg.image_size, mean, std), detections_per_img=cfg.max_detections,
                score_thresh=cfg.score_threshold, nms_thresh=cfg.nms_iou)


def new_class_logits(head: RetinaNetHead, num_classes: int) -> None:
    """A fresh class layer for `num_classes` (COCO's has 91), initialised as torchvision does."""
    cls_head = head.classification_head
    old = cls_head.cls_logits
    anchors = old.out_channels // cls_head.num_classes
    cls_head.cls_logits = nn.Conv2d(old.in_channels, anchors * num_classes, kernel_size=3, stride=1, padding=1)
    nn.init.normal_(cls_head.cls_logits.weight, std=0.01)
    nn.init.constant_(cls_head.cls_logits.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    cls_head.num_classes = num_classes


def build_torchvision_one_stage(name: str, cfg: Any, num_classes: int, builder: Callable[..., nn.Module],
                                allowed: set[str], detector: type[TorchvisionDetector]) -> TorchvisionDetector:
    """torchvision's one-stage builder `builder` (RetinaNet or FCOS) as `detector`: from the COCO weights with a new
    class layer (`pretrained`), or from scratch; `options` checked against `allowed`."""
    options = checked_options(name, config_value(cfg, "options", {}), allowed | {"trainable_backbone_layers"})
    kwargs = {**one_stage_kwargs(cfg, IMAGENET_MEAN, IMAGENET_STD), **options}
    if cfg.pretrained:
        with hub_download(f"the COCO weights of {name}"):
            net = builder(weights="DEFAULT", **kwargs)
        new_class_logits(net.head, num_classes)  # everything else stays COCO-pretrained
    else:
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    return detector(net, num_classes, cfg.image_size, cfg.max_detections)


def build_torchvision_retinanet(name: str, cfg: Any, num_classes: int) -> TorchvisionDetector:
    """torchvision's RetinaNet `name` (a key of TORCHVISION_BUILDERS), registered under that name below."""
    return build_torchvision_one_stage(name, cfg, num_classes, TORCHVISION_BUILDERS[name], RETINANET_OPTIONS,
                                       RetinaNetDetector)


for _name in TORCHVISION_BUILDERS:
    register_model(_name)(partial(build_torchvision_retinanet, _name))


def group_norm(channels: int) -> partial[nn.GroupNorm]:
    """GroupNorm for the heads: torchvision's 32 groups, fewer for an FPN narrower than 64 channels so that every
    group keeps two channels. One channel per group (32 groups of a 32-channel FPN) would normalise a 1x1 P7 map (a
    128 px input) over a single value: torch raises "Expected more than 1 value per channel" for one image.
    Measured on the demo (fold 0, 6 epochs, 64 channels): 32 groups of 2 channels gave RetinaNet mAP 0.126, 8
    groups of 8 channels 0.015, and left FCOS with a dead box branch (its ReLU outputs all 0, no detections)."""
    per_group = min(2, channels)
    return partial(nn.GroupNorm, max(g for g in range(1, 33) if channels % g == 0 and channels // g >= per_group))


@register_model("retinanet_timm")
def build_timm_retinanet(cfg: Any, num_classes: int) -> RetinaNetDetector:
    """RetinaNet on a timm body: levels P3-P5 from `out_indices` (default strides 8, 16, 32) plus P6, P7; anchors
    as torchvision's (three sizes 4x, 5x, 6.3x the stride, three ratios per level) unless `anchor_sizes` is set;
    GroupNorm heads and GIoU box loss as in torchvision's v2 (`head_norm: none`, `box_loss: smooth_l1` for v1)."""
    options = checked_options("retinanet_timm", config_value(cfg, "options", {}), RETINANET_OPTIONS | set(TIMM_OPTIONS))
    own = {k: options.pop(k) for k in TIMM_OPTIONS if k in options}
    body = timm_body(cfg, own.get("out_indices", (2, 3, 4)), own.get("backbone_args", {}))
    channels = int(own.get("fpn_channels", 256))
    backbone = TimmFPNBackbone(body, channels, extra="p6p7")
    sizes = own.get("anchor_sizes") or [tuple(int(4 * s * 2 ** (i / 3)) for i in range(3)) for s in backbone.strides]
    ratios = tuple(own.get("aspect_ratios") or (0.5, 1.0, 2.0))
    per_location = {len(s) * len(ratios) for s in sizes}
    if len(per_location) != 1:
        raise ValueError(f"retinanet_timm: every level needs the same number of anchor sizes (its head predicts one "
                         f"count per location), got anchor_sizes {sizes}")
    anchors = LevelStrideAnchorGenerator(sizes, (ratios,) * len(sizes), backbone.strides)
    head_norm = own.get("head_norm", "group")
    if head_norm not in ("group", "none"):
        raise ValueError(f"retinanet_timm: head_norm must be 'group' or 'none', got {head_norm!r}")
    head = RetinaNetHead(channels, per_location.pop(), num_classes,
                         norm_layer=group_norm(channels) if head_norm == "group" else None)
    box_loss = own.get("box_loss", "giou")
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"retinanet_timm: box_loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
    head.regression_head._loss_type = box_loss  # how torchvision's v2 builder selects it
    mean, std = body_mean_std(body)
    net = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head,
                    **{**one_stage_kwargs(cfg, mean, std), **options})
    return RetinaNetDetector(net, num_classes, cfg.image_size, cfg.max_detections)
