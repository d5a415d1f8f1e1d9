"""A pre-resized image cache: every image decoded once (JPEG, PNG, DICOM) and resized to the model's input, stored
as one memory-mapped uint8 array per split.

    python -m pipeline.data cache --config C --size S|WxH [--resize square|letterbox] [--split train|test]
    cache, line = open_cache(cfg, "train", table.images)   # what training and prediction call (data.cache_dir)
    cache = ImageCache.open(folder, "train", size, resize, images=table.images)   # None: no usable cache
    cache.input(image_id)    # (height x width x 3 input, (content_width, content_height)), or None: read the file
    cache.resized(image_id)  # (the content alone, (sx, sy) scale from original pixels), or None

``size`` is the model's input size (``model.image_size``): a side for a square input, or (width, height).

Layout (``folder`` = ``<dir>/<data.name>/<resize><size>/``, ``<size>`` written as ``512`` for a square and
``1280x736`` (width x height) otherwise; ``<dir>`` is ``data.cache_dir``, else ``cache/`` in the working directory):

- ``<split>.<build>.npy``: ``(N, height, width, C)`` uint8, image ``i`` exactly
  ``augment.fit_to_input(read_image(path), size, resize)`` -- the same resize (cv2 bilinear) and, for ``letterbox``,
  the same padding; ``C`` is 1 when every image of the split is grayscale by its header (DICOM MONOCHROME, 8/16-bit
  gray PNG/JPEG: a third of the disk), else 3. Read with ``np.load(mmap_mode="r")``: the OS pages in only what is
  read, and every loader worker shares the page cache.
- ``<split>.json``: the format version, size (an int, or [width, height]), resize, channels, the array's file name,
  and per image its id, path, file size and mtime (ns) when decoded, original width and height and content size:
  the exact scale is ``content / original`` per axis. Written last and atomically: a reader sees the old build or
  the new, whole.

An entry is used only while its file keeps the size and mtime it had when decoded, its path and original size match
the table's, and the cache's version, size and resize match the request; anything else falls back to the original
file (counted: ``stale``, ``missing``; ``open_cache`` says it in one line), so predictions always map back to original
pixels through the same content size. ``pipeline.dataset`` reads it: ``EvalDataset`` bit-identically,
``TrainDataset`` at the cache's size (the augmentation then runs on the resized image; see that module).
``CACHE_VERSION`` changes whenever decoding changes (DICOM scaling, the resize), which makes every old cache stale.
A square cache is named and indexed as before non-square sizes existed (same folder, an int size, the same pixels),
so it stays valid at version 1.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.augment import Resize, fit_to_input
from pipeline.config import InputSize, canonical_size, input_wh, size_text
from pipeline.data.dicom import is_dicom
from pipeline.data.images import read_image
from pipeline.data.table import DataError
from pipeline.io import atomic_write_text

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("cache")
_GRAY_MODES = frozenset({"L", "I;16", "I;16L", "I;16B", "I;16N", "I"})
_INDEX_COLUMNS = ["image_id", "path", "bytes", "mtime_ns", "width", "height", "content_width", "content_height"]


def cache_folder(base: str | Path, data_name: str, size: InputSize, resize: Resize) -> Path:
    """``<base>/<data_name>/<resize><size>``: ``square512``, ``letterbox1280x736`` (width x height)."""
    return Path(base) / data_name / f"{resize}{size_text(size)}"


def _stored_size(meta: dict) -> InputSize | None:
    """The index's size (an int, or [width, height]) canonical; None when it is not a size."""
    try:
        return canonical_size(meta.get("size"))
    except ValueError:
        return None


def _index_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.json"


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns): what says a file changed without reading it."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def is_gray_file(path: str | Path) -> bool:
    """True when the header promises a gray image (decoded with R = G = B): a DICOM MONOCHROME1/2, a PIL gray mode.
    False for anything else, unreadable files included (decoding them reports the error)."""
    try:
        if is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return str(ds.get("PhotometricInterpretation", "")).strip().upper() in ("MONOCHROME1", "MONOCHROME2")
        with Image.open(path) as img:
            return img.mode in _GRAY_MODES
    except Exception:  # noqa: BLE001 - a header that cannot be read is no promise of gray
        return False


class ImageCache:
    """One split's cached model inputs, memory-mapped read-only; only the entries still fresh are served.

    Picklable without its array (a DataLoader worker started by spawn maps the file itself)."""

    def __init__(self, folder: Path, split: str, meta: dict, index: pd.DataFrame, fresh: dict[str, int],
                 stale: list[str] | None = None, missing: int = 0):
        self.folder, self.split, self.meta, self.index, self.fresh = folder, split, meta, index, fresh
        # the input size: an int for a square, (width, height) otherwise (pipeline.config.canonical_size)
        self.size, self.resize, self.channels = canonical_size(meta["size"]), meta["resize"], int(meta["channels"])
        # of the table it was opened against: ids whose file changed since cached, and how many were never cached
        self.stale, self.missing = list(stale or []), int(missing)
        # per slot, as plain arrays: a pandas row lookup per sample costs more than the copy it serves
        self._original = index[["width", "height"]].to_numpy(dtype=np.int64)
        self._content = index[["content_width", "content_height"]].to_numpy(dtype=np.int64)
        self._array: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: str | Path, split: str, size: InputSize, resize: Resize,
             images: pd.DataFrame | None = None) -> "ImageCache | None":
        """The cache of ``split`` under ``folder`` when it was built for ``size`` (a side, or (width, height)) and
        ``resize`` by this version, else None. With ``images`` (the annotation table's), only entries whose file,
        path and original size are unchanged are served (the rest counted as stale or missing and logged); without,
        every entry is."""
        folder = Path(folder)
        meta = read_index(folder, split)
        if meta is None:
            return None
        wanted = {"version": CACHE_VERSION, "size": canonical_size(size), "resize": resize}
        found = {"version": meta.get("version"), "size": _stored_size(meta), "resize": meta.get("resize")}
        if found != wanted:
            log.info("image cache %s (%s) was built for %s, not %s: not used", folder, split, found, wanted)
            return None
        index = pd.DataFrame(meta.pop("images"), columns=_INDEX_COLUMNS)
        if not (folder / meta["array"]).is_file():
            log.warning("image cache %s: %s is missing: not used", folder, meta["array"])
            return None
        fresh, stale, missing = fresh_slots(index, images)
        return cls(folder, split, meta, index, fresh, stale, missing)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.folder / self.meta["array"], mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return len(self.fresh)

    # ------------------------------------------------------------------------------------------- reading

    def _slot(self, image_id: str) -> int | None:
        return self.fresh.get(image_id)

    def input(self, image_id: str) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The model input of ``image_id`` (height x width x 3 uint8, writable) and its content size, exactly what
        ``fit_to_input(read_image(path), size, resize)`` returns; None when the image is not (freshly) cached."""
        slot = self._slot(image_id)
        if slot is None:
            return None
        cw, ch = self._content[slot]
        return self._rgb(self.array[slot]), (int(cw), int(ch))

    def resized(self, image_id: str) -> tuple[np.ndarray, tuple[float, float]] | None:
        """The resized image without any padding (content_height x content_width x 3, writable) and the per-axis
        scale from original pixels (boxes * [sx, sy, sx, sy] are in its pixels); None when not cached."""
        slot = self._slot(image_id)
        if slot is None:
            return None
        (cw, ch), (width, height) = self._content[slot].tolist(), self._original[slot].tolist()
        return self._rgb(self.array[slot, :ch, :cw]), (cw / width, ch / height)

    def _rgb(self, stored: np.ndarray) -> np.ndarray:
        if self.channels == 1:
            return np.repeat(stored, 3, axis=2)  # a new, writable array
        return np.array(stored)  # a writable copy: the map is read-only and shared


def read_index(folder: Path, split: str) -> dict | None:
    path = _index_path(folder, split)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("image cache index %s is unreadable (%s): not used", path, exc)
        return None
    return meta if isinstance(meta, dict) and "images" in meta else None


def fresh_slots(index: pd.DataFrame, images: pd.DataFrame | None) -> tuple[dict[str, int], list[str], int]:
    """(image id -> slot of the entries still valid for ``images``, the ids whose entry is stale, how many of
    ``images`` have none); without ``images`` every entry is valid."""
    slots = {str(i): n for n, i in enumerate(index.image_id)}
    if images is None:
        return slots, [], 0
    # plain lists, not a pandas row per image: this runs at every stage start, over every image of the split
    cached = list(zip(index.path.astype(str), index.width.astype(int), index.height.astype(int),
                      index.bytes.astype(int), index.mtime_ns.astype(int)))
    fresh, stale, missing = {}, [], 0
    for image_id, path, width, height in zip(images.image_id.astype(str), images.path.astype(str),
                                             images.width.astype(int), images.height.astype(int)):
        slot = slots.get(image_id)
        if slot is None:
            missing += 1
            continue
        try:
            stamp = file_stamp(path)
        except OSError:
            stamp = None
        if cached[slot] != (path, width, height, *(stamp or (None, None))):
            stale.append(image_id)
            continue
        fresh[image_id] = slot
    return fresh, stale, missing


def open_cache(cfg: ExperimentConfig, split: str, images: pd.DataFrame) -> tuple[ImageCache | None, str]:
    """The cache under ``data.cache_dir`` for the model's input (``model.image_size``, ``model.resize``) and
    ``split``, checked against ``images`` (the table about to be read), and one line saying what it serves; (None,
    "") when ``data.cache_dir`` is not set, (None, why) when no usable cache is there."""
    if cfg.data.cache_dir is None:
        return None, ""
    size, resize = cfg.model.image_size, cfg.model.resize
    folder = cache_folder(cfg.data.cache_dir, cfg.data.name, size, resize)
    cache = ImageCache.open(folder, split, size, resize, images=images)
    text = size_text(size)
    if cache is None:
        return None, (f"image cache: none usable in {folder} for the {split} split at {resize} {text} px: every "
                      f"image read from its file (build it: python -m pipeline.data cache --size {text})")
    line = (f"image cache: {folder} ({split}): {len(cache)} of {len(images)} images from the cache, "
            f"{len(images) - len(cache)} from their files")
    why = ([f"{len(cache.stale)} changed since cached, e.g. {', '.join(cache.stale[:3])}"] if cache.stale else []) + \
        ([f"{cache.missing} not cached"] if cache.missing else [])
    if why:
        line += f" ({'; '.join(why)}; rebuild: python -m pipeline.data cache --size {text})"
    return cache, line


# ---------------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class BuildReport:
    split: str
    images: int
    decoded: int
    reused: int
    channels: int
    seconds: float
    path: Path
    bytes: int


def _decode_into(out: np.ndarray, slot: int, path: str, original: tuple[int, int], size: InputSize,
                 resize: Resize) -> tuple[int, int, int, int]:
    """Decode ``path``, fit it to the input and write it to ``out[slot]``; (bytes, mtime_ns, cw, ch). The stamp
    is taken before reading, so a file changed while it is decoded reads as stale next time."""
    stamp = file_stamp(path)
    pixels = read_image(path)
    if (pixels.shape[1], pixels.shape[0]) != original:
        raise DataError(f"{path}: decodes as {pixels.shape[1]}x{pixels.shape[0]}, the table says "
                        f"{original[0]}x{original[1]} (the file changed since the dataset was loaded?)")
    image, (cw, ch) = fit_to_input(pixels, size, resize)
    if out.shape[3] == 1:
        if not (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])):
            raise DataError(f"{path}: its header says grayscale but it decodes in colour")
        out[slot] = image[..., :1]
    else:
        out[slot] = image
    return stamp[0], stamp[1], cw, ch


def build_cache(images: pd.DataFrame, folder: str | Path, split: str, size: InputSize, resize: Resize,
                workers: int | None = None) -> BuildReport:
    """Cache every image of ``images`` (the annotation table's) at ``size`` (a side, or (width, height)) /
    ``resize``: fresh entries of an existing cache are copied, the rest decoded (``workers`` threads: decoders
    release the GIL)."""
    start = time.perf_counter()
    size = canonical_size(size)
    width, height = input_wh(size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = images.reset_index(drop=True)
    old = ImageCache.open(folder, split, size, resize, images=images)
    if old is not None and old.index.image_id.tolist() == images.image_id.tolist() and len(old.fresh) == len(images):
        array = folder / old.meta["array"]  # up to date: nothing to decode, nothing to rewrite
        return BuildReport(split, len(images), 0, len(images), old.channels, time.perf_counter() - start, array,
                           array.stat().st_size)
    paths = images.path.tolist()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        channels = 1 if all(pool.map(is_gray_file, paths)) else 3
        reuse = {} if old is None or old.channels != channels else old.fresh
        name = f"{split}.{uuid.uuid4().hex[:12]}.npy"
        out = np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.uint8,
                                        shape=(len(images), height, width, channels))
        try:
            columns = _fill(out, images, old, reuse, pool, size, resize)
            out.flush()
        except BaseException:
            del out
            (folder / name).unlink(missing_ok=True)
            raise
    del out
    # size: an int for a square (as every cache before non-square inputs), [width, height] otherwise
    meta = {"version": CACHE_VERSION, "size": size if isinstance(size, int) else list(size), "resize": resize,
            "channels": channels, "array": name, "split": split, "images": {c: columns[c] for c in _INDEX_COLUMNS}}
    atomic_write_text(_index_path(folder, split), json.dumps(meta))
    for stale_array in folder.glob(f"{split}.*.npy"):  # builds this index no longer names
        if stale_array.name != name:
            stale_array.unlink(missing_ok=True)
    reused = sum(1 for i in images.image_id if i in reuse)
    return BuildReport(split, len(images), len(images) - reused, reused, channels, time.perf_counter() - start,
                       folder / name, (folder / name).stat().st_size)


def _fill(out: np.ndarray, images: pd.DataFrame, old: ImageCache | None, reuse: dict[str, int],
          pool: ThreadPoolExecutor, size: InputSize, resize: Resize) -> dict[str, list]:
    """Write every image into ``out``; the index columns, in the table's order."""
    stamps: list = [None] * len(images)
    todo = []
    for slot, row in enumerate(images.itertuples()):
        if row.image_id in reuse and old is not None:
            entry = old.index.iloc[reuse[row.image_id]]
            out[slot] = old.array[reuse[row.image_id]]
            stamps[slot] = (int(entry.bytes), int(entry.mtime_ns), int(entry.content_width),
                            int(entry.content_height))
        else:
            todo.append(slot)
    paths = images.path.astype(str).tolist()
    sizes = list(zip(images.width.astype(int), images.height.astype(int)))
    for slot, stamp in zip(todo, pool.map(lambda s: _decode_into(out, s, paths[s], sizes[s], size, resize), todo)):
        stamps[slot] = stamp
    return {
        "image_id": images.image_id.astype(str).tolist(), "path": images.path.astype(str).tolist(),
        "bytes": [s[0] for s in stamps], "mtime_ns": [s[1] for s in stamps],
        "width": images.width.astype(int).tolist(), "height": images.height.astype(int).tolist(),
        "content_width": [s[2] for s in stamps], "content_height": [s[3] for s in stamps],
    }
