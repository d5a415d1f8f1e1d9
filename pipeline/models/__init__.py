"""Detectors created by name: `create_model(cfg, num_classes)` looks `cfg.name` up in `MODELS`, builds the
network, then loads `backbone_weights` and `init_checkpoint` if set.

Each family module registers its builders with `@register_model(name)` when it is imported; a new family is
one module plus its import below.
"""
from __future__ import annotations

from typing import Any

from . import efficientdet, faster_rcnn, fcos, retinanet, ssdlite  # noqa: F401  (for their register_model entries)
from .base import MODELS, Builder, Detector, register_model
from .efficientdet import EfficientDetDetector
from .faster_rcnn import FasterRCNNDetector
from .fcos import FCOSDetector
from .retinanet import RetinaNetDetector
from .ssdlite import SSDliteDetector
from .weights import (
    LoadReport,
    apply_local_weights,
    lite0_weights_path,
    load_backbone_weights,
    load_model_state,
    read_state_dict,
)


def create_model(cfg: Any, num_classes: int) -> Detector:
    """A Detector for `num_classes` dataset classes (no background) from a `pipeline.config.ModelConfig` (or any
    object with its fields)."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model name {cfg.name!r}; known: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = MODELS[cfg.name](cfg, num_classes)
    apply_local_weights(model, cfg)
    return model


__all__ = [
    "MODELS", "Builder", "Detector", "EfficientDetDetector", "FasterRCNNDetector", "FCOSDetector", "LoadReport",
    "RetinaNetDetector", "SSDliteDetector", "create_model",
    "lite0_weights_path", "load_backbone_weights", "load_model_state", "read_state_dict", "register_model",
]
