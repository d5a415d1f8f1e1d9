"""Any timm backbone under torchvision's feature pyramid: the body that `fasterrcnn_timm`, `retinanet_timm` and
`fcos_timm` share, and anchors placed by each level's true stride.

`backbone_weights` loads into the timm body (`TimmFPNBackbone.body`), so the offline EfficientNet-Lite0 file
(`backbone_weights: lite0`) works for every family built here.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal, Sequence

import timm
import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .weights import hub_download

# the pyramid's levels above the body: Faster R-CNN's max-pooled P6 (RPN only) or RetinaNet/FCOS's conv P6, P7
ExtraLevels = Literal["pool", "p6p7"]


class TimmFPNBackbone(nn.Module):
    """A timm features_only model under torchvision's FPN, shaped like torchvision's BackboneWithFPN
    (`body`, `fpn`, `out_channels`, an OrderedDict of levels "0".."n-1" plus the extra levels)."""

    def __init__(self, body: nn.Module, fpn_channels: int, extra: ExtraLevels = "pool") -> None:
        super().__init__()
        self.body = body
        block: ExtraFPNBlock = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(fpn_channels, fpn_channels)
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), fpn_channels, extra_blocks=block)
        self.out_channels = fpn_channels
        # each level's stride in input pixels: the body's, then x2 per extra level (both extras halve exactly)
        body_strides = [int(s) for s in body.feature_info.reduction()]
        extra_count = 1 if extra == "pool" else 2
        self.strides = tuple(body_strides + [body_strides[-1] * 2 ** (i + 1) for i in range(extra_count)])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def timm_body(cfg: Any, out_indices: Sequence[int], backbone_args: dict[str, Any]) -> nn.Module:
    """`cfg.arch` from timm as a features_only model; ImageNet weights from the hub only if `cfg.pretrained`."""
    if not cfg.arch:
        raise ValueError(f"{cfg.name} needs `arch:` = a timm backbone name, e.g. resnet50 or tf_efficientnet_lite0")

    def create(pretrained: bool) -> nn.Module:
        return timm.create_model(cfg.arch, pretrained=pretrained, features_only=True,
                                 out_indices=tuple(out_indices), **backbone_args)

    if not cfg.pretrained:
        return create(False)
    with hub_download(f"the ImageNet weights of timm's {cfg.arch}"):
        return create(True)


def body_mean_std(body: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the backbone's ImageNet weights were trained with (timm's pretrained_cfg)."""
    cfg = body.pretrained_cfg
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


class LevelStrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator, but each level's anchors step by that level's true stride.

    torchvision derives a level's stride as input side // grid side, which is the true stride only when the side
    divides by it. For P6/P7 (strides 64 and 128) of a 160 or 480 px input it is not: P7 of 480 px has 4 cells,
    and 480 // 4 = 120 puts the last anchor 24 px away from where the network's cell sits (3 x 128). Such sizes
    are exactly what TTA scale views produce, so anchors here step by the known strides at every size, and at
    sides that divide evenly they are torchvision's, tensor for tensor.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int]) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        if len(strides) != len(self.sizes):
            raise ValueError(f"{len(self.sizes)} anchor size groups for {len(strides)} feature levels; give one "
                             "group of sizes per level (anchor_sizes)")
        self.strides = tuple(int(s) for s in strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        levels = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(levels) for _ in image_list.image_sizes]
