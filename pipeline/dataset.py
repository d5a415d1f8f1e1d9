"""Torch datasets over the canonical annotation table: images in, (uint8 CHW tensor, target, meta) out.

Images leave the workers as uint8 (4x less to copy than float) and become float on the device. Targets hold boxes
in input pixels (x1, y1, x2, y2) and 0-based labels; ``meta`` carries what maps predictions back to the original
image: its id, original width and height, and for a letterbox the content size (``content_width``,
``content_height``: the top-left part of the input the image fills; absent, it is the whole input).

Multi-scale training (``train.multiscale``): ``MultiScaleBatchSampler`` yields batches of ``(index, side)`` with one
side per batch, a pure function of (seed, epoch, batch index), and ``TrainDataset`` produces each sample at its
batch's side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from pipeline.augment import Resize, build_train, cutmix, fit_to_input, mixup, reseed
from pipeline.config import AugmentConfig
from pipeline.data.images import read_image
from pipeline.data.table import AnnotationTable


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


class EvalDataset(Dataset):
    """Resize (and for ``letterbox`` pad) only. Boxes are scaled per axis into the content rectangle, so
    predictions map back exactly (``pipeline.engine.to_table`` with the meta's content size)."""

    def __init__(self, records: list[Record], size: int, resize: Resize = "square"):
        self.records, self.size, self.resize = records, size, resize

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        image, (cw, ch) = fit_to_input(read_image(rec.path), self.size, self.resize)
        scale = np.array([cw / rec.width, ch / rec.height] * 2, dtype=np.float32)
        return to_sample(image, rec.boxes * scale, rec.labels, rec, content=(cw, ch))


class TrainDataset(Dataset):
    """The training set with the configured augmentation; ``set_epoch`` must be called each epoch.

    An item is an index (the sample at ``size``) or an ``(index, side)`` pair from ``MultiScaleBatchSampler`` (the
    sample at that side). The augmentation draws depend on (seed, epoch, index) only, so a sample gets the same
    flips and colours at every side."""

    def __init__(self, records: list[Record], size: int, cfg: AugmentConfig, seed: int, resize: Resize = "square"):
        self.records, self.size, self.cfg, self.seed, self.resize = records, size, cfg, seed, resize
        self.epoch = 0
        self._other_sides: dict[int, tuple[A.Compose, A.Compose | None]] = {}
        self.transform, self.mosaic_transform = self._build(size)

    def _build(self, side: int) -> tuple[A.Compose, A.Compose | None]:
        mosaic = build_train(self.cfg, side, mosaic=True, resize=self.resize) if self.cfg.mosaic_prob > 0 else None
        return build_train(self.cfg, side, resize=self.resize), mosaic

    def pipelines(self, side: int) -> tuple[A.Compose, A.Compose | None]:
        """The plain and the mosaic pipeline ending at side x side: ``transform`` and ``mosaic_transform`` at
        ``size``, others built once per side."""
        if side == self.size:
            return self.transform, self.mosaic_transform
        if side not in self._other_sides:
            self._other_sides[side] = self._build(side)
        return self._other_sides[side]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _raw(self, index: int) -> dict:
        rec = self.records[index]
        return {"image": read_image(rec.path), "bboxes": rec.boxes, "labels": rec.labels}

    def _augmented(self, index: int, rng: np.random.Generator, side: int) -> dict:
        (transform, mosaic_transform), data = self.pipelines(side), self._raw(index)
        if mosaic_transform is not None and rng.random() < self.cfg.mosaic_prob:
            transform = mosaic_transform
            data["mosaic_metadata"] = [self._raw(int(j)) for j in rng.integers(0, len(self), 3)]
        reseed(transform, rng)
        out = transform(**data)
        return {"image": out["image"], "bboxes": np.asarray(out["bboxes"]).reshape(-1, 4),
                "labels": np.asarray(out["labels"], dtype=np.int64)}

    def __getitem__(self, item: int | tuple[int, int]):
        index, side = (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), self.size)
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


def multiscale_side(sides: Sequence[int], seed: int, epoch: int, batch: int) -> int:
    """The side of batch ``batch`` of epoch ``epoch``: uniform over ``sides``, a pure function of its arguments."""
    return int(sides[np.random.default_rng([seed, epoch, batch, _SIDE_STREAM]).integers(len(sides))])


class MultiScaleBatchSampler(Sampler[list[tuple[int, int]]]):
    """``BatchSampler(sampler, batch_size, drop_last)`` whose batches are lists of ``(index, side)``, one side per
    batch from ``multiscale_side``. The epoch is the wrapped sampler's (``DistributedSampler.set_epoch``, which
    training already calls) or the one given to ``set_epoch``; no other state, so a resumed run draws the same
    sides, and every rank of a distributed run the same side at the same step."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, sides: Sequence[int], seed: int):
        if not sides:
            raise ValueError("MultiScaleBatchSampler needs at least one side")
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        self.sampler, self.sides, self.seed = sampler, [int(s) for s in sides], seed
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", self._epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for b, batch in enumerate(self.batches):
            side = multiscale_side(self.sides, self.seed, epoch, b)
            yield [(i, side) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


def collate(batch):
    images, targets, metas = zip(*batch)
    return torch.stack(images), list(targets), list(metas)
