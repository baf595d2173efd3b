"""open_clip vision towers: project model configs (configs/*.json) or open_clip's own, random or from a checkpoint.

A new architecture is one JSON file in `xraygpt/encoders/configs/` (open_clip's model-config format:
`embed_dim`, `vision_cfg`, `text_cfg`). The encoder builds only the vision tower; the full CLIP model
(with its text tower and the offline BPE tokenizer that ships in the open_clip wheel) is for stage-0
contrastive pretraining: `build_open_clip_model`, `get_open_clip_tokenizer`, `save_open_clip_checkpoint`.

Features: open_clip's VisionTransformer with `output_tokens=True` returns `(pooled, tokens)`, where
tokens are the patch tokens (class token dropped) after `ln_post` (unless the config sets
`final_ln_after_pool`) and before the projection; pooled is the projected class token.

feature="labels" reads the stage-0 label head saved with the checkpoint (`label_head.*`, classes in the
metadata) and gives every patch token the film's predicted finding logits next to that patch's own
class-activation logits (the same head applied to the patch alone):

    patch tokens (B, N, W) -> project -> (B, N, E) --mean/pool--> (B, E) -> unit * sqrt(E) -> head -> (B, C)
    token n = [ image logits (C) | head(patch n, scaled like the pooled embedding) (C) ]  ->  (B, N, 2C)

so the features the projection reads are the encoder's findings, in a fixed 2C-dimensional basis.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
from open_clip.model import _build_vision_tower, resize_pos_embed
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from xraygpt.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    CXR_MEAN,
    CXR_STD,
    PROJECT_CONFIG_DIR,
    EncoderConfig,
    ImageEncoder,
    ImageProcessingConfig,
    closest,
    load_state_dict_file,
    load_strict,
    project_config_names,
    require_path,
)

# open_clip hub/local-dir layout (e.g. BiomedCLIP): a folder with this config and one of these weight files.
FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")
META_NAME = "open_clip_model_name"
META_CFG = "open_clip_model_cfg"
META_LABELS = "label_classes"  # JSON list: the classes of the saved label head
META_POOL = "image_pool"  # how stage 0 pooled the image embedding the label head reads
LABEL_HEAD = "label_head."  # key prefix of the stage-0 image label head in a checkpoint
_registered = False


def register_project_configs() -> None:
    """Add configs/ to open_clip's registry once (at first use, not at import)."""
    global _registered
    if not _registered:
        import xraygpt.encoders.cxr_cnn  # noqa: F401  registers the project's timm trunks (cxr_vgg_tiny)

        open_clip.add_model_config(PROJECT_CONFIG_DIR)
        _registered = True


def get_model_cfg(name: str) -> dict:
    """The open_clip model config for a project or open_clip name; ValueError listing valid names."""
    register_project_configs()
    cfg = open_clip.get_model_config(name) if name else None
    if cfg is None:
        project = project_config_names()
        raise ValueError(
            f"Unknown open_clip model config '{name}'.{closest(name or '', project + open_clip.list_models())}\n"
            f"  project configs: {project}\n"
            f"  open_clip's own configs: {len(open_clip.list_models()) - len(project)} more, e.g. ViT-B-16, "
            "ViT-B-32 (open_clip.list_models() lists them)\n"
            f"  or a checkpoint folder holding {FOLDER_CONFIG}."
        )
    return copy.deepcopy(cfg)


def _find_folder_weights(folder: Path) -> Path:
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Checkpoint folder {folder} holds none of {list(FOLDER_WEIGHTS)}.")


def has_label_head(checkpoint: str | os.PathLike) -> bool:
    """Whether a stage-0 checkpoint (safetensors) carries a label head, from its metadata alone."""
    path = Path(checkpoint)
    return path.suffix == ".safetensors" and META_LABELS in _read_safetensors_metadata(path)


def _read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def _resolve(config: EncoderConfig) -> tuple[dict, dict, Path | None]:
    """(model_cfg, preprocess_cfg, weights file) from the checkpoint when it says, else from config.name."""
    preprocess: dict = {}
    if config.checkpoint is None:
        return get_model_cfg(config.name), preprocess, None
    ckpt = require_path(config.checkpoint, "open_clip checkpoint")
    if ckpt.is_dir():
        weights = _find_folder_weights(ckpt)
        if (ckpt / FOLDER_CONFIG).is_file():
            folder_cfg = json.loads((ckpt / FOLDER_CONFIG).read_text())
            return folder_cfg.get("model_cfg", folder_cfg), folder_cfg.get("preprocess_cfg", {}), weights
        return get_model_cfg(config.name), preprocess, weights
    if ckpt.suffix == ".safetensors":
        meta = _read_safetensors_metadata(ckpt)
        saved_name = meta.get(META_NAME)
        if saved_name and saved_name != config.name:
            raise ValueError(
                f"Checkpoint {ckpt} was saved from open_clip config '{saved_name}' but encoder.name is "
                f"'{config.name}'. Set encoder.name={saved_name}."
            )
        if META_CFG in meta:
            return json.loads(meta[META_CFG]), preprocess, ckpt
    return get_model_cfg(config.name), preprocess, ckpt


def _processing(name: str, preprocess: dict, image_size: int) -> ImageProcessingConfig:
    if preprocess:
        resize = {"shortest": "crop", "longest": "pad", "squash": "squash"}[preprocess.get("resize_mode", "shortest")]
        return ImageProcessingConfig(image_size, tuple(preprocess.get("mean", CLIP_MEAN)),
                                     tuple(preprocess.get("std", CLIP_STD)), True, resize)
    if name in project_config_names():
        # Project towers are trained on chest films by stage 0 with MedCLIP's recipe: CXR stats, pad to square.
        return ImageProcessingConfig(image_size, CXR_MEAN, CXR_STD, True, "pad")
    return ImageProcessingConfig(image_size, CLIP_MEAN, CLIP_STD, True, "crop")


def _visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vision-tower keys of a full CLIP state dict (`visual.*`), or the dict itself if it is visual-only."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


class OpenClipEncoder(ImageEncoder):
    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        if config.layer != -1:
            raise ValueError("encoder.layer is only supported for hf_clip; open_clip returns the last layer.")
        register_project_configs()  # a checkpoint's own config may name a project timm trunk
        model_cfg, preprocess, weights = _resolve(config)
        vision_cfg = {**model_cfg["vision_cfg"], **config.arch}
        if config.image_size is not None:
            vision_cfg["image_size"] = config.image_size
        if "timm_model_name" in vision_cfg:
            vision_cfg["timm_model_pretrained"] = False  # never download; weights come from the checkpoint
        else:
            vision_cfg["output_tokens"] = True
        self.visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg,
                                          quick_gelu=model_cfg.get("quick_gelu", False))
        # eval before anything runs the tower: _count's probe forward in training mode would move BatchNorm's
        # running statistics (a real bug in CNN towers, caught by a test: features differed from the checkpoint's)
        self.visual.eval()
        self.label_head: nn.Linear | None = None
        self.label_classes: list[str] | None = None
        if weights is not None:
            self._load(weights)
        if config.feature == "labels" and self.label_head is None:
            raise ValueError(
                f"encoder.feature=labels needs a stage-0 checkpoint with a label head ({LABEL_HEAD}weight); "
                f"{weights or 'a random init'} has none. Train stage 0 with loss.label_weight > 0, or use "
                "feature=patch.")

        image_size = vision_cfg.get("image_size", 224)
        if isinstance(image_size, (tuple, list)):
            if len(set(image_size)) != 1:
                raise ValueError(f"Only square inputs are supported; vision_cfg.image_size is {image_size}")
            image_size = int(image_size[0])
        trunk_size = getattr(getattr(getattr(self.visual, "trunk", None), "patch_embed", None), "img_size", None)
        if trunk_size is not None and tuple(trunk_size) != (image_size, image_size):
            self.visual.set_input_size(image_size)  # timm: after loading, so the pos grid is resampled
        self.processing = _processing(config.name, preprocess, image_size)
        self.hidden_size, self.num_tokens = self._count(model_cfg["embed_dim"])

    def _load(self, weights: Path) -> None:
        full, meta = load_state_dict_file(weights)
        if self.config.feature == "labels" and f"{LABEL_HEAD}weight" in full:
            self._load_label_head(full, meta, weights)
        state = _visual_state({k: v for k, v in full.items() if not k.startswith(LABEL_HEAD)})
        if "positional_embedding" in state:  # interpolate the position grid if image_size was overridden
            holder = {"visual.positional_embedding": state["positional_embedding"]}
            resize_pos_embed(holder, SimpleNamespace(visual=self.visual))
            state["positional_embedding"] = holder["visual.positional_embedding"]
        load_strict(self.visual, state, str(weights))

    def _load_label_head(self, state: dict[str, torch.Tensor], meta: dict[str, str], weights: Path) -> None:
        weight, bias = state[f"{LABEL_HEAD}weight"], state.get(f"{LABEL_HEAD}bias")
        classes = json.loads(meta.get(META_LABELS, "null")) or [f"class_{i}" for i in range(weight.shape[0])]
        pool = meta.get(META_POOL, "patch_mean")
        if pool != "patch_mean":
            raise ValueError(f"{weights}: its label head reads the '{pool}' image embedding; feature=labels needs a "
                             "stage-0 run with model.image_pool=patch_mean")  # fmt: skip
        if len(classes) != weight.shape[0]:
            raise ValueError(f"{weights}: label head has {weight.shape[0]} outputs but {len(classes)} class names")
        self.label_head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        load_strict(self.label_head, {"weight": weight, **({"bias": bias} if bias is not None else {})}, str(weights))
        self.label_classes = list(classes)

    def _count(self, embed_dim: int) -> tuple[int, int]:
        """(D_img, T_img) without running the tower where the architecture says it."""
        v = self.visual
        if self.config.feature == "pooled":
            return embed_dim, 1
        if isinstance(v, VisionTransformer) and v.attn_pool is None and self.config.feature == "patch":
            grid = v.grid_size[0] * v.grid_size[1]
            return v.transformer.width, grid + (1 if v.pool_type == "none" else 0)
        with torch.no_grad():  # anything else (timm trunks, attentional pools): measure once
            size = self.processing.image_size
            out = self.encode(torch.zeros(1, 3, size, size))
        return out.shape[2], out.shape[1]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.feature == "labels":
            return self.encode_labels(pixel_values)
        v = self.visual
        if isinstance(v, TimmModel):
            if self.config.feature == "pooled":
                return v(pixel_values)[:, None]  # (B, 1, embed_dim)
            x = v.trunk.forward_features(pixel_values)
            if x.ndim == 4:  # convnet trunk: (B, C, h, w) -> (B, h*w, C)
                return x.flatten(2).transpose(1, 2)
            return x[:, getattr(v.trunk, "num_prefix_tokens", 0):]  # (B, N, D) without class/register tokens
        if not isinstance(v, VisionTransformer):
            raise NotImplementedError(
                f"open_clip tower {type(v).__name__} is not supported; use a ViT or timm config.")
        pooled, tokens = v(pixel_values)  # (B, embed_dim), (B, grid*grid, width)
        return pooled[:, None] if self.config.feature == "pooled" else tokens

    def encode_labels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, 2C): [image label logits | patch class-activation logits] per patch token."""
        v = self.visual
        if isinstance(v, TimmModel):
            fmap = v.trunk.forward_features(pixel_values)  # convnet (B, W, h, w) | timm ViT (B, prefix + N, W)
            pooled = v.head(v.trunk.forward_head(fmap, pre_logits=True))  # (B, E): what stage 0 pooled
            if fmap.ndim == 4:
                tokens = fmap.flatten(2).transpose(1, 2)  # (B, N, W)
            else:
                tokens = v.trunk.fc_norm(fmap[:, getattr(v.trunk, "num_prefix_tokens", 0):])  # as its pool sees them
            patches = v.head(tokens)  # (B, N, E): the same projection per patch
        elif isinstance(v, VisionTransformer):
            _, tokens = v(pixel_values)  # (B, N, W): the tower is built with output_tokens=True
            patches = tokens @ v.proj if v.proj is not None else tokens  # (B, N, E)
            pooled = patches.mean(1)  # (B, E): stage 0's patch_mean
        else:
            raise NotImplementedError(f"feature=labels does not support open_clip tower {type(v).__name__}")
        # stage 0's head reads the unit embedding times sqrt(E); scale each patch by the same factor
        scale = pooled.shape[-1] ** 0.5 / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (B, 1)
        image = self.label_head(pooled * scale)  # (B, C)
        local = self.label_head(patches * scale[:, None])  # (B, N, C)
        return torch.cat([image[:, None].expand_as(local), local], dim=-1)  # (B, N, 2C)


# ---- stage 0: the full CLIP model, its tokenizer and checkpoint format ----

def build_open_clip_model(name: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Full open_clip model (vision + text towers) for contrastive pretraining; random init unless checkpoint."""
    cfg = get_model_cfg(name)
    model = open_clip.create_model(name, pretrained=None)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)[0]
        load_strict(model, {k: v for k, v in state.items() if not k.startswith(LABEL_HEAD)}, str(checkpoint))
    model.xraygpt_open_clip_name = name
    model.xraygpt_open_clip_cfg = cfg
    return model


def get_open_clip_tokenizer(name: str):
    """open_clip's tokenizer for a config; the project configs use SimpleTokenizer (BPE vocab in the wheel)."""
    register_project_configs()
    get_model_cfg(name)  # fail loudly on an unknown name instead of silently returning a default tokenizer
    return open_clip.get_tokenizer(name)


def save_open_clip_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict | None = None, *,
                              label_head: nn.Linear | None = None, label_classes: list[str] | None = None,
                              image_pool: str = "patch_mean") -> Path:  # fmt: skip
    """Write the full model as safetensors, atomically, naming its open_clip config in the metadata.

    The file loads back with `build_open_clip_model(name, path)` or as an encoder checkpoint
    (`EncoderConfig(type="open_clip", name=name, checkpoint=path)`, which reads only `visual.*`).
    `label_head` (stage 0's image head, on the unit embedding times sqrt(E)) is stored as `label_head.*`
    with its class names, for feature="labels".
    """
    from safetensors.torch import save_file

    meta = dict(meta or {})
    name = meta.pop("model_name", None) or getattr(model, "xraygpt_open_clip_name", None)
    if not name:
        raise ValueError("Cannot tell the model's open_clip config: build it with build_open_clip_model(name) "
                         "or pass meta={'model_name': ...}.")
    cfg = getattr(model, "xraygpt_open_clip_cfg", None) or get_model_cfg(name)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_open_clip_checkpoint writes safetensors; give a .safetensors path, not {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {META_NAME: name, META_CFG: json.dumps(cfg), "meta": json.dumps(meta, default=str)}
    if label_head is not None:
        if label_classes is None or len(label_classes) != label_head.out_features:
            raise ValueError(f"label_classes must name the {label_head.out_features} outputs of label_head")
        state.update({f"{LABEL_HEAD}{k}": v.detach().to("cpu").contiguous().clone()
                      for k, v in label_head.state_dict().items()})  # fmt: skip
        metadata.update({META_LABELS: json.dumps(list(label_classes)), META_POOL: image_pool})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
