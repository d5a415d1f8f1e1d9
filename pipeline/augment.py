"""Augmentation: an albumentations pipeline declared in YAML, bbox-safe, plus Mosaic, MixUp and CutMix.

``augment.train`` lists albumentations transforms by class name with their parameters; every pipeline ends with a
resize to the model's square input, so boxes come out in input pixels. Validation and prediction use the resize
alone (no crop, no pad): its inverse for boxes is a per-axis scale, exact.

Randomness is a pure function of (seed, epoch, sample index): each sample reseeds the pipeline, so a resumed run
and a run with a different number of loader workers see the same augmentations.
"""
from __future__ import annotations

import albumentations as A
import numpy as np

from pipeline.config import AugmentConfig, TransformSpec

# A Kaggle-style starting recipe, used by configs that say `train: default`.
DEFAULT_TRAIN = [
    TransformSpec(name="HorizontalFlip", params={"p": 0.5}),
    TransformSpec(name="VerticalFlip", params={"p": 0.5}),
    TransformSpec(name="RandomRotate90", params={"p": 0.5}),
    TransformSpec(name="HueSaturationValue", params={"p": 0.5}),
    TransformSpec(name="RandomBrightnessContrast", params={"p": 0.5}),
]


def bbox_params(cfg: AugmentConfig) -> A.BboxParams:
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_visibility=cfg.min_visibility,
        min_area=cfg.min_area,
        clip=True,  # float rounding in geometric transforms can push a coordinate a hair past the border
    )


def make_transform(spec: TransformSpec) -> A.BasicTransform:
    cls = getattr(A, spec.name, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"augment.train: {spec.name!r} is not an albumentations transform")
    try:
        return cls(**spec.params)
    except Exception as exc:  # albumentations validates parameters with pydantic: say which transform
        raise ValueError(f"augment.train: {spec.name}({spec.params}) is invalid: {exc}") from None


def build_train(cfg: AugmentConfig, size: int, mosaic: bool = False) -> A.Compose:
    """The training pipeline; with ``mosaic``, an ``A.Mosaic`` (fed 3 more images via metadata) comes first."""
    steps: list[A.BasicTransform] = []
    if mosaic:
        steps.append(A.Mosaic(grid_yx=(2, 2), target_size=(size, size), cell_shape=(size, size), p=1.0))
    steps += [make_transform(s) for s in cfg.train]
    steps.append(A.Resize(size, size))
    return A.Compose(steps, bbox_params=bbox_params(cfg), strict=True)


def reseed(transform: A.Compose, rng: np.random.Generator) -> None:
    """Seed ``transform`` and each of its steps from its own draw of ``rng``.

    ``Compose.set_random_seed(s)`` hands the same ``s`` to every step, so their first draws coincide: with one
    reseed per sample, HorizontalFlip(p=0.5), VerticalFlip(p=0.5) and RandomRotate90(p=0.5) fired all together or
    not at all, and a lone flip was never trained on.
    """
    transform.set_random_seed(int(rng.integers(0, 2**31)))
    for step in transform.transforms:
        step.set_random_seed(int(rng.integers(0, 2**31)))


def mixup(a: dict, b: dict, lam: float) -> dict:
    """Blend two transformed samples; both sets of boxes stay (the Global Wheat winners' variant)."""
    image = (a["image"].astype(np.float32) * lam + b["image"].astype(np.float32) * (1 - lam)).astype(np.uint8)
    return {
        "image": image,
        "bboxes": np.concatenate([a["bboxes"], b["bboxes"]]).reshape(-1, 4),
        "labels": np.concatenate([a["labels"], b["labels"]]),
    }


def cutmix(a: dict, b: dict, rng: np.random.Generator, min_visibility: float) -> dict:
    """Paste a random rectangle of ``b`` into ``a``. Boxes of ``a`` hidden below ``min_visibility`` are dropped, the
    rest kept whole (an occluded object is still there); boxes of ``b`` are clipped to the rectangle and kept when
    at least ``min_visibility`` of them is inside it."""
    h, w = a["image"].shape[:2]
    lam = rng.uniform(0.3, 0.7)
    cw, ch = int(w * np.sqrt(1 - lam)), int(h * np.sqrt(1 - lam))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    x1, y1 = x0 + cw, y0 + ch
    image = a["image"].copy()
    image[y0:y1, x0:x1] = b["image"][y0:y1, x0:x1]

    def inside(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes = boxes.reshape(-1, 4)
        clipped = np.stack(
            [np.clip(boxes[:, 0], x0, x1), np.clip(boxes[:, 1], y0, y1),
             np.clip(boxes[:, 2], x0, x1), np.clip(boxes[:, 3], y0, y1)], axis=1)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        covered = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        return clipped, covered / np.maximum(area, 1e-9)

    _, a_covered = inside(a["bboxes"])
    keep_a = (1 - a_covered) >= min_visibility
    b_clipped, b_inside = inside(b["bboxes"])
    keep_b = b_inside >= min_visibility
    return {
        "image": image,
        "bboxes": np.concatenate([np.asarray(a["bboxes"]).reshape(-1, 4)[keep_a], b_clipped[keep_b]]),
        "labels": np.concatenate([np.asarray(a["labels"])[keep_a], np.asarray(b["labels"])[keep_b]]),
    }
