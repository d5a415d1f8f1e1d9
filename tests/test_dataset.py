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


def predicted_box(records: list, size: int | tuple[int, int], resize: str) -> np.ndarray:
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


# ------------------------------------------------------------------------------- non-square inputs: [W, H]


def test_a_non_square_letterbox_pads_below_a_wide_image_and_right_of_a_tall_one(tmp_path: Path) -> None:
    """Input 128 x 64 (width x height). 300 x 120: min(128/300, 64/120) = 0.427 -> 128 x 51, padded below. 100 x 400:
    min(1.28, 0.16) = 0.16 -> 16 x 64, padded right. Square stretches each axis to fill 128 x 64."""
    fill = torch.tensor(LETTERBOX_FILL, dtype=torch.uint8)[:, None, None]
    wide = one_image(tmp_path, 300, 120, (30, 20, 150, 100))
    image, target, meta = EvalDataset(wide, (128, 64), "letterbox")[0]
    assert image.shape == (3, 64, 128) and (meta["content_width"], meta["content_height"]) == (128, 51)
    assert (image[:, 51:, :] == fill).all() and not (image[:, :51, :] == fill).all()
    scale = 128 / 300
    torch.testing.assert_close(target["boxes"],
                               torch.tensor([[30 * scale, 20 * 51 / 120, 150 * scale, 100 * 51 / 120]]))
    tall = one_image(tmp_path, 100, 400, (25, 100, 75, 300))
    image, _, meta = EvalDataset(tall, (128, 64), "letterbox")[0]
    assert image.shape == (3, 64, 128) and (meta["content_width"], meta["content_height"]) == (16, 64)
    assert (image[:, :, 16:] == fill).all()
    image, target, meta = EvalDataset(wide, (128, 64), "square")[0]
    assert image.shape == (3, 64, 128) and "content_width" not in meta
    torch.testing.assert_close(target["boxes"], torch.tensor([[30 * 128 / 300, 20 * 64 / 120, 150 * 128 / 300,
                                                               100 * 64 / 120]]))


def test_boxes_come_back_in_original_pixels_through_a_non_square_input(tmp_path: Path) -> None:
    """An equivariant finder through EvalDataset, predict and to_table at a 160 x 96 input. A 600 x 300 image:
    letterbox scales by 0.2667 (edges on whole input pixels: exact), square by 0.2667 x 0.32 (within one input
    pixel). A 1000 x 600 image has the input's aspect: both resizes scale by 0.16 and give the same boxes."""
    rect = (90, 60, 300, 240)
    records = one_image(tmp_path, 600, 300, rect)
    np.testing.assert_allclose(predicted_box(records, (160, 96), "letterbox"), rect, rtol=0, atol=1e-9)
    np.testing.assert_allclose(predicted_box(records, (160, 96), "square"), rect, rtol=0, atol=300 / 96)
    same_aspect = one_image(tmp_path, 1000, 600, (100, 50, 600, 400))
    square, letterbox = EvalDataset(same_aspect, (160, 96), "square")[0], EvalDataset(same_aspect, (160, 96),
                                                                                     "letterbox")[0]
    assert torch.equal(square[0], letterbox[0]) and square[2] == letterbox[2]
    np.testing.assert_array_equal(predicted_box(same_aspect, (160, 96), "square"),
                                  predicted_box(same_aspect, (160, 96), "letterbox"))
    np.testing.assert_allclose(predicted_box(same_aspect, (160, 96), "square"), (100, 50, 600, 400), rtol=0, atol=1e-9)


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_training_resize_to_a_non_square_input_matches_the_evaluation_one(tmp_path: Path, resize: str) -> None:
    records = one_image(tmp_path, 300, 120, (30, 20, 150, 100))
    train = TrainDataset(records, (128, 64), AugmentConfig(train=[]), seed=0, resize=resize)[0]
    evaluation = EvalDataset(records, (128, 64), resize)[0]
    assert train[0].shape == (3, 64, 128) and torch.equal(train[0], evaluation[0])
    torch.testing.assert_close(train[1]["boxes"], evaluation[1]["boxes"])


def test_multiscale_batches_of_width_height_pairs(tmp_path: Path) -> None:
    """train.multiscale with [W, H] pairs: each batch is one (width, height), its tensors (B, 3, H, W), and a
    sample's flips are the same at both sizes (boxes at 128 x 96 are exactly twice those at 64 x 48)."""
    records = one_image(tmp_path, 200, 100, (20, 10, 120, 90)) * 8
    cfg = AugmentConfig(train=[TransformSpec(name="HorizontalFlip", params={"p": 0.5}),
                               TransformSpec(name="VerticalFlip", params={"p": 0.5})])
    ds = TrainDataset(records, (64, 48), cfg, seed=0)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    batches = MultiScaleBatchSampler(sampler, 2, True, [(64, 48), [128, 96]], seed=0)
    seen = set()
    for images, targets, _ in DataLoader(ds, batch_sampler=batches, collate_fn=collate):
        height, width = images.shape[-2:]
        seen.add((width, height))
        for t in targets:
            assert (t["boxes"][:, [0, 2]] <= width).all() and (t["boxes"][:, [1, 3]] <= height).all()
    assert seen == {(64, 48), (128, 96)}
    for index in range(8):
        torch.testing.assert_close(ds[(index, (128, 96))][1]["boxes"], 2 * ds[(index, (64, 48))][1]["boxes"])
    assert torch.equal(ds[(3, (64, 48))][0], ds[3][0])


def test_a_non_square_cache_serves_its_own_size_only(tmp_path: Path, monkeypatch) -> None:
    table = _gradient_table(tmp_path)
    records = make_records(table, table.images.image_id)
    from_files = [EvalDataset(records, (96, 64), "letterbox")[i] for i in range(len(records))]
    cache = _cached(tmp_path, table, (96, 64), "letterbox")
    assert cache.size == (96, 64) and cache.array.shape[1:3] == (64, 96)
    assert EvalDataset(records, (64, 96), "letterbox", cache).cache is None  # the swapped size is another size
    assert EvalDataset(records, 96, "letterbox", cache).cache is None
    _no_file_reads(monkeypatch)
    cached = EvalDataset(records, (96, 64), "letterbox", cache)
    for i, (image, target, meta) in enumerate(from_files):
        c_image, c_target, c_meta = cached[i]
        assert torch.equal(c_image, image) and c_meta == meta
        assert torch.equal(c_target["boxes"], target["boxes"])
    train = TrainDataset(records, (96, 64), AugmentConfig(train=[]), seed=0, resize="letterbox", cache=cache)
    assert train[0][0].shape == (3, 64, 96)  # from the cache: read_image would raise


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


# ------------------------------------------------------------------------------------------- the image cache


def _gradient_table(tmp_path: Path) -> AnnotationTable:
    """Four PNGs of different shapes (wide, tall, square): smooth gradients with one red rectangle, its box."""
    rows, boxes = [], []
    for i, (w, h) in enumerate([(160, 100), (90, 140), (120, 120), (200, 80)]):
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8)
        x1, y1, x2, y2 = int(w * 0.2), int(h * 0.3), int(w * 0.6), int(h * 0.8)
        pixels[y1:y2, x1:x2] = [250, 40, 40]
        path = tmp_path / f"g{i}.png"
        Image.fromarray(pixels).save(path)
        rows.append((f"g{i}", str(path), w, h))
        boxes.append((f"g{i}", float(x1), float(y1), float(x2), float(y2), i % 2))
    return AnnotationTable(pd.DataFrame(rows, columns=["image_id", "path", "width", "height"]),
                           pd.DataFrame(boxes, columns=["image_id", "x1", "y1", "x2", "y2", "label"]), ["x", "y"])


def _cached(tmp_path: Path, table: AnnotationTable, size: int | tuple[int, int], resize: str):
    from pipeline.config import size_text
    from pipeline.data.cache import ImageCache, build_cache

    folder = tmp_path / f"cache_{resize}{size_text(size)}"
    build_cache(table.images, folder, "train", size, resize, workers=1)
    return ImageCache.open(folder, "train", size, resize, images=table.images)


def _no_file_reads(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"{path} was read from its file, not from the cache")

    monkeypatch.setattr("pipeline.dataset.read_image", refuse)


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_eval_sample_from_the_cache_is_the_file_sample(tmp_path: Path, resize: str, monkeypatch) -> None:
    table = _gradient_table(tmp_path)
    records = make_records(table, table.images.image_id)
    from_files = [EvalDataset(records, 64, resize)[i] for i in range(len(records))]
    cache = _cached(tmp_path, table, 64, resize)
    _no_file_reads(monkeypatch)
    cached = EvalDataset(records, 64, resize, cache)
    for i, (image, target, meta) in enumerate(from_files):
        c_image, c_target, c_meta = cached[i]
        assert torch.equal(c_image, image) and c_meta == meta  # the very tensor, and the same map back
        assert torch.equal(c_target["boxes"], target["boxes"]) and torch.equal(c_target["labels"], target["labels"])
    # a cache of another size or resize is not used at all
    assert EvalDataset(records, 48, resize, cache).cache is None
    assert EvalDataset(records, 64, "square" if resize == "letterbox" else "letterbox", cache).cache is None


_GEOMETRIC = [TransformSpec(name=n, params={"p": 0.5}) for n in ("HorizontalFlip", "VerticalFlip", "RandomRotate90")]
_COLOUR = [TransformSpec(name="HueSaturationValue", params={"p": 0.5}),
           TransformSpec(name="RandomBrightnessContrast", params={"p": 0.5})]


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_train_sample_from_the_cache_matches_the_file_sample_up_to_the_resize_order(tmp_path: Path, resize: str,
                                                                                   monkeypatch) -> None:
    """The cache resizes first and augments at the input size; the file path augments at full size, then resizes.
    Boxes: the same (exact per-axis scale, then the same flips/rot90) up to float rounding. Pixels: equal without
    augmentation, within one level under flips/rot90 (bilinear rounding is not mirror-symmetric), close under colour
    ops (they round at another resolution; they differ most on sharp edges)."""
    table = _gradient_table(tmp_path)
    records = make_records(table, table.images.image_id)
    recipes = {"none": [], "geometric": _GEOMETRIC, "geometric+colour": _GEOMETRIC + _COLOUR}
    expected = {}
    for name, steps in recipes.items():
        ds = TrainDataset(records, 64, AugmentConfig(train=steps), seed=3, resize=resize)
        expected[name] = [(ds.set_epoch(epoch), [ds[i] for i in range(len(records))])[1] for epoch in range(3)]
    cache = _cached(tmp_path, table, 64, resize)
    _no_file_reads(monkeypatch)
    for name, steps in recipes.items():
        ds = TrainDataset(records, 64, AugmentConfig(train=steps), seed=3, resize=resize, cache=cache)
        pixel_gaps = []
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(len(records)):
                (image, target, meta), (f_image, f_target, f_meta) = ds[i], expected[name][epoch][i]
                assert image.shape == f_image.shape == (3, 64, 64) and meta == f_meta
                torch.testing.assert_close(target["boxes"], f_target["boxes"], rtol=0, atol=1e-4)
                assert torch.equal(target["labels"], f_target["labels"])
                pixel_gaps.append((image.int() - f_image.int()).abs())
        gaps = torch.stack(pixel_gaps).float()
        if name == "none":
            assert gaps.max() == 0
        elif name == "geometric":
            assert gaps.max() <= 1
        else:
            assert gaps.mean() < 1.5, f"{name}: mean gap {gaps.mean():.2f} levels"


def test_train_reads_the_file_at_a_side_the_cache_was_not_built_for(tmp_path: Path) -> None:
    table = _gradient_table(tmp_path)
    records = make_records(table, table.images.image_id)
    cfg = AugmentConfig(train=_GEOMETRIC + _COLOUR)
    plain = TrainDataset(records, 64, cfg, seed=0)
    cached = TrainDataset(records, 64, cfg, seed=0, cache=_cached(tmp_path, table, 64, "square"))
    for i in range(len(records)):  # multi-scale batch at 96: from the file, exactly as without a cache
        assert torch.equal(cached[(i, 96)][0], plain[(i, 96)][0])
        assert torch.equal(cached[(i, 96)][1]["boxes"], plain[(i, 96)][1]["boxes"])
    # a cache made by another resize is not used
    assert TrainDataset(records, 64, cfg, seed=0, resize="letterbox", cache=cached.cache).cache is None


def test_mosaic_draws_its_four_images_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    table = _gradient_table(tmp_path)
    records = make_records(table, table.images.image_id)
    cache = _cached(tmp_path, table, 64, "square")
    _no_file_reads(monkeypatch)
    ds = TrainDataset(records, 64, AugmentConfig(train=_GEOMETRIC, mosaic_prob=1.0), seed=0, cache=cache)
    image, target, _ = ds[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) >= 1
    assert (target["boxes"] >= 0).all() and (target["boxes"] <= 64).all()


def test_datasets_with_a_cache_go_to_loader_workers_without_its_array(tmp_path: Path) -> None:
    import pickle

    table = _gradient_table(tmp_path)
    records = make_records(table, table.images.image_id)
    cache = _cached(tmp_path, table, 64, "letterbox")
    cache.input("g0")  # maps the array in this process
    for ds in (EvalDataset(records, 64, "letterbox", cache),
               TrainDataset(records, 64, AugmentConfig(train=_GEOMETRIC), seed=0, resize="letterbox", cache=cache)):
        blob = pickle.dumps(ds)  # what a spawned worker receives: the index, not the pixels
        assert len(blob) < cache.array.nbytes and pickle.loads(blob).cache._array is None
        assert torch.equal(pickle.loads(blob)[1][0], ds[1][0])
    loader = DataLoader(EvalDataset(records, 64, "letterbox", cache), batch_size=2, num_workers=2, collate_fn=collate)
    expected = torch.stack([EvalDataset(records, 64, "letterbox")[i][0] for i in range(len(records))])
    assert torch.equal(torch.cat([batch[0] for batch in loader]), expected)
