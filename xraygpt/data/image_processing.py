"""Chest films from disk to normalised pixel tensors: `load_image` and `ImageTransform`.

    file (PNG 8/16-bit, palette, RGBA, JPEG, DICOM) --load_image--> PIL 'L' or 'RGB' (8-bit)
        --ImageTransform--> grayscale -> resize (crop | pad | squash, bicubic) -> [0, 1]
                            -> 3 channels -> (x - mean) / std  ==>  float32 (3, S, S)

The encoder decides size, statistics and resize mode (`encoder.processing`), so the same film always
reaches a given encoder the way it was trained. Evaluation is deterministic; training adds only mild,
caller-seeded jitter and never flips left/right (the heart's side is anatomy, not noise).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from xraygpt.encoders.base import ImageProcessingConfig

DICOM_SUFFIXES = (".dcm", ".dicom")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageReadError(ValueError):
    """An image file that exists but cannot be decoded (empty, truncated, not an image)."""


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map an array's actual [min, max] onto [0, 255] (a constant image becomes all zeros)."""
    array = array.astype(np.float64)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _over_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite onto black: transparent pixels carry no film, so they read as no signal."""
    weight = alpha.astype(np.float64)[..., None] / 255.0 if rgb.ndim == 3 else alpha.astype(np.float64) / 255.0
    return np.round(rgb.astype(np.float64) * weight).astype(np.uint8)


def to_8bit(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit 'L' (single-channel sources) or 'RGB' (colour sources)."""
    mode = image.mode
    if mode in HIGH_BIT_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), mode="L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    mode = image.mode
    if mode == "L":
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "LA":
        arr = np.asarray(image)
        return Image.fromarray(_over_black(arr[..., 0], arr[..., 1]), mode="L")
    if mode == "RGBA":
        arr = np.asarray(image)
        return Image.fromarray(_over_black(arr[..., :3], arr[..., 3]), mode="RGB")
    return image.convert("RGB")  # RGB, CMYK, YCbCr, LAB, HSV, RGBX ...


def _load_dicom(path: Path) -> Image.Image:
    try:
        import pydicom
    except ImportError as e:
        raise ImportError(f"{path} is a DICOM file; reading DICOM needs the 'dicom' extra: "
                          f"pip install 'xraygpt[dicom]' (or pip install pydicom)") from e
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken files / missing codecs
        raise ImageReadError(f"Cannot read DICOM pixels from {path}: {e}") from e
    if ds.get("SamplesPerPixel", 1) == 3:
        return Image.fromarray(_scale_to_uint8(pixels), mode="RGB")
    pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)  # rescale slope/intercept, then window
    if pixels.ndim == 3:  # multi-frame: the first frame
        pixels = pixels[0]
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # bright = low values: invert
        pixels = pixels.max() - pixels
    return Image.fromarray(_scale_to_uint8(pixels), mode="L")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read a film as an 8-bit PIL image ('L' or 'RGB'); a clear error naming the file when it cannot be read.

    16-bit and float images are scaled to 8 bits by their actual range; palette images are expanded;
    alpha is composited onto black; EXIF rotation is applied; DICOM goes through pydicom (optional).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"Image file {path} is empty (0 bytes): re-export or re-copy it, or leave it out.")
    if _is_dicom(path):
        return _load_dicom(path)
    try:
        with Image.open(path) as image:
            image.seek(0)  # multi-frame files: the first frame
            image.load()  # decode now, so truncation fails here and not deep inside a DataLoader
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"Cannot read image {path}: {e} (truncated, corrupt or not an image?): re-export or "
                             f"re-copy it, or leave it out.") from e
    return to_8bit(image)


class ImageTransform:
    """PIL image or path -> float32 tensor (3, S, S) laid out for the encoder that `processing` describes.

    train=True adds mild jitter (crop scale 0.9-1, rotation +-5 degrees, brightness/contrast +-10%) drawn
    from the `generator` the caller passes per sample (no left-right flips: laterality matters).
    """

    def __init__(self, processing: ImageProcessingConfig, train: bool = False):
        self.processing = processing
        self.train = train
        self.mean = torch.tensor(processing.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(processing.std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"ImageTransform({self.processing}, train={self.train})"

    def resize(self, image: Image.Image) -> Image.Image:
        """Bring the image to (S, S) by the processing's resize mode, bicubic."""
        size, (w, h) = self.processing.image_size, image.size
        if (w, h) == (size, size):
            return image
        if self.processing.resize == "squash":
            return image.resize((size, size), Image.Resampling.BICUBIC)
        if self.processing.resize == "pad":  # black square around the film, then resize
            side = max(w, h)
            square = Image.new(image.mode, (side, side), 0)
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            return square if side == size else square.resize((size, size), Image.Resampling.BICUBIC)
        # crop: shorter side to S (long side truncated as torchvision does), then the central S x S
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
        return image.crop((left, top, left + size, top + size))

    def _jitter_geometry(self, image: Image.Image, g: torch.Generator | None) -> Image.Image:
        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=g))

        angle = uniform(-5.0, 5.0)
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=0)
        w, h = image.size
        scale = math.sqrt(uniform(0.9, 1.0))  # area fraction kept
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        left, top = round(uniform(0, w - cw)), round(uniform(0, h - ch))
        return image.crop((left, top, left + cw, top + ch))

    def __call__(self, image: Image.Image | str | os.PathLike, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        elif isinstance(image, Image.Image):
            image = to_8bit(image)
        else:
            raise TypeError(f"ImageTransform takes a PIL image or a path, got {type(image).__name__}")
        image = image.convert("L" if self.processing.grayscale_to_rgb else "RGB")
        if self.train:
            image = self._jitter_geometry(image, generator)
        image = self.resize(image)

        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (S, S) or (S, S, 3) in [0, 1]
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        if self.train:
            brightness = (torch.rand((), generator=generator) - 0.5) * 0.2
            contrast = 1.0 + (torch.rand((), generator=generator) - 0.5) * 0.2
            pixels = ((pixels - pixels.mean()) * contrast + pixels.mean() + brightness).clamp(0.0, 1.0)
        if pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1)
        return ((pixels - self.mean) / self.std).contiguous()  # (3, S, S)
