import albumentations as A
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from pipeline.augment import (LETTERBOX_FILL, build_train, content_size, cutmix, fit_to_input, make_transform, mixup,
                              resize_steps)
from pipeline.config import AugmentConfig, TransformSpec
from pipeline.data import load_dataset
from pipeline.dataset import TrainDataset, make_records
from pipeline.visualize import augment_grid

FLIPS = [TransformSpec(name="HorizontalFlip", params={"p": 0.5}), TransformSpec(name="RandomRotate90", params={"p": 0.5})]


def dataset(tiny_data, train=FLIPS, **augment):
    from conftest import TINY_SYNTHETIC
    from pipeline.config import DataConfig

    table = load_dataset(DataConfig(name="t", format="gwd_csv", root=tiny_data, classes=TINY_SYNTHETIC.classes))
    cfg = AugmentConfig(train=train, **augment)
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


@pytest.mark.parametrize("engine", ["albumentations", "fused"])
def test_steps_of_a_pipeline_draw_independently(tiny_data, engine):
    # albumentations seeds every step of a Compose alike; two p=0.5 flips then fire together or not at all
    ds = dataset(tiny_data, train=[TransformSpec(name="HorizontalFlip", params={"p": 0.5}),
                                   TransformSpec(name="VerticalFlip", params={"p": 0.5})], engine=engine)
    assert (ds.fused is not None) == (engine == "fused")
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


# --------------------------------------------------------------- the resize to a non-square input, and its inverse

sides = st.integers(1, 10).map(lambda k: 16 * k)  # input sides 16..160


@st.composite
def resize_case(draw):
    """An input size (a side, or (width, height) drawn apart), an original image size and its boxes."""
    in_w, in_h = draw(sides), draw(sides)
    size = in_w if draw(st.booleans()) else (in_w, in_h)
    width, height = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        x1, y1 = draw(st.floats(0, width - 0.01)), draw(st.floats(0, height - 0.01))
        rows.append([x1, y1, draw(st.floats(x1 + 0.01, width)), draw(st.floats(y1 + 0.01, height))])
    return size, width, height, np.array(rows)


@settings(max_examples=60, deadline=None)
@given(case=resize_case(), resize=st.sampled_from(["square", "letterbox"]))
def test_fit_to_input_and_its_inverse_are_exact_for_any_input_shape(case, resize):
    """W x H originals into a w x h input: ``square`` fills it (content w x h), ``letterbox`` scales both sides
    by min(w / W, h / H) (content = that scale, rounded; one side fills its axis) and pads below and right with
    the fill. Boxes scaled into the content and mapped back by ``input_to_original`` with the dataset's meta are the
    originals; the training pipeline's albumentations resize makes the very same pixels."""
    from pipeline.dataset import Record, to_sample
    from pipeline.engine import input_to_original

    size, width, height, boxes = case
    in_w, in_h = (size, size) if isinstance(size, int) else size
    image = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    fitted, (cw, ch) = fit_to_input(image, size, resize)
    assert fitted.shape == (in_h, in_w, 3) and (cw, ch) == content_size(width, height, size, resize)
    if resize == "square":
        assert (cw, ch) == (in_w, in_h)
    else:
        scale = min(in_w / width, in_h / height)
        assert cw == in_w or ch == in_h  # the limiting side fills its axis
        # the ratio kept, to rounding (a side below half a pixel still gets one)
        assert abs(cw - width * scale) <= 0.5 or cw == 1
        assert abs(ch - height * scale) <= 0.5 or ch == 1
        fill = np.array(LETTERBOX_FILL, np.uint8)
        assert (fitted[ch:] == fill).all() and (fitted[:, cw:] == fill).all()
    trained = A.Compose(resize_steps(size, resize))(image=image)["image"]
    np.testing.assert_array_equal(trained, fitted)
    record = Record("a", "unused.png", width, height, boxes.astype(np.float32), np.zeros(len(boxes), np.int64))
    _, _, meta = to_sample(fitted, [], [], record, content=(cw, ch))
    on_input = boxes * np.array([cw / width, ch / height] * 2)
    assert (on_input[:, [0, 2]] <= cw + 1e-9).all() and (on_input[:, [1, 3]] <= ch + 1e-9).all()
    back, keep = input_to_original(on_input, meta, size)
    assert keep.all()
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-9 * max(width, height))


def test_an_image_with_the_input_aspect_is_resized_alike_by_square_and_letterbox():
    image = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)  # 16:9, as a GBR frame
    square, letterbox = fit_to_input(image, (256, 144), "square"), fit_to_input(image, (256, 144), "letterbox")
    assert square[1] == letterbox[1] == (256, 144)
    np.testing.assert_array_equal(square[0], letterbox[0])


def test_the_training_pipeline_ends_at_the_non_square_input():
    """build_train at (width, height): every sample, mosaic included, is height x width, boxes inside it."""
    cfg = AugmentConfig(train=FLIPS)
    for mosaic in (False, True):
        transform = build_train(cfg, (96, 64), mosaic=mosaic, resize="letterbox")
        image = np.zeros((120, 300, 3), np.uint8)
        data = {"image": image, "bboxes": np.array([[30.0, 20.0, 150.0, 100.0]]), "labels": np.array([0])}
        if mosaic:
            data["mosaic_metadata"] = [dict(data) for _ in range(3)]
        out = transform(**data)
        assert out["image"].shape == (64, 96, 3)
        boxes = np.asarray(out["bboxes"]).reshape(-1, 4)
        assert len(boxes) > 0 and (boxes[:, [0, 2]] <= 96).all() and (boxes[:, [1, 3]] <= 64).all()
