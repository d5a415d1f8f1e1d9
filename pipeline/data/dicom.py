"""DICOM images (``.dcm`` / ``.dicom``, or any file with the ``DICM`` magic) as 8-bit RGB, through pydicom.

How the stored values become the (H, W, 3) uint8 array every other image is:

1. the pixel data is decoded by pydicom (uncompressed and RLE natively; JPEG baseline and JPEG 2000 through Pillow;
   JPEG lossless and 12-bit JPEG through the ``pylibjpeg`` + ``pylibjpeg-libjpeg`` plugins);
2. grayscale (MONOCHROME1/2): the modality LUT (Rescale Slope / Intercept) and then the VOI LUT or the first
   window (Window Center / Width, its VOI LUT Function) are applied when the file has them (pydicom's
   ``apply_modality_lut`` and ``apply_voi_lut``), as a DICOM viewer shows the image;
3. the result is scaled to 8 bits by its own minimum and maximum: ``round(255 * (v - min) / (max - min))``
   (a constant image is black). With a window that the image spans this is the window itself (the window's
   output runs from its floor to its ceiling); without one it stretches whatever bits are stored (12 of 16, or
   16) to the full 8-bit range -- the conversion the public VinBigData / SIIM kernels used;
4. MONOCHROME1 (0 = white) is inverted after that, so bone is bright in every image;
5. the gray channel is repeated to RGB. Colour files (RGB, YBR: pydicom converts to RGB) of 8 bits are taken as
   they are; deeper colour is min-max scaled like gray.

Width and height are the file's Columns and Rows; boxes stay in these pixels. A multi-frame file, a palette
image or an unknown photometric interpretation is a DataError naming the file, never a guess.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from pipeline.data.table import DataError

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
_MAGIC_OFFSET, _MAGIC = 128, b"DICM"
_GRAY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"})
# the end of encapsulated (compressed) pixel data: a sequence delimitation item, tag (FFFE,E0DD), length 0
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_TAIL_BYTES = 256
_MAX_LUT = 1 << 16  # integer pixels spanning fewer distinct values than this go through a lookup table


def is_dicom(path: str | Path) -> bool:
    """True for a file with the DICOM magic (``DICM`` after the 128-byte preamble), or without it (some old files
    have no preamble) when its extension says DICOM."""
    try:
        with open(path, "rb") as f:
            head = f.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError:
        return False  # the image reader reports a missing or unreadable file
    return head[_MAGIC_OFFSET:] == _MAGIC or Path(path).suffix.lower() in DICOM_EXTENSIONS


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency; this names the fix if it was left out
        raise DataError("reading DICOM images needs pydicom: pip install pydicom pylibjpeg pylibjpeg-libjpeg") from None
    return pydicom


def _read(path: str | Path, *, header_only: bool):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, struct.error, ValueError ... on garbage
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None


def _size(ds, path: str | Path) -> tuple[int, int]:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise DataError(f"{path}: DICOM file without an image (no Rows / Columns; a report or a structured set?)")
    return int(columns), int(rows)


def dicom_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header (Columns, Rows); the pixel data is not read."""
    return _size(_read(path, header_only=True), path)


def probe_dicom(path: str | Path) -> tuple[tuple[int, int], bool]:
    """((width, height) from the header, whether the file looks complete): False when it is shorter than its
    uncompressed pixel data, or its compressed pixel data lacks the closing delimiter near the end -- probably
    cut short (the caller confirms by decoding). One header read."""
    pydicom = _pydicom()
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            pixel_data_at, file_size = f.tell(), os.fstat(f.fileno()).st_size
            size = _size(ds, path)
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            if syntax is not None and syntax.is_compressed:
                f.seek(max(0, file_size - _TAIL_BYTES))
                return size, _SEQUENCE_END in f.read()
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = size[0] * size[1] * int(ds.get("SamplesPerPixel", 1) or 1) * frames
    expected = expected * int(ds.get("BitsAllocated", 8) or 8) // 8
    return size, file_size - pixel_data_at >= expected + 8  # + the element's tag and length (8 or 12 bytes)


def to_uint8(values: np.ndarray, invert: bool = False, present: np.ndarray | None = None) -> np.ndarray:
    """``round(255 * (v - min) / (max - min))`` as uint8, then ``255 - x`` with ``invert``; a constant array is 0
    (255 inverted). ``present``: the values whose min and max count (a lookup table's entries that occur)."""
    values = np.asarray(values, dtype=np.float64)
    counted = values if present is None else values[present]
    low, high = float(counted.min()), float(counted.max())
    scaled = np.zeros(values.shape, np.uint8) if high <= low else np.rint(
        np.clip((values - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)
    return 255 - scaled if invert else scaled


def gray_to_uint8(pixels: np.ndarray, ds, invert: bool) -> np.ndarray:
    """Stored gray values -> modality LUT -> VOI LUT / window -> min-max 8 bits (-> inverted), as (H, W) uint8.

    Every step is a function of the stored value alone, so for integer pixels it is computed once per value in
    the image's range (at most 65,536) through pydicom's own functions, and the image is one table look-up: the
    same numbers as applying them to every pixel (pydicom's windowing works in float64 on every pixel: 0.37 s of
    a 2000x2000 image's 0.35 s read, against ~0.02 s for the whole read this way)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if pixels.dtype.kind not in "iu" or int(pixels.max()) - int(pixels.min()) >= _MAX_LUT:
        return to_uint8(apply_voi_lut(apply_modality_lut(pixels, ds), ds), invert)
    first = int(pixels.min())
    domain = np.arange(first, int(pixels.max()) + 1).astype(pixels.dtype)
    values = apply_voi_lut(apply_modality_lut(domain, ds), ds)
    if first == 0:
        offsets = pixels
    else:
        offsets = pixels - pixels.dtype.type(first) if pixels.dtype.kind == "u" else pixels.astype(np.int64) - first
    steps = np.diff(np.asarray(values, dtype=np.float64))
    if (steps >= 0).all() or (steps <= 0).all():
        present = None  # monotonic (windows, sigmoid, rescale): the extremes are at the ends, both in the image
    else:  # a non-monotonic LUT: the min and max are over the values that occur
        present = np.bincount(offsets.ravel(), minlength=len(domain)) > 0
    return to_uint8(values, invert, present)[offsets]


def _pixels(ds, path: str | Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # no decoder for the transfer syntax, or damaged pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown"
        hint = (" (compressed DICOM: pip install pylibjpeg pylibjpeg-libjpeg for JPEG lossless, JPEG-LS and 12-bit "
                "JPEG)" if syntax is not None and syntax.is_compressed and importlib.util.find_spec("libjpeg") is None
                else "")
        raise DataError(f"{path}: DICOM pixel data cannot be decoded, transfer syntax {name}: "
                        f"{type(exc).__name__}: {exc}{hint}") from None


def read_dicom(path: str | Path) -> np.ndarray:
    """The DICOM image at ``path`` as a writable (H, W, 3) uint8 RGB array (see the module docstring)."""
    ds = _read(path, header_only=False)
    width, height = _size(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames); one image per file is expected")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _GRAY | _COLOUR:
        raise DataError(f"{path}: DICOM photometric interpretation {photometric or '(none)'!r} is not supported "
                        f"(expected one of {sorted(_GRAY | _COLOUR)})")
    pixels = _pixels(ds, path)
    if photometric in _GRAY:
        try:
            gray = gray_to_uint8(pixels, ds, invert=photometric == "MONOCHROME1")
        except Exception as exc:  # a malformed LUT or window element
            raise DataError(f"{path}: DICOM modality / VOI LUT cannot be applied ({type(exc).__name__}: {exc})") \
                from None
        import cv2  # here, not at the top: every stage imports this module, few read DICOMs

        rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)  # ~10x numpy's repeat on a 2000x2000 image
    else:
        rgb = pixels if pixels.dtype == np.uint8 else to_uint8(pixels)
    if rgb.shape != (height, width, 3):
        raise DataError(f"{path}: DICOM pixel data decodes as {rgb.shape}, the header says {height}x{width}")
    if rgb is pixels and not rgb.flags.writeable:  # pydicom may hand out a read-only view of its buffer
        rgb = rgb.copy()
    return rgb


def write_dicom(path: str | Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 16,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                compress_rle: bool = False) -> Path:
    """A minimal single-frame grayscale DICOM of ``pixels`` (uint16, (H, W), values within ``bits_stored`` bits):
    a window (center, width) and a rescale (slope, intercept) when given; RLE-compressed with ``compress_rle``.
    For tests and benchmarks: real files come from the scanner."""
    _pydicom()  # the install hint when pydicom is missing
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint16 or int(pixels.max(initial=0)) >= 2 ** bits_stored:
        raise ValueError(f"pixels must be (H, W) uint16 within {bits_stored} bits")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
    ds.PixelData = pixels.astype("<u2").tobytes()
    if compress_rle:
        ds.compress(RLELossless)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
