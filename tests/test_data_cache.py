"""The pre-resized image cache: miss, hit, stale (size / mtime), reuse on rebuild, and that a cached input is the very
array the on-the-fly path (``read_image`` + ``fit_to_input``, i.e. ``EvalDataset``) feeds the model."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.augment import fit_to_input
from pipeline.config import DataConfig
from pipeline.data import load_dataset, read_image
from pipeline.data.__main__ import main
from pipeline.data.cache import CACHE_VERSION, ImageCache, build_cache, cache_folder
from pipeline.data.dicom import write_dicom
from pipeline.dataset import EvalDataset, make_records


def noisy(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def dataset(root: Path, with_dicom: bool = True) -> DataConfig:
    noisy(root / "imgs" / "a.jpg", (120, 80), 1)
    noisy(root / "imgs" / "b.png", (50, 90), 2)
    rows = "image_id,x1,y1,x2,y2\na,1,1,20,20\nb,2,2,30,30\n"
    if with_dicom:
        write_dicom(root / "imgs" / "c.dcm", np.random.default_rng(3).integers(0, 4096, (70, 100)).astype(np.uint16),
                    bits_stored=12)
        rows += "c,5,5,40,40\n"
    (root / "train.csv").write_text(rows)
    return DataConfig(name="t", format="csv", root=root, csv={
        "image_pattern": "imgs/{id}.*", "box_columns": ["x1", "y1", "x2", "y2"], "fixed_class": "x"})


def on_the_fly(path: str, size: int, resize: str):
    return fit_to_input(read_image(path), size, resize)


def test_miss_when_nothing_is_cached(tmp_path):
    assert ImageCache.open(tmp_path / "nothing", "train", 64, "square") is None


@pytest.mark.parametrize("resize", ["square", "letterbox"])
def test_cached_input_is_exactly_the_on_the_fly_input(tmp_path, resize):
    table = load_dataset(dataset(tmp_path / "data"))
    folder = cache_folder(tmp_path / "cache", "t", 64, resize)
    report = build_cache(table.images, folder, "train", 64, resize, workers=2)
    assert (report.images, report.decoded, report.reused, report.channels) == (3, 3, 0, 3)  # a colour JPEG: RGB
    cache = ImageCache.open(folder, "train", 64, resize, images=table.images)
    assert cache is not None and len(cache) == 3
    for row in table.images.itertuples():
        image, content = cache.input(row.image_id)
        expected, expected_content = on_the_fly(row.path, 64, resize)
        np.testing.assert_array_equal(image, expected)
        assert content == expected_content and image.flags.writeable
        resized, (sx, sy) = cache.resized(row.image_id)
        cw, ch = content
        np.testing.assert_array_equal(resized, cv2.resize(read_image(row.path), (cw, ch),
                                                          interpolation=cv2.INTER_LINEAR))
        assert (sx, sy) == (cw / row.width, ch / row.height)
    # what EvalDataset feeds the model, tensor and meta, is what the cache holds
    records = make_records(table, table.images.image_id)
    for i, rec in enumerate(records):
        tensor, target, meta = EvalDataset(records, 64, resize)[i]
        image, (cw, ch) = cache.input(rec.image_id)
        np.testing.assert_array_equal(tensor.numpy().transpose(1, 2, 0), image)
        assert (meta.get("content_width", 64), meta.get("content_height", 64)) == (cw, ch)


def test_gray_split_is_stored_in_one_channel_and_read_as_rgb(tmp_path):
    root = tmp_path / "data"
    noisy(root / "imgs" / "g.png", (40, 30), 4, mode="L")
    write_dicom(root / "imgs" / "d.dcm", np.arange(600, dtype=np.uint16).reshape(20, 30), bits_stored=12)
    (root / "train.csv").write_text("image_id,x1,y1,x2,y2\ng,1,1,5,5\nd,1,1,5,5\n")
    table = load_dataset(DataConfig(name="g", format="csv", root=root, csv={
        "image_pattern": "imgs/{id}.*", "box_columns": ["x1", "y1", "x2", "y2"], "fixed_class": "x"}))
    report = build_cache(table.images, tmp_path / "c", "train", 32, "square", workers=1)
    assert report.channels == 1 and np.load(report.path, mmap_mode="r").shape == (2, 32, 32, 1)
    cache = ImageCache.open(tmp_path / "c", "train", 32, "square", images=table.images)
    for row in table.images.itertuples():
        np.testing.assert_array_equal(cache.input(row.image_id)[0], on_the_fly(row.path, 32, "square")[0])


def test_stale_entries_fall_back_and_a_rebuild_decodes_only_them(tmp_path):
    table = load_dataset(dataset(tmp_path / "data"))
    folder = tmp_path / "cache"
    build_cache(table.images, folder, "train", 48, "square", workers=1)
    paths = table.images.set_index("image_id").path
    noisy(Path(paths["a"]), (120, 80), seed=99)  # new content, same size in pixels
    st = os.stat(paths["b"])
    os.utime(paths["b"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, newer mtime
    cache = ImageCache.open(folder, "train", 48, "square", images=table.images)
    assert cache.input("a") is None and cache.input("b") is None and cache.input("c") is not None
    rebuilt = build_cache(table.images, folder, "train", 48, "square", workers=1)
    assert (rebuilt.decoded, rebuilt.reused) == (2, 1)
    assert len(list(folder.glob("train.*.npy"))) == 1  # the old build's array is gone
    cache = ImageCache.open(folder, "train", 48, "square", images=table.images)
    np.testing.assert_array_equal(cache.input("a")[0], on_the_fly(paths["a"], 48, "square")[0])
    again = build_cache(table.images, folder, "train", 48, "square", workers=1)
    assert (again.decoded, again.reused, again.path) == (0, 3, rebuilt.path)  # up to date: nothing rewritten


def test_a_cache_for_another_size_resize_version_or_path_is_not_used(tmp_path):
    table = load_dataset(dataset(tmp_path / "data", with_dicom=False))
    build_cache(table.images, tmp_path / "c", "train", 48, "square", workers=1)
    assert ImageCache.open(tmp_path / "c", "train", 64, "square") is None
    assert ImageCache.open(tmp_path / "c", "train", 48, "letterbox") is None
    moved = table.images.assign(path=table.images.path.str.replace("imgs", "elsewhere", regex=False))
    assert len(ImageCache.open(tmp_path / "c", "train", 48, "square", images=moved)) == 0
    index = tmp_path / "c" / "train.json"
    meta = json.loads(index.read_text())
    index.write_text(json.dumps({**meta, "version": CACHE_VERSION + 1}))
    assert ImageCache.open(tmp_path / "c", "train", 48, "square") is None


def test_pickled_cache_leaves_its_array_behind(tmp_path):
    table = load_dataset(dataset(tmp_path / "data", with_dicom=False))
    report = build_cache(table.images, tmp_path / "c", "train", 128, "square", workers=1)
    cache = ImageCache.open(tmp_path / "c", "train", 128, "square", images=table.images)
    cache.input("a")  # maps the array
    blob = pickle.dumps(cache)
    assert len(blob) < report.bytes / 10
    np.testing.assert_array_equal(pickle.loads(blob).input("a")[0], cache.input("a")[0])


def test_cache_command(tmp_path, capsys, monkeypatch):
    dataset(tmp_path / "data")
    config = tmp_path / "c.yaml"
    tree = {"data": {"name": "t", "format": "csv", "root": str(tmp_path / "data"), "csv": {
        "image_pattern": "imgs/{id}.*", "box_columns": ["x1", "y1", "x2", "y2"], "fixed_class": "x"}}}
    config.write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "--config", str(config), "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 images at square 32 px, 3 decoded" in out and "test: not cached" in out
    assert (tmp_path / "cache" / "t" / "square32" / "train.json").is_file()
    assert main(["cache", "--config", str(config), "--size", "32", "--split", "train"]) == 0
    assert "0 decoded" in capsys.readouterr().out
    assert main(["cache", "--config", str(config), "--size", "32", "--split", "test"]) == 1
    assert "error:" in capsys.readouterr().err


def test_cache_index_is_a_table_of_the_images(tmp_path):
    table = load_dataset(dataset(tmp_path / "data", with_dicom=False))
    build_cache(table.images, tmp_path / "c", "train", 40, "letterbox", workers=1)
    cache = ImageCache.open(tmp_path / "c", "train", 40, "letterbox")
    assert isinstance(cache.index, pd.DataFrame)
    assert cache.index[["image_id", "width", "height", "content_width", "content_height"]].values.tolist() == [
        ["a", 120, 80, 40, 27], ["b", 50, 90, 22, 40]]
