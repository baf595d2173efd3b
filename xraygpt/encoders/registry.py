"""One entry point: `build_encoder(EncoderConfig) -> frozen ImageEncoder`, and the list of what it can build.

Backends import their heavy dependencies (open_clip, transformers, torchvision) only when built.
"""

from __future__ import annotations

import torch

from xraygpt.encoders.base import RANDOM_INIT_SEED, EncoderConfig, ImageEncoder, closest, project_config_names

ENCODER_TYPES = ("open_clip", "medclip", "hf_clip")


def _encoder_class(type_: str) -> type[ImageEncoder]:
    if type_ == "open_clip":
        from xraygpt.encoders.open_clip_encoder import OpenClipEncoder

        return OpenClipEncoder
    if type_ == "medclip":
        from xraygpt.encoders.medclip import MedClipEncoder

        return MedClipEncoder
    if type_ == "hf_clip":
        from xraygpt.encoders.hf_clip import HFClipEncoder

        return HFClipEncoder
    raise ValueError(f"Unknown encoder type '{type_}'.{closest(type_, list(ENCODER_TYPES))} "
                     f"Valid types: {list(ENCODER_TYPES)}; valid encoders: {list_encoders()}")


def build_encoder(cfg: EncoderConfig | dict) -> ImageEncoder:
    """Build the encoder `cfg` names, frozen: no parameter requires grad and it stays in eval mode.

    Without a checkpoint the weights are a random init under a fixed seed (RANDOM_INIT_SEED), drawn
    without touching the caller's RNG state, so 'Baseline' features are reproducible and cacheable.
    """
    if isinstance(cfg, dict):
        cfg = EncoderConfig.from_dict(cfg)
    cls = _encoder_class(cfg.type)
    if cfg.feature == "labels" and cfg.type != "open_clip":
        raise ValueError(f"encoder.feature=labels reads a stage-0 label head, which only open_clip checkpoints "
                         f"carry; encoder.type={cfg.type} supports feature=patch or pooled")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        encoder = cls(cfg)
    return encoder.freeze()


def list_encoders() -> list[str]:
    """'open_clip:<name>' for the project's configs, the MedCLIP variants and 'hf_clip'.

    open_clip's own configs (open_clip.list_models()) are valid names too; they are not listed here.
    """
    return [f"open_clip:{n}" for n in project_config_names()] + ["medclip:vit", "medclip:resnet", "hf_clip"]
