"""Frozen image encoders: `build_encoder(EncoderConfig(...))` -> (B, 3, H, W) -> (B, T_img, D_img).

Importing this package is cheap (torch only); open_clip / transformers load when an encoder is built.
The stage-0 helpers (`build_open_clip_model`, `get_open_clip_tokenizer`, `save_open_clip_checkpoint`)
are re-exported lazily from `xraygpt.encoders.open_clip_encoder`.
"""

from xraygpt.encoders.base import EncoderConfig, ImageEncoder, ImageProcessingConfig
from xraygpt.encoders.registry import ENCODER_TYPES, build_encoder, list_encoders

_OPEN_CLIP_HELPERS = ("build_open_clip_model", "get_open_clip_tokenizer", "save_open_clip_checkpoint")

__all__ = [
    "ENCODER_TYPES",
    "EncoderConfig",
    "ImageEncoder",
    "ImageProcessingConfig",
    "build_encoder",
    "build_open_clip_model",
    "get_open_clip_tokenizer",
    "list_encoders",
    "save_open_clip_checkpoint",
]


def __getattr__(name: str):
    if name in _OPEN_CLIP_HELPERS:
        from xraygpt.encoders import open_clip_encoder

        return getattr(open_clip_encoder, name)
    raise AttributeError(f"module 'xraygpt.encoders' has no attribute '{name}'")
