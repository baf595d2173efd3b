"""OpenI / IU X-ray: reports (via the project's one XML reader) mapped to their PNG images.

A report `CXR1384` lists its images as <parentImage id="CXR1384_IM-0242-1001">, stored as
NLMCXR_png/CXR1384_IM-0242-1001.png. The original XrayGPT code names images "<report number>_<k>" ("1384_1",
k counting from 1 in the report's image order) and opens `<vis_root>/<image_id>.png`; `image_id_style` picks
that or the plain stem. OpenI has no official split, so val/test are a seeded hash of the report id.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from xraygpt.data.reports import read_reports

from .config import OpenIConfig
from .mimic import DatasetRead, ImageRef


def original_image_id(report_id: str, index: int) -> str:
    """"CXR1384", 0 -> "1384_1": the original code's id for the report's first image."""
    number = re.sub(r"^\D+", "", report_id)
    return f"{number}_{index + 1}"


def hash_split(report_id: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """train/val/test from a seeded hash: stable for a report whatever else is in the run."""
    u = int(hashlib.sha256(f"{seed}:{report_id}".encode()).hexdigest()[:12], 16) / 16**12
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_openi(cfg: OpenIConfig, embedded: bool = False) -> DatasetRead:
    """All reports with their images. `embedded`: the IU reports shipped in the torchxrayvision wheel."""
    if embedded:
        from xraygpt.assets import iu_reports_tgz

        source = iu_reports_tgz()
    else:
        source = Path(str(cfg.reports))
    reports = read_reports(source)
    images_root = Path(cfg.images_dir) if cfg.images_dir else None
    counts: Counter[str] = Counter(reports_read=len(reports))
    images: dict[str, list[ImageRef]] = {}
    for r in reports:
        split = hash_split(r.report_id, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        refs = []
        for k, stem in enumerate(r.image_ids):
            counts["images_listed"] += 1
            if images_root is not None and not (images_root / f"{stem}.png").is_file():
                counts["images_missing"] += 1
                continue
            image_id = original_image_id(r.report_id, k) if cfg.image_id_style == "original" else stem
            refs.append(ImageRef(image_id=image_id, path=f"{stem}.png", split=split))
        if not r.image_ids:
            counts["reports_without_images"] += 1
        images[r.report_id] = refs
    inputs = {"reports": str(source), "images_dir": str(cfg.images_dir), "image_id_style": cfg.image_id_style}
    return DatasetRead(reports=reports, images=images, counts=dict(counts), inputs=inputs)
