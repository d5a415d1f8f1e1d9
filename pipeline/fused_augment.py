"""The fused augmentation engine: the Kaggle recipe (flips, rot90, transpose, HSV, brightness/contrast) in one pass.

albumentations is the engine for every recipe; this one runs when ``augment.train`` holds only the transforms
below (``augment.engine: auto``, the default) because on a pre-resized cached image albumentations' bookkeeping
costs more than the pixels (a 512-px image on the 2-core machine: ``np.rot90`` then a contiguous copy ~1.4 ms,
``shift_hsv`` with its split, per-channel look-ups and merge ~3 ms, and ~1 ms a sample normalising, clipping and
filtering boxes after every step, by cProfile; ``benchmarks/data_cache.py`` times the engines). Here:

- the flips, rot90s and transposes of a sample compose into one element of the square's symmetry group (a
  transpose or not, then a flip of rows and/or columns): one or two OpenCV copies, boxes by formula;
- the colour transforms run where the recipe puts them: HueSaturationValue is one 3-channel look-up table between
  the two colour conversions, each channel's table made by albumentations' own per-value functions;
  RandomBrightnessContrast is ``albucore.multiply_add``. The geometry between two colour steps is applied before
  the second: OpenCV's RGB/HSV conversion is not quite pointwise (a pixel's value can differ by one level with its
  place in the row, vector lanes vs the scalar tail), so moving pixels later than albumentations does would not
  give its image to the bit;
- boxes are clipped to the image once (albumentations' ``clip=True``; these transforms never move a box out of the
  image, so ``min_visibility`` has nothing to drop), mapped and scaled to the input; as in albumentations a box is
  dropped when empty or under ``min_area`` pixels, in the input's pixels and (when the recipe has a step)
  in the source's.

Each transform fires with its ``p`` and draws its parameters from the distributions albumentations draws from
(``RandomRotate90``: factor 0-3; HSV: three uniform shifts; brightness/contrast: alpha = 1 + U(contrast_limit),
beta = U(brightness_limit) x 255 or x the image mean), from the sample's (seed, epoch, index) stream. With the same
parameters the image is albumentations' to the bit and the boxes to float rounding: tests/test_fused_augment.py
runs albumentations as the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import albucore
import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.pixel import functional as fpixel
from albumentations.core.type_definitions import MAX_VALUES_BY_DTYPE

from pipeline.augment import Resize, fit_to_input, make_transform
from pipeline.config import AugmentConfig, InputSize

GEOMETRY = ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "Transpose")
COLOUR = ("HueSaturationValue", "RandomBrightnessContrast")
FUSED_TRANSFORMS = GEOMETRY + COLOUR


def unfusable(cfg: AugmentConfig) -> list[str]:
    """Why ``cfg`` needs albumentations (empty: the fused engine runs it): transforms it lacks, or Mosaic."""
    why = [f"{spec.name} is not one of {', '.join(FUSED_TRANSFORMS)}"
           for spec in cfg.train if spec.name not in FUSED_TRANSFORMS]
    return why + (["mosaic_prob > 0 (Mosaic is albumentations')"] if cfg.mosaic_prob > 0 else [])


@dataclass(frozen=True)
class Dihedral:
    """An element of the square's symmetry group acting on an H x W image: transpose (if ``t``), then reverse the
    rows (``fy``) and/or the columns (``fx``)."""
    t: bool = False
    fy: bool = False
    fx: bool = False

    def then(self, name: str, factor: int = 0) -> Dihedral:
        """This element followed by the transform ``name`` (``factor``: RandomRotate90's counter-clockwise turns)."""
        if name == "HorizontalFlip":
            return Dihedral(self.t, self.fy, not self.fx)
        if name == "VerticalFlip":
            return Dihedral(self.t, not self.fy, self.fx)
        if name == "Transpose":  # transpose(flip_yx(X)) = flip_xy(transpose(X))
            return Dihedral(not self.t, self.fx, self.fy)
        out = self
        for _ in range(factor % 4):  # np.rot90(m) = flipud(transpose(m))
            out = out.then("Transpose").then("VerticalFlip")
        return out

    def image(self, image: np.ndarray) -> np.ndarray:
        out = cv2.transpose(image) if self.t else image
        if self.fy or self.fx:
            out = cv2.flip(out, -1 if self.fy and self.fx else (0 if self.fy else 1))
        if out.ndim < image.ndim:  # OpenCV drops a single channel axis
            out = out[..., None]
        return out

    def boxes(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """x1, y1, x2, y2 pixel boxes of a ``width`` x ``height`` image, mapped as the image is."""
        out = boxes[:, [1, 0, 3, 2]] if self.t else boxes.copy()
        width, height = (height, width) if self.t else (width, height)
        if self.fx:
            out[:, [0, 2]] = width - out[:, [2, 0]]
        if self.fy:
            out[:, [1, 3]] = height - out[:, [3, 1]]
        return out


def hsv_lut(hue_shift: float, sat_shift: float, val_shift: float) -> np.ndarray:
    """The (1, 256, 3) table ``fpixel.shift_hsv`` applies to H, S and V of a uint8 HSV image, built from its own
    steps: hue modulo 180, saturation and value through ``albucore.add_constant``; a saturation of 0 (grey) stays 0."""
    values = np.arange(256, dtype=np.uint8)
    hue = np.mod(np.arange(256, dtype=np.int16) + hue_shift, 180).astype(np.uint8) if hue_shift != 0 else values
    sat = albucore.add_constant(values[None, :].copy(), sat_shift, inplace=False)[0] if sat_shift != 0 else values
    sat = np.where(values == 0, 0, sat).astype(np.uint8)
    val = albucore.add_constant(values[None, :].copy(), val_shift, inplace=False)[0] if val_shift != 0 else values
    return np.stack([hue, sat, val], axis=-1)[None]


def shift_hsv(image: np.ndarray, hue_shift: float, sat_shift: float, val_shift: float) -> np.ndarray:
    """``fpixel.shift_hsv`` for an RGB uint8 image, its three per-channel look-ups as one."""
    if hue_shift == 0 and sat_shift == 0 and val_shift == 0:
        return image
    if image.ndim != 3 or image.shape[2] != 3:  # grey images: albumentations' own path (and its warning)
        return fpixel.shift_hsv(image, hue_shift, sat_shift, val_shift)
    hsv = cv2.LUT(cv2.cvtColor(image, cv2.COLOR_RGB2HSV), hsv_lut(hue_shift, sat_shift, val_shift))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


class FusedAugment:
    """``augment.train`` (fused transforms only) then the resize to the input, as ``build_train`` would run it."""

    def __init__(self, cfg: AugmentConfig, resize: Resize = "square"):
        reasons = unfusable(cfg)
        if reasons:
            raise ValueError("augment.engine fused cannot run this recipe: " + "; ".join(reasons))
        self.cfg, self.resize = cfg, resize
        # albumentations builds (and validates) each transform: its limits, normalised, are what we draw from
        self.transforms: list[A.BasicTransform] = [make_transform(spec) for spec in cfg.train]

    def draw(self, rng: np.random.Generator) -> list[tuple[A.BasicTransform, dict]]:
        """One sample's fired transforms, in the recipe's order, with their parameters (RandomRotate90: factor;
        HSV: the three shifts; brightness/contrast: alpha and beta before beta's scaling)."""
        steps = []
        for transform in self.transforms:
            if rng.random() >= transform.p:
                continue
            if isinstance(transform, A.RandomRotate90):
                params = {"factor": int(rng.integers(0, 4))}
            elif isinstance(transform, A.HueSaturationValue):
                params = {"hue_shift": rng.uniform(*transform.hue_shift_limit),
                          "sat_shift": rng.uniform(*transform.sat_shift_limit),
                          "val_shift": rng.uniform(*transform.val_shift_limit)}
            elif isinstance(transform, A.RandomBrightnessContrast):
                params = {"alpha": 1.0 + rng.uniform(*transform.contrast_limit),
                          "beta": rng.uniform(*transform.brightness_limit)}
            else:
                params = {}
            steps.append((transform, params))
        return steps

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 size: InputSize) -> dict:
        height, width = image.shape[:2]
        geometry = pending = Dihedral()  # the whole geometry (for boxes), and the part not yet applied to pixels
        for transform, params in self.draw(rng):
            name = type(transform).__name__
            if name in GEOMETRY:
                geometry = geometry.then(name, params.get("factor", 0))
                pending = pending.then(name, params.get("factor", 0))
            else:  # pixels moved before a colour step, as albumentations moves them: see the module's note
                image, pending = pending.image(image), Dihedral()
                image = colour_step(image, transform, params)
        image = pending.image(image)
        boxes = np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0, [width, height, width, height])
        labels = np.asarray(labels, dtype=np.int64)
        if self.transforms:  # albumentations filters after every step, so in the source's pixels too
            keep = self.kept(boxes)
            boxes, labels = boxes[keep], labels[keep]
        boxes = geometry.boxes(boxes, width, height)
        height, width = image.shape[:2]
        image, (cw, ch) = fit_to_input(image, size, self.resize)
        boxes = boxes * np.array([cw / width, ch / height] * 2, dtype=np.float32)
        keep = self.kept(boxes)
        return {"image": image, "bboxes": boxes[keep], "labels": labels[keep]}

    def kept(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes that are not empty and cover at least ``min_area`` pixels."""
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return (area > 0) & (area >= self.cfg.min_area)


def colour_step(image: np.ndarray, transform: A.BasicTransform, params: dict) -> np.ndarray:
    if isinstance(transform, A.HueSaturationValue):
        return shift_hsv(image, **params)
    max_value = MAX_VALUES_BY_DTYPE[image.dtype]
    beta = params["beta"] * (max_value if transform.brightness_by_max else float(np.mean(image)))
    alpha = params["alpha"]
    if transform.ensure_safe_range:
        alpha, beta = fpixel.get_safe_brightness_contrast_params(alpha, beta, max_value)
    return albucore.multiply_add(image, alpha, beta, inplace=False)
