"""Datasets for a training run: resolve the data root, build the image transform, optionally cache features."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraygpt.data.dataset import CaptionDataset
from xraygpt.data.image_processing import ImageTransform
from xraygpt.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    root: Path
    train: CaptionDataset
    val: CaptionDataset | None
    train_features: np.ndarray | None = None
    val_features: np.ndarray | None = None


class Subset:
    """The first `limit` samples of a CaptionDataset, keeping its record()/image_path() API."""

    def __init__(self, base: CaptionDataset, limit: int):
        self.base, self.n = base, min(limit, len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base[i]

    def record(self, i: int) -> dict[str, Any]:
        return self.base.record(i)

    def image_path(self, i: int) -> Path:
        return self.base.image_path(i)


def resolve_root(cfg: TrainConfig) -> Path:
    if cfg.data.embedded:
        from xraygpt.data.embedded import build_embedded_dataset

        return Path(build_embedded_dataset().root)
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a folder; point it at the dataset (image/ + annotations)")
    return root


def _ann_path(root: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else root / p


def build_datasets(cfg: TrainConfig, model, accelerator) -> TrainData:
    if cfg.run.feature_cache and cfg.data.augment:
        raise ValueError("run.feature_cache=true caches eval-transform features: set data.augment=false, or "
                         "turn the cache off")
    root = resolve_root(cfg)
    processing = model.encoder.processing
    train_tf = ImageTransform(processing, train=cfg.data.augment)
    eval_tf = ImageTransform(processing, train=False)

    def make(name: str, transform, limit: int | None):
        ds = CaptionDataset(root, _ann_path(root, name), transform=transform, on_missing=cfg.data.on_missing)
        if ds.num_skipped and accelerator.is_main_process:
            log.warning("%s: skipped %d samples whose image is missing (data.on_missing=skip)", name, ds.num_skipped)
        return Subset(ds, limit) if limit is not None else ds

    train = make(cfg.data.ann_file, eval_tf if cfg.run.feature_cache else train_tf, cfg.data.limit)
    val = make(cfg.data.val_ann_file, eval_tf, cfg.data.val_limit) if cfg.data.val_ann_file else None
    data = TrainData(root, train, val)
    if cfg.run.feature_cache:
        from xraygpt.train.feature_cache import load_or_build

        kw = dict(accelerator=accelerator, batch_size=max(cfg.run.batch_size, 16), root=cfg.run.feature_cache_dir,
                  progress=cfg.run.progress)
        data.train_features = load_or_build(model.encoder, train, **kw)
        if val is not None:
            data.val_features = load_or_build(model.encoder, val, **kw)
    return data
