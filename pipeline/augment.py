"""Augmentation: an albumentations pipeline declared in YAML, bbox-safe, plus Mosaic, MixUp and CutMix.

``augment.train`` lists albumentations transforms by class name with their parameters; every pipeline ends with a
resize to the model's input (``model.image_size``: a square side, or width x height), so boxes come out in input
pixels. Validation and prediction use the resize alone (no crop): its inverse for boxes is a per-axis scale, exact.

The resize (``model.resize``) to a w x h input is ``square`` (stretch to w x h; the aspect ratio changes unless the
image's is w:h) or ``letterbox`` (scale both sides by min(w / W, h / H) for a W x H image, keep the ratio, pad the
bottom/right with the ImageNet mean colour). The image then fills the top-left ``content`` rectangle of the input, so
the inverse is still a per-axis scale, from the content rectangle to the original image, and a box in the padding
maps to nothing (``pipeline.engine.to_table``). An int size is the square w = h = size, as before.

Randomness is a pure function of (seed, epoch, sample index): each sample reseeds the pipeline, so a resumed run
and a run with a different number of loader workers see the same augmentations.
"""
from __future__ import annotations

from typing import Literal

import albumentations as A
import cv2
import numpy as np

from pipeline.config import AugmentConfig, InputSize, TransformSpec, input_wh

Resize = Literal["square", "letterbox"]
RESIZE_MODES = ("square", "letterbox")
# letterbox padding: the ImageNet mean, which the models' normalisation turns into ~0 (no edge, no signal)
LETTERBOX_FILL = (124, 116, 104)

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


def build_train(cfg: AugmentConfig, size: InputSize, mosaic: bool = False, resize: Resize = "square") -> A.Compose:
    """The training pipeline; with ``mosaic``, an ``A.Mosaic`` (fed 3 more images via metadata) comes first.
    It ends with the ``resize`` to the input (``size``: a side, or (width, height))."""
    width, height = input_wh(size)
    steps: list[A.BasicTransform] = []
    if mosaic:  # albumentations sizes are (height, width)
        steps.append(A.Mosaic(grid_yx=(2, 2), target_size=(height, width), cell_shape=(height, width), p=1.0))
    steps += [make_transform(s) for s in cfg.train]
    steps += resize_steps(size, resize)
    return A.Compose(steps, bbox_params=bbox_params(cfg), strict=True)


def resize_steps(size: InputSize, resize: Resize) -> list[A.BasicTransform]:
    """The albumentations steps that bring any image to the model input (``size``: a side or (width, height)), as
    ``fit_to_input`` does: the same scale and the same rounding of the content size."""
    width, height = input_wh(size)
    if resize == "square":
        return [A.Resize(height, width)]
    if resize == "letterbox":
        # scale = min(height / H, width / W), sides round(H * scale), round(W * scale): content_size's numbers
        # (for a square input the same float as the longer side's max_size / max(H, W))
        return [A.LongestMaxSize(max_size_hw=(height, width)),
                A.PadIfNeeded(min_height=height, min_width=width, position="top_left",
                              border_mode=cv2.BORDER_CONSTANT, fill=LETTERBOX_FILL)]
    raise ValueError(f"model.resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


def content_size(width: int, height: int, size: InputSize, resize: Resize) -> tuple[int, int]:
    """Width and height (input pixels) of a ``width`` x ``height`` image inside the input (``size``: a side or
    (input width, input height)): all of it for ``square``; for ``letterbox`` both sides scaled by
    min(input width / width, input height / height), the side that does not fill its axis rounded."""
    in_w, in_h = input_wh(size)
    if resize == "square":
        return in_w, in_h
    if resize == "letterbox":
        scale = min(in_w / width, in_h / height)
        return max(1, min(in_w, round(width * scale))), max(1, min(in_h, round(height * scale)))
    raise ValueError(f"model.resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


def fit_to_input(image: np.ndarray, size: InputSize, resize: Resize) -> tuple[np.ndarray, tuple[int, int]]:
    """An HxWx3 image as the model input (``size``: a side, or (width, height); bilinear, like ``A.Resize``), and
    its content size: the image fills the top-left content_width x content_height, the rest (``letterbox`` only) is
    padding."""
    height, width = image.shape[:2]
    in_w, in_h = input_wh(size)
    cw, ch = content_size(width, height, (in_w, in_h), resize)
    resized = cv2.resize(image, (cw, ch), interpolation=cv2.INTER_LINEAR)
    if (cw, ch) == (in_w, in_h):
        return resized, (cw, ch)
    canvas = np.empty((in_h, in_w, image.shape[2]), dtype=image.dtype)
    canvas[...] = np.asarray(LETTERBOX_FILL[: image.shape[2]], dtype=image.dtype)
    canvas[:ch, :cw] = resized
    return canvas, (cw, ch)


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
