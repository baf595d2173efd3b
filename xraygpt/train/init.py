"""How a run's projection starts: from an earlier stage (our output dir / model dir, or an original .pth), or
freshly initialised at the LLM's embedding scale."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from xraygpt.model import CONFIG_NAME, WEIGHTS_NAME, XrayGPT
from xraygpt.train import checkpoint as ckpt

log = logging.getLogger(__name__)


class IncompatibleInitError(ValueError):
    """The checkpoint was trained for another encoder or LLM."""


def find_model_dir(source: Path) -> Path:
    """A folder holding xraygpt_config.json: the source itself, its final/ or best/, or its latest checkpoint."""
    if (source / CONFIG_NAME).is_file():
        return source
    for name in ("final", "best"):
        if (source / name / CONFIG_NAME).is_file():
            return source / name
    latest = ckpt.latest_checkpoint(source)
    if latest is not None and (latest / CONFIG_NAME).is_file():
        return latest
    raise FileNotFoundError(f"run.init_from={source}: no trained model found there (looked for {CONFIG_NAME} in it, "
                            f"in final/, best/ and in its latest checkpoint)")


def _identity(model_cfg: dict) -> tuple[str, str]:
    enc = model_cfg["encoder"]
    encoder = f"{enc['type']}:{enc['name']}" + (f" ({enc['checkpoint']})" if enc.get("checkpoint") else "")
    return encoder, model_cfg["llm"]["name_or_path"]


def init_projection(model: XrayGPT, source: str | Path) -> Path:
    """Load the trained projection from `source` into `model`, refusing another encoder/LLM pair."""
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"run.init_from={source} does not exist")
    if source.is_file():
        model.load_original_checkpoint(source)
        log.info("projection initialised from original checkpoint %s", source)
        return source
    folder = find_model_dir(source)
    saved = json.loads((folder / CONFIG_NAME).read_text())["model"]
    theirs = _identity(saved)
    ours = _identity({"encoder": vars(model.config.encoder), "llm": vars(model.config.llm)})
    if theirs != ours:
        raise IncompatibleInitError(
            f"run.init_from={folder} was trained with encoder {theirs[0]} and LLM {theirs[1]}, but this run uses "
            f"encoder {ours[0]} and LLM {ours[1]}. Point model.encoder / model.llm at the same ones, or train "
            f"stage 1 again for this pair.")
    model.load_trainable(folder / WEIGHTS_NAME)
    log.info("projection initialised from %s", folder)
    return folder


@torch.no_grad()
def scale_projection_to_embeddings(model: XrayGPT, features: torch.Tensor) -> float:
    """Rescale a fresh projection so image embeds start with the norm of the LLM's token embeddings.

    nn.Linear's default init maps encoder features (e.g. label logits of magnitude ~5) to embeds ~20x larger than
    any word's: the frozen LLM then reads the image slot as out-of-distribution noise until the projection has
    unlearnt that scale. `features` (N, T, D_img) is a sample of training features; returns the factor applied.
    """
    proj = model.llama_proj
    words = model.llm.get_input_embeddings().weight.float().norm(dim=-1).mean()  # mean word-embedding norm
    current = model.project(features).float().norm(dim=-1).mean()  # (N, T) -> mean image-embed norm
    factor = float(words / current.clamp_min(1e-12))
    proj.weight.mul_(factor)
    if proj.bias is not None:
        proj.bias.mul_(factor)
    log.info("projection scaled by %.4f: image embeds start at the word-embedding norm %.3f", factor, float(words))
    return factor


def feature_sample(model: XrayGPT, dataset, cached: np.ndarray | None, n: int = 64) -> torch.Tensor:
    """Encoder features (n, T, D_img) of the first n training samples: from the feature cache when there is one."""
    n = min(n, len(dataset))
    if cached is not None:
        return torch.from_numpy(np.array(cached[:n], dtype=np.float32))  # a copy: the cache is a read-only memmap
    pixels = torch.stack([dataset[i]["image"] for i in range(n)])
    return model.get_image_features(pixels).float()
