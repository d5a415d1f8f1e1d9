"""The fused augmentation engine against albumentations as the oracle: same parameters, same pixels and boxes."""
from __future__ import annotations

import itertools

import albumentations as A
import numpy as np
import pytest
from albumentations.augmentations.pixel import functional as fpixel

from pipeline.augment import bbox_params, resize_steps
from pipeline.config import AugmentConfig, TransformSpec
from pipeline.fused_augment import Dihedral, FusedAugment, shift_hsv, unfusable

RECIPE = [
    TransformSpec(name="HorizontalFlip", params={"p": 0.5}),
    TransformSpec(name="VerticalFlip", params={"p": 0.5}),
    TransformSpec(name="RandomRotate90", params={"p": 0.5}),
    TransformSpec(name="Transpose", params={"p": 0.3}),
    TransformSpec(name="HueSaturationValue", params={"hue_shift_limit": 10, "sat_shift_limit": 20,
                                                     "val_shift_limit": 15, "p": 0.5}),
    TransformSpec(name="RandomBrightnessContrast", params={"brightness_limit": 0.15, "contrast_limit": 0.15,
                                                           "p": 0.5}),
]


def image_and_boxes(rng: np.random.Generator, height: int = 23, width: int = 37):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[:4, :4] = 128  # grey pixels: saturation 0, which the HSV shift must leave grey
    x1, y1 = rng.uniform(0, width - 6, 12), rng.uniform(0, height - 6, 12)
    boxes = np.stack([x1, y1, x1 + rng.uniform(2, 6, 12), y1 + rng.uniform(2, 6, 12)], 1).astype(np.float32)
    return image, boxes, rng.integers(0, 3, 12)


def pinned(name: str, params: dict) -> A.BasicTransform:
    """An albumentations transform that always fires with exactly ``params``."""
    if name == "HueSaturationValue":
        return A.HueSaturationValue(*[(params[k], params[k]) for k in ("hue_shift", "sat_shift", "val_shift")], p=1)
    if name == "RandomBrightnessContrast":
        return A.RandomBrightnessContrast(brightness_limit=(params["beta"],) * 2,
                                          contrast_limit=(params["alpha"] - 1,) * 2, p=1)
    transform = getattr(A, name)(p=1)
    if name == "RandomRotate90":
        transform.get_params = lambda: {"factor": params["factor"]}
    return transform


def oracle(steps: list[tuple[str, dict]], image, boxes, labels, cfg: AugmentConfig, size, resize="square") -> dict:
    compose = A.Compose([pinned(n, p) for n, p in steps] + resize_steps(size, resize),
                        bbox_params=bbox_params(cfg), strict=True)
    out = compose(image=image, bboxes=boxes, labels=labels)
    return {"image": out["image"], "bboxes": np.asarray(out["bboxes"]).reshape(-1, 4), "labels": out["labels"]}


GEOMETRY_STEPS = [("HorizontalFlip", {}), ("VerticalFlip", {}), ("Transpose", {})] + [
    ("RandomRotate90", {"factor": k}) for k in range(4)]


@pytest.mark.parametrize("steps", [list(s) for n in range(4) for s in itertools.product(GEOMETRY_STEPS, repeat=n)
                                   if n < 3 or s[0][0] == "RandomRotate90"])
def test_any_chain_of_flips_rot90s_and_transposes_is_albumentations(steps):
    image, boxes, labels = image_and_boxes(np.random.default_rng(len(steps)))
    element = Dihedral()
    for name, params in steps:
        element = element.then(name, params.get("factor", 0))
    cfg = AugmentConfig(min_area=0, min_visibility=0)
    expected = A.Compose([pinned(n, p) for n, p in steps], bbox_params=bbox_params(cfg))(
        image=image, bboxes=boxes, labels=labels)
    assert np.array_equal(element.image(image), expected["image"])
    np.testing.assert_allclose(element.boxes(boxes, 37, 23), np.asarray(expected["bboxes"]), atol=1e-3)


@pytest.mark.parametrize("shifts", [(0, 0, 0), (7.6, 0, 0), (0, -13.2, 0), (0, 0, 11.9), (-9.5, 17.3, -14.4),
                                    (3, 250, -250), (179.9, -30, 40)])
def test_hsv_shift_is_albumentations_to_the_bit(shifts):
    image, _, _ = image_and_boxes(np.random.default_rng(1), 64, 48)
    assert np.array_equal(shift_hsv(image, *shifts), fpixel.shift_hsv(image, *shifts))


@pytest.mark.parametrize("resize", ["square", "letterbox"])
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("recipe", [RECIPE, [RECIPE[4], RECIPE[0], RECIPE[5], RECIPE[2], RECIPE[4]], []],
                         ids=["recipe", "colour-between-geometry", "resize-only"])
def test_a_sample_is_albumentations_with_the_same_draws(seed, recipe, resize):
    """Every transform of the recipe, fired or not as the draw says, in the recipe's order, then the resize."""
    cfg = AugmentConfig(train=recipe, min_area=4.0, min_visibility=0.3)
    fused = FusedAugment(cfg, resize)
    image, boxes, labels = image_and_boxes(np.random.default_rng(100 + seed))
    boxes[0] = [-3, -2, 4, 5]  # partly outside: clipped, and kept only when visible enough
    boxes[1] = [30, 18, 45, 30]
    boxes[2] = [5, 5, 6.5, 7]  # 3 px2 here, 6.8 px2 at the input: min_area counts input pixels
    boxes[3] = [9, 9, 10, 11]  # 2 px2 here, 4.5 at the input
    boxes[4] = [12, 3, 13, 4.5]  # 1.5 px2 here, 3.4 at the input: dropped
    steps = [(type(t).__name__, params) for t, params in fused.draw(np.random.default_rng(seed))]
    out = fused(image, boxes, labels, np.random.default_rng(seed), (48, 40))
    expected = oracle(steps, image, boxes, labels, cfg, (48, 40), resize)
    assert np.array_equal(out["image"], expected["image"])
    np.testing.assert_allclose(out["bboxes"], expected["bboxes"], atol=1e-3)
    assert list(out["labels"]) == list(expected["labels"])


def test_a_box_outside_the_image_is_dropped_where_albumentations_would_raise():
    image, boxes, labels = image_and_boxes(np.random.default_rng(0))
    boxes[5] = [40, 1, 50, 9]
    out = FusedAugment(AugmentConfig(train=RECIPE))(image, boxes, labels, np.random.default_rng(0), 37)
    assert len(out["bboxes"]) == 11 and out["image"].shape == (37, 37, 3)


def test_every_transform_fires_about_as_often_as_its_p():
    fused = FusedAugment(AugmentConfig(train=RECIPE))
    rng = np.random.default_rng(0)
    fired = np.zeros(len(RECIPE))
    for _ in range(2000):
        steps = fused.draw(rng)
        fired += [any(t is transform for t, _ in steps) for transform in fused.transforms]
    np.testing.assert_allclose(fired / 2000, [spec.params["p"] for spec in RECIPE], atol=0.04)


def test_recipes_it_cannot_run_name_the_reason():
    cfg = AugmentConfig(train=RECIPE + [TransformSpec(name="RandomCrop", params={"height": 8, "width": 8})])
    assert unfusable(cfg) == ["RandomCrop is not one of HorizontalFlip, VerticalFlip, RandomRotate90, Transpose, "
                              "HueSaturationValue, RandomBrightnessContrast"]
    assert unfusable(AugmentConfig(train=RECIPE, mosaic_prob=0.5)) == ["mosaic_prob > 0 (Mosaic is albumentations')"]
    with pytest.raises(ValueError, match="RandomCrop is not one of"):
        FusedAugment(cfg)
