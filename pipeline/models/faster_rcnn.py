"""Faster R-CNN (torchvision) behind the Detector interface: torchvision's ResNet-50 FPN v2 and
MobileNetV3-Large FPN, and any timm backbone under torchvision's FPN, RPN and RoI heads."""
from __future__ import annotations

from functools import partial
from typing import Any

from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

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

TORCHVISION_BUILDERS = {
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
}
# options read by the timm builder itself; the rest go to torchvision's FasterRCNN
TIMM_OPTIONS = ("out_indices", "fpn_channels", "anchor_sizes", "aspect_ratios", "backbone_args")
FRCNN_OPTIONS = constructor_options(FasterRCNN)


class FasterRCNNDetector(TorchvisionDetector):
    """A torchvision FasterRCNN, with 0-based labels outside and background class 0 inside.

    Predicts at the size it is given: any width and height that are multiples of `size_multiple` (the transform's
    `size_divisible`, 32 by default: the FPN's deepest stride, so no padding is added), square or not, or its own
    image_size (a side or [width, height]).
    Anchors and RoI pooling follow the feature maps, so nothing else depends on the size. The exception is a net
    whose transform was set to resize (options min_size/max_size other than image_size, or fixed_size): it would
    resize every input to one size, undoing a scale view, so it takes its own size only.
    """

    head_prefixes = ("net.roi_heads.box_predictor.",)
    label_offset = 1
    loss_parts = ("rpn", "roi_heads")


def _frcnn_kwargs(cfg: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    return dict(
        transform_kwargs(cfg.image_size, mean, std),
        box_detections_per_img=cfg.max_detections, box_score_thresh=cfg.score_threshold, box_nms_thresh=cfg.nms_iou,
    )


def build_torchvision_frcnn(name: str, cfg: Any, num_classes: int) -> FasterRCNNDetector:
    """torchvision's Faster R-CNN `name` (a key of TORCHVISION_BUILDERS), registered under that name below."""
    builder = TORCHVISION_BUILDERS[name]
    options = checked_options(name, config_value(cfg, "options", {}), FRCNN_OPTIONS | {"trainable_backbone_layers"})
    kwargs = {**_frcnn_kwargs(cfg, IMAGENET_MEAN, IMAGENET_STD), **options}
    if cfg.pretrained:
        with hub_download(f"the COCO weights of {name}"):
            net = builder(weights="DEFAULT", **kwargs)
        # COCO has 91 outputs; a fresh predictor for ours keeps everything else pretrained
        in_features = net.roi_heads.box_predictor.cls_score.in_features
        net.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes + 1)
    else:
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs)
    return FasterRCNNDetector(net, num_classes, cfg.image_size, cfg.max_detections)


for _name in TORCHVISION_BUILDERS:
    register_model(_name)(partial(build_torchvision_frcnn, _name))


@register_model("fasterrcnn_timm")
def build_timm_frcnn(cfg: Any, num_classes: int) -> FasterRCNNDetector:
    options = checked_options("fasterrcnn_timm", config_value(cfg, "options", {}), FRCNN_OPTIONS | set(TIMM_OPTIONS))
    own = {k: options.pop(k) for k in TIMM_OPTIONS if k in options}
    body = timm_body(cfg, own.get("out_indices", (1, 2, 3, 4)), own.get("backbone_args", {}))
    backbone = TimmFPNBackbone(body, int(own.get("fpn_channels", 256)), extra="pool")
    names = [str(i) for i in range(len(backbone.strides) - 1)]  # the RoI heads pool from the body's levels
    # torchvision's default sizes are 8x the stride of each level (32 at stride 4 ... 512 at the pool)
    sizes = own.get("anchor_sizes") or [(8 * s,) for s in backbone.strides]
    ratios = own.get("aspect_ratios") or (0.5, 1.0, 2.0)
    anchors = LevelStrideAnchorGenerator(sizes, (tuple(ratios),) * len(sizes), backbone.strides)
    mean, std = body_mean_std(body)
    net = FasterRCNN(
        backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2),
        **{**_frcnn_kwargs(cfg, mean, std), **options},
    )
    return FasterRCNNDetector(net, num_classes, cfg.image_size, cfg.max_detections)
