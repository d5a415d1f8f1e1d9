"""Image decoding: the one reader every stage uses (dataset checks, the training loader, prediction).

- Decoding is by content, never by extension: a PNG named ``.jpg`` reads fine.
- DICOM files (the ``DICM`` magic, or a ``.dcm`` / ``.dicom`` name) go through :mod:`pipeline.data.dicom`:
  modality and VOI LUT / window applied, MONOCHROME1 inverted, min-max scaled to 8 bits, width and height from the
  header.
- Every pixel mode becomes an (H, W, 3) uint8 RGB array: grayscale and palette are expanded, alpha is dropped
  (as cv2 and most Kaggle kernels do), 16-bit grayscale is scaled to 8 bits (PIL's own conversion would clip).
- EXIF orientation is applied, so pixel coordinates mean what an annotator saw in an image viewer; the sizes
  reported by :func:`image_size` are those after orientation.
- A truncated or corrupt file raises :class:`DataError` naming the file; it never loads half grey. JPEGs are decoded
  by libjpeg-turbo through simplejpeg in strict mode (PIL uses the same library and gets the same pixels, but
  ignores its "Corrupt JPEG data" warnings): scan data that is corrupt behind intact markers is an error too,
  instead of a garbage picture.

Three costs: :func:`image_size` reads the header only (~0.05 ms), :func:`probe_image` adds a look at the file's
last bytes to catch the usual truncation (a partial download) without decoding, :func:`verify_image` decodes fully.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageFile

from pipeline.data.dicom import DICOM_EXTENSIONS, dicom_size, is_dicom, probe_dicom, read_dicom
from pipeline.data.table import DataError

# PIL's default, set explicitly: a library that flips it to True would make truncated files load half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Files in an image folder that count as images (anything else, e.g. Thumbs.db or a README, is ignored).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
) | DICOM_EXTENSIONS

_EXIF_ORIENTATION = 0x0112
_ROTATES_90 = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_TRANSPOSE = {  # EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_TAIL_BYTES = 64


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: str | Path) -> Image.Image | None:
    """PIL's image; None for a DICOM file: by its name, or by its magic when PIL does not know the file (so the
    common case pays no extra read to look for the magic)."""
    if Path(path).suffix.lower() in DICOM_EXTENSIONS:
        return None
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except Exception as exc:  # PIL raises many types on garbage: UnidentifiedImageError, SyntaxError, struct.error
        if is_dicom(path):
            return None
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def _orientation(img: Image.Image, path: str | Path) -> int:
    """The EXIF (or XMP) orientation known from the header, before any pixel is decoded.

    Image.getexif of the base class, not the plugin's: PNG's would decode the whole image to look for an eXIf
    chunk after the pixel data. read_image uses this same function, so sizes and pixels always agree.
    """
    try:
        value = int(Image.Image.getexif(img).get(_EXIF_ORIENTATION, 1) or 1)
    except Exception as exc:
        raise DataError(f"{path}: corrupt EXIF block ({type(exc).__name__}: {exc})") from None
    return value if value in _TRANSPOSE else 1  # out-of-range values (seen in the wild) mean "as stored"


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:
        # 16-bit range -> 8 bits by the top byte; PIL's convert("RGB") would clip everything above 255 to white.
        gray = (np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, P, RGBA, CMYK, YCbCr, 1, F: alpha dropped, palette expanded
    # np.array, not asarray: asarray would be a read-only view of PIL's bytes (torch warns, in-place ops fail).
    return np.array(img)


# libjpeg's warnings that mean the entropy-coded data is damaged (jerror.h: JWRN_HIT_MARKER, JWRN_EXTRANEOUS_DATA,
# JWRN_HUFF_BAD_CODE, JWRN_MUST_RESYNC, JWRN_JPEG_EOF, ...); its other warnings (an unknown JFIF revision, odd SOS
# parameters) leave the pixels right and are not errors.
_CORRUPT_JPEG = ("Corrupt JPEG data", "Premature end of JPEG file")
_JPEG_TARGET = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}  # decoder colour space; anything else -> RGB


def _strict_jpeg(path: str | Path) -> np.ndarray | None:
    """The JPEG's stored pixels (H, W, 3) uint8 RGB, decoded in strict mode: DataError when libjpeg reports
    corrupt data. None when PIL should decode it instead (CMYK/YCCK, checked here all the same; or a file this
    decoder refuses for another reason, which PIL then reports or reads)."""
    data = Path(path).read_bytes()
    try:
        colorspace = simplejpeg.decode_jpeg_header(data, strict=False)[2]
        target = _JPEG_TARGET.get(colorspace, "RGB")
        pixels = simplejpeg.decode_jpeg(data, colorspace=target, strict=True)
    except ValueError as exc:
        if str(exc).startswith(_CORRUPT_JPEG):
            raise DataError(f"{path}: corrupt or truncated image (libjpeg: {exc})") from None
        return None
    if target == "CMYK":  # libjpeg cannot convert CMYK to RGB; PIL does (Adobe's inverted CMYK included)
        return None
    return np.repeat(pixels, 3, axis=2) if target == "GRAY" else pixels


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as a writable (H, W, 3) uint8 RGB array, EXIF orientation applied."""
    img = _open(path)
    if img is None:
        return read_dicom(path)
    with img:
        transpose = _TRANSPOSE[_orientation(img, path)]
        pixels = _strict_jpeg(path) if img.format == "JPEG" else None
        if pixels is None:
            try:
                img.load()  # raises OSError on truncation because LOAD_TRUNCATED_IMAGES is False
                return _to_rgb(img if transpose is None else img.transpose(transpose))
            except Exception as exc:
                raise DataError(f"{path}: corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    if transpose is not None:
        pixels = np.array(Image.fromarray(pixels).transpose(transpose))
    return pixels


def _size(img: Image.Image, path: str | Path) -> tuple[int, int]:
    width, height = img.size
    if _orientation(img, path) in _ROTATES_90:
        width, height = height, width
    return int(width), int(height)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only (no pixel decoding)."""
    img = _open(path)
    if img is None:
        return dicom_size(path)
    with img:
        return _size(img, path)


def _tail_complete(path: str | Path, fmt: str | None) -> bool:
    """False when a JPEG lacks its end marker or a PNG its IEND chunk near the end: the file was cut short."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
        return marker in f.read()


def probe_image(path: str | Path) -> tuple[int, int]:
    """:func:`image_size` plus a cheap truncation check; a suspicious file is confirmed by a full decode.

    A JPEG may legitimately carry data after its end marker (camera trailers), so a missing marker alone is not
    an error: only the full decode decides, and only for those few files. A DICOM file shorter than its pixel data
    (or, compressed, without the closing delimiter) is decoded to confirm likewise.
    """
    img = _open(path)
    if img is None:
        size, complete = probe_dicom(path)
        if not complete:
            verify_image(path)  # a DataError when the pixel data is cut short; the size is checked while decoding
        return size
    with img:
        size, fmt = _size(img, path), img.format
    if not _tail_complete(path, fmt):
        verified = verify_image(path)
        if verified != size:
            raise DataError(f"{path}: header says {size[0]}x{size[1]} but the pixels decode as {verified}")
    return size


def verify_image(path: str | Path) -> tuple[int, int]:
    """Decode the whole image (the only sure check for corruption); (width, height) after EXIF orientation."""
    pixels = read_image(path)
    return int(pixels.shape[1]), int(pixels.shape[0])
