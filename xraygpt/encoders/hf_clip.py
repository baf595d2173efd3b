"""HF `CLIPVisionModel` folders (openai/CLIP conversions, PubMedCLIP, CXR-CLIP exports ...), loaded offline.

Features (B, T, D): hidden state `encoder.layer` (-1 = last_hidden_state, -2 = penultimate as in LLaVA)
without the class token for feature="patch"; the post-LayerNorm class token for feature="pooled".
Processing comes from the folder's `preprocessor_config.json` (image_mean / image_std / crop_size) when
present, else CLIP's defaults.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from xraygpt.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderConfig,
    ImageEncoder,
    ImageProcessingConfig,
    require_path,
)


def _size_from(value, default: int) -> int:
    """HF processors write sizes as an int, {"shortest_edge": n} or {"height": h, "width": w}."""
    if value is None:
        return default
    if isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if value.get("height") != value.get("width"):
        raise ValueError(f"Only square encoder inputs are supported, preprocessor says {value}")
    return int(value["height"])


def read_processing(folder: Path | None, model_image_size: int, override: int | None) -> ImageProcessingConfig:
    pre = {}
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        pre = json.loads((folder / "preprocessor_config.json").read_text())
    size = override or _size_from(pre.get("crop_size"), _size_from(pre.get("size"), model_image_size))
    mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)
    if len(mean) == 1:  # grayscale processors
        mean, std = mean * 3, std * 3
    resize = "crop" if pre.get("do_center_crop", True) else "squash"
    return ImageProcessingConfig(size, tuple(mean), tuple(std), True, resize)


class HFClipEncoder(ImageEncoder):
    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        folder = None
        if config.checkpoint is None:
            self.clip = CLIPVisionModel(CLIPVisionConfig(**config.arch))
        else:
            folder = require_path(config.checkpoint, "hf_clip checkpoint folder")
            if not (folder.is_dir() and (folder / "config.json").is_file()):
                raise FileNotFoundError(
                    f"hf_clip needs a folder written by save_pretrained (with config.json); got {folder}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # full-CLIP folders warn about the unused text tower
                self.clip = CLIPVisionModel.from_pretrained(folder, local_files_only=True, **config.arch)
        vcfg = self.clip.config
        n_states = vcfg.num_hidden_layers + 1  # embeddings + every layer
        if not -n_states <= config.layer < n_states:
            raise ValueError(f"encoder.layer={config.layer} is out of range for {vcfg.num_hidden_layers} layers "
                             f"(use -1 for the last, -2 for the penultimate).")
        self.processing = read_processing(folder, vcfg.image_size, config.image_size)
        self.interpolate = self.processing.image_size != vcfg.image_size
        self.hidden_size = vcfg.hidden_size
        grid = self.processing.image_size // vcfg.patch_size
        self.num_tokens = 1 if config.feature == "pooled" else grid * grid

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_states = self.config.feature == "patch" and self.config.layer != -1
        out = self.clip(pixel_values=pixel_values, output_hidden_states=want_states,
                        interpolate_pos_encoding=self.interpolate)
        if self.config.feature == "pooled":
            return out.pooler_output[:, None]  # (B, 1, D) class token after post_layernorm
        states = out.hidden_states[self.config.layer] if want_states else out.last_hidden_state
        return states[:, 1:]  # (B, grid*grid, D) without the class token
