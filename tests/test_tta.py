"""TTA views: exact box inverses, agreement with the image ops, an equivariant stand-in detector, batching."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch import Tensor, nn

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


@st.composite
def boxes_in(draw, size: int, n_max: int = 8) -> np.ndarray:
    n = draw(st.integers(0, n_max))
    coords = st.floats(0, size, allow_nan=False, allow_infinity=False)
    rows = []
    for _ in range(n):
        xa, xb, ya, yb = (draw(coords) for _ in range(4))
        rows.append([min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)])
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


@st.composite
def view_size_boxes(draw):
    view = draw(st.sampled_from(ALL_VIEWS))
    size = draw(st.sampled_from([32, 64, 96, 224, 512, 1024]))
    return view, size, draw(boxes_in(size))


# ------------------------------------------------------------------------------------------ box algebra


@settings(max_examples=300, deadline=None)
@given(view_size_boxes())
def test_invert_undoes_forward_numpy(case):
    view, size, boxes = case
    there = forward_boxes(boxes, view, size)
    s_view = view_size(view, size)
    assert there.shape == boxes.shape and isinstance(there, np.ndarray)
    assert (there >= -1e-9).all() and (there <= s_view + 1e-9).all()
    assert (there[:, 2] >= there[:, 0]).all() and (there[:, 3] >= there[:, 1]).all()
    np.testing.assert_allclose(invert_boxes(there, view, size), boxes, rtol=0, atol=1e-9 * size)
    np.testing.assert_allclose(forward_boxes(invert_boxes(boxes * s_view / size, view, size), view, size),
                               boxes * s_view / size, rtol=0, atol=1e-9 * size)


@settings(max_examples=100, deadline=None)
@given(view_size_boxes())
def test_invert_undoes_forward_torch(case):
    view, size, boxes = case
    t = torch.from_numpy(boxes).float()
    back = invert_boxes(forward_boxes(t, view, size), view, size)
    assert isinstance(back, Tensor) and back.dtype == torch.float32
    torch.testing.assert_close(back, t, rtol=0, atol=1e-6 * size)


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


def _render(box: tuple[int, int, int, int], size: int) -> Tensor:
    x1, y1, x2, y2 = box
    image = torch.zeros(1, 1, size, size)
    image[..., y1:y2, x1:x2] = 1.0
    return image


def _extent(image: Tensor) -> list[float]:
    mask = image[0, 0] > 0.5
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


@st.composite
def int_box(draw, size: int) -> tuple[int, int, int, int]:
    x1, y1 = draw(st.integers(0, size - 4)), draw(st.integers(0, size - 4))
    return x1, y1, draw(st.integers(x1 + 4, size)), draw(st.integers(y1 + 4, size))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ALL_VIEWS), st.sampled_from([32, 64, 96]), st.data())
def test_forward_boxes_matches_the_image(view, size, data):
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
    with pytest.raises(ValueError, match="square"):
        apply_view(torch.rand(1, 3, 32, 64), "hflip")


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


def synthetic_batch(n: int, size: int, seed: int) -> Tensor:
    """One to four rectangles per image, each inside its own 16-pixel cell with edges on a 4-pixel grid (even
    edges survive scale0.5 exactly) and at least 4 px from the next, each with its own score and label value."""
    rng = np.random.default_rng(seed)
    images = torch.zeros(n, 3, size, size)
    cells = size // 16
    for b in range(n):
        for k, cell in enumerate(rng.choice(cells * cells, size=rng.integers(1, 5), replace=False)):
            cy, cx = divmod(int(cell), cells)
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


# ---------------------------------------------------------------------------- a new op is one entry


@pytest.fixture
def rot180() -> Iterator[type[TTAOp]]:
    """A half turn written as a new registry entry, the way ops.py defines its own; registered for one test."""
    saved = dict(tta_ops.REGISTRY)

    @register_op(r"rot180")
    @dataclass(frozen=True)
    class Rot180(TTAOp):
        spellings = ("rot180",)

        def apply(self, images: Tensor, new_size: int) -> Tensor:
            return images.flip(-1).flip(-2)

        def map_points(self, x: np.ndarray, y: np.ndarray, s_in: int, s_out: int) -> tuple[np.ndarray, np.ndarray]:
            return s_in - x, s_in - y

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
