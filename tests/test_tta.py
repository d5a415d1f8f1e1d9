"""TTA views: exact box inverses (every registered op, through square and letterbox resize), agreement with the
image ops, an equivariant stand-in detector (alone and through the predict stage's path), batching."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch import Tensor, nn

from pipeline.augment import content_size
from pipeline.config import DataConfig, ExperimentConfig, ModelConfig, PredictConfig, TrainConfig
from pipeline.dataset import Record, to_sample
from pipeline.engine import input_to_original, predict_with_views, resolve_precision
from pipeline.tta import (
    BASIC_VIEWS,
    TTAOp,
    apply_view,
    check_views,
    forward_boxes,
    invert_boxes,
    is_scale_view,
    parse_view,
    predict_views,
    register_op,
    scaled_size,
    view_size,
)
from pipeline.tta import ops as tta_ops

SCALE_VIEWS = ("scale0.5", "scale0.8", "scale1.25", "scale2")
COMPOSED = ("hflip+rot90_1", "vflip+transpose", "rot90_3+hflip", "scale2+transpose", "hflip+scale0.5+rot90_2")
ALL_VIEWS = BASIC_VIEWS + SCALE_VIEWS + COMPOSED


SIDES = [32, 64, 96, 224, 512, 1024]


@st.composite
def boxes_in(draw, size: int | tuple[int, int], n_max: int = 8) -> np.ndarray:
    """Boxes inside an input of ``size`` (a side, or (width, height))."""
    width, height = (size, size) if isinstance(size, int) else size
    n = draw(st.integers(0, n_max))
    xs = st.floats(0, width, allow_nan=False, allow_infinity=False)
    ys = st.floats(0, height, allow_nan=False, allow_infinity=False)
    rows = []
    for _ in range(n):
        xa, xb, ya, yb = draw(xs), draw(xs), draw(ys), draw(ys)
        rows.append([min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)])
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


@st.composite
def view_size_boxes(draw):
    """A view, an input size (a square side, or (width, height) with sides drawn apart), boxes inside the input and
    boxes inside the view's frame (W' x H': H x W after a quarter turn of a non-square input)."""
    view = draw(st.sampled_from(ALL_VIEWS))
    width, height = draw(st.sampled_from(SIDES)), draw(st.sampled_from(SIDES))
    size = width if draw(st.booleans()) else (width, height)
    return view, size, draw(boxes_in(size)), draw(boxes_in(view_size(view, size)))


def _wh(size: int | tuple[int, int]) -> np.ndarray:
    """(width, height, width, height) of a size, to scale or bound boxes per axis."""
    width, height = (size, size) if isinstance(size, int) else size
    return np.array([width, height, width, height], dtype=np.float64)


# ------------------------------------------------------------------------------------------ box algebra


@settings(max_examples=300, deadline=None)
@given(view_size_boxes())
def test_invert_undoes_forward_numpy(case):
    view, size, boxes, in_view = case
    there = forward_boxes(boxes, view, size)
    atol = 1e-9 * max(_wh(size).max(), _wh(view_size(view, size)).max())
    assert there.shape == boxes.shape and isinstance(there, np.ndarray)
    assert (there >= -1e-9).all() and (there <= _wh(view_size(view, size)) + atol).all()  # inside W' x H'
    assert (there[:, 2] >= there[:, 0]).all() and (there[:, 3] >= there[:, 1]).all()
    np.testing.assert_allclose(invert_boxes(there, view, size), boxes, rtol=0, atol=atol)
    back = invert_boxes(in_view, view, size)
    assert (back >= -1e-9).all() and (back <= _wh(size) + atol).all()  # the inverse lands inside W x H
    np.testing.assert_allclose(forward_boxes(back, view, size), in_view, rtol=0, atol=atol)


@settings(max_examples=100, deadline=None)
@given(view_size_boxes())
def test_invert_undoes_forward_torch(case):
    view, size, boxes, _ = case
    t = torch.from_numpy(boxes).float()
    back = invert_boxes(forward_boxes(t, view, size), view, size)
    assert isinstance(back, Tensor) and back.dtype == torch.float32
    torch.testing.assert_close(back, t, rtol=0, atol=1e-6 * float(_wh(size).max()))


def test_rotation_direction_is_counter_clockwise_as_displayed():
    image = torch.zeros(1, 1, 4, 4)
    image[..., 0, 3] = 1  # the top-right pixel
    turned = apply_view(image, "rot90_1")
    assert turned[0, 0, 0, 0] == 1  # ... is now top-left
    top_right = np.array([[3.0, 0.0, 4.0, 1.0]])
    np.testing.assert_array_equal(forward_boxes(top_right, "rot90_1", 4), [[0.0, 0.0, 1.0, 1.0]])
    # continuous coordinates: a flip maps x -> S - x
    np.testing.assert_array_equal(forward_boxes(np.array([[0.0, 1.0, 1.5, 2.0]]), "hflip", 4), [[2.5, 1.0, 4.0, 2.0]])


def test_scaled_sizes_round_to_the_multiple():
    assert scaled_size(512, 0.8) == 416  # 409.6 -> 13 * 32
    assert scaled_size(512, 1.25) == 640
    assert scaled_size(512, 0.8, size_multiple=128) == 384  # 409.6 / 128 = 3.2 -> 3
    assert scaled_size(64, 0.1) == 32  # never below one multiple
    assert view_size("scale2+hflip", 64) == 128 and view_size("rot90_1", 64) == 64


@pytest.mark.parametrize("bad", ["rot90_4", "flip", "scale", "scale0", "scale-1", "hflip+", "Hflip"])
def test_unknown_views_are_named(bad):
    with pytest.raises(ValueError, match="unknown TTA view"):
        parse_view(bad)


# -------------------------------------------------------------------------------- boxes vs. image ops


def _render(box: tuple[int, int, int, int], size: int | tuple[int, int]) -> Tensor:
    """A (1, 1, H, W) image of ``size`` (a side, or (width, height)), 1 inside ``box`` and 0 elsewhere."""
    x1, y1, x2, y2 = box
    width, height = (size, size) if isinstance(size, int) else size
    image = torch.zeros(1, 1, height, width)
    image[..., y1:y2, x1:x2] = 1.0
    return image


def _extent(image: Tensor) -> list[float]:
    mask = image[0, 0] > 0.5
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


@st.composite
def int_box(draw, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = (size, size) if isinstance(size, int) else size
    x1, y1 = draw(st.integers(0, width - 4)), draw(st.integers(0, height - 4))
    return x1, y1, draw(st.integers(x1 + 4, width)), draw(st.integers(y1 + 4, height))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ALL_VIEWS), st.sampled_from([32, 64, 96, (64, 32), (32, 96), (96, 64)]), st.data())
def test_forward_boxes_matches_the_image(view, size, data):
    """Square and non-square inputs: where the box map sends a box is where the image op sends its pixels."""
    box = data.draw(int_box(size))
    seen = _extent(apply_view(_render(box, size), view))
    predicted = forward_boxes(np.array([box], dtype=np.float64), view, size)[0]
    # Flips and turns move whole pixels: exact. A resize blurs the edge over a pixel of the new grid.
    tolerance = 1.0 if "scale" in view else 0.0
    np.testing.assert_allclose(seen, predicted, rtol=0, atol=tolerance)


def test_apply_view_keeps_batch_and_channels():
    images = torch.rand(3, 3, 64, 64)
    assert apply_view(images, "scale1.25").shape == (3, 3, 96, 96)  # 80 -> nearest multiple of 32 is 96
    assert apply_view(images, "hflip+scale0.5").shape == (3, 3, 32, 32)
    torch.testing.assert_close(apply_view(apply_view(images, "rot90_1"), "rot90_3"), images, rtol=0, atol=0)
    torch.testing.assert_close(apply_view(images, "rot90_2"), apply_view(apply_view(images, "hflip"), "vflip"))
    with pytest.raises(ValueError, match="batch"):
        apply_view(torch.rand(3, 32, 64), "hflip")


def test_views_of_a_non_square_batch_and_their_sizes():
    """(B, C, H, W) with W != H: flips and a half turn keep W x H, quarter turns and transpose give H x W, and a
    scale rounds each side to the multiple on its own (the box map then scales each axis by its own ratio)."""
    images = torch.rand(2, 3, 96, 160)  # 160 wide, 96 high
    for view in ("none", "hflip", "vflip", "rot90_2"):
        assert apply_view(images, view).shape == (2, 3, 96, 160) and view_size(view, (160, 96)) == (160, 96)
    for view in ("rot90_1", "rot90_3", "transpose", "hflip+rot90_1", "rot90_1+rot90_2"):
        assert apply_view(images, view).shape == (2, 3, 160, 96) and view_size(view, (160, 96)) == (96, 160)
    assert view_size("rot90_1+transpose", (160, 96)) == (160, 96)  # two swaps: back to W x H
    torch.testing.assert_close(apply_view(apply_view(images, "rot90_1"), "rot90_3"), images, rtol=0, atol=0)
    torch.testing.assert_close(apply_view(images, "transpose"), images.transpose(-1, -2), rtol=0, atol=0)
    # scale0.8: 160 -> 128 (4 x 32), 96 -> 76.8 -> 64 (2.4 multiples round to 2): ratios 0.8 and 2/3
    assert apply_view(images, "scale0.8").shape == (2, 3, 64, 128) and view_size("scale0.8", (160, 96)) == (128, 64)
    np.testing.assert_allclose(forward_boxes(np.array([[16.0, 12.0, 80.0, 48.0]]), "scale0.8", (160, 96)),
                               [[12.8, 8.0, 64.0, 32.0]], rtol=0, atol=1e-12)
    # one turn counter-clockwise as displayed: the top-right corner of the 160 x 96 image is the top-left of the
    # 96 x 160 view, and (x, y) -> (y, W - x)
    top_right = np.array([[150.0, 0.0, 160.0, 10.0]])
    np.testing.assert_array_equal(forward_boxes(top_right, "rot90_1", (160, 96)), [[0.0, 0.0, 10.0, 10.0]])
    np.testing.assert_array_equal(forward_boxes(top_right, "rot90_3", (160, 96)), [[86.0, 150.0, 96.0, 160.0]])
    np.testing.assert_array_equal(forward_boxes(top_right, "hflip", (160, 96)), [[0.0, 0.0, 10.0, 10.0]])
    np.testing.assert_array_equal(forward_boxes(top_right, "vflip", (160, 96)), [[150.0, 86.0, 160.0, 96.0]])


# ------------------------------------------------------------------------------ equivariant stand-in


class RectFinder(nn.Module):
    """A detector that is exactly equivariant to every view: it finds solid rectangles (channel 0 > 0.5) as
    connected extents; score = max of channel 1 and label = round(10 * max of channel 2) inside each one
    (the maximum is an interior pixel, untouched by the blur a resize puts on the edges)."""

    supports_scale_tta = True
    size_multiple = 32

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.batches: list[int] = []

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, Tensor]]:
        self.batches.append(images.shape[0])
        out = []
        for image in images.numpy():
            components, _ = ndimage.label(image[0] > 0.5)
            slices = ndimage.find_objects(components)
            boxes = [[sx.start, sy.start, sx.stop, sy.stop] for sy, sx in slices]
            scores = [image[1][components == i + 1].max() for i in range(len(slices))]
            labels = [round(10 * image[2][components == i + 1].max()) for i in range(len(slices))]
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor(scores, dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
        return out


def synthetic_batch(n: int, size: int | tuple[int, int], seed: int) -> Tensor:
    """One to four rectangles per image (``size``: a side, or (width, height)), each inside its own 16-pixel cell
    with edges on a 4-pixel grid (even edges survive scale0.5 exactly) and at least 4 px from the next, each with its
    own score and label value."""
    rng = np.random.default_rng(seed)
    width, height = (size, size) if isinstance(size, int) else size
    images = torch.zeros(n, 3, height, width)
    cols, rows = width // 16, height // 16
    for b in range(n):
        for k, cell in enumerate(rng.choice(cols * rows, size=rng.integers(1, 5), replace=False)):
            cy, cx = divmod(int(cell), cols)
            x1, y1 = cx * 16 + 4 * rng.integers(0, 2), cy * 16 + 4 * rng.integers(0, 2)
            w, h = 4 * rng.integers(1, 3), 4 * rng.integers(1, 3)
            images[b, :, y1:y1 + h, x1:x1 + w] = torch.tensor([1.0, 0.9 - 0.1 * k, 0.1 * (k + 1)])[:, None, None]
    return images


def _sorted(det: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.argsort(det["scores"], descending=True)
    return det["boxes"][order], det["scores"][order], det["labels"][order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivariant_detector_gives_the_same_boxes_through_every_view(seed):
    size = 64
    model = RectFinder(size)
    images = synthetic_batch(4, size, seed)
    exact = [v for v in ALL_VIEWS if "scale0.8" not in v and "scale1.25" not in v]  # non-integer ratios blur
    results = predict_views(model, images, exact, batch_size=8)
    for per_view in results:
        boxes, scores, labels = _sorted(per_view["none"])
        assert len(boxes) > 0
        for view in exact:
            b, s, lab = _sorted(per_view[view])
            torch.testing.assert_close(b, boxes, rtol=0, atol=1e-4, msg=f"view {view}")
            torch.testing.assert_close(s, scores, msg=f"view {view}")
            torch.testing.assert_close(lab, labels, msg=f"view {view}")


def test_non_integer_scales_stay_within_a_pixel():
    model, images = RectFinder(64), synthetic_batch(3, 64, 5)
    for per_view in predict_views(model, images, ["none", "scale0.8", "scale1.25"], batch_size=4):
        boxes = _sorted(per_view["none"])[0]
        for view in ("scale0.8", "scale1.25"):
            # one pixel of the viewed grid is 64 / 64 or 64 / 96 input pixels
            torch.testing.assert_close(_sorted(per_view[view])[0], boxes, rtol=0, atol=1.0)


def test_batch_size_does_not_change_the_output_and_is_respected():
    views = ["none", "hflip", "rot90_1", "transpose", "scale2", "vflip+scale0.5"]
    images = synthetic_batch(3, 64, 7)
    outputs = {}
    for batch_size in (1, 7):
        model = RectFinder(64)
        outputs[batch_size] = predict_views(model, images, views, batch_size=batch_size)
        assert max(model.batches) <= batch_size
        assert sum(model.batches) == len(images) * len(views)
    one, seven = outputs[1], outputs[7]
    for a, b in zip(one, seven):
        assert list(a) == views == list(b)
        for view in views:
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(a[view][key], b[view][key], rtol=0, atol=0)


def test_views_of_one_image_share_a_batch():
    model = RectFinder(64)
    predict_views(model, synthetic_batch(3, 64, 1), ["none", "hflip", "rot90_2"], batch_size=7)
    assert model.batches == [6, 3]  # two whole images, then the third; never an image split across calls
    model = RectFinder(64)
    predict_views(model, synthetic_batch(2, 64, 1), ["none", "hflip", "rot90_2"], batch_size=2)
    assert model.batches == [2, 2, 2]  # more views than batch_size: full batches, an image's views split


class FixedSize(RectFinder):
    supports_scale_tta = False


def test_scale_view_on_a_fixed_size_model_names_the_view():
    with pytest.raises(ValueError, match=r"'scale1.25'.*supports_scale_tta"):
        predict_views(FixedSize(64), torch.zeros(1, 3, 64, 64), ["none", "scale1.25"], batch_size=2)
    check_views(FixedSize(64), ["none", "hflip+rot90_1"])  # geometric views are fine
    with pytest.raises(ValueError, match="repeated"):
        check_views(RectFinder(64), ["hflip", "hflip"])


@pytest.mark.parametrize("seed", [0, 1])
def test_every_exact_view_of_a_non_square_batch_gives_the_same_boxes(seed):
    """128 x 64 images (width x height): a model that takes any size (so also the 64 x 128 of a quarter turn) finds
    the same rectangles under every view, mapped back into the 128 x 64 frame. (Both sides halve and double to
    multiples of 32, so scale0.5 and scale2 keep every edge on a whole pixel.)"""
    size = (128, 64)
    model = RectFinder(size)
    exact = [v for v in ALL_VIEWS if "scale0.8" not in v and "scale1.25" not in v]
    results = predict_views(model, synthetic_batch(3, size, seed), exact, batch_size=8)
    for per_view in results:
        boxes, scores, labels = _sorted(per_view["none"])
        assert len(boxes) > 0
        for view in exact:
            b, s, lab = _sorted(per_view[view])
            assert (b[:, [0, 2]] <= 128).all() and (b[:, [1, 3]] <= 64).all(), view
            torch.testing.assert_close(b, boxes, rtol=0, atol=1e-4, msg=f"view {view}")
            torch.testing.assert_close(s, scores, msg=f"view {view}")
            torch.testing.assert_close(lab, labels, msg=f"view {view}")


def test_a_quarter_turn_of_a_non_square_input_needs_a_model_that_takes_the_swapped_size():
    """The documented rule: rot90_1 / rot90_3 / transpose show a W x H input as H x W. A model that takes only its
    own 96 x 64 refuses them, with an error naming the view, both sizes and why; flips and a half turn keep the
    size and pass; a model that takes any size runs them (previous test)."""
    fixed = FixedSize((96, 64))
    check_views(fixed, ["none", "hflip", "vflip", "rot90_2", "hflip+vflip", "rot90_1+transpose"])
    for view in ("rot90_1", "rot90_3", "transpose", "hflip+rot90_1"):
        with pytest.raises(ValueError, match=rf"(?s)'{re.escape(view)}'.*64x96.*from 96x64.*only its own 96x64.*"
                                             r"swaps the width and height"):
            check_views(fixed, ["none", view])
    with pytest.raises(ValueError, match=r"'rot90_1'.*swaps the width and height"):
        predict_views(fixed, torch.zeros(1, 3, 64, 96), ["none", "rot90_1"], batch_size=2)
    check_views(FixedSize(64), ["rot90_1", "transpose"])  # a square input: a turn keeps the size


# ---------------------------------------------------------------------------- a new op is one entry


@pytest.fixture
def rot180() -> Iterator[type[TTAOp]]:
    """A half turn written as a new registry entry, the way ops.py defines its own; registered for one test."""
    saved = dict(tta_ops.REGISTRY)

    @register_op(r"rot180")
    @dataclass(frozen=True)
    class Rot180(TTAOp):
        spellings = ("rot180",)

        def apply(self, images: Tensor, new_size: tuple[int, int]) -> Tensor:
            return images.flip(-1).flip(-2)

        def map_points(self, x: np.ndarray, y: np.ndarray, s_in: tuple[int, int],
                       s_out: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            return s_in[0] - x, s_in[1] - y  # sizes are (width, height)

    yield Rot180
    tta_ops.REGISTRY.clear()
    tta_ops.REGISTRY.update(saved)


def test_a_registered_op_composes_and_inverts(rot180):
    assert [type(op) for op in parse_view("rot180+hflip")] == [rot180, tta_ops.HFlip]
    assert not is_scale_view("rot180") and view_size("rot180+scale2", 64) == 128
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(apply_view(images, "rot180"), apply_view(images, "rot90_2"), rtol=0, atol=0)
    torch.testing.assert_close(apply_view(images, "rot180+hflip"), apply_view(images, "vflip"), rtol=0, atol=0)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 64, size=(20, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1)
    for view in ("rot180", "hflip+rot180", "rot180+scale2+transpose", "scale0.5+rot180+rot90_1"):
        there = forward_boxes(boxes, view, 64)
        np.testing.assert_allclose(invert_boxes(there, view, 64), boxes, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(forward_boxes(boxes, "rot180", 64), forward_boxes(boxes, "rot90_2", 64))
    for box in [(0, 4, 12, 20), (30, 2, 64, 9)]:  # the box map agrees with the image op
        seen = _extent(apply_view(_render(box, 64), "rot180+scale2"))
        np.testing.assert_allclose(seen, forward_boxes(np.array([box], dtype=np.float64), "rot180+scale2", 64)[0],
                                   rtol=0, atol=1.0)


def test_a_registered_op_runs_through_predict_views(rot180):
    views = ["none", "rot180", "rot180+scale0.5", "transpose+rot180"]
    check_views(RectFinder(64), views)
    for per_view in predict_views(RectFinder(64), synthetic_batch(2, 64, 3), views, batch_size=8):
        boxes = _sorted(per_view["none"])[0]
        for view in views[1:]:
            torch.testing.assert_close(_sorted(per_view[view])[0], boxes, rtol=0, atol=1e-4, msg=f"view {view}")


def test_an_op_name_cannot_be_registered_twice(rot180):
    with pytest.raises(ValueError, match="already registered"):
        register_op(r"rot180")(rot180)
    assert "rot180" not in BASIC_VIEWS  # BASIC_VIEWS lists the shipped ops, fixed at import


# ------------------------------------------------------------- every registered op, through the resize


# Ops whose spellings are templates (``basic = False``) need a strategy that writes concrete names; a template op
# registered in ops.py without one here fails test_every_registered_op_is_drawn instead of going untested.
TEMPLATE_SPELLINGS: dict[type[TTAOp], st.SearchStrategy[str]] = {
    tta_ops.Scale: st.integers(5, 300).map(lambda hundredths: f"scale{hundredths / 100:g}"),
}


def _op_spellings(cls: type[TTAOp]) -> st.SearchStrategy[str]:
    return st.sampled_from(cls.spellings) if cls.basic else TEMPLATE_SPELLINGS[cls]


@st.composite
def registry_view(draw, max_ops: int = 3) -> str:
    """A composition of one to ``max_ops`` ops drawn from the registry as it is now (so a newly registered op is
    drawn without touching this file), each written through its own spellings or its template strategy."""
    classes = list(tta_ops.REGISTRY.values())
    parts = [draw(_op_spellings(draw(st.sampled_from(classes)))) for _ in range(draw(st.integers(1, max_ops)))]
    return "+".join(parts)


def test_every_registered_op_is_drawn():
    untested = [cls.__name__ for cls in tta_ops.REGISTRY.values() if not cls.basic and cls not in TEMPLATE_SPELLINGS]
    assert not untested, f"add a spelling strategy to TEMPLATE_SPELLINGS for the template ops {untested}"


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_each_drawn_spelling_parses_to_its_own_op(data):
    cls = data.draw(st.sampled_from(list(tta_ops.REGISTRY.values())))
    assert [type(op) for op in parse_view(data.draw(_op_spellings(cls)))] == [cls]


@st.composite
def original_boxes(draw, width: int, height: int, n_max: int = 6) -> np.ndarray:
    """Boxes inside a ``width`` x ``height`` image, at least a hundredth of a pixel wide and high."""
    rows = []
    for _ in range(draw(st.integers(1, n_max))):
        x1 = draw(st.floats(0, width - 0.01, allow_nan=False))
        y1 = draw(st.floats(0, height - 0.01, allow_nan=False))
        rows.append([x1, y1, draw(st.floats(x1 + 0.01, width)), draw(st.floats(y1 + 0.01, height))])
    return np.array(rows, dtype=np.float64)


@settings(max_examples=150, deadline=None)
@given(view=registry_view(), width=st.integers(1, 3000), height=st.integers(1, 3000),
       input_w=st.integers(1, 24).map(lambda k: 32 * k), input_h=st.integers(1, 24).map(lambda k: 32 * k),
       square_input=st.booleans(), size_multiple=st.sampled_from([32, 128]),
       resize=st.sampled_from(["square", "letterbox"]), data=st.data())
def test_original_pixels_survive_resize_view_and_both_inverses(view, width, height, input_w, input_h, square_input,
                                                               size_multiple, resize, data):
    """The whole geometry of a prediction: original pixels -> model input (a side, or a non-square W x H; square
    or letterbox resize, as EvalDataset scales its targets) -> the view's frame -> back through the view's inverse
    -> back to original pixels through ``input_to_original`` with the meta the dataset writes. Every box comes
    back, to float rounding."""
    size = input_w if square_input else (input_w, input_h)
    in_w, in_h = (size, size) if square_input else size
    boxes = data.draw(original_boxes(width, height))
    cw, ch = content_size(width, height, size, resize)
    assert cw <= in_w and ch <= in_h and (cw == in_w or ch == in_h)  # the content fills one axis at least
    record = Record("a", "unused.png", width, height, boxes.astype(np.float32), np.zeros(len(boxes), np.int64))
    _, _, meta = to_sample(np.zeros((in_h, in_w, 3), np.uint8), [], [], record, content=(cw, ch))
    on_input = boxes * np.array([cw / width, ch / height] * 2)
    there = forward_boxes(on_input, view, size, size_multiple)
    viewed = _wh(view_size(view, size, size_multiple))
    scale = max(in_w, in_h, viewed.max())
    assert (there >= -1e-9 * scale).all() and (there <= viewed * (1 + 1e-9)).all()
    back_on_input = invert_boxes(there, view, size, size_multiple)
    np.testing.assert_allclose(back_on_input, on_input, rtol=0, atol=1e-9 * scale)
    back, keep = input_to_original(back_on_input, meta, size)
    assert keep.all()
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-9 * max(width, height, scale))


# ------------------------------------------------ an equivariant stand-in through the predict stage's path

ORIGINAL_SIDE, INPUT_SIDE = 256, 128  # the dataset halves every image: rectangle edges stay on whole pixels


def paint_rectangles(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A black HxWx3 uint8 image with one to four rectangles, and their boxes (original pixels) in paint order.
    Edges lie on an 8-px grid of the original: 4 px at the 128-px input, so whole pixels again after the 0.75 and
    1.25 rescales of that input (96 and 160 px), where bilinear sampling then puts every edge exactly; each
    rectangle sits in its own 64-px cell, 16 px or more from the next. Rectangle k carries score 0.9 - 0.1k
    (channel 1) and label k + 1 (channel 2), which RectFinder reads back."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    cols, rows = width // 64, height // 64
    boxes = []
    for k, cell in enumerate(rng.choice(cols * rows, size=rng.integers(1, 5), replace=False)):
        cy, cx = divmod(int(cell), cols)
        x1, y1 = cx * 64 + 8 * int(rng.integers(0, 3)), cy * 64 + 8 * int(rng.integers(0, 3))
        x2, y2 = x1 + 8 * int(rng.integers(2, 5)), y1 + 8 * int(rng.integers(2, 5))
        image[y1:y2, x1:x2] = np.round(255 * np.array([1.0, 0.9 - 0.1 * k, 0.1 * (k + 1)]))
        boxes.append([x1, y1, x2, y2])
    return image, np.array(boxes, dtype=np.float64)


def painted_records(folder: Path, width: int, height: int, n: int) -> list[Record]:
    """``n`` painted PNGs in ``folder``, as the dataset's records; each record's boxes are its painted rectangles."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image, boxes = paint_rectangles(width, height, seed=i)
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), image[..., ::-1])  # RGB -> OpenCV's BGR
        records.append(Record(f"img{i}", str(path), width, height, boxes.astype(np.float32),
                              np.arange(1, len(boxes) + 1)))
    return records


def stage_config(folder: Path, resize: str, size: int | tuple[int, int] = INPUT_SIDE) -> ExperimentConfig:
    return ExperimentConfig(
        run="rect_finder", data=DataConfig(name="painted", format="gwd_csv", root=folder),
        model=ModelConfig(name="fasterrcnn_timm", image_size=size, resize=resize),
        train=TrainConfig(num_workers=0, progress=False), predict=PredictConfig(batch_size=5),
    )


STAGE_VIEWS = ["none", "scale0.75", "scale1.25", "hflip+scale1.25", "rot90_1+scale0.75", "scale1.25+vflip"]


def _stage_predictions(folder: Path, resize: str, width: int, height: int, size: int | tuple[int, int] = INPUT_SIDE,
                       views: list[str] = STAGE_VIEWS) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    records = painted_records(folder, width, height, n=3)
    cfg = stage_config(folder, resize, size)
    precision = resolve_precision(cfg.train, torch.device("cpu"))
    preds = predict_with_views(RectFinder(size), records, cfg, views, 0, precision)
    return preds, {r.image_id: r.boxes.astype(np.float64) for r in records}


def _assert_painted_boxes(preds: pd.DataFrame, truth: dict[str, np.ndarray], views: list[str]) -> None:
    """Under every view, each image's rows are its painted rectangles (original pixels), score and label."""
    assert set(preds.tta) == set(views) and set(preds.image_id) == set(truth)
    for (image_id, view), rows in preds.groupby(["image_id", "tta"]):
        rows = rows.sort_values("score", ascending=False)  # paint order: score 0.9 - 0.1k
        expected = truth[image_id]
        assert len(rows) == len(expected), f"{image_id} {view}: {len(rows)} boxes, painted {len(expected)}"
        np.testing.assert_allclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(), expected, rtol=0, atol=1e-3,
                                   err_msg=f"{image_id} under {view}")
        np.testing.assert_array_equal(rows.label.to_numpy(), np.arange(1, len(expected) + 1))
        np.testing.assert_allclose(rows.score.to_numpy(), np.round(255 * (0.9 - 0.1 * np.arange(len(expected))))
                                   / 255, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resize, width, height", [("square", 256, 256), ("letterbox", 256, 256),
                                                   ("letterbox", 256, 192)])
def test_equivariant_detector_through_predict_with_views_finds_the_painted_boxes(tmp_path, resize, width, height):
    """pipeline.engine.predict_with_views (loader, resize, views, inverses, the prediction table) with a detector
    that is exactly equivariant: under every view, including the non-integer rescales 0.75 and 1.25, each image's
    rows are the painted rectangles in original pixels, with their own score and label."""
    preds, truth = _stage_predictions(tmp_path, resize, width, height)
    _assert_painted_boxes(preds, truth, STAGE_VIEWS)


# a non-square 128 x 96 input (width x height) and views whose frames keep every painted edge on whole pixels: the
# quarter turns show the model 96 x 128, scale2 256 x 192
NON_SQUARE_INPUT = (128, 96)
NON_SQUARE_VIEWS = ["none", "hflip", "rot90_1", "vflip+transpose", "scale2", "rot90_3+scale2"]


@pytest.mark.parametrize("resize, width, height", [("square", 256, 192), ("letterbox", 256, 192),
                                                   ("square", 256, 256), ("letterbox", 256, 256),
                                                   ("square", 128, 256), ("letterbox", 192, 256)])
def test_a_non_square_input_through_predict_with_views_finds_the_painted_boxes(tmp_path, resize, width, height):
    """model.image_size [128, 96]: 256 x 192 originals fill it (scale 0.5 both ways); the others are stretched
    (square: 0.5 x 0.375, 1 x 0.375) or letterboxed (0.375, padded below or right), ratios that keep the painted
    8-px grid on whole input pixels. Under every view, quarter turns included, the rows are the painted rectangles
    in original pixels."""
    preds, truth = _stage_predictions(tmp_path, resize, width, height, NON_SQUARE_INPUT, NON_SQUARE_VIEWS)
    _assert_painted_boxes(preds, truth, NON_SQUARE_VIEWS)


def test_letterbox_and_square_agree_when_the_image_has_the_input_aspect(tmp_path):
    """A 256 x 192 image into a 128 x 96 input: letterbox scales by min(128/256, 96/192) = 0.5 and pads nothing, so
    it is the square resize, and the two prediction tables are equal."""
    square, _ = _stage_predictions(tmp_path / "square", "square", 256, 192, NON_SQUARE_INPUT, NON_SQUARE_VIEWS)
    letterbox, _ = _stage_predictions(tmp_path / "letterbox", "letterbox", 256, 192, NON_SQUARE_INPUT,
                                      NON_SQUARE_VIEWS)
    assert len(square) > 0
    pd.testing.assert_frame_equal(square, letterbox)


def test_letterbox_and_square_give_the_same_table_for_a_square_image(tmp_path):
    square, _ = _stage_predictions(tmp_path / "square", "square", ORIGINAL_SIDE, ORIGINAL_SIDE)
    letterbox, _ = _stage_predictions(tmp_path / "letterbox", "letterbox", ORIGINAL_SIDE, ORIGINAL_SIDE)
    assert len(square) > 0
    pd.testing.assert_frame_equal(square, letterbox)
