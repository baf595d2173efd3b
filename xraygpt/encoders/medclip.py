"""MedCLIP vision towers from the published `pytorch_model.bin`, without the `medclip` package or network.

MedCLIP (Wang et al. 2022, github RyanWangZf/MedCLIP, medclip/modeling_medclip.py) saves one state dict:

    vision_model.model.*                 Swin-tiny (HF SwinModel, "vit" variant) or torchvision ResNet-50
    vision_model.projection_head.weight  (512, 768) for Swin; the ResNet variant's head is model.fc (512, 2048)
    text_model.*, logit_scale            Bio_ClinicalBERT text tower (ignored here)

We rebuild the tower locally (`SwinModel(SwinConfig(...))` / `resnet50(weights=None)`) and load only
`vision_model.model.*`; the projection heads are dropped because XrayGPT projects patch features itself.
Checkpoints written by transformers 4.x name Swin attention weights `attention.self.query` etc.; they are
renamed to whatever the installed transformers uses (transformers 5: `attention.q_proj` ...).

Features: Swin `last_hidden_state` (B, 49, 768) after the final LayerNorm; ResNet the layer4 map (B, 2048, 7, 7)
flattened to (B, 49, 2048). Processing as in MedCLIP's feature extractor: grayscale, pad to square, 224,
mean 0.5862785803043838, std 0.27950088968644304.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from xraygpt.encoders.base import (
    CXR_MEAN,
    CXR_STD,
    EncoderConfig,
    ImageEncoder,
    ImageProcessingConfig,
    closest,
    load_state_dict_file,
    load_strict,
    require_path,
)

VARIANTS = ("vit", "resnet")
WEIGHTS_NAME = "pytorch_model.bin"  # MedCLIP's constants.WEIGHTS_NAME
VISION_PREFIX = "vision_model.model."
MEDCLIP_IMAGE_SIZE = 224

# transformers 4.x Swin names -> transformers 5 names (order matters: attention.output before output).
SWIN_RENAMES = [
    ("attention.self.query.", "attention.q_proj."),
    ("attention.self.key.", "attention.k_proj."),
    ("attention.self.value.", "attention.v_proj."),
    ("attention.self.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]


def checkpoint_file(path: str | Path) -> Path:
    """The weights file: the path itself, or `pytorch_model.bin` / a single safetensors file in a folder."""
    p = require_path(path, "MedCLIP checkpoint")
    if p.is_file():
        return p
    for candidate in (p / WEIGHTS_NAME, p / "model.safetensors"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MedCLIP checkpoint folder {p} holds no {WEIGHTS_NAME} or model.safetensors.")


def vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`vision_model.model.*` of a full MedCLIP state dict, prefix stripped (or the dict if already stripped)."""
    if any(k.startswith(VISION_PREFIX) for k in state):
        return {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    if any(k.startswith("vision_model.") for k in state):
        raise ValueError("Checkpoint has vision_model.* keys but none under vision_model.model.*; "
                         "is this a MedCLIP checkpoint?")
    return state


def rename_swin_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Map transformers-4 Swin names to the installed model's names (or back); drop recomputed buffers."""
    out = {}
    for key, value in state.items():
        if key.endswith("relative_position_index") and key not in model_keys:
            continue  # non-persistent buffer in transformers 5, rebuilt from window_size
        new = key
        if new not in model_keys:
            for old, cur in SWIN_RENAMES:
                new = new.replace(old, cur)
        if new not in model_keys:  # an older transformers that still uses the 4.x names
            new = key
            for old, cur in reversed(SWIN_RENAMES):
                new = new.replace(cur, old)
        out[new if new in model_keys else key] = value
    return out


def infer_swin_config(state: dict[str, torch.Tensor]) -> dict:
    """SwinConfig kwargs read off the tensor shapes of a Swin state dict (either naming)."""
    proj = state.get("embeddings.patch_embeddings.projection.weight")
    if proj is None:
        raise ValueError("Not a Swin state dict: embeddings.patch_embeddings.projection.weight is missing.")
    embed_dim, num_channels, patch_size, _ = proj.shape
    blocks: dict[int, int] = {}
    for key in state:
        m = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            blocks[i] = max(blocks.get(i, 0), j + 1)
    depths = [blocks[i] for i in range(len(blocks))]
    heads, window = [], None
    for i in range(len(depths)):
        table = next(v for k, v in state.items()
                     if k.startswith(f"encoder.layers.{i}.blocks.0.") and k.endswith("relative_position_bias_table"))
        heads.append(int(table.shape[1]))
        window = (math.isqrt(table.shape[0]) + 1) // 2  # table has (2w-1)^2 rows
    fc1_name = re.compile(r"encoder\.layers\.0\.blocks\.0\..*(mlp\.fc1|intermediate\.dense)\.weight$")
    fc1 = next(v for k, v in state.items() if fc1_name.match(k))
    qkv_bias = any(re.search(r"layers\.0\.blocks\.0\.attention\.(q_proj|self\.query)\.bias$", k) for k in state)
    return {"embed_dim": int(embed_dim), "num_channels": int(num_channels), "patch_size": int(patch_size),
            "depths": depths, "num_heads": heads, "window_size": window,
            "mlp_ratio": fc1.shape[0] / embed_dim, "qkv_bias": qkv_bias}


class ResNetTrunk(nn.Module):
    """torchvision ResNet-50 without avgpool/fc, so layer4's spatial map is the feature sequence."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.in_channels = net.fc.in_features  # 2048
        del net.fc, net.avgpool
        for name, child in net.named_children():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, H/32, W/32)
        return x


class MedClipEncoder(ImageEncoder):
    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        if config.name not in VARIANTS:
            raise ValueError(f"Unknown MedCLIP variant '{config.name}'.{closest(config.name, list(VARIANTS))} "
                             f"Valid: {list(VARIANTS)} ('vit' is MedCLIP's Swin-tiny tower).")
        if config.layer != -1:
            raise ValueError("encoder.layer is only supported for hf_clip; MedCLIP returns the last layer.")
        state, source = None, None
        if config.checkpoint is not None:
            source = checkpoint_file(config.checkpoint)
            state = vision_state(load_state_dict_file(source)[0])
        image_size = config.image_size or MEDCLIP_IMAGE_SIZE
        self.processing = ImageProcessingConfig(image_size, CXR_MEAN, CXR_STD, True, "pad")
        if config.name == "vit":
            self._build_swin(state, source, image_size)
        else:
            self._build_resnet(state, source, image_size)

    def _build_swin(self, state, source, image_size: int) -> None:
        from transformers import SwinConfig, SwinModel

        kwargs = infer_swin_config(state) if state is not None else {}  # default: swin-tiny-patch4-window7-224
        kwargs.update(self.config.arch)
        kwargs["image_size"] = image_size
        swin_cfg = SwinConfig(**kwargs)
        self.swin = SwinModel(swin_cfg, add_pooling_layer=self.config.feature == "pooled")
        if state is not None:
            model_keys = set(self.swin.state_dict())
            load_strict(self.swin, rename_swin_keys(state, model_keys), str(source))
        self.hidden_size = swin_cfg.hidden_size  # embed_dim * 2^(stages-1): 768 for swin-tiny
        side = math.ceil(image_size / swin_cfg.patch_size)
        for _ in range(len(swin_cfg.depths) - 1):  # each patch merging halves the grid (padding odd sides)
            side = math.ceil(side / 2)
        self.num_tokens = 1 if self.config.feature == "pooled" else side * side

    def _build_resnet(self, state, source, image_size: int) -> None:
        if self.config.arch:
            raise ValueError("encoder.arch is not supported for the MedCLIP ResNet-50 tower.")
        self.resnet = ResNetTrunk()
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # MedCLIP's 2048->512 head
            load_strict(self.resnet, state, str(source))
        self.hidden_size = self.resnet.in_channels
        side = image_size
        for _ in range(5):  # conv1 stride 2, maxpool, layer2-4 strides: each ceil-halves
            side = math.ceil(side / 2)
        self.num_tokens = 1 if self.config.feature == "pooled" else side * side

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "swin"):
            out = self.swin(pixel_values=pixel_values)
            if self.config.feature == "pooled":
                return out.pooler_output[:, None]  # (B, 1, 768)
            return out.last_hidden_state  # (B, 49, 768)
        fmap = self.resnet(pixel_values)  # (B, 2048, 7, 7)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, 49, 2048)
        return tokens.mean(dim=1, keepdim=True) if self.config.feature == "pooled" else tokens
