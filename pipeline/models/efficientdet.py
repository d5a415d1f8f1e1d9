"""EfficientDet (effdet) behind the Detector interface.

The raw `EfficientDet` network (`self.net`) sits next to the pieces of effdet's benches, not inside them:
the training side is DetBenchTrain's labeler and focal loss (`create_labeler=True`: boxes are matched to
anchors in the forward), the predict side DetBenchPredict's top-k and box decoding. Holding the network in
a bench would repeat its weights in the state_dict under a second prefix, and a bench would keep calling
the old network after the engine swaps in `torch.compile(model.net)`. The anchors are registered here as a
non-persistent buffer, so `.to(device)` moves them with the network (the DetBenchPredict device trap) and
checkpoints hold only learned weights.

Other input sizes (TTA scale views): effdet builds a network and anchors for one `config.image_size` (height,
width: effdet's order; ours is (width, height) everywhere else). The network's only size-bound parts are the
BiFPN's upsampling layers, which resize to fixed feature-map sizes; they are switched to the equivalent fixed
factors (the same output at image_size), and anchors for another size are built on first use and cached. So
`predict` takes any W x H whose sides are multiples of 2 ** max_level (128) -- non-square included, and a quarter
turn's H x W -- and so does training (multi-scale): the labeler for another size matches targets to that size's
anchors. effdet lays anchors out per axis (its own stride along each), so W != H needs nothing more.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

with warnings.catch_warnings():
    # effdet 0.4.1 decorates helpers with torch.jit.script at import; torch >= 2.9 warns about it on every command
    # start. The decorated helpers work; the warning is for effdet's maintainers, not for our users.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
    from effdet import EfficientDet, get_efficientdet_config
    from effdet.anchors import AnchorLabeler, Anchors, decode_box_outputs
    from effdet.bench import _post_process
    from effdet.config.model_config import efficientdet_model_param_dict
    from effdet.efficientdet import Interpolate2d, ResampleFeatureMap
    from effdet.helpers import load_pretrained
    from effdet.loss import DetectionLoss
from omegaconf import DictConfig
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.ops import batched_nms

from pipeline.config import InputSize, input_wh

from .base import (Detections, Detector, Target, check_divisible, clamp_boxes, config_value, register_model,
                   sides_rule)
from .weights import hub_download

COCO_CLASSES = 90  # the class count of effdet's published checkpoints


class EfficientDetDetector(Detector):
    head_prefixes = ("net.class_net.predict.",)
    compiled_parts = ("net",)  # backbone, BiFPN and heads; the labeler, loss and top-k stay eager

    def __init__(self, net: EfficientDet, image_size: InputSize, max_detections: int,
                 score_threshold: float, nms_iou: float) -> None:
        super().__init__(net.config.num_classes, image_size, max_detections)
        self.net = net
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        config = net.config
        self.size_multiple = 2 ** config.max_level  # the deepest feature stride: every level halves exactly
        _resample_by_factor(net)
        # (width, height) -> anchors and their labeler, for sizes other than image_size (TTA scale views, quarter
        # turns, multi-scale training); plain dicts, not submodules: anchors are rebuilt from the config, never saved
        self._other_anchors: dict[tuple[int, int], Anchors] = {}
        self._other_labelers: dict[tuple[int, int], AnchorLabeler] = {}
        self.register_buffer("mean", _channel_tensor(config.get("mean", IMAGENET_DEFAULT_MEAN)), persistent=False)
        self.register_buffer("std", _channel_tensor(config.get("std", IMAGENET_DEFAULT_STD)), persistent=False)
        self.anchors = Anchors.from_config(config)
        self.anchors.register_buffer("boxes", self.anchors.boxes, persistent=False)
        # as in DetBenchTrain(create_labeler=True); the labeler is a plain object sharing our anchors
        self.labeler = AnchorLabeler(self.anchors, config.num_classes, match_threshold=0.5)
        self.loss_fn = DetectionLoss(config)

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def accepts_size(self, size: InputSize) -> bool:
        return all(side > 0 and side % self.size_multiple == 0 for side in input_wh(size))

    @property
    def size_rule(self) -> str:
        return sides_rule(self.size_multiple, why=" (2 ** max_level)")

    def _losses(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        device = images.device
        yxyx = [t["boxes"][:, [1, 0, 3, 2]].to(device) for t in targets]  # effdet wants y1,x1,y2,x2
        classes = [(t["labels"] + 1).float().to(device) for t in targets]  # and 1-based classes
        class_out, box_out = self.net(self._normalise(images))
        labeler = self._labeler_at((images.shape[-1], images.shape[-2]))
        cls_targets, box_targets, num_positives = labeler.batch_label_anchors(yxyx, classes)
        _, class_loss, box_loss = self.loss_fn(class_out, box_out, cls_targets, box_targets, num_positives)
        # effdet's total is class_loss + box_loss_weight * box_loss; report the weighted term so the parts
        # add up to "loss" like every other family's.
        return {"class_loss": class_loss, "box_loss": self.net.config.box_loss_weight * box_loss}

    def _detect(self, images: Tensor) -> list[Detections]:
        config = self.net.config
        size = (images.shape[-1], images.shape[-2])
        anchors = self._anchor_boxes(size)
        class_out, box_out = self.net(self._normalise(images))
        # top-k over anchors fails ("selected index k out of range") when fewer anchors than k exist (small inputs)
        scores, box_codes, indices, classes = _post_process(
            class_out, box_out, num_levels=config.num_levels, num_classes=config.num_classes,
            max_detection_points=min(config.max_detection_points, anchors.shape[0]))
        return [self._detect_one(scores[i], box_codes[i], anchors[indices[i]], classes[i], size)
                for i in range(images.shape[0])]

    def _anchor_boxes(self, size: InputSize) -> Tensor:
        """Anchor boxes (y1, x1, y2, x2) for inputs of `size` (a side or (width, height))."""
        return self._anchors_at(size).boxes

    def _anchors_at(self, size: InputSize) -> Anchors:
        """effdet's anchors for inputs of `size` (a side or (width, height)): the registered ones at image_size,
        else built once per size and kept on the device and dtype of the registered ones."""
        width, height = input_wh(size)
        if (width, height) == self.input_wh:
            return self.anchors
        own = self.anchors.boxes
        anchors = self._other_anchors.get((width, height))
        if anchors is None or anchors.boxes.device != own.device or anchors.boxes.dtype != own.dtype:
            config = self.net.config
            anchors = Anchors(config.min_level, config.max_level, config.num_scales, config.aspect_ratios,
                              config.anchor_scale, (height, width))  # effdet's (height, width)
            anchors.boxes = anchors.boxes.to(own)
            self._other_anchors[width, height] = anchors
        return anchors

    def _labeler_at(self, size: InputSize) -> AnchorLabeler:
        """The labeler that matches targets to the anchors of inputs of `size` (multi-scale training)."""
        wh = input_wh(size)
        if wh == self.input_wh:
            return self.labeler
        anchors = self._anchors_at(wh)
        labeler = self._other_labelers.get(wh)
        if labeler is None or labeler.anchors is not anchors:
            labeler = AnchorLabeler(anchors, self.net.config.num_classes, match_threshold=0.5)
            self._other_labelers[wh] = labeler
        return labeler

    def _detect_one(self, logits: Tensor, box_codes: Tensor, anchors: Tensor, classes: Tensor,
                    size: tuple[int, int]) -> Detections:
        # effdet's own generate_detections hard-codes NMS IoU 0.5, has no score threshold and pads with zero
        # rows; this is the same decode with our thresholds.
        boxes = decode_box_outputs(box_codes.float(), anchors, output_xyxy=True)
        boxes = clamp_boxes(boxes, *size)
        scores = logits.float().sigmoid().squeeze(1)
        keep = torch.nonzero(scores > self.score_threshold).squeeze(1)
        keep = keep[batched_nms(boxes[keep], scores[keep], classes[keep], self.nms_iou)]
        keep = keep[: self.max_detections]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": classes[keep]}  # classes are 0-based

    def _normalise(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


def _resample_by_factor(net: EfficientDet) -> None:
    """effdet's BiFPN upsamples to the feature-map sizes of config.image_size (`size=`, as its module flag
    `_USE_SCALE = False` selects), which breaks at any other input size. Give those layers the equal factor
    instead: for sides that are multiples of 2 ** max_level every ratio is an exact power of two, so at
    image_size the output is the same and at other sizes it follows the input. Max-pool downsampling already
    works at any size (its stride comes from the ratio and 'same' padding is computed per input)."""
    for resample in net.modules():
        if not isinstance(resample, ResampleFeatureMap):
            continue
        for layer in resample.children():
            if isinstance(layer, Interpolate2d) and layer.size is not None:
                (h_in, w_in), (h_out, w_out) = resample.input_size, resample.output_size
                layer.scale_factor = (h_out / h_in, w_out / w_in)
                layer.size = None


@register_model("efficientdet")
def build_efficientdet(cfg: Any, num_classes: int) -> EfficientDetDetector:
    config = efficientdet_config(cfg, num_classes)
    if cfg.pretrained:
        net = _pretrained_net(config, num_classes)
    else:
        net = EfficientDet(config, pretrained_backbone=False)
    return EfficientDetDetector(net, cfg.image_size, cfg.max_detections, cfg.score_threshold, cfg.nms_iou)


def efficientdet_config(cfg: Any, num_classes: int) -> DictConfig:
    """effdet's config for `cfg.arch` with our image size, classes, detection limits and `options`
    (any effdet config key, e.g. fpn_channels, fpn_cell_repeats, box_class_repeats for tiny models)."""
    if cfg.arch not in efficientdet_model_param_dict:
        raise ValueError(f"unknown effdet arch {cfg.arch!r}; known: {', '.join(sorted(efficientdet_model_param_dict))}")
    config = get_efficientdet_config(cfg.arch)
    options = dict(config_value(cfg, "options", {}))
    unknown = sorted(set(options) - set(config))
    if unknown:
        raise ValueError(f"efficientdet options {unknown} are not effdet config keys; known: {', '.join(sorted(config))}")
    config.update(options)
    config.num_levels = config.max_level - config.min_level + 1
    check_divisible(cfg.image_size, 2 ** config.max_level, cfg.arch)
    width, height = input_wh(cfg.image_size)
    config.image_size = (height, width)  # effdet's order
    config.num_classes = num_classes
    config.max_det_per_image = cfg.max_detections  # effdet's default of 100 caps recall on crowded images
    config.soft_nms = False  # far too slow, and the ensemble's WBF does the fusing
    # max_detection_points stays as asked: the detector caps it by the anchor count of each input size
    return config


def _pretrained_net(config: DictConfig, num_classes: int) -> EfficientDet:
    """effdet's COCO checkpoint (90 classes) with a fresh class head; the ImageNet backbone alone where
    effdet publishes no detector weights for the arch."""
    config.num_classes = COCO_CLASSES
    with hub_download(f"the weights of {config.name}"):
        net = EfficientDet(config, pretrained_backbone=not config.url)
        if config.url:
            load_pretrained(net, config.url)
    net.reset_head(num_classes=num_classes)
    return net


def _channel_tensor(values: Any) -> Tensor:
    return torch.tensor([float(v) for v in values]).view(1, 3, 1, 1)
