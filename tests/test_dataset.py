"""Input geometry: square vs letterbox resize with the exact map back to original pixels, and multi-scale
training batches whose sides are a pure function of (seed, epoch, batch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.augment import LETTERBOX_FILL, content_size
from pipeline.config import AugmentConfig, TrainConfig, TransformSpec
from pipeline.data.table import AnnotationTable
from pipeline.dataset import (
    EvalDataset,
    MultiScaleBatchSampler,
    TrainDataset,
    collate,
    make_records,
    multiscale_side,
)
from pipeline.engine import predict, resolve_precision, to_table


class RectangleFinder(torch.nn.Module):
    """An exactly equivariant stand-in detector: the extent of the bright pixels of each input, score 0.9, label 1.
    Whatever the resize did to the image, it reports where the rectangle is in the input's pixels."""

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            ys, xs = torch.nonzero(image.mean(0) > 0.75, as_tuple=True)  # the padding (~0.45) is not bright
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out


def one_image(tmp_path: Path, width: int, height: int, rect: tuple[int, int, int, int]) -> list:
    """Records of one black width x height PNG with a white rectangle (x1, y1, x2, y2), labelled as a box."""
    pixels = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = rect
    pixels[y1:y2, x1:x2] = 255
    path = tmp_path / f"img_{width}x{height}.png"
    Image.fromarray(pixels).save(path)
    images = pd.DataFrame({"image_id": ["a"], "path": [str(path)], "width": [width], "height": [height]})
    boxes = pd.DataFrame({"image_id": ["a"], "x1": [float(x1)], "y1": [float(y1)], "x2": [float(x2)],
                          "y2": [float(y2)], "label": [1]})
    return make_records(AnnotationTable(images, boxes, ["x", "y"]), ["a"])


def predicted_box(records: list, size: int, resize: str) -> np.ndarray:
    loader = DataLoader(EvalDataset(records, size, resize), batch_size=1, collate_fn=collate)
    preds = predict(RectangleFinder(), loader, resolve_precision(TrainConfig(), torch.device("cpu")), size)
    assert len(preds) == 1
    return preds[["x1", "y1", "x2", "y2"]].to_numpy()[0]


# ------------------------------------------------------------------------------------------- square, letterbox


def test_letterbox_and_square_are_the_same_for_a_square_image(tmp_path: Path) -> None:
    records = one_image(tmp_path, 200, 200, (30, 50, 110, 170))
    square, letterbox = EvalDataset(records, 64, "square")[0], EvalDataset(records, 64, "letterbox")[0]
    assert torch.equal(square[0], letterbox[0])
    assert torch.equal(square[1]["boxes"], letterbox[1]["boxes"]) and square[2] == letterbox[2]
    np.testing.assert_array_equal(predicted_box(records, 64, "square"), predicted_box(records, 64, "letterbox"))


def test_letterbox_keeps_the_ratio_and_pads_bottom_right_with_the_fill(tmp_path: Path) -> None:
    records = one_image(tmp_path, 300, 120, (30, 20, 150, 100))
    image, target, meta = EvalDataset(records, 100, "letterbox")[0]
    assert image.shape == (3, 100, 100)
    assert (meta["content_width"], meta["content_height"]) == (100, 40)  # 300x120 -> 100x40: one scale, 1/3
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 20 / 3, 50.0, 100 / 3]]))
    padding = image[:, 40:, :]
    assert (padding == torch.tensor(LETTERBOX_FILL, dtype=torch.uint8)[:, None, None]).all()
    assert image[:, 10, 20].tolist() == [255, 255, 255]  # the rectangle, in the content part


def test_an_equivariant_detector_gives_the_same_original_boxes_under_letterbox_and_square(tmp_path: Path) -> None:
    """A 640x480 image at 256 px: square stretches y by 0.533 and x by 0.4, letterbox scales both by 0.4 and pads
    64 rows. The finder's boxes, mapped back by each resize's inverse, are the drawn rectangle: exactly for the
    letterbox (its edges land on whole input pixels), within one input pixel for the square (y edges do not)."""
    rect = (100, 50, 300, 250)
    records = one_image(tmp_path, 640, 480, rect)
    letterbox = predicted_box(records, 256, "letterbox")
    square = predicted_box(records, 256, "square")
    np.testing.assert_allclose(letterbox, rect, rtol=0, atol=1e-9)
    np.testing.assert_allclose(square, rect, rtol=0, atol=480 / 256)
    np.testing.assert_allclose(square[[0, 2]], letterbox[[0, 2]], rtol=0, atol=1e-9)  # x: the same 0.4 both ways


def test_letterbox_of_a_tall_image_pads_the_right(tmp_path: Path) -> None:
    rect = (25, 100, 75, 300)  # 100 wide, 400 high -> 32x128 at 128 px; edges on whole input pixels (x 0.32)
    records = one_image(tmp_path, 100, 400, rect)
    _, _, meta = EvalDataset(records, 128, "letterbox")[0]
    assert (meta["content_width"], meta["content_height"]) == (32, 128)
    np.testing.assert_allclose(predicted_box(records, 128, "letterbox"), rect, rtol=0, atol=1e-9)


def test_padding_never_produces_boxes() -> None:
    meta = {"image_id": "a", "width": 300, "height": 120, "content_width": 100, "content_height": 40}
    out = {"boxes": torch.tensor([[10.0, 50.0, 60.0, 90.0],    # wholly in the padding below the image
                                  [10.0, 20.0, 60.0, 70.0],    # reaches into the padding: clipped at the content
                                  [99.5, 0.0, 100.0, 40.0]]),  # in the content: kept
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 2])}
    rows = to_table(out, meta, 100, "m", 0, "none")
    assert rows.label.tolist() == [1, 2]
    np.testing.assert_allclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(),
                               [[30.0, 60.0, 180.0, 120.0], [298.5, 0.0, 300.0, 120.0]])
    # without a content size the whole input is the image: a square resize, scaled per axis
    square = to_table(out, {"image_id": "a", "width": 300, "height": 120}, 100, "m", 0, "none")
    np.testing.assert_allclose(square[["y1", "y2"]].to_numpy()[0], [60.0, 108.0])


def test_content_size_rounds_the_shorter_side_and_fills_the_longer() -> None:
    assert content_size(640, 480, 256, "letterbox") == (256, 192)
    assert content_size(333, 100, 100, "letterbox") == (100, 30)
    assert content_size(1, 5000, 64, "letterbox") == (1, 64)  # never a zero-width content
    assert content_size(640, 480, 256, "square") == (256, 256)
    with pytest.raises(ValueError, match="model.resize"):
        content_size(640, 480, 256, "crop")


def test_training_letterbox_matches_the_evaluation_letterbox(tmp_path: Path) -> None:
    # no augmentation: the training pipeline's letterbox (albumentations) is the evaluation one (fit_to_input)
    records = one_image(tmp_path, 300, 120, (30, 20, 150, 100))
    train = TrainDataset(records, 100, AugmentConfig(train=[]), seed=0, resize="letterbox")[0]
    evaluation = EvalDataset(records, 100, "letterbox")[0]
    assert torch.equal(train[0], evaluation[0])
    torch.testing.assert_close(train[1]["boxes"], evaluation[1]["boxes"])


# ------------------------------------------------------------------------------------------------ multi-scale


def test_multiscale_side_is_a_pure_function_of_seed_epoch_and_batch() -> None:
    sides = [64, 96, 128]
    draws = [multiscale_side(sides, 7, 3, b) for b in range(60)]
    assert draws == [multiscale_side(sides, 7, 3, b) for b in range(60)]
    assert set(draws) == set(sides)  # uniform over the sides: all three within 60 batches
    assert draws != [multiscale_side(sides, 7, 4, b) for b in range(60)]  # another epoch, other draws
    assert draws != [multiscale_side(sides, 8, 3, b) for b in range(60)]  # another seed, other draws


def _batches(sampler_seed: int, epoch: int, n: int = 20) -> list[list[tuple[int, int]]]:
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=sampler_seed)
    batches = MultiScaleBatchSampler(sampler, batch_size=4, drop_last=True, sides=[64, 96, 128], seed=5)
    sampler.set_epoch(epoch)  # what training calls each epoch; the batch sampler reads the epoch from it
    return list(batches)


def test_a_resumed_run_sees_the_same_batches_and_sides() -> None:
    # a fresh sampler set to epoch 3 (a resume) gives what the original run gave in its epoch 3, with no
    # state carried over from epochs 0-2
    original = [_batches(0, epoch) for epoch in range(4)][3]
    resumed = _batches(0, 3)
    assert resumed == original and len(resumed) == 5
    for batch in resumed:
        assert len({side for _, side in batch}) == 1  # one side per batch
    assert [b[0][1] for b in resumed] == [multiscale_side([64, 96, 128], 5, 3, i) for i in range(5)]
    assert _batches(0, 4) != original


def test_batch_sampler_set_epoch_reaches_the_sampler() -> None:
    sampler = DistributedSampler(range(8), num_replicas=1, rank=0, shuffle=True, seed=0)
    batches = MultiScaleBatchSampler(sampler, batch_size=2, drop_last=False, sides=[32, 64], seed=1)
    batches.set_epoch(6)
    assert sampler.epoch == 6 and batches.epoch == 6 and len(batches) == 4


def test_multiscale_loader_gives_each_batch_its_side_with_the_same_augmentation(tmp_path: Path) -> None:
    records = one_image(tmp_path, 200, 100, (20, 10, 120, 90)) * 8
    cfg = AugmentConfig(train=[TransformSpec(name="HorizontalFlip", params={"p": 0.5}),
                               TransformSpec(name="VerticalFlip", params={"p": 0.5})])
    ds = TrainDataset(records, 64, cfg, seed=0)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_sampler=MultiScaleBatchSampler(sampler, 2, True, [64, 128], seed=0),
                        collate_fn=collate)
    sides = []
    for images, targets, _ in loader:
        side = images.shape[-1]
        sides.append(side)
        assert images.shape[-2] == side and all((t["boxes"] <= side).all() for t in targets)
    assert set(sides) == {64, 128}
    # a sample's flips depend on (seed, epoch, index) only: at twice the side its boxes are exactly twice as large
    for index in range(8):
        torch.testing.assert_close(ds[(index, 128)][1]["boxes"], 2 * ds[(index, 64)][1]["boxes"])
    assert torch.equal(ds[(3, 64)][0], ds[3][0])  # an index alone is the sample at the dataset's size
