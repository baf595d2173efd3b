"""CaptionDataset: the original XrayGPT layout, every image mode to 8-bit L, and loud errors on bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from xraygpt.data.dataset import AnnotationError, CaptionDataset, read_annotations
from xraygpt.data.image_processing import ImageReadError


def write_ann(path, annotations) -> str:
    path.write_text(json.dumps({"annotations": annotations}))
    return path


@pytest.fixture
def root(tmp_path):
    (tmp_path / "image").mkdir()
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)).save(tmp_path / "image" / "a.png")
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "image" / "b.jpg")
    return tmp_path


def test_reads_png_and_jpg_with_transform(root):
    ann = write_ann(root / "ann.json", [{"image_id": "a", "caption": "first"}, {"image_id": "b", "caption": "second"}])
    ds = CaptionDataset(root, ann, transform=lambda im: (im.mode, im.size))
    assert len(ds) == 2 and ds.num_skipped == 0
    assert ds[0] == {"image": ("L", (64, 48)), "caption": "first", "image_id": "a"}
    assert ds[1]["image"] == ("L", (40, 30))
    assert ds.record(1) == {"image_id": "b", "caption": "second"}
    assert ds.image_path(0) == root / "image" / "a.png" and ds.image_path(1) == root / "image" / "b.jpg"
    plain = CaptionDataset(root, ann)[0]["image"]
    assert isinstance(plain, Image.Image) and np.array_equal(
        np.asarray(plain), np.asarray(Image.open(ds.image_path(0)))
    )


def test_image_id_with_extension_is_used_as_is(root):
    ann = write_ann(root / "ann.json", [{"image_id": "a.png", "caption": "x"}])
    assert CaptionDataset(root, ann).image_path(0) == root / "image" / "a.png"


def test_any_mode_becomes_8bit_grayscale(tmp_path):
    (tmp_path / "image").mkdir()
    img = tmp_path / "image"
    Image.fromarray((np.arange(16, dtype=np.uint16).reshape(4, 4) * 273)).save(img / "i16.png")  # 0..4095
    Image.new("P", (4, 4), 3).save(img / "pal.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # transparent pixel reads as black
    Image.fromarray(rgba, "RGBA").save(img / "rgba.png")
    Image.new("1", (4, 4), 1).save(img / "bw.png")
    anns = [{"image_id": n, "caption": "c"} for n in ("i16", "pal", "rgba", "bw")]
    ds = CaptionDataset(tmp_path, write_ann(tmp_path / "a.json", anns))
    out = {ds.record(i)["image_id"]: ds[i]["image"] for i in range(len(ds))}
    assert all(im.mode == "L" and im.size == (4, 4) for im in out.values())
    i16 = np.asarray(out["i16"])
    assert i16.min() == 0 and i16.max() == 255  # the film's own range spread over 8 bits
    assert np.asarray(out["rgba"])[0, 0] == 0 and np.asarray(out["rgba"])[1, 1] == 200
    assert np.asarray(out["bw"]).max() == 255


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"images": []}', r"ann\.json: expected an object .*found keys \['images'\]"),
        ("[1, 2]", r"ann\.json: expected an object .*found a JSON list"),
        ('{"annotations": {"a": 1}}', r'"annotations" must be a list, found dict'),
        ('{"annotations": [1]}', r"annotations\[0\] must be an object"),
        ('{"annotations": [{"image_id": "a", "caption": "x"}, {"image_id": "a"}]}',
         r"annotations\[1\] has no 'caption'"),
        ('{"annotations": [{"caption": "x"}]}', r"annotations\[0\] has no 'image_id'"),
        ('{"annotations": [{"image_id": 7, "caption": "x"}]}', r"\[0\]\['image_id'\] must be a string, found int"),
        ('{"annotations": [{"image_id": "a", "caption": ["x"]}]}', r"\['caption'\] must be a string, found list"),
        ('{"annotations": [{"image_id": "a", "caption": "  "}]}', r"annotations\[0\]\['caption'\] is empty"),
        ('{"annotations": [{"image_id": "", "caption": "x"}]}', r"\['image_id'\] is empty"),
        ('{"annotations": [{"image_id": "../secret", "caption": "x"}]}', r"'\.\./secret' points outside"),
        ('{"annotations": [{"image_id": "/etc/passwd", "caption": "x"}]}', r"'/etc/passwd' points outside"),
        ('{"annotations": [{"image_id": "C:\\\\x", "caption": "x"}]}', r"points outside"),
        ('{"annotations": [\n{"image_id": "a",}]}', r"ann\.json:2:\d+: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_annotation_files(root, content, match):
    (root / "ann.json").write_text(content)
    with pytest.raises(AnnotationError, match=match):
        CaptionDataset(root, root / "ann.json")


def test_missing_annotation_file_and_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Annotation file not found"):
        read_annotations(tmp_path / "none.json")
    ann = write_ann(tmp_path / "ann.json", [{"image_id": "a", "caption": "x"}])
    with pytest.raises(FileNotFoundError, match=r"Image folder not found: .*image"):
        CaptionDataset(tmp_path, ann)


def test_missing_image_error_or_skip(root):
    anns = [{"image_id": "a", "caption": "x"}, {"image_id": "ghost", "caption": "y"}, {"image_id": "b", "caption": "z"}]
    ann = write_ann(root / "ann.json", anns)
    with pytest.raises(
        FileNotFoundError, match=r"annotations\[1\] image_id 'ghost' has no image; tried .*ghost\.jpg.*ghost\.png"
    ):
        CaptionDataset(root, ann)
    ds = CaptionDataset(root, ann, on_missing="skip")
    assert len(ds) == 2 and ds.num_skipped == 1
    assert [ds.record(i)["image_id"] for i in range(2)] == ["a", "b"]
    with pytest.raises(ValueError, match="on_missing must be one of"):
        CaptionDataset(root, ann, on_missing="ignore")


def test_corrupt_image_names_file_and_entry(root):
    (root / "image" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    ds = CaptionDataset(root, write_ann(root / "ann.json", [{"image_id": "a", "caption": "x"},
                                                            {"image_id": "bad", "caption": "y"}]))  # fmt: skip
    assert ds[0]["caption"] == "x"
    with pytest.raises(ImageReadError, match=r"bad\.png.*annotations\[1\], image_id 'bad'"):
        ds[1]


def test_symlink_leaving_the_image_folder_is_refused(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "x.png"
    Image.new("L", (4, 4)).save(outside)
    os.symlink(outside, root / "image" / "link.png")
    with pytest.raises(AnnotationError, match="resolves outside"):
        CaptionDataset(root, write_ann(root / "ann.json", [{"image_id": "link", "caption": "x"}]))
