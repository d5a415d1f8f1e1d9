"""Torch datasets over the canonical annotation table: images in, (uint8 CHW tensor, target, meta) out.

Images leave the workers as uint8 (4x less to copy than float) and become float on the device. Targets hold boxes
in input pixels (x1, y1, x2, y2) and 0-based labels; ``meta`` carries what maps predictions back to the original
image: its id, original width and height, and for a letterbox the content size (``content_width``,
``content_height``: the top-left part of the input the image fills; absent, it is the whole input).

Input sizes are ``model.image_size``'s: an int for a square input, a (width, height) pair otherwise
(``pipeline.config.input_wh``); a sample's image tensor is (3, height, width).

Multi-scale training (``train.multiscale``): ``MultiScaleBatchSampler`` yields batches of ``(index, size)`` with one
size per batch (a side or a (width, height) pair), a pure function of (seed, epoch, batch index), and
``TrainDataset`` produces each sample at its batch's size.

Both read a pre-resized image cache (``pipeline.data.cache.ImageCache``) when given one, each image it holds fresh:

- ``EvalDataset``: the cached input is the very array ``fit_to_input(read_image(path))`` makes (same resize, same
  padding), so its samples, and every prediction mapped back through the meta, are identical with or without it.
- ``TrainDataset``: at a size equal to the cache's, the augmentation starts from the cached resized image (boxes
  scaled by the cache's exact per-axis scale) instead of the full-size file, and its final resize is then a no-op.
  Other sizes (multi-scale) read the file. The order differs (resize, then augment), so a sample is not the file's:
  for transforms that commute with a per-axis scale (flips, rot90, colour) the boxes are the same up to float
  rounding and the image within one level (geometry) or close (colour ops round at another resolution; tested in
  tests/test_dataset.py). Transforms that do not commute act differently: parameters in pixels (crop sizes, blur
  kernels, ``min_area``, which albumentations checks after every step) at the input's scale; arbitrary rotations and
  shears, and Mosaic's aspect-keeping fit of each cell, on the already stretched image of a ``square`` resize of a
  non-square original (the same as the file's for ``letterbox`` or square originals, up to interpolation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from pipeline.augment import Resize, build_train, cutmix, fit_to_input, mixup, reseed
from pipeline.config import AugmentConfig, InputSize, canonical_size, input_wh
from pipeline.data.images import read_image
from pipeline.data.table import AnnotationTable
from pipeline.fused_augment import FusedAugment, unfusable

if TYPE_CHECKING:
    from pipeline.data.cache import ImageCache


@dataclass(frozen=True)
class Record:
    image_id: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32, original pixels
    labels: np.ndarray  # (N,) int64


def make_records(table: AnnotationTable, image_ids) -> list[Record]:
    by_image = table.boxes_by_image()
    rows = table.images.set_index("image_id").loc[list(image_ids)]
    return [
        Record(str(i), r.path, int(r.width), int(r.height),
               by_image[i][:, :4].astype(np.float32), by_image[i][:, 4].astype(np.int64))
        for i, r in zip(rows.index, rows.itertuples())
    ]


def to_sample(image: np.ndarray, boxes, labels, record: Record,
              content: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict, dict]:
    """``content``: width and height of the part of ``image`` the original fills (default: all of it). The meta
    names it only when it is less than the whole input (a letterbox); the whole input is the default downstream."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    target = {
        "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
    }
    meta = {"image_id": record.image_id, "width": record.width, "height": record.height}
    if content is not None and tuple(content) != (image.shape[1], image.shape[0]):
        meta.update(content_width=int(content[0]), content_height=int(content[1]))
    return tensor, target, meta


def usable_cache(cache: ImageCache | None, size: InputSize, resize: Resize) -> ImageCache | None:
    """``cache`` when it holds inputs of ``size`` made by ``resize``, else None (another size or resize: unused)."""
    if cache is None or cache.resize != resize or input_wh(cache.size) != input_wh(size):
        return None
    return cache


class EvalDataset(Dataset):
    """Resize (and for ``letterbox`` pad) only. Boxes are scaled per axis into the content rectangle, so
    predictions map back exactly (``pipeline.engine.to_table`` with the meta's content size).

    ``cache``: an ``ImageCache`` opened against the records' table; the inputs it holds (at this size and resize)
    are read from it, bit-identical to decoding the file, the rest from their files."""

    def __init__(self, records: list[Record], size: InputSize, resize: Resize = "square",
                 cache: ImageCache | None = None):
        self.records, self.size, self.resize = records, canonical_size(size), resize
        self.cache = usable_cache(cache, size, resize)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        cached = self.cache.input(rec.image_id) if self.cache is not None else None
        if cached is None:
            cached = fit_to_input(read_image(rec.path), self.size, self.resize)
        image, (cw, ch) = cached
        scale = np.array([cw / rec.width, ch / rec.height] * 2, dtype=np.float32)
        return to_sample(image, rec.boxes * scale, rec.labels, rec, content=(cw, ch))


def fused_engine(cfg: AugmentConfig, resize: Resize) -> FusedAugment | None:
    """The fused engine for ``cfg`` (``augment.engine`` fused, or auto and the recipe fuses), else None."""
    if cfg.engine == "albumentations" or (cfg.engine == "auto" and unfusable(cfg)):
        return None
    return FusedAugment(cfg, resize)  # engine fused with a recipe it cannot run: its error names why


class TrainDataset(Dataset):
    """The training set with the configured augmentation; ``set_epoch`` must be called each epoch.

    An item is an index (the sample at ``size``) or an ``(index, size)`` pair from ``MultiScaleBatchSampler`` (the
    sample at that size: a side or (width, height)). The augmentation draws depend on (seed, epoch, index) only, so
    a sample gets the same flips and colours at every size.

    ``cache``: an ``ImageCache`` opened against the records' table (same resize); at the size it was built for,
    the images it holds start from their cached resized copy (see the module's note on what that changes)."""

    def __init__(self, records: list[Record], size: InputSize, cfg: AugmentConfig, seed: int,
                 resize: Resize = "square", cache: ImageCache | None = None):
        self.records, self.size, self.cfg, self.seed, self.resize = records, canonical_size(size), cfg, seed, resize
        self.cache = cache if cache is not None and cache.resize == resize else None
        self.epoch = 0
        self.fused = fused_engine(cfg, resize)
        self._pipelines: dict[InputSize, tuple[A.Compose, A.Compose | None]] = {}

    def pipelines(self, side: InputSize) -> tuple[A.Compose, A.Compose | None]:
        """The albumentations plain and mosaic pipelines ending at the input size ``side`` (a side or (width,
        height)), built on first use per size (never, when the fused engine runs the recipe)."""
        side = canonical_size(side)
        if side not in self._pipelines:
            mosaic = build_train(self.cfg, side, mosaic=True, resize=self.resize) if self.cfg.mosaic_prob > 0 else None
            self._pipelines[side] = build_train(self.cfg, side, resize=self.resize), mosaic
        return self._pipelines[side]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _raw(self, index: int, side: InputSize) -> dict:
        """The image before augmentation, boxes in its pixels: the cached copy resized for ``side`` when the cache
        holds one (boxes times its exact per-axis scale), else the original file (boxes as annotated)."""
        rec = self.records[index]
        if self.cache is not None and input_wh(self.cache.size) == input_wh(side):
            cached = self.cache.resized(rec.image_id)
            if cached is not None:
                image, (sx, sy) = cached
                return {"image": image, "bboxes": rec.boxes * np.array([sx, sy, sx, sy], dtype=np.float32),
                        "labels": rec.labels}
        return {"image": read_image(rec.path), "bboxes": rec.boxes, "labels": rec.labels}

    def _augmented(self, index: int, rng: np.random.Generator, side: InputSize) -> dict:
        if self.fused is not None:
            data = self._raw(index, side)
            return self.fused(data["image"], data["bboxes"], data["labels"], rng, side)
        (transform, mosaic_transform), data = self.pipelines(side), self._raw(index, side)
        if mosaic_transform is not None and rng.random() < self.cfg.mosaic_prob:
            transform = mosaic_transform
            data["mosaic_metadata"] = [self._raw(int(j), side) for j in rng.integers(0, len(self), 3)]
        reseed(transform, rng)
        out = transform(**data)
        return {"image": out["image"], "bboxes": np.asarray(out["bboxes"]).reshape(-1, 4),
                "labels": np.asarray(out["labels"], dtype=np.int64)}

    def __getitem__(self, item: int | tuple[int, InputSize]):
        if isinstance(item, (tuple, list)):
            index, side = int(item[0]), canonical_size(item[1])
        else:
            index, side = int(item), self.size
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = self._augmented(index, rng, side)
        if self.cfg.mixup_prob > 0 and rng.random() < self.cfg.mixup_prob:
            sample = mixup(sample, self._augmented(int(rng.integers(0, len(self))), rng, side), lam=0.5)
        elif self.cfg.cutmix_prob > 0 and rng.random() < self.cfg.cutmix_prob:
            other = self._augmented(int(rng.integers(0, len(self))), rng, side)
            sample = cutmix(sample, other, rng, self.cfg.min_visibility)
        # training targets need no content size: boxes in the padding do not exist, and nothing maps back
        return to_sample(sample["image"], sample["bboxes"], sample["labels"], self.records[index])


# a constant mixed into the seed of the side draws, so they are not the stream of sample `batch`'s augmentation
_SIDE_STREAM = 0x5CA1E


def multiscale_side(sides: Sequence[InputSize], seed: int, epoch: int, batch: int) -> InputSize:
    """The input size of batch ``batch`` of epoch ``epoch``: uniform over ``sides`` (each a side or (width,
    height)), a pure function of its arguments."""
    return canonical_size(sides[np.random.default_rng([seed, epoch, batch, _SIDE_STREAM]).integers(len(sides))])


class MultiScaleBatchSampler(Sampler[list[tuple[int, InputSize]]]):
    """``BatchSampler(sampler, batch_size, drop_last)`` whose batches are lists of ``(index, size)``, one size per
    batch from ``multiscale_side`` (a side, or a (width, height) pair). The epoch is the wrapped sampler's
    (``DistributedSampler.set_epoch``, which training already calls) or the one given to ``set_epoch``; no other
    state, so a resumed run draws the same sizes, and every rank of a distributed run the same size at the same
    step."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, sides: Sequence[InputSize],
                 seed: int):
        if not sides:
            raise ValueError("MultiScaleBatchSampler needs at least one side")
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        self.sampler, self.sides, self.seed = sampler, [canonical_size(s) for s in sides], seed
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", self._epoch))

    def __iter__(self) -> Iterator[list[tuple[int, InputSize]]]:
        epoch = self.epoch
        for b, batch in enumerate(self.batches):
            side = multiscale_side(self.sides, self.seed, epoch, b)
            yield [(i, side) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


def collate(batch):
    images, targets, metas = zip(*batch)
    # numpy's stack: torch.stack of uint8 images runs on torch's thread pool, which on a busy machine (a training
    # loop with num_workers 0, other jobs) took 30 ms for four 512-px images where one copy takes 0.3 ms
    return torch.from_numpy(np.stack([image.numpy() for image in images])), list(targets), list(metas)
