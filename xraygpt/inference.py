"""Inference on films: load a trained model, turn paths / PIL images / tensors into pixels, summarise in batches.

    images (paths | PIL | (3, S, S) | (B, 3, S, S))
      -> load_image + ImageTransform (the encoder's own processing)   pixels (N, 3, S, S)
      -> XrayGPT.generate, batch_size films at a time                  one summary per film

Greedy decoding with a float32 LLM is batch-invariant, so `summarize(films, batch_size=8)` equals summarising
them one by one (tested); a bfloat16/float16 LLM (`llm.dtype`) can change a film's output with the batch it is in.
Files are decoded one batch at a time, so a long list never sits in memory as pixels.
The command line (`scripts/infer.py`) and the web demo (`xraygpt.web`) build on these functions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image

from xraygpt.conversation import DEFAULT_INSTRUCTION
from xraygpt.data.image_processing import ImageReadError, ImageTransform, load_image
from xraygpt.model import CONFIG_NAME, GenerationConfig, ModelConfig, XrayGPT

log = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor]
# What a single unreadable file raises; anything else is a bug and propagates.
READ_ERRORS = (ImageReadError, FileNotFoundError, IsADirectoryError, PermissionError, ImportError)


# ------------------------------------------------------------------------------------------ generation settings
def generation_config(base: GenerationConfig | None = None, **overrides: Any) -> GenerationConfig:
    """`base` (default: greedy GenerationConfig) with keyword overrides, checked early with a clear message."""
    valid = [f.name for f in fields(GenerationConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"unknown generation setting(s) {unknown}; valid: {valid}")
    gen = GenerationConfig(**{**asdict(base or GenerationConfig()), **overrides})
    if gen.num_beams < 1 or gen.max_new_tokens < 1:
        raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {gen.num_beams} and {gen.max_new_tokens}")
    if gen.do_sample and gen.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {gen.temperature} (use do_sample=False for "
                         f"greedy decoding)")
    if not 0 < gen.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {gen.top_p}")
    return gen


# ---------------------------------------------------------------------------------------------- image inputs
def is_single(images: ImageLike | Sequence[ImageLike]) -> bool:
    """One film (a path, a PIL image, a (3, S, S) tensor) as opposed to a list or a (B, 3, S, S) batch."""
    if isinstance(images, torch.Tensor):
        return images.dim() == 3
    return isinstance(images, (str, os.PathLike, Image.Image))


def as_items(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """Flatten the accepted inputs into a list of single films (a batch tensor becomes its rows)."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 4:
            return list(images.unbind(0))
        if images.dim() == 3:
            return [images]
        raise ValueError(f"a pixel tensor must be (3, S, S) or (B, 3, S, S), got shape {tuple(images.shape)}")
    if is_single(images):
        return [images]
    if isinstance(images, Iterable):
        return list(images)
    raise TypeError(f"images must be paths, PIL images or pixel tensors, got {type(images).__name__}")


def to_pixels(image: ImageLike, transform: ImageTransform) -> torch.Tensor:
    """One film -> normalised pixels (3, S, S) for the encoder that `transform` describes.

    Tensors are taken as already normalised by that encoder's ImageTransform (only their shape is checked):
    normalising twice would be a silent accuracy bug.
    """
    if isinstance(image, torch.Tensor):
        size = transform.processing.image_size
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if tuple(image.shape) != (3, size, size):
            raise ValueError(f"pixel tensor of shape {tuple(image.shape)} does not fit the encoder: expected "
                             f"(3, {size}, {size}) normalised pixels (xraygpt.data.image_processing.ImageTransform)")
        if not image.is_floating_point():
            raise ValueError(f"pixel tensor has dtype {image.dtype}: pass float pixels normalised by ImageTransform, "
                             f"or pass the file path / PIL image and let summarize() normalise it")
        return image.float()
    if isinstance(image, (str, os.PathLike)):
        return transform(load_image(image))
    if isinstance(image, Image.Image):
        return transform(image)
    raise TypeError(f"cannot read a film from {type(image).__name__}: give a path, a PIL image or a pixel tensor")


# ------------------------------------------------------------------------------------------------ summaries
@torch.no_grad()
def summarize(model: XrayGPT, images: ImageLike | Sequence[ImageLike], *, question: str = DEFAULT_INSTRUCTION,
              batch_size: int = 8, progress: bool = False, generation: GenerationConfig | None = None,
              **overrides: Any) -> str | list[str]:
    """Summaries of films: a str for one film, a list (same order) for a list or a (B, 3, S, S) batch.

    `overrides` are GenerationConfig fields (num_beams, temperature, top_p, max_new_tokens, repetition_penalty,
    do_sample, ...); the default is deterministic greedy decoding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = generation_config(generation, **overrides)
    single = is_single(images)
    items = as_items(images)
    transform = ImageTransform(model.encoder.processing, train=False)
    bar = _progress_bar(len(items), progress)
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = torch.stack([to_pixels(item, transform) for item in chunk])  # (b, 3, S, S)
        texts += model.generate(pixels, [question] * len(chunk), generation=gen)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return texts[0] if single else texts


@dataclass
class FileSummary:
    """One file's outcome: a summary, or the reason it could not be read."""

    image: str
    question: str
    summary: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@torch.no_grad()
def summarize_files(model: XrayGPT, paths: Sequence[str | os.PathLike], *, question: str = DEFAULT_INSTRUCTION,
                    batch_size: int = 8, progress: bool = False, generation: GenerationConfig | None = None,
                    **overrides: Any) -> Iterator[FileSummary]:
    """Yield one FileSummary per path, in order. An unreadable file yields its error and the rest go on."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = generation_config(generation, **overrides)
    transform = ImageTransform(model.encoder.processing, train=False)
    bar = _progress_bar(len(paths), progress)
    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start:start + batch_size]]
        results = [FileSummary(p, question) for p in chunk]
        pixels, readable = [], []
        for result in results:
            try:
                pixels.append(transform(load_image(result.image)))
                readable.append(result)
            except READ_ERRORS as e:
                result.error = f"{type(e).__name__}: {e}"
        if readable:
            texts = model.generate(torch.stack(pixels), [question] * len(readable), generation=gen)
            for result, text in zip(readable, texts):
                result.summary = text
        if bar is not None:
            bar.update(len(chunk))
        yield from results
    if bar is not None:
        bar.close()


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="summarise", unit="img")


# --------------------------------------------------------------------------------------------- model loading
def load_model_config(path: str | Path) -> ModelConfig:
    """A ModelConfig from YAML: either a whole training/eval config (its `model:` section) or the section alone."""
    from omegaconf import OmegaConf

    from xraygpt.config import ConfigError, from_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    except Exception as e:  # YAML syntax, unresolved interpolation
        raise ConfigError(f"{path}: cannot read the model config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (a `model:` section or the model keys)")
    return from_dict(ModelConfig, data.get("model", data), where=str(path))


def load_model(ckpt: str | Path, cfg: str | Path | None = None, device: str = "auto") -> XrayGPT:
    """A trained model, in eval mode on `device`.

    ckpt: a folder written by `save_pretrained` / scripts/train.py (the folder, its final/ or best/, or its latest
    checkpoint), or an original XrayGPT `.pth`, whose frozen parts come from `cfg` (YAML; default: ModelConfig()).
    """
    from xraygpt.train.init import find_model_dir

    target = resolve_device(device)  # before building anything: a missing GPU is a usage error, found at once
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: give a model folder (save_pretrained or a "
                                f"scripts/train.py output dir) or an original XrayGPT .pth")
    if path.is_file():
        model_cfg = load_model_config(cfg) if cfg is not None else ModelConfig()
        if cfg is None:
            log.info("%s is an original checkpoint and no --cfg was given: using the default model config", path)
        model = XrayGPT(model_cfg)
        model.load_original_checkpoint(path)
    else:
        if cfg is not None:
            log.warning("--cfg %s is ignored: the model folder %s carries its own config", cfg, path)
        try:
            folder = find_model_dir(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} holds no {CONFIG_NAME} (looked in it, in final/, best/ and its latest checkpoint): point "
                f"--ckpt at a folder written by save_pretrained or scripts/train.py, or at an original .pth together "
                f"with --cfg <model yaml>") from None
        model = XrayGPT.from_pretrained(folder)
    return place(model, target).eval()


def place(model: XrayGPT, device: torch.device) -> XrayGPT:
    """Move the model to `device`; an LLM already placed by device_map or quantisation stays where it is."""
    llm_cfg = model.config.llm
    if llm_cfg.device_map is not None or llm_cfg.load_in_8bit or llm_cfg.load_in_4bit:
        model.encoder.to(device)
        model.llama_proj.to(device)
        return model
    return model.to(device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} but no CUDA/ROCm GPU is visible to torch; use --device cpu (or auto)")
    return torch.device(device)
