"""Python inference API on a tiny real model: batched == one by one, every input kind and pixel mode, DICOM."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_xraygpt
from PIL import Image

from xraygpt.assets import pediatric_cxr_jpegs
from xraygpt.data.image_processing import ImageTransform, load_image
from xraygpt.encoders import EncoderConfig, build_encoder
from xraygpt.inference import generation_config, summarize, to_pixels

GEN = dict(max_new_tokens=6)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_xraygpt(tokenizer)


@pytest.fixture(scope="module")
def films():
    return pediatric_cxr_jpegs()[:4]


def gray_film(seed: int = 0, shape=(40, 48)) -> np.ndarray:
    """An 8-bit film that spans the full 0..255 range (so range scaling maps it back onto itself)."""
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    arr.flat[0], arr.flat[1] = 0, 255
    return arr


def test_batched_equals_one_by_one_greedy_and_beams(model, films):
    for n, settings in ((3, GEN), (2, dict(GEN, num_beams=2))):
        batched = model.summarize(films[:n], batch_size=2, **settings)  # greedy: a full batch and a partial one
        alone = [model.summarize(f, **settings) for f in films[:n]]
        assert isinstance(batched, list) and len(batched) == n
        assert all(isinstance(t, str) and t for t in alone)
        assert batched == alone


def test_input_kinds_give_the_same_summary(model, films):
    transform = ImageTransform(model.encoder.processing)
    path = films[0]
    pixels = transform(load_image(path))  # (3, S, S)
    by_path = model.summarize(path, **GEN)  # one film -> str
    assert isinstance(by_path, str) and by_path
    assert model.summarize(pixels, **GEN) == by_path  # (3, S, S) -> str
    assert model.summarize([str(path), Image.open(path), pixels], **GEN) == [by_path] * 3  # a list -> list
    assert model.summarize(torch.stack([pixels, pixels]), **GEN) == [by_path] * 2  # (B, 3, S, S) -> list
    assert model.summarize([], **GEN) == []


def test_every_pixel_mode_of_a_gray_film_gives_identical_pixels(tmp_path):
    """16-bit (scaled by its actual range, not clipped), 32-bit, RGB, RGBA, LA, palette: all equal the 8-bit film."""
    gray = gray_film()
    transform = ImageTransform(build_encoder(EncoderConfig()).processing)
    reference = to_pixels(Image.fromarray(gray, "L"), transform)
    palette = Image.new("P", gray.shape[::-1])
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.putdata(gray.flatten().tolist())
    variants = {
        "I;16 full range": Image.fromarray(gray.astype(np.uint16) * 257),
        "I;16 narrow range": Image.fromarray(gray.astype(np.uint16) * 4 + 1000),  # clipping would saturate
        "I": Image.fromarray(gray.astype(np.int32) * 1000 - 5000, mode="I"),
        "RGB": Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB"),
        "RGBA": Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)]), "RGBA"),
        "LA": Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA"),
        "P": palette,
    }
    for name, image in variants.items():
        suffix = ".tif" if name == "I" else ".png"  # PNG has no 32-bit gray: TIFF keeps it
        path = tmp_path / f"{name.replace(' ', '_').replace(';', '')}{suffix}"
        image.save(path)
        assert Image.open(path).mode == image.mode, name
        torch.testing.assert_close(to_pixels(path, transform), reference, atol=0, rtol=0, msg=name)


def test_sixteen_bit_png_summary_equals_the_eight_bit_one(model, tmp_path):
    gray = gray_film(1, (64, 64))
    Image.fromarray(gray, "L").save(tmp_path / "film8.png")
    Image.fromarray(gray.astype(np.uint16) * 16 + 300).save(tmp_path / "film16.png")  # 12-bit detector range
    assert Image.open(tmp_path / "film16.png").mode == "I;16"
    sixteen, eight = model.summarize([tmp_path / "film16.png", tmp_path / "film8.png"], **GEN)
    assert sixteen and sixteen == eight


def test_dicom_film_summary_equals_the_png_one(model, tmp_path):
    pytest.importorskip("pydicom")
    from test_image_processing import _write_dicom

    gray = gray_film(2, (32, 32))
    _write_dicom(tmp_path / "m2.dcm", gray.astype(np.uint16) * 10, "MONOCHROME2", slope=2.0, intercept=-100.0)
    _write_dicom(tmp_path / "m1.dcm", gray.astype(np.uint16) * 10, "MONOCHROME1")  # low values are bright
    Image.fromarray(gray, "L").save(tmp_path / "film.png")
    Image.fromarray(255 - gray, "L").save(tmp_path / "inverted.png")
    names = ["m2.dcm", "m1.dcm", "film.png", "inverted.png"]
    m2, m1, png, inverted = model.summarize([tmp_path / n for n in names], batch_size=4, **GEN)
    assert (m2, m1) == (png, inverted)


def test_dicom_without_pydicom_names_the_extra(model, tmp_path, monkeypatch):
    path = tmp_path / "film.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImportError, match=r"film.dcm is a DICOM file.*pip install 'xraygpt\[dicom\]'"):
        model.summarize(path)


def test_bad_inputs_fail_clearly(model, tmp_path):
    with pytest.raises(ValueError, match=r"shape \(3, 64, 64\) does not fit the encoder: expected \(3, 224, 224\)"):
        model.summarize(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        model.summarize(torch.zeros(3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(3, S, S\) or \(B, 3, S, S\)"):
        model.summarize(torch.zeros(224, 224))
    with pytest.raises(TypeError, match="cannot read a film from int"):
        model.summarize([1])
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        model.summarize(tmp_path / "nothere.png")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.summarize([tmp_path / "nothere.png"], batch_size=0)


def test_generation_settings_are_checked():
    assert generation_config(num_beams=3).num_beams == 3
    assert generation_config().do_sample is False  # deterministic default
    with pytest.raises(TypeError, match=r"unknown generation setting\(s\) \['beams'\]"):
        generation_config(beams=2)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
        generation_config(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generation_config(top_p=1.5)


def test_sampling_is_seeded_and_follows_temperature(model, films):
    torch.manual_seed(5)
    a = summarize(model, films[:1], do_sample=True, temperature=1.5, **GEN)
    torch.manual_seed(5)
    b = summarize(model, films[:1], do_sample=True, temperature=1.5, **GEN)
    assert a == b
    greedy = summarize(model, films[:1], **GEN)
    assert summarize(model, films[:1], do_sample=True, temperature=1e-4, **GEN) == greedy  # near-zero T = argmax
