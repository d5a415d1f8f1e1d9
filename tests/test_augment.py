import numpy as np
import pytest

from conftest import tiny_config
from pipeline.augment import build_train, cutmix, make_transform, mixup
from pipeline.config import AugmentConfig, TransformSpec
from pipeline.data import load_dataset
from pipeline.dataset import TrainDataset, make_records
from pipeline.visualize import augment_grid

FLIPS = [TransformSpec(name="HorizontalFlip", params={"p": 0.5}), TransformSpec(name="RandomRotate90", params={"p": 0.5})]


def dataset(tiny_data, **augment):
    from conftest import TINY_SYNTHETIC
    from pipeline.config import DataConfig

    table = load_dataset(DataConfig(name="t", format="gwd_csv", root=tiny_data, classes=TINY_SYNTHETIC.classes))
    cfg = AugmentConfig(train=FLIPS, **augment)
    return TrainDataset(make_records(table, table.images.image_id), 96, cfg, seed=0)


@pytest.mark.parametrize("extra", [{}, {"mosaic_prob": 1.0}, {"mixup_prob": 1.0}, {"cutmix_prob": 1.0}])
def test_samples_keep_valid_boxes_inside_the_input(tiny_data, extra):
    ds = dataset(tiny_data, **extra)
    n_boxes = 0
    for i in range(len(ds)):
        image, target, _ = ds[i]
        assert image.shape == (3, 96, 96)
        b = target["boxes"]
        n_boxes += len(b)
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert (b >= 0).all() and (b <= 96).all()
        assert len(target["labels"]) == len(b) and (target["labels"] < 3).all()
    assert n_boxes > 0


def test_augmentation_is_a_function_of_seed_epoch_and_index(tiny_data):
    a, b = dataset(tiny_data, mosaic_prob=0.5), dataset(tiny_data, mosaic_prob=0.5)
    for ds in (a, b):
        ds.set_epoch(3)
    assert (a[5][0] == b[5][0]).all() and (a[5][1]["boxes"] == b[5][1]["boxes"]).all()
    b.set_epoch(4)
    assert not (a[5][0] == b[5][0]).all()


def _flips_seen(ds: TrainDataset, reference: np.ndarray, epochs: int) -> dict[str, int]:
    """How often each flip combination produced sample 0, told apart by where its boxes went."""
    size, seen = ds.size, {}
    candidates = {"none": lambda b: b, "h": lambda b: b[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [size, 0, size, 0],
                  "v": lambda b: b[:, [0, 3, 2, 1]] * [1, -1, 1, -1] + [0, size, 0, size]}
    candidates["hv"] = lambda b: candidates["v"](candidates["h"](b))
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        boxes = ds[0][1]["boxes"].numpy()
        (name,) = [n for n, f in candidates.items() if np.allclose(np.sort(f(reference), 0), np.sort(boxes, 0), atol=1e-3)]
        seen[name] = seen.get(name, 0) + 1
    return seen


def test_steps_of_a_pipeline_draw_independently(tiny_data):
    # albumentations seeds every step of a Compose alike; two p=0.5 flips then fire together or not at all
    ds = dataset(tiny_data)
    ds.cfg = AugmentConfig(train=[TransformSpec(name="HorizontalFlip", params={"p": 0.5}),
                                  TransformSpec(name="VerticalFlip", params={"p": 0.5})])
    ds.transform = build_train(ds.cfg, ds.size)
    rec = ds.records[0]
    assert len(rec.boxes) > 0
    reference = rec.boxes * np.array([ds.size / rec.width, ds.size / rec.height] * 2)
    seen = _flips_seen(ds, reference, epochs=80)
    assert set(seen) == {"none", "h", "v", "hv"} and min(seen.values()) >= 8, seen


def test_mixup_keeps_both_sets_of_boxes():
    a = {"image": np.zeros((8, 8, 3), np.uint8), "bboxes": np.array([[0, 0, 4, 4]]), "labels": np.array([0])}
    b = {"image": np.full((8, 8, 3), 200, np.uint8), "bboxes": np.array([[2, 2, 6, 6]]), "labels": np.array([1])}
    out = mixup(a, b, 0.5)
    assert out["image"][0, 0, 0] == 100 and len(out["bboxes"]) == 2 and list(out["labels"]) == [0, 1]


def test_cutmix_drops_hidden_boxes_and_clips_pasted_ones():
    rng = np.random.default_rng(0)
    a = {"image": np.zeros((100, 100, 3), np.uint8), "bboxes": np.array([[0, 0, 100, 100], [0, 0, 2, 2]], float),
         "labels": np.array([0, 1])}
    b = {"image": np.full((100, 100, 3), 255, np.uint8), "bboxes": np.array([[0, 0, 100, 100]], float),
         "labels": np.array([2])}
    out = cutmix(a, b, rng, min_visibility=0.3)
    pasted = out["image"][..., 0] == 255
    ys, xs = np.nonzero(pasted)
    region = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert list(out["labels"]).count(2) == 1
    assert np.allclose(out["bboxes"][list(out["labels"]).index(2)], region)  # clipped to the pasted rectangle


def test_unknown_transform_is_a_clear_error():
    with pytest.raises(ValueError, match="NotATransform"):
        make_transform(TransformSpec(name="NotATransform"))
    with pytest.raises(ValueError, match="HorizontalFlip"):
        build_train(AugmentConfig(train=[TransformSpec(name="HorizontalFlip", params={"q": 1})]), 64)


def test_visualize_augment_writes_a_png_grid(tmp_path, tiny_data):
    from PIL import Image

    cfg = tiny_config(tmp_path, tiny_data, augment={"train": [s.model_dump() for s in FLIPS], "mosaic_prob": 0.5})
    out = augment_grid(cfg, 8, tmp_path / "aug.png")
    size = Image.open(out).size
    assert size == (4 * 128, 2 * 128)
