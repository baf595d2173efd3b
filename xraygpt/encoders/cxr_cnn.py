"""A small VGG-style chest-film CNN, registered as a timm model so open_clip builds it as a timm tower.

Why a VGG: the embedded films carry findings as small local signs (a 1-2 pixel granuloma, a thin wire) as
well as global ones (heart size). Strided stems and average pooling wash the small ones out when only
~2,400 films train the tower from scratch; 3x3 convolutions at full resolution with max-pool downsampling,
pooled with avg+max, keep them (benchmarks/probe_embedded_data.py measured this design's probe).

    film (B, 3, S, S) -> [conv3x3 - BN - ReLU - maxpool 2x2] x len(widths) -> (B, C, S/16, S/16)
                      -> global pool (timm's, "avgmax" in the project config) -> (B, C)

Only the trunk lives here; open_clip adds the projection (`timm_proj: linear`) to the embedding width.
"""

from __future__ import annotations

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import register_model
from torch import nn


class CxrCNN(nn.Module):
    """timm-style trunk: forward_features -> (B, C, h, w); forward_head pools (and classifies if num_classes)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), in_chans: int = 3, num_classes: int = 0,
                 global_pool: str = "avgmax", **kwargs):  # fmt: skip
        super().__init__()
        if kwargs:
            raise TypeError(f"CxrCNN got unexpected arguments: {sorted(kwargs)}")
        layers: list[nn.Module] = []
        for a, b in zip((in_chans, *widths[:-1]), widths):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]  # fmt: skip
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]
        self.default_cfg = self.pretrained_cfg = {"pool_size": None, "num_classes": num_classes}
        self.reset_classifier(num_classes, global_pool)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", "max", "avgmax"):
                raise ValueError(f"CxrCNN pools with avg, max or avgmax (same width), not {global_pool!r}")
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, 3, S, S) -> (B, C, S/2^k, S/2^k)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)  # (B, C)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _own_kwargs(name: str, pretrained: bool, kwargs: dict) -> dict:
    """The kwargs a project trunk takes: refuses pretrained weights, drops timm's pretrained-config keys."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; stage 0 trains it (scripts/train_encoder.py)")
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


@register_model
def cxr_vgg_tiny(pretrained: bool = False, **kwargs) -> CxrCNN:
    """4 stages, widths 16-32-64-128: 128 px films -> an 8x8 grid of 128 channels (~100k parameters)."""
    return CxrCNN(**_own_kwargs("cxr_vgg_tiny", pretrained, kwargs))


@register_model
def cxr_vgg_vit_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """A small hybrid ViT: the VGG stem above (3 stages, 128 px -> 16x16x64), 2x2 patches -> 64 tokens of width
    128, 4 pre-norm transformer blocks (4 heads), average-pooled. Plain ViTs trained from scratch on the ~2,400
    embedded films stay at chance (README); the convolutional stem gives the transformer local features to mix."""
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    kwargs = _own_kwargs("cxr_vgg_vit_tiny", pretrained, kwargs)
    stem = CxrCNN(widths=(16, 32, 64), in_chans=kwargs.get("in_chans", 3)).features  # (B, 64, S/8, S/8)
    # fc_norm=False: the final LayerNorm acts per token before the average pool (as open_clip's ln_post), so the
    # patch tokens later stages read are normalised and their mean is exactly what the pool embeds
    args = dict(img_size=128, patch_size=2, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, class_token=False,
                global_pool="avg", fc_norm=False, num_classes=0)  # fmt: skip
    args.update(kwargs)
    model = VisionTransformer(embed_layer=partial(HybridEmbed, backbone=stem), **args)
    model.default_cfg = model.pretrained_cfg = {"pool_size": None, "num_classes": 0}  # what open_clip reads
    return model
