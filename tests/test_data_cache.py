"""The pre-resized image cache: miss, hit, stale (size / mtime), reuse on rebuild, and that a cached input is the very
array the on-the-fly path (``read_image`` + ``fit_to_input``, i.e. ``EvalDataset``) feeds the model; wired into the
stages through ``data.cache_dir``: the line they print, the training fingerprint that ignores it, and a predict run
whose table is the same with and without it. (The datasets' use of it: tests/test_dataset.py.)"""
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

from conftest import FRCNN_TINY
from pipeline.augment import fit_to_input
from pipeline.config import DataConfig, ExperimentConfig, load_config
from pipeline.data import load_dataset, read_image
from pipeline.data.__main__ import main
from pipeline.data.cache import CACHE_VERSION, ImageCache, build_cache, cache_folder, open_cache
from pipeline.data.dicom import write_dicom
from pipeline.dataset import EvalDataset, make_records
from pipeline.layout import folds_path


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


def test_a_non_square_cache_is_named_and_keyed_by_width_and_height(tmp_path):
    """A [W, H] input gets its own folder (``letterbox96x64``) and index size; the array is (N, H, W, C), each input
    exactly fit_to_input's; a square request, or the swapped (H, W), is another size and does not open it."""
    table = load_dataset(dataset(tmp_path / "data"))
    folder = cache_folder(tmp_path / "cache", "t", (96, 64), "letterbox")
    assert folder.name == "letterbox96x64" and cache_folder(tmp_path, "t", [64, 64], "square").name == "square64"
    report = build_cache(table.images, folder, "train", (96, 64), "letterbox", workers=1)
    assert np.load(report.path, mmap_mode="r").shape == (3, 64, 96, 3)
    assert json.loads((folder / "train.json").read_text())["size"] == [96, 64]
    cache = ImageCache.open(folder, "train", [96, 64], "letterbox", images=table.images)
    assert cache is not None and cache.size == (96, 64) and len(cache) == 3
    for row in table.images.itertuples():
        image, content = cache.input(row.image_id)
        expected, expected_content = on_the_fly(row.path, (96, 64), "letterbox")
        np.testing.assert_array_equal(image, expected)
        assert image.shape == (64, 96, 3) and content == expected_content
    for other in ((64, 96), 96, 64):
        assert ImageCache.open(folder, "train", other, "letterbox") is None


def test_a_square_cache_built_before_non_square_inputs_still_opens(tmp_path):
    """A version-1 square cache has an int size in its index and a ``<resize><side>`` folder: both unchanged, so
    it is served without a rebuild (and CACHE_VERSION stays 1); an index whose size is not a size is not used."""
    table = load_dataset(dataset(tmp_path / "data", with_dicom=False))
    folder = cache_folder(tmp_path / "cache", "t", 48, "square")
    assert folder.name == "square48"
    build_cache(table.images, folder, "train", 48, "square", workers=1)
    meta = json.loads((folder / "train.json").read_text())
    assert CACHE_VERSION == 1 and meta["size"] == 48 and meta["version"] == 1
    assert len(ImageCache.open(folder, "train", 48, "square", images=table.images)) == 2
    assert len(ImageCache.open(folder, "train", (48, 48), "square", images=table.images)) == 2
    (folder / "train.json").write_text(json.dumps({**meta, "size": "big"}))
    assert ImageCache.open(folder, "train", 48, "square") is None


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


# ------------------------------------------------------------- wired into the stages (data.cache_dir)


def stage_config(root: Path, cache_dir: Path | None, size: int | list[int] = 64,
                 resize: str = "letterbox") -> ExperimentConfig:
    """A csv dataset of odd shapes and formats (JPEG 120x80, PNG 50x90, DICOM 100x70 in train; PNG and DICOM in
    test), the tiny Faster R-CNN at ``size`` / ``resize``, two folds written by hand; no tracking."""
    data = root / "data"
    dataset(data)
    noisy(data / "test" / "t1.png", (100, 60), 5)
    write_dicom(data / "test" / "t2.dcm", np.random.default_rng(6).integers(0, 4096, (90, 40)).astype(np.uint16),
                bits_stored=12)
    tree = {
        "experiment": "cache", "run": "tiny", "runs_dir": str(root / "runs"), "tracking": {"enabled": False},
        "data": {"name": "t", "format": "csv", "root": str(data), "cache_dir": str(cache_dir) if cache_dir else None,
                 "sample_submission": None,
                 "csv": {"image_pattern": "imgs/{id}.*", "test_image_pattern": "test/{id}.*",
                         "box_columns": ["x1", "y1", "x2", "y2"], "fixed_class": "x"}},
        "folds": {"k": 2, "seed": 0, "dir": str(root / "folds")},
        "model": {**FRCNN_TINY, "image_size": size, "resize": resize},
        "train": {"num_workers": 0, "progress": False, "batch_size": 2},
        "predict": {"batch_size": 2},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    cfg.folds.dir.mkdir(parents=True, exist_ok=True)
    folds_path(cfg).write_text("image_id,fold\na,0\nb,1\nc,0\n")
    return cfg


def test_open_cache_says_in_one_line_what_it_serves_and_counts_stale_files(tmp_path, monkeypatch):
    cfg = stage_config(tmp_path, tmp_path / "caches")
    table = load_dataset(cfg.data)
    assert open_cache(cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": None})}), "train",
                      table.images) == (None, "")  # no cache_dir: nothing opened, nothing said
    cache, line = open_cache(cfg, "train", table.images)
    assert cache is None and "none usable" in line and "python -m pipeline.data cache --size 64" in line
    monkeypatch.chdir(tmp_path)  # the command's default root would be ./cache: data.cache_dir must win
    assert main(["cache", "--config", str(tmp_path / "config.yaml"), "--size", "64", "--split", "train"]) == 0
    assert (tmp_path / "caches" / "t" / "letterbox64" / "train.json").is_file() and not (tmp_path / "cache").exists()
    cache, line = open_cache(cfg, "train", table.images)
    assert len(cache) == 3 and line.endswith("3 of 3 images from the cache, 0 from their files")

    paths = table.images.set_index("image_id").path
    noisy(Path(paths["a"]), (120, 80), seed=42)  # rewritten: same size in pixels, new content
    cache, line = open_cache(cfg, "train", table.images)
    assert (len(cache), cache.stale, cache.missing) == (2, ["a"], 0)
    assert "2 of 3 images from the cache, 1 from their files (1 changed since cached, e.g. a;" in line
    records = make_records(table, ["a", "b"])
    from_cache, from_files = EvalDataset(records, 64, "letterbox", cache), EvalDataset(records, 64, "letterbox")
    for i in range(2):  # the stale image: its new file, not the old cached pixels
        assert np.array_equal(from_cache[i][0].numpy(), from_files[i][0].numpy())
        assert from_cache[i][2] == from_files[i][2]
    old, _ = ImageCache.open(cache.folder, "train", 64, "letterbox").input("a")  # the entry, served blindly
    assert not np.array_equal(old, from_files[0][0].numpy().transpose(1, 2, 0))
    # an image of the table the cache never saw (a pseudo-labelled one, say): counted as not cached
    extra = pd.concat([table.images, table.images.iloc[[1]].assign(image_id="z")], ignore_index=True)
    assert "(1 changed since cached, e.g. a; 1 not cached;" in open_cache(cfg, "train", extra)[1]


def test_training_loaders_read_the_cache_and_say_so(tmp_path, capsys):
    from pipeline.train import make_loaders

    cfg = stage_config(tmp_path, tmp_path / "caches")
    table = load_dataset(cfg.data)
    train_ds, _, _, val_loader = make_loaders(cfg, table, ["a", "b"], ["c"])
    assert train_ds.cache is None and val_loader.dataset.cache is None and "none usable" in capsys.readouterr().out
    build_cache(table.images, cache_folder(cfg.data.cache_dir, "t", 64, "letterbox"), "train", 64, "letterbox")
    train_ds, _, _, val_loader = make_loaders(cfg, table, ["a", "b"], ["c"])
    assert train_ds.cache is not None and val_loader.dataset.cache is train_ds.cache
    assert "3 of 3 images from the cache" in capsys.readouterr().out
    no_cache = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": None})})
    train_ds, _, _, val_loader = make_loaders(no_cache, table, ["a", "b"], ["c"])
    assert train_ds.cache is None and capsys.readouterr().out == ""  # today's behaviour, silently


def test_the_cache_is_no_part_of_the_training_fingerprint(tmp_path):
    """A cache changes where pixels come from, not what is trained on: a run may resume with or without it, and
    a checkpoint written while the fingerprint still held data.cache_dir resumes too."""
    from pipeline.train import config_fingerprint, same_training

    with_cache = stage_config(tmp_path, tmp_path / "caches")
    without = with_cache.model_copy(update={"data": with_cache.data.model_copy(update={"cache_dir": None})})
    assert config_fingerprint(with_cache) == config_fingerprint(without)
    assert same_training(config_fingerprint(without), with_cache)
    assert same_training(config_fingerprint(with_cache), without)
    older = config_fingerprint(without)
    older["data"]["cache_dir"] = None  # as written by a build whose fingerprint kept the field
    assert same_training(older, with_cache) and same_training(older, without)
    other_data = with_cache.model_copy(update={"data": with_cache.data.model_copy(update={"name": "u"})})
    assert not same_training(older, other_data)  # the rest of the data section still counts


@pytest.mark.slow  # two prediction runs per split: 20+ s, the rest of the file is fast
def test_predict_with_and_without_the_cache_writes_identical_tables(tmp_path, monkeypatch, capsys):
    import torch

    from pipeline import checkpoint, predict
    from pipeline.layout import BEST_CHECKPOINT, fold_dir, predictions_path, read_predictions
    from pipeline.models import create_model

    cfg = stage_config(tmp_path, tmp_path / "caches")
    no_cache = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": None})})
    for fold in (0, 1):  # untrained fold models: any fixed weights will do, what matters is the same input
        torch.manual_seed(fold)
        checkpoint.save({"model": create_model(cfg.model, num_classes=1).state_dict()},
                        fold_dir(cfg, fold) / BEST_CHECKPOINT)
    assert cfg.model.image_size == 64
    assert main(["cache", "--config", str(tmp_path / "config.yaml")]) == 0  # --size: model.image_size
    for split in ("oof", "test"):
        files = read_predictions(predict.run(no_cache, split, ["none", "hflip"]))
        assert len(files) > 0 and set(files.tta) == {"none", "hflip"}
        capsys.readouterr()

        def refuse(path):
            raise AssertionError(f"{path} read from its file")

        with monkeypatch.context() as patched:  # every input from the cache, or this fails
            patched.setattr("pipeline.dataset.read_image", refuse)
            cached = read_predictions(predict.run(cfg, split, ["none", "hflip"]))
        assert f"({'train' if split == 'oof' else 'test'}): " in capsys.readouterr().out
        pd.testing.assert_frame_equal(cached, files)
        assert predictions_path(cfg, split) == predictions_path(no_cache, split)


def test_open_cache_names_a_non_square_size_as_width_x_height(tmp_path):
    cfg = stage_config(tmp_path, tmp_path / "caches", size=[96, 64])
    table = load_dataset(cfg.data)
    cache, line = open_cache(cfg, "train", table.images)
    assert cache is None and "letterbox96x64" in line and "at letterbox 96x64 px" in line
    assert "python -m pipeline.data cache --size 96x64" in line
    build_cache(table.images, cache_folder(tmp_path / "caches", "t", (96, 64), "letterbox"), "train", (96, 64),
                "letterbox", workers=1)
    cache, line = open_cache(cfg, "train", table.images)
    assert cache.size == (96, 64) and line.endswith("3 of 3 images from the cache, 0 from their files")
