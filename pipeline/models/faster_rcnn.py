"""Faster R-CNN (torchvision) behind the Detector interface: torchvision's ResNet-50 FPN v2 and
MobileNetV3-Large FPN, and any timm backbone under torchvision's FPN, RPN and RoI heads."""
from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from typing import Any, Iterator

import timm
from torch import Tensor, nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .base import Detections, Detector, Target, config_value
from .weights import hub_download

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TORCHVISION_BUILDERS = {
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
}
# options read by the timm builder itself; the rest go to torchvision's FasterRCNN
TIMM_OPTIONS = ("out_indices", "fpn_channels", "anchor_sizes", "aspect_ratios", "backbone_args")
# FasterRCNN hands unknown kwargs to its transform, which silently ignores them: check names ourselves
FRCNN_OPTIONS = frozenset(inspect.signature(FasterRCNN.__init__).parameters) - {"self", "backbone", "num_classes", "kwargs"}
TRANSFORM_OPTIONS = frozenset({"size_divisible", "fixed_size"})


class FasterRCNNDetector(Detector):
    """A torchvision FasterRCNN, with 0-based labels outside and background class 0 inside."""

    head_prefixes = ("net.roi_heads.box_predictor.",)

    def __init__(self, net: FasterRCNN, num_classes: int, image_size: int, max_detections: int) -> None:
        super().__init__(num_classes, image_size, max_detections)
        self.net = net

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone.body

    def _losses(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        targets = [{"boxes": t["boxes"].to(images.device), "labels": t["labels"].to(images.device) + 1}
                   for t in targets]
        with _loss_mode(self.net):
            return self.net(list(images), targets)

    def _detect(self, images: Tensor) -> list[Detections]:
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1}
                for d in self.net(list(images))]


@contextlib.contextmanager
def _loss_mode(net: FasterRCNN) -> Iterator[None]:
    """torchvision returns losses only when `training` is set. For a validation loss in eval mode, set it
    on the detection parts alone, so BatchNorm keeps its running statistics untouched."""
    parts = (net, net.transform, net.rpn, net.roi_heads)
    modes = [p.training for p in parts]
    for p in parts:
        p.training = True
    try:
        yield
    finally:
        for p, mode in zip(parts, modes):
            p.training = mode


def _checked_options(name: str, options: dict[str, Any], extra: set[str]) -> dict[str, Any]:
    allowed = FRCNN_OPTIONS | TRANSFORM_OPTIONS | extra
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown options {unknown}; known: {', '.join(sorted(allowed))}")
    return dict(options)


def _common_kwargs(cfg: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    size = cfg.image_size
    return dict(
        # min_size = max_size = S: the loader already resized to S x S, the transform must not resize again
        min_size=size, max_size=size, image_mean=list(mean), image_std=list(std),
        box_detections_per_img=cfg.max_detections, box_score_thresh=cfg.score_threshold,
        box_nms_thresh=cfg.nms_iou,
    )


def build_torchvision_frcnn(name: str, cfg: Any, num_classes: int) -> FasterRCNNDetector:
    builder = TORCHVISION_BUILDERS[name]
    options = _checked_options(name, config_value(cfg, "options", {}), extra={"trainable_backbone_layers"})
    kwargs = {**_common_kwargs(cfg, IMAGENET_MEAN, IMAGENET_STD), **options}
    if cfg.pretrained:
        with hub_download(f"the COCO weights of {name}"):
            net = builder(weights="DEFAULT", **kwargs)
        # COCO has 91 outputs; a fresh predictor for ours keeps everything else pretrained
        in_features = net.roi_heads.box_predictor.cls_score.in_features
        net.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes + 1)
    else:
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs)
    return FasterRCNNDetector(net, num_classes, cfg.image_size, cfg.max_detections)


class TimmFPNBackbone(nn.Module):
    """A timm features_only model under torchvision's FPN, shaped like torchvision's BackboneWithFPN
    (`body`, `fpn`, `out_channels`, an OrderedDict of levels "0".."n-1" plus "pool")."""

    def __init__(self, body: nn.Module, fpn_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_timm_frcnn(cfg: Any, num_classes: int) -> FasterRCNNDetector:
    if not cfg.arch:
        raise ValueError("fasterrcnn_timm needs `arch:` = a timm backbone name, e.g. resnet50 or tf_efficientnet_lite0")
    options = _checked_options("fasterrcnn_timm", config_value(cfg, "options", {}), extra=set(TIMM_OPTIONS))
    own = {k: options.pop(k) for k in TIMM_OPTIONS if k in options}
    body = _timm_body(cfg, tuple(own.get("out_indices", (1, 2, 3, 4))), own.get("backbone_args", {}))
    backbone = TimmFPNBackbone(body, int(own.get("fpn_channels", 256)))
    strides = body.feature_info.reduction()
    names = [str(i) for i in range(len(strides))]
    # torchvision's default sizes are 8x the stride of each level (32 at stride 4 ... 512 at the pool)
    sizes = own.get("anchor_sizes") or [(8 * s,) for s in strides] + [(16 * strides[-1],)]
    ratios = own.get("aspect_ratios") or (0.5, 1.0, 2.0)
    anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(ratios),) * len(sizes))
    mean, std = body.pretrained_cfg.get("mean", IMAGENET_MEAN), body.pretrained_cfg.get("std", IMAGENET_STD)
    net = FasterRCNN(
        backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2),
        **{**_common_kwargs(cfg, mean, std), **options},
    )
    return FasterRCNNDetector(net, num_classes, cfg.image_size, cfg.max_detections)


def _timm_body(cfg: Any, out_indices: tuple[int, ...], backbone_args: dict[str, Any]) -> nn.Module:
    def create(pretrained: bool) -> nn.Module:
        return timm.create_model(cfg.arch, pretrained=pretrained, features_only=True, out_indices=out_indices,
                                 **backbone_args)

    if not cfg.pretrained:
        return create(False)
    with hub_download(f"the ImageNet weights of timm's {cfg.arch}"):
        return create(True)
