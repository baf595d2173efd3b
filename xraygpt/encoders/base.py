"""Image-encoder contract shared by every backend: configs, the frozen base class, checkpoint reading.

An encoder maps pixels to a sequence of features that `llama_proj` turns into LLM tokens:

    pixel_values (B, 3, H, W)  ->  ImageEncoder  ->  features (B, T_img, D_img)

Each encoder also carries the image processing it was trained with (`ImageProcessingConfig`), because
feeding MedCLIP features computed with CLIP's mean/std is a silent accuracy bug, not an error.
This module imports only torch and safetensors, so `xraygpt.data` can use the configs cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Weight and config files that define an encoder folder; these go into `identity()`.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
IDENTITY_SUFFIXES = WEIGHT_SUFFIXES + (".json",)

# Random-init encoders (the 'Baseline' row, tests) are built under this seed, so their features are
# reproducible and cacheable. Building never touches the caller's RNG state.
RANDOM_INIT_SEED = 0

RESIZE_MODES = ("crop", "pad", "squash")

# Chest X-ray luminance statistics used by MedCLIP (constants.IMG_MEAN / IMG_STD), repeated to 3 channels.
CXR_MEAN = (0.5862785803043838,) * 3
CXR_STD = (0.27950088968644304,) * 3
# CLIP's (and open_clip's default) RGB statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURES = ("patch", "pooled", "labels")
FEATURE_CODE_VERSION = 2


# Project open_clip model configs: one JSON per architecture (open_clip's model-config format).
PROJECT_CONFIG_DIR = Path(__file__).parent / "configs"


def project_config_names() -> list[str]:
    """Model-config names shipped with xraygpt (file stems in configs/)."""
    return sorted(p.stem for p in PROJECT_CONFIG_DIR.glob("*.json"))


def closest(name: str, valid: list[str]) -> str:
    """' Did you mean X?' for error messages, or '' when nothing is close."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


@dataclass
class ImageProcessingConfig:
    """How pixels must look before the encoder sees them (see xraygpt/data/image_processing.py)."""

    image_size: int  # square side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grayscale_to_rgb: bool = True  # read as one luminance channel, then repeat it to 3 channels
    # "crop": shorter side to image_size then center crop (CLIP / open_clip);
    # "pad": pad to a black square then resize (MedCLIP): keeps the whole film incl. costophrenic angles;
    # "squash": resize straight to a square, ignoring aspect (the original XrayGPT/MiniGPT-4 eval processor).
    resize: str = "crop"

    def __post_init__(self):
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got '{self.resize}'")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}


@dataclass
class EncoderConfig:
    """Which encoder to build; what YAML configs and saved model configs hold (JSON-serialisable)."""

    type: str = "open_clip"  # "open_clip" | "medclip" | "hf_clip"
    # open_clip: a model-config name (project configs first, then open_clip's own);
    # medclip: "vit" (Swin-tiny tower) or "resnet" (ResNet-50 tower); hf_clip: ignored.
    name: str = "xray-vit-tiny"
    checkpoint: str | None = None  # local file or folder; None = seeded random init
    image_size: int | None = None  # override the encoder's own input size
    # "patch": every patch/sequence token; "pooled": one pooled token; "labels" (open_clip stage-0 checkpoints
    # with a label head): per patch, the film's predicted finding logits and the patch's own (B, N, 2C)
    feature: str = "patch"
    layer: int = -1  # hf_clip only: hidden-state index (-1 last, -2 penultimate as in LLaVA)
    # 0: every token of the tower's patch grid; g > 0: average-pool the square grid to g x g tokens, which
    # shortens every LLM sequence by (side^2 - g^2) tokens (the embedded ablation: 8x8 label logits -> 1 token)
    token_grid: int = 0
    # Architecture overrides: open_clip -> merged into vision_cfg; medclip vit -> SwinConfig kwargs
    # (default: inferred from the checkpoint, else swin-tiny); hf_clip -> CLIPVisionConfig kwargs.
    arch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.feature not in FEATURES:
            raise ValueError(f"encoder.feature must be one of {FEATURES}, got '{self.feature}'")
        if self.arch is None:
            self.arch = {}
        if not isinstance(self.token_grid, int) or self.token_grid < 0:
            raise ValueError(
                f"encoder.token_grid must be an integer >= 0 (0: the tower's own grid), got {self.token_grid!r}")
        if self.token_grid and self.feature == "pooled":
            raise ValueError("encoder.token_grid pools patch tokens; feature=pooled has one token. Set token_grid=0.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in valid:
                raise ValueError(f"Unknown encoder config key '{key}'.{closest(key, valid)} Valid keys: {valid}")
        return cls(**d)


def file_fingerprint(path: Path) -> dict:
    """Name, size and sha256 of one file: a feature-cache key that survives copying between nodes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"name": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def checkpoint_fingerprint(path: str | os.PathLike) -> dict:
    """Fingerprint a checkpoint file, or every weight/config file of a checkpoint folder."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(IDENTITY_SUFFIXES))
        return {"path": str(path), "files": [file_fingerprint(p) for p in files]}
    return {"path": str(path), "files": [file_fingerprint(path)]}


def require_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p} (set encoder.checkpoint to an existing file or folder)")
    return p


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file without unpickling code: (state_dict, safetensors metadata or {}).

    Accepts safetensors, or torch files holding a state dict, `{"state_dict": ...}` (open_clip / Lightning)
    or `{"model": ...}`; strips DataParallel `module.` prefixes.
    """
    path = require_path(path, "Checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"Checkpoint file {path} is empty (0 bytes); re-download or re-save it.")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            names = f.keys()
            state = {k: f.get_tensor(k) for k in names}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or code-carrying pickles
            from xraygpt.model import refusal_reason

            raise ValueError(
                f"Could not read checkpoint {path} with torch.load(weights_only=True): {refusal_reason(e)}. "
                "Only plain tensor state dicts are accepted (no pickled code); re-save it with "
                "torch.save(model.state_dict(), path) or as safetensors."
            ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"Checkpoint {path} does not hold a non-empty state dict (got {type(state).__name__}).")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, metadata


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with a readable message that names the checkpoint and keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        raise ValueError(
            f"Checkpoint {source} does not fit the {type(module).__name__} it should load into:\n"
            + (f"  missing keys ({len(missing)}): {show(missing)}\n" if missing else "")
            + (f"  unexpected keys ({len(unexpected)}): {show(unexpected)}\n" if unexpected else "")
            + (f"  shape mismatches ({len(wrong)}): {show(wrong)}\n" if wrong else "")
            + "Check encoder.type / encoder.name / encoder.arch against the checkpoint."
        )
    module.load_state_dict(state, strict=True)


class ImageEncoder(nn.Module):
    """Frozen image tower: (B, 3, H, W) -> (B, T_img, D_img) features in the tower's dtype.

    Subclasses set `hidden_size`, `num_tokens`, `processing` in __init__ and implement `encode`.
    `train()` is a no-op on purpose: a frozen encoder must never switch BatchNorm/Dropout to training
    mode when the surrounding XrayGPT is put in training mode.
    """

    config: EncoderConfig
    hidden_size: int  # D_img
    processing: ImageProcessingConfig

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self._identity: dict | None = None
        self._tower_tokens = 0

    @property
    def num_tokens(self) -> int:
        """T_img: the tower's token count, or token_grid^2 when the patch grid is pooled."""
        return self._pooled_side() ** 2 if self.config.token_grid else self._tower_tokens

    @num_tokens.setter
    def num_tokens(self, value: int) -> None:  # subclasses set what their tower gives
        self._tower_tokens = int(value)

    def _pooled_side(self) -> int:
        """token_grid, checked against the tower's grid (square, at least as large)."""
        n, g = self._tower_tokens, self.config.token_grid
        side = int(round(n ** 0.5))
        if side * side != n or g > side:
            raise ValueError(
                f"encoder.token_grid={g} needs a square patch grid of at least {g}x{g} tokens; "
                f"{self.config.type}:{self.config.name} with feature={self.config.feature} gives {n} tokens. "
                "Set token_grid=0 or a smaller grid.")
        return g

    def pool_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, side*side, D) -> (B, g*g, D): average over g x g regions of the patch grid (row-major tokens)."""
        g = self._pooled_side()
        b, n, d = features.shape
        side = int(round(n ** 0.5))
        grid = features.transpose(1, 2).reshape(b, d, side, side)  # (B, D, side, side)
        return nn.functional.adaptive_avg_pool2d(grid, g).flatten(2).transpose(1, 2)  # (B, g*g, D)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape (B, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        param = next(self.parameters(), None)
        if param is not None and pixel_values.dtype != param.dtype:
            pixel_values = pixel_values.to(param.dtype)
        features = self.encode(pixel_values)  # (B, tower tokens, D_img)
        if self.config.token_grid:
            features = self.pool_tokens(features)  # (B, g*g, D_img)
        return features

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(False)

    def freeze(self) -> ImageEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def identity(self) -> dict:
        """Stable description of what produces these features: a feature-cache key and a saved-config entry."""
        if self._identity is None:
            ckpt = self.config.checkpoint
            self._identity = {
                # bumped when the same weights start giving other features: cached features of older code are
                # not reused (2: BatchNorm statistics of timm towers were moved by a probe forward before)
                "feature_code": FEATURE_CODE_VERSION,
                "type": self.config.type,
                "name": self.config.name if self.config.type != "hf_clip" else None,
                "feature": self.config.feature,
                "layer": self.config.layer,
                **({"token_grid": self.config.token_grid} if self.config.token_grid else {}),  # old keys stay valid
                "arch": self.config.arch,
                "num_tokens": self.num_tokens,
                "hidden_size": self.hidden_size,
                "processing": self.processing.to_dict(),
                "checkpoint": checkpoint_fingerprint(ckpt) if ckpt else None,
                "random_init_seed": None if ckpt else RANDOM_INIT_SEED,
            }
        return json.loads(json.dumps(self._identity))  # a deep copy the caller may mutate
