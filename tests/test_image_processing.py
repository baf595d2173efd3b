"""Image loading and the encoder-side transform: exact pixel values on tiny synthetic films, odd file formats."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from xraygpt.data.image_processing import ImageReadError, ImageTransform, load_image, to_8bit
from xraygpt.encoders.base import CXR_MEAN, CXR_STD, ImageProcessingConfig

GRID = np.array([[0, 10, 20, 30], [40, 50, 60, 70]], dtype=np.uint8)  # (H=2, W=4)


def expected(pixels: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """Independent reference: uint8 -> [0,1] -> 3 identical channels -> (x - mean) / std."""
    x = torch.tensor(pixels, dtype=torch.float64) / 255.0
    return ((x - mean) / std).expand(3, -1, -1).float()


def processing(size: int, resize: str = "crop") -> ImageProcessingConfig:
    return ImageProcessingConfig(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, resize)


def test_identity_size_is_exact_normalisation():
    square = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17  # 0 .. 255
    out = ImageTransform(processing(4))(Image.fromarray(square))
    assert out.dtype == torch.float32 and out.shape == (3, 4, 4)
    torch.testing.assert_close(out, expected(square, 0.5, 0.25), atol=1e-6, rtol=0)
    assert out[0, 0, 0].item() == pytest.approx(-2.0) and out[0, 3, 3].item() == pytest.approx(2.0)


def test_crop_mode_keeps_the_centre():
    out = ImageTransform(processing(2, "crop"))(Image.fromarray(GRID))  # shorter side already 2
    torch.testing.assert_close(out, expected(GRID[:, 1:3], 0.5, 0.25), atol=1e-6, rtol=0)


def test_pad_mode_adds_black_rows_above_and_below():
    out = ImageTransform(processing(4, "pad"))(Image.fromarray(GRID))
    padded = np.zeros((4, 4), dtype=np.uint8)
    padded[1:3] = GRID
    torch.testing.assert_close(out, expected(padded, 0.5, 0.25), atol=1e-6, rtol=0)


@pytest.mark.parametrize("resize", ["crop", "pad", "squash"])
def test_resize_modes_give_the_square_size(resize):
    flat = np.full((6, 8), 100, dtype=np.uint8)
    out = ImageTransform(processing(4, resize))(Image.fromarray(flat))
    assert out.shape == (3, 4, 4)
    if resize != "pad":  # bicubic of a constant film is that constant, exactly
        torch.testing.assert_close(out, expected(np.full((4, 4), 100, np.uint8), 0.5, 0.25), atol=1e-6, rtol=0)


def test_crop_of_a_tall_film_resizes_the_short_side():
    tall = Image.fromarray(np.tile(np.arange(0, 250, 25, dtype=np.uint8)[:, None], (1, 5)))  # (H=10, W=5)
    out = ImageTransform(processing(5, "crop"))(tall)  # no resize: keep rows 2..6
    rows = np.tile(np.arange(0, 250, 25, dtype=np.uint8)[2:7, None], (1, 5))
    torch.testing.assert_close(out, expected(rows, 0.5, 0.25), atol=1e-6, rtol=0)


def test_sixteen_bit_png_is_scaled_by_its_actual_range(tmp_path):
    raw = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000 + 500)  # 500 .. 11500 of 65535
    path = tmp_path / "film16.png"
    Image.fromarray(raw).save(path)
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    assert image.mode == "L"
    want = np.round((raw.astype(np.float64) - 500) * 255.0 / 11000).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image), want)
    assert np.asarray(image).min() == 0 and np.asarray(image).max() == 255


def test_thirty_two_bit_and_constant_images():
    wide = Image.fromarray(np.array([[-1000, 0], [1000, 3000]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_8bit(wide)), [[0, 64], [128, 255]])
    flat = Image.fromarray(np.full((2, 2), 7, dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_8bit(flat)), np.zeros((2, 2)))


def test_palette_png_expands_then_reads_as_luminance(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert list(image.getdata()) == [(255, 0, 0), (0, 255, 0)]
    out = ImageTransform(ImageProcessingConfig(2, (0.0,) * 3, (1.0,) * 3, True, "pad"))(path)
    # PIL luma L = 0.299 R + 0.587 G + 0.114 B: red -> 76, green -> 150; pad adds a black second row.
    want = torch.tensor([[76, 150], [0, 0]], dtype=torch.float64) / 255.0
    torch.testing.assert_close(out, want.expand(3, -1, -1).float(), atol=1e-6, rtol=0)


def test_alpha_is_composited_onto_black(tmp_path):
    rgba = Image.new("RGBA", (1, 1), (200, 100, 50, 128))
    rgba.save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (100, 50, 25)
    la = Image.new("LA", (1, 1), (200, 64))
    la.save(tmp_path / "la.png")
    image = load_image(tmp_path / "la.png")
    assert image.mode == "L" and image.getpixel((0, 0)) == 50


def test_unreadable_files_name_the_file(tmp_path):
    film = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    good = tmp_path / "good.jpg"
    film.save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        load_image(truncated)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty.png is empty \(0 bytes\)"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_image(text)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    assert load_image(good).mode == "L"


def _write_dicom(path, pixels: np.ndarray, photometric: str, slope: float = 1.0, intercept: float = 0.0):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    assert pydicom.dcmread(str(path)).pixel_array.shape == pixels.shape


def test_dicom_monochrome2_and_monochrome1(tmp_path):
    raw = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    _write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", slope=2.0, intercept=-100.0)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "m2.dcm")), [[0, 64], [128, 255]])
    _write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1")  # bright bone = low values: inverted
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "m1.dcm")), [[255, 191], [128, 0]])


def test_dicom_without_pydicom_names_the_install(tmp_path, monkeypatch):
    path = tmp_path / "film.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImportError, match="pip install pydicom"):
        load_image(path)


def test_train_jitter_is_seeded_by_the_caller():
    film = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48), dtype=np.uint8))
    train, evaluate = ImageTransform(processing(32), train=True), ImageTransform(processing(32))
    a = train(film, torch.Generator().manual_seed(3))
    b = train(film, torch.Generator().manual_seed(3))
    c = train(film, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == evaluate(film).shape == (3, 32, 32)
    assert torch.equal(evaluate(film), evaluate(film))
    assert not torch.equal(a, evaluate(film))


def test_real_paediatric_film_with_medclip_processing():
    from xraygpt.assets import pediatric_cxr_jpegs

    path = pediatric_cxr_jpegs()[0]
    out = ImageTransform(ImageProcessingConfig(224, CXR_MEAN, CXR_STD, True, "pad"))(path)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    low, high = (0 - CXR_MEAN[0]) / CXR_STD[0], (1 - CXR_MEAN[0]) / CXR_STD[0]
    assert out.min().item() == pytest.approx(low, abs=1e-5)  # the black padding
    assert low <= out.max().item() <= high + 1e-5
