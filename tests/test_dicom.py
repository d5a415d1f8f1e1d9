"""DICOM images: small files generated with pydicom (MONOCHROME1 and 2, 12 and 16 bit, with and without a window
or a rescale, RLE-compressed), decoded by ``read_image`` to 8-bit RGB as ``pipeline.data.dicom`` documents."""
from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pydicom
import pytest

from pipeline.config import DataConfig
from pipeline.data import DataError, load_dataset, read_image
from pipeline.data.dicom import to_uint8, write_dicom
from pipeline.data.images import image_size, is_image_file, probe_image, verify_image


def ramp(height: int, width: int, top: int) -> np.ndarray:
    """(H, W) uint16 values from 0 to ``top`` inclusive, row-major."""
    return np.linspace(0, top, height * width).round().astype(np.uint16).reshape(height, width)


def expected_minmax(values: np.ndarray) -> np.ndarray:
    """The documented scaling, written out independently: round(255 * (v - min) / (max - min))."""
    v = values.astype(np.float64)
    return np.rint(255 * (v - v.min()) / (v.max() - v.min())).astype(np.uint8)


@pytest.mark.parametrize("bits", [12, 16])
def test_monochrome2_without_window_is_min_max_scaled(tmp_path, bits):
    pixels = ramp(6, 10, 2 ** bits - 1)
    pixels[0, 0] = 100  # the minimum is not 0: the scale starts at the image's own minimum
    pixels[0, 1] = 100
    path = write_dicom(tmp_path / "a.dcm", pixels, bits_stored=bits)
    rgb = read_image(path)
    assert rgb.shape == (6, 10, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], expected_minmax(pixels))
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255


def test_twelve_bits_stored_use_the_full_8_bit_range(tmp_path):
    # 12 of 16 bits: a top-byte conversion (>> 8) would leave the image at 0..15, nearly black
    pixels = ramp(4, 4, 4095)
    rgb = read_image(write_dicom(tmp_path / "a.dicom", pixels, bits_stored=12))
    assert rgb.max() == 255 and rgb[0, 1, 0] == round(255 * int(pixels[0, 1]) / 4095) == 17


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp(5, 8, 4095)
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", pixels, photometric="MONOCHROME2", bits_stored=12))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono1[0, 0, 0] == 255 and mono1[-1, -1, 0] == 0  # stored 0 is white in MONOCHROME1


def test_window_is_applied_before_scaling(tmp_path):
    pixels = ramp(10, 10, 3300)
    pixels[5, 5] = 1500
    path = write_dicom(tmp_path / "w.dcm", pixels, bits_stored=12, window=(1500, 1000))
    rgb = read_image(path)[..., 0]
    # DICOM's linear window (PS3.3 C.11.2.1.2.1) into 0..4095, written out: below c - 0.5 - (w-1)/2 -> 0, above
    # c - 0.5 + (w-1)/2 -> 4095; the image spans both ends, so the min-max step leaves it as it is
    c, w = 1500.0, 1000.0
    x = pixels.astype(np.float64)
    windowed = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 4095, 0, 4095)
    np.testing.assert_array_equal(rgb, np.rint(windowed * 255 / 4095).astype(np.uint8))
    assert rgb[5, 5] == 128  # the window's centre is mid-grey ...
    unwindowed = read_image(write_dicom(tmp_path / "n.dcm", pixels, bits_stored=12))[..., 0]
    assert unwindowed[5, 5] == round(255 * 1500 / 3300)  # ... and without the window it is not
    assert (rgb[x < 999.5] == 0).all() and (rgb[x > 2000] == 255).all()


def test_rescale_comes_before_the_window(tmp_path):
    # a CT-style file: stored = HU + 1024; the window (40, 400) is in HU, so stored 1064 is its centre
    pixels = ramp(8, 8, 4095)
    pixels[0, 0] = 1064
    path = write_dicom(tmp_path / "ct.dcm", pixels, bits_stored=12, window=(40, 400), rescale=(1, -1024))
    rgb = read_image(path)[..., 0]
    assert rgb[0, 0] == 128  # applied to stored values the window would put 1064 far above its top: white
    assert rgb[0, 1] == 0 and rgb[-1, -1] == 255


def test_real_width_and_height_from_the_header(tmp_path):
    path = write_dicom(tmp_path / "wide.dcm", ramp(5, 7, 65535))
    assert image_size(path) == (7, 5) and probe_image(path) == (7, 5) and verify_image(path) == (7, 5)
    assert is_image_file(path) and is_image_file(tmp_path / "x.DICOM")


def test_dicom_is_found_by_content_whatever_the_name(tmp_path):
    path = write_dicom(tmp_path / "scan.bin", ramp(3, 4, 65535))
    assert image_size(path) == (4, 3) and read_image(path).shape == (3, 4, 3)


def test_rle_compressed_file_decodes_to_the_same_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 4096, (16, 12)).astype(np.uint16)
    plain = write_dicom(tmp_path / "plain.dcm", pixels, bits_stored=12)
    packed = write_dicom(tmp_path / "rle.dcm", pixels, bits_stored=12, compress_rle=True)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_image(packed), read_image(plain))
    assert probe_image(packed) == (12, 16)


@pytest.mark.skipif(importlib.util.find_spec("libjpeg") is None, reason="pylibjpeg-libjpeg not installed")
def test_twelve_bit_jpeg_through_the_pylibjpeg_plugin():
    path = pydicom.data.get_testdata_file("JPGExtended.dcm")  # 12-bit JPEG: Pillow cannot decode it
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed and ds.BitsStored == 12
    rgb = read_image(path)
    assert rgb.shape == (ds.Rows, ds.Columns, 3) and rgb.min() == 0 and rgb.max() == 255


def test_truncated_dicom_is_a_data_error_naming_the_file(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", ramp(40, 40, 65535))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DataError, match="cut.dcm"):
        probe_image(path)
    with pytest.raises(DataError, match="cut.dcm"):
        read_image(path)


def test_not_a_dicom_and_unsupported_files_are_data_errors(tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(DataError, match="fake.dcm"):
        image_size(fake)
    ds = pydicom.dcmread(write_dicom(tmp_path / "p.dcm", ramp(4, 4, 255), bits_stored=8))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(tmp_path / "palette.dcm")
    with pytest.raises(DataError, match="PALETTE COLOR"):
        read_image(tmp_path / "palette.dcm")


def test_constant_image_is_black_not_a_division_by_zero():
    assert (to_uint8(np.full((3, 3), 700.0)) == 0).all()
    assert (to_uint8(np.full((3, 3), 700.0), invert=True) == 255).all()


def test_dicom_dataset_through_the_csv_reader(tmp_path):
    write_dicom(tmp_path / "train" / "p1.dicom", ramp(30, 50, 4095), bits_stored=12)
    write_dicom(tmp_path / "train" / "p2.dicom", ramp(40, 20, 65535))
    pd.DataFrame({"image_id": ["p1", "p2"], "class_name": ["Nodule", "No finding"], "x_min": ["5", ""],
                  "y_min": ["6", ""], "x_max": ["45", ""], "y_max": ["29", ""]}).to_csv(tmp_path / "train.csv",
                                                                                        index=False)
    cfg = DataConfig(name="d", format="csv", root=tmp_path, classes=["Nodule"], csv={
        "image_pattern": "train/{id}.dicom", "box_columns": ["x_min", "y_min", "x_max", "y_max"],
        "label_column": "class_name", "empty_labels": ["No finding"]})
    table = load_dataset(cfg, verify_images=True)
    sizes = table.images.set_index("image_id")[["width", "height"]]
    assert sizes.loc["p1"].tolist() == [50, 30] and sizes.loc["p2"].tolist() == [20, 40]
    assert table.boxes[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[5, 6, 45, 29]]  # original pixels
    assert not table.report.repairs


def test_dicom_images_in_a_folder_are_listed_by_the_other_readers(tmp_path):
    write_dicom(tmp_path / "train" / "scan.dcm", ramp(8, 8, 65535))
    (tmp_path / "train.csv").write_text("image_id,width,height,bbox\nscan,8,8,\"[1, 1, 4, 4]\"\n")
    table = load_dataset(DataConfig(name="g", format="gwd_csv", root=tmp_path, test_images=None))
    assert table.images.image_id.tolist() == ["scan"] and len(table.boxes) == 1


def _reference(pixels: np.ndarray, ds, invert: bool) -> np.ndarray:
    """The conversion applied to every pixel, as pydicom's functions do it (the slow path)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    return to_uint8(apply_voi_lut(apply_modality_lut(pixels, ds), ds), invert)


def _gray_dataset(bits: int, signed: bool = False, **elements):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("case", ["plain", "window_rescale", "sigmoid", "voi_lut_sequence", "non_monotonic_lut",
                                  "signed"])
@pytest.mark.parametrize("invert", [False, True])
def test_lookup_table_path_equals_applying_pydicom_to_every_pixel(case, invert):
    from pydicom.dataset import Dataset

    from pipeline.data.dicom import gray_to_uint8

    rng = np.random.default_rng(7)
    pixels = rng.integers(200, 3900, (64, 48)).astype(np.uint16)
    ds = _gray_dataset(12)
    if case == "window_rescale":
        ds = _gray_dataset(12, WindowCenter=40.0, WindowWidth=400.0, RescaleSlope=1.0, RescaleIntercept=-1024.0)
    elif case == "sigmoid":
        ds = _gray_dataset(12, WindowCenter=2000.0, WindowWidth=800.0, VOILUTFunction="SIGMOID")
    elif case == "voi_lut_sequence":
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.LUTData = (np.sqrt(np.arange(4096)) * 1000).astype(np.uint16).tolist()  # a non-linear curve
        ds = _gray_dataset(12, VOILUTSequence=[item])
    elif case == "non_monotonic_lut":  # its extremes are inside the range: the min-max must see which values occur
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.LUTData = ((np.arange(4096) % 700) * 50 + 100).astype(np.uint16).tolist()
        ds = _gray_dataset(12, VOILUTSequence=[item])
        # 1000..1649 without 1399 and 1400, the LUT's maximum and minimum over that range
        pixels = rng.choice(np.setdiff1d(np.arange(1000, 1650), [1399, 1400]), (64, 48)).astype(np.uint16)
    elif case == "signed":
        pixels = rng.integers(-2000, 1500, (64, 48)).astype(np.int16)
        ds = _gray_dataset(16, signed=True, RescaleSlope=2.0, RescaleIntercept=5.0)
    fast = gray_to_uint8(pixels, ds, invert)
    np.testing.assert_array_equal(fast, _reference(pixels, ds, invert))
    assert fast.min() == 0 and fast.max() == 255  # min-max: the full 8-bit range, inverted or not
