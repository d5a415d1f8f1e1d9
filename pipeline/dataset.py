"""Torch datasets over the canonical annotation table: images in, (uint8 CHW tensor, target, meta) out.

Images leave the workers as uint8 (4x less to copy than float) and become float on the device. Targets hold boxes
in input pixels (x1, y1, x2, y2) and 0-based labels; ``meta`` carries what maps predictions back to the original
image: its id and original width and height.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.augment import build_train, cutmix, mixup, reseed
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


def to_sample(image: np.ndarray, boxes, labels, record: Record) -> tuple[torch.Tensor, dict, dict]:
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    target = {
        "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
    }
    meta = {"image_id": record.image_id, "width": record.width, "height": record.height}
    return tensor, target, meta


class EvalDataset(Dataset):
    """Resize only. Boxes are scaled per axis, so predictions map back exactly."""

    def __init__(self, records: list[Record], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        image = cv2.resize(read_image(rec.path), (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        scale = np.array([self.size / rec.width, self.size / rec.height] * 2, dtype=np.float32)
        return to_sample(image, rec.boxes * scale, rec.labels, rec)


class TrainDataset(Dataset):
    """The training set with the configured augmentation; ``set_epoch`` must be called each epoch."""

    def __init__(self, records: list[Record], size: int, cfg: AugmentConfig, seed: int):
        self.records, self.size, self.cfg, self.seed = records, size, cfg, seed
        self.epoch = 0
        self.transform = build_train(cfg, size)
        self.mosaic_transform = build_train(cfg, size, mosaic=True) if cfg.mosaic_prob > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _raw(self, index: int) -> dict:
        rec = self.records[index]
        return {"image": read_image(rec.path), "bboxes": rec.boxes, "labels": rec.labels}

    def _augmented(self, index: int, rng: np.random.Generator) -> dict:
        transform, data = self.transform, self._raw(index)
        if self.mosaic_transform is not None and rng.random() < self.cfg.mosaic_prob:
            transform = self.mosaic_transform
            data["mosaic_metadata"] = [self._raw(int(j)) for j in rng.integers(0, len(self), 3)]
        reseed(transform, rng)
        out = transform(**data)
        return {"image": out["image"], "bboxes": np.asarray(out["bboxes"]).reshape(-1, 4),
                "labels": np.asarray(out["labels"], dtype=np.int64)}

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = self._augmented(index, rng)
        if self.cfg.mixup_prob > 0 and rng.random() < self.cfg.mixup_prob:
            sample = mixup(sample, self._augmented(int(rng.integers(0, len(self))), rng), lam=0.5)
        elif self.cfg.cutmix_prob > 0 and rng.random() < self.cfg.cutmix_prob:
            other = self._augmented(int(rng.integers(0, len(self))), rng)
            sample = cutmix(sample, other, rng, self.cfg.min_visibility)
        return to_sample(sample["image"], sample["bboxes"], sample["labels"], self.records[index])


def collate(batch):
    images, targets, metas = zip(*batch)
    return torch.stack(images), list(targets), list(metas)
