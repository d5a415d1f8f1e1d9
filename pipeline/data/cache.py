"""A pre-resized image cache: every image decoded once (JPEG, PNG, DICOM) and resized to the model's input, stored
as one memory-mapped uint8 array per split.

    python -m pipeline.data cache --config C --size S [--resize square|letterbox] [--split train|test]
    cache = ImageCache.open(folder, "train", size, resize, images=table.images)   # None: no usable cache
    cache.input(image_id)    # (size x size x 3 input, (content_width, content_height)), or None: read the file
    cache.resized(image_id)  # (the content alone, (sx, sy) scale from original pixels), or None

Layout (``folder`` = ``<dir>/<data.name>/<resize><size>/``, by default under ``cache/`` in the working directory):

- ``<split>.<build>.npy``: ``(N, size, size, C)`` uint8, image ``i`` exactly ``augment.fit_to_input(read_image(path),
  size, resize)`` -- the same resize (cv2 bilinear) and, for ``letterbox``, the same padding; ``C`` is 1 when every
  image of the split is grayscale by its header (DICOM MONOCHROME, 8/16-bit gray PNG/JPEG: a third of the disk),
  else 3. Read with ``np.load(mmap_mode="r")``: the OS pages in only what is read, and every loader worker shares
  the page cache.
- ``<split>.json``: the format version, size, resize, channels, the array's file name, and per image its id,
  path, file size and mtime (ns) when decoded, original width and height and content size: the exact scale is
  ``content / original`` per axis. Written last and atomically: a reader sees the old build or the new, whole.

An entry is used only while its file keeps the size and mtime it had when decoded, its path and original size match
the table's, and the cache's version, size and resize match the request; anything else falls back to the original
file (counted and logged), so predictions always map back to original pixels through the same content size.
``CACHE_VERSION`` changes whenever decoding changes (DICOM scaling, the resize), which makes every old cache stale.
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

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.augment import Resize, fit_to_input
from pipeline.data.dicom import is_dicom
from pipeline.data.images import read_image
from pipeline.data.table import DataError
from pipeline.io import atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("cache")
_GRAY_MODES = frozenset({"L", "I;16", "I;16L", "I;16B", "I;16N", "I"})
_INDEX_COLUMNS = ["image_id", "path", "bytes", "mtime_ns", "width", "height", "content_width", "content_height"]


def cache_folder(base: str | Path, data_name: str, size: int, resize: Resize) -> Path:
    return Path(base) / data_name / f"{resize}{size}"


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

    def __init__(self, folder: Path, split: str, meta: dict, index: pd.DataFrame, fresh: dict[str, int]):
        self.folder, self.split, self.meta, self.index, self.fresh = folder, split, meta, index, fresh
        self.size, self.resize, self.channels = int(meta["size"]), meta["resize"], int(meta["channels"])
        self._array: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: str | Path, split: str, size: int, resize: Resize,
             images: pd.DataFrame | None = None) -> "ImageCache | None":
        """The cache of ``split`` under ``folder`` when it was built for ``size`` and ``resize`` by this version,
        else None. With ``images`` (the annotation table's), only entries whose file, path and original size are
        unchanged are served (the rest counted as stale or missing and logged); without, every entry is."""
        folder = Path(folder)
        meta = read_index(folder, split)
        if meta is None:
            return None
        wanted = {"version": CACHE_VERSION, "size": int(size), "resize": resize}
        if any(meta.get(k) != v for k, v in wanted.items()):
            log.info("image cache %s (%s) was built for %s, not %s: not used", folder, split,
                     {k: meta.get(k) for k in wanted}, wanted)
            return None
        index = pd.DataFrame(meta.pop("images"), columns=_INDEX_COLUMNS)
        if not (folder / meta["array"]).is_file():
            log.warning("image cache %s: %s is missing: not used", folder, meta["array"])
            return None
        fresh = fresh_slots(index, images)
        return cls(folder, split, meta, index, fresh)

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
        """The model input of ``image_id`` (size x size x 3 uint8, writable) and its content size, exactly what
        ``fit_to_input(read_image(path), size, resize)`` returns; None when the image is not (freshly) cached."""
        slot = self._slot(image_id)
        if slot is None:
            return None
        row = self.index.iloc[slot]
        return self._rgb(self.array[slot]), (int(row.content_width), int(row.content_height))

    def resized(self, image_id: str) -> tuple[np.ndarray, tuple[float, float]] | None:
        """The resized image without any padding (content_height x content_width x 3, writable) and the per-axis
        scale from original pixels (boxes * [sx, sy, sx, sy] are in its pixels); None when not cached."""
        slot = self._slot(image_id)
        if slot is None:
            return None
        row = self.index.iloc[slot]
        cw, ch = int(row.content_width), int(row.content_height)
        return self._rgb(self.array[slot, :ch, :cw]), (cw / int(row.width), ch / int(row.height))

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


def fresh_slots(index: pd.DataFrame, images: pd.DataFrame | None) -> dict[str, int]:
    """image id -> slot of the entries still valid for ``images`` (every entry without it); logs what is not."""
    slots = {str(i): n for n, i in enumerate(index.image_id)}
    if images is None:
        return slots
    fresh, stale, missing = {}, [], 0
    for row in images.itertuples():
        slot = slots.get(row.image_id)
        if slot is None:
            missing += 1
            continue
        entry = index.iloc[slot]
        try:
            stamp = file_stamp(row.path)
        except OSError:
            stamp = None
        if (entry.path, int(entry.width), int(entry.height)) != (row.path, int(row.width), int(row.height)) or \
                stamp != (int(entry.bytes), int(entry.mtime_ns)):
            stale.append(row.image_id)
            continue
        fresh[row.image_id] = slot
    if stale or missing:
        log.warning("image cache: %d of %d images are stale (file changed, e.g. %s) and %d not cached: read from "
                    "their files (rebuild: python -m pipeline.data cache)", len(stale), len(images),
                    stale[:3], missing)
    return fresh


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


def _decode_into(out: np.ndarray, slot: int, path: str, original: tuple[int, int], size: int,
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


def build_cache(images: pd.DataFrame, folder: str | Path, split: str, size: int, resize: Resize,
                workers: int | None = None) -> BuildReport:
    """Cache every image of ``images`` (the annotation table's) at ``size`` / ``resize``: fresh entries of an
    existing cache are copied, the rest decoded (``workers`` threads: decoders release the GIL)."""
    start = time.perf_counter()
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
                                        shape=(len(images), size, size, channels))
        try:
            columns = _fill(out, images, old, reuse, pool, size, resize)
            out.flush()
        except BaseException:
            del out
            (folder / name).unlink(missing_ok=True)
            raise
    del out
    meta = {"version": CACHE_VERSION, "size": int(size), "resize": resize, "channels": channels, "array": name,
            "split": split, "images": {c: columns[c] for c in _INDEX_COLUMNS}}
    atomic_write_text(_index_path(folder, split), json.dumps(meta))
    for stale_array in folder.glob(f"{split}.*.npy"):  # builds this index no longer names
        if stale_array.name != name:
            stale_array.unlink(missing_ok=True)
    reused = sum(1 for i in images.image_id if i in reuse)
    return BuildReport(split, len(images), len(images) - reused, reused, channels, time.perf_counter() - start,
                       folder / name, (folder / name).stat().st_size)


def _fill(out: np.ndarray, images: pd.DataFrame, old: ImageCache | None, reuse: dict[str, int],
          pool: ThreadPoolExecutor, size: int, resize: Resize) -> dict[str, list]:
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
