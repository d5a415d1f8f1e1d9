"""Detectors created by name: `create_model(cfg, num_classes)` looks `cfg.name` up in `MODELS`, builds the
network, then loads `backbone_weights` and `init_checkpoint` if set."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

from .base import Detector, ModelConfig
from .efficientdet import EfficientDetDetector, build_efficientdet
from .faster_rcnn import FasterRCNNDetector, build_timm_frcnn, build_torchvision_frcnn
from .weights import (
    LoadReport,
    apply_local_weights,
    lite0_weights_path,
    load_backbone_weights,
    load_model_state,
    read_state_dict,
)

Builder = Callable[[Any, int], Detector]

MODELS: dict[str, Builder] = {
    "fasterrcnn_resnet50_fpn_v2": partial(build_torchvision_frcnn, "fasterrcnn_resnet50_fpn_v2"),
    "fasterrcnn_mobilenet_v3_large_fpn": partial(build_torchvision_frcnn, "fasterrcnn_mobilenet_v3_large_fpn"),
    "fasterrcnn_timm": build_timm_frcnn,
    "efficientdet": build_efficientdet,
}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator for a new family: `@register_model("yolo") def build(cfg, num_classes) -> Detector`."""
    def add(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder
    return add


def create_model(cfg: Any, num_classes: int) -> Detector:
    """A Detector for `num_classes` dataset classes (no background) from a ModelConfig-like `cfg`."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model name {cfg.name!r}; known: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = MODELS[cfg.name](cfg, num_classes)
    apply_local_weights(model, cfg)
    return model


__all__ = [
    "MODELS", "Detector", "EfficientDetDetector", "FasterRCNNDetector", "LoadReport", "ModelConfig",
    "create_model", "lite0_weights_path", "load_backbone_weights", "load_model_state", "read_state_dict",
    "register_model",
]
