"""Read XrayGPT's original dataset layout: `<root>/image/<image_id>.{jpg,png}` + `{"annotations": [...]}`.

Every annotation is checked when the dataset is built, so a bad file fails at start-up with the file, the
entry's index and the key at fault, instead of crashing a DataLoader worker an hour into training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image

IMAGE_SUBDIR = "image"
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")  # tried in this order after the bare id
ON_MISSING = ("error", "skip")
FIX_ENTRY = ('every entry must be {"image_id": "<file name without extension>", "caption": "<report text>"} with '
             "non-empty strings; fix or remove this entry")


class AnnotationError(ValueError):
    """An annotation file that is not in the {"annotations": [{"image_id", "caption"}]} format."""


def read_annotations(ann_file: Path) -> list[dict[str, Any]]:
    """Load and validate an annotation file; returns its list of entries (each with str image_id, caption)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"Annotation file not found: {ann_file} (check the dataset root and the annotation "
                                f"file name, e.g. data.root / data.ann_file in a config)")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{ann_file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); fix the syntax there "
                              f"(a JSON validator shows it) or regenerate the file") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{ann_file}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict) or "annotations" not in data:
        found = f"keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise AnnotationError(
            f'{ann_file}: expected an object {{"annotations": [{{"image_id": ..., "caption": ...}}, ...]}}, '
            f"found {found}"
        )
    anns = data["annotations"]
    if not isinstance(anns, list):
        raise AnnotationError(f'{ann_file}: "annotations" must be a list, found {type(anns).__name__}')
    for i, a in enumerate(anns):
        where = f"{ann_file}: annotations[{i}]"
        if not isinstance(a, dict):
            raise AnnotationError(f"{where} must be an object, found {type(a).__name__}")
        for key in ("image_id", "caption"):
            if key not in a:
                raise AnnotationError(f"{where} has no {key!r} (keys: {sorted(a)}); {FIX_ENTRY}")
            if not isinstance(a[key], str):
                raise AnnotationError(f"{where}[{key!r}] must be a string, found {type(a[key]).__name__}: {a[key]!r}; "
                                      f"{FIX_ENTRY}")
        if not a["image_id"].strip():
            raise AnnotationError(f"{where}['image_id'] is empty; {FIX_ENTRY}")
        if not a["caption"].strip():
            raise AnnotationError(f"{where}['caption'] is empty (image_id {a['image_id']!r}); {FIX_ENTRY}")
        _check_image_id(a["image_id"], where)
    return anns


def _check_image_id(image_id: str, where: str) -> None:
    """Refuse ids that would read outside the image folder (absolute paths, '..', drive letters)."""
    for pure in (PurePosixPath(image_id), PureWindowsPath(image_id)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise AnnotationError(f"{where}['image_id'] {image_id!r} points outside the image folder; "
                                  "ids must be relative names like 'CXR1_1_IM-0001-3001'")  # fmt: skip


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any PIL mode (16-bit, float, palette, RGBA, RGB, 1-bit) -> 8-bit 'L'."""
    from xraygpt.data.image_processing import to_8bit  # one place decides how 16-bit films are scaled

    image = to_8bit(image)
    return image if image.mode == "L" else image.convert("L")


class CaptionDataset:
    """Image/caption pairs in the original XrayGPT format; item i is {"image", "caption", "image_id"}.

    root: dataset folder holding `image/`.
    ann_file: annotation JSON (filter_cap.json or a split file).
    transform: applied to the 8-bit grayscale PIL image (e.g. ImageTransform); None keeps the PIL image.
    on_missing: "error" (default) raises on the first annotation without an image file; "skip" drops such
        annotations and counts them in `num_skipped`.
    """

    def __init__(
        self,
        root: Path,
        ann_file: Path,
        transform: Callable[[Image.Image], Any] | None = None,
        on_missing: str = "error",
    ):
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
        self.root = Path(root)
        self.image_root = self.root / IMAGE_SUBDIR
        self.ann_file = Path(ann_file)
        self.transform = transform
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"Image folder not found: {self.image_root} (expected <root>/{IMAGE_SUBDIR}/)")
        anns = read_annotations(self.ann_file)
        self.annotations: list[dict[str, str]] = []
        self._paths: list[Path] = []
        self._source_index: list[int] = []  # position of each kept entry in the annotation file
        self.num_skipped = 0
        for i, a in enumerate(anns):
            path, tried = self._resolve(a["image_id"])
            if path is None:
                if on_missing == "skip":
                    self.num_skipped += 1
                    continue
                raise FileNotFoundError(
                    f"{self.ann_file}: annotations[{i}] image_id {a['image_id']!r} has no image; tried "
                    + ", ".join(str(p) for p in tried)
                    + ". Add the image, or drop such entries with on_missing='skip' (data.on_missing=skip in a "
                    "training config)"
                )
            if path.stat().st_size == 0:  # cheap, and found now rather than an hour into training
                from xraygpt.data.image_processing import ImageReadError

                raise ImageReadError(f"{self.ann_file}: annotations[{i}] image_id {a['image_id']!r}: image {path} is "
                                     f"empty (0 bytes); re-export or re-copy it, or remove the entry")
            self.annotations.append({"image_id": a["image_id"], "caption": a["caption"]})
            self._paths.append(path)
            self._source_index.append(i)

    def _resolve(self, image_id: str) -> tuple[Path | None, list[Path]]:
        names = [image_id] if image_id.lower().endswith(IMAGE_SUFFIXES) else []
        names += [image_id + s for s in IMAGE_SUFFIXES]
        tried = [self.image_root / n for n in names]
        root = self.image_root.resolve()
        for p in tried:
            if p.is_file():
                if not p.resolve().is_relative_to(root):  # a symlink leading out of the folder
                    raise AnnotationError(f"{self.ann_file}: image {p} resolves outside {root}")
                return p, tried
        return None, tried

    def __len__(self) -> int:
        return len(self.annotations)

    def record(self, i: int) -> dict[str, str]:
        """The annotation of item i ({"image_id", "caption"}) without loading its image."""
        return self.annotations[i]

    def image_path(self, i: int) -> Path:
        return self._paths[i]

    def load_image(self, i: int) -> Image.Image:
        """Item i's image as 8-bit grayscale; errors name the file, the index and the image id."""
        from xraygpt.data.image_processing import ImageReadError, load_image

        path = self._paths[i]
        try:
            image = load_image(path)
        except ImageReadError as e:
            raise ImageReadError(f"{e} [{self.ann_file}: annotations[{self._source_index[i]}], image_id "
                                 f"{self.annotations[i]['image_id']!r}]") from e  # fmt: skip
        return to_grayscale(image)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.load_image(i)
        a = self.annotations[i]
        return {
            "image": self.transform(image) if self.transform is not None else image,
            "caption": a["caption"],
            "image_id": a["image_id"],
        }
