"""One evaluation run: generate predictions (and the shuffled-image control), then the metric tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from xraygpt.eval.generate import EvalConfig, generate_predictions, load_model
from xraygpt.eval.tables import compare, to_markdown, write_tables
from xraygpt.model import XrayGPT


def evaluate(cfg: EvalConfig, model: XrayGPT | None = None) -> dict[str, Any]:
    """Predictions for the split, tables (md/json/csv) in cfg.output_dir; returns the report dict. `model`: an
    already loaded model (a notebook's, or one evaluated several ways) instead of loading `cfg.ckpt`."""
    if cfg.device == "cuda" and not torch.cuda.is_available():  # before minutes of model loading
        raise RuntimeError("device=cuda but no CUDA/ROCm GPU is visible to torch; use device=cpu (or auto)")
    model = model if model is not None else load_model(cfg.ckpt, cfg.model)
    runs, names = [generate_predictions(cfg, model)], [cfg.name]
    if cfg.control and not cfg.shuffle_images:
        control = dataclasses.replace(cfg, shuffle_images=True, output_dir=str(Path(cfg.output_dir) / "control"))
        runs.append(generate_predictions(control, model))
        names.append(f"{cfg.name} (shuffled images)")
    report = compare(runs, names=names, metrics=cfg.metrics, bootstrap=cfg.bootstrap, seed=cfg.seed)
    paths = write_tables(report, cfg.output_dir)
    report["table_markdown"] = to_markdown(report)
    report["files"] = {k: str(v) for k, v in paths.items()}
    return report
