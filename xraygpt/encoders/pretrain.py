"""Stage 0: pretrain the project's small open_clip encoder on image/report pairs, the way MedCLIP does.

    pairs (film, report, CheXpert label vector)  ->  CLIP model (vision + text tower)
        image  (B, 3, S, S) -> visual -> (B, E) --\
                                                    logits = exp(t) * img @ txt.T   (B, B)
        report (B, L) tokens -> text  -> (B, E) --/
        targets (B, B) = row-normalised cosine similarity of the pairs' label vectors  (semantic matching)
        loss = soft cross-entropy, image->text and text->image, averaged

Plain CLIP treats every other report in the batch as a negative, so two normal studies with equally normal
reports are pushed apart. MedCLIP's semantic matching replaces the identity targets with the label
similarity, so pairs that say the same thing share the probability mass. (MedCLIP softmaxes the raw
similarity, which for a batch of 64 puts ~4% on the true pair; normalising the cosine rows keeps the
targets sharp: a pair with no label-mate puts all its mass on itself.)

Outputs in `run.output_dir`: `encoder.safetensors` (the full CLIP model; `build_encoder` reads its `visual.*`;
with loss.label_weight > 0 also the image label head, for encoder.feature=labels), `encoder_init.safetensors`
(the seeded untrained model and head: a "random weights, same architecture" encoder that still has a head)
and `stage0_meta.json` (config, data identity, loss curve), written last so it marks a complete run.
`evaluate_encoder` measures image->text retrieval and linear-probe AUROC against random weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraygpt.config import ConfigError, atomic_write_text, to_dict
from xraygpt.encoders.base import EncoderConfig, ImageProcessingConfig

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "encoder.safetensors"
INIT_NAME = "encoder_init.safetensors"  # the same architecture at its seeded initial weights (Baseline rows)
META_NAME = "stage0_meta.json"
EVAL_NAME = "stage0_eval.json"
META_VERSION = 1
IMAGE_POOLS = ("patch_mean", "cls")
LABEL_SETS = ("chexpert", "mesh")
PAD_ID = 0  # open_clip SimpleTokenizer pads with 0 and ends every sequence with <end_of_text> (the max id)


# ------------------------------------------------------------------------------------------------- config
@dataclass
class Stage0DataConfig:
    embedded: bool = True  # build (or reuse) the embedded IU dataset; `root` is then where to build it
    root: str | None = None  # dataset folder holding image/ (embedded: None = the cache folder)
    ann_file: str = "splits/train.json"  # training pairs, relative to root (or absolute)
    eval_ann_file: str = "splits/test.json"  # pairs evaluate_encoder scores, relative to root (or absolute)
    labels_file: str | None = "labels.json"  # CheXpert labels per image id; None = plain CLIP targets only
    # "chexpert": labels_file as it is; "mesh": plus drawn MeSH findings, sides and zones derived from its tags on the
    # training split (xraygpt/data/mesh_labels.py), written to <output_dir>/labels_mesh.json
    label_set: str = "chexpert"
    mesh_min_films: int = 15  # label_set=mesh: a MeSH class needs this many training films
    limit: int | None = None  # embedded only: keep the first N reports (fast builds for tests)

    def validate(self) -> None:
        if not self.embedded and not self.root:
            raise ConfigError("data.root is required when data.embedded is false (a folder holding image/)")
        if self.limit is not None and (self.limit < 1 or not self.embedded):
            raise ConfigError("data.limit must be >= 1 and only applies with data.embedded=true")
        if self.label_set not in LABEL_SETS:
            raise ConfigError(f"data.label_set must be one of {LABEL_SETS}, got {self.label_set!r}")
        if self.mesh_min_films < 1:
            raise ConfigError(f"data.mesh_min_films must be >= 1, got {self.mesh_min_films}")
        if self.label_set == "mesh" and not self.labels_file:
            raise ConfigError("data.label_set=mesh derives its classes from data.labels_file's tags: set it")


@dataclass
class Stage0ModelConfig:
    name: str = "xray-vit-tiny"  # open_clip model config (xraygpt/encoders/configs/*.json or open_clip's own)
    # Image embedding for the contrastive loss: "patch_mean" = mean of the patch tokens, projected (what later
    # stages and the probe consume; informative from the first step); "cls" = open_clip's own pooled output.
    image_pool: str = "patch_mean"

    def validate(self) -> None:
        if self.image_pool not in IMAGE_POOLS:
            raise ConfigError(f"model.image_pool must be one of {IMAGE_POOLS}, got {self.image_pool!r}")


@dataclass
class Stage0LossConfig:
    semantic: bool = True  # MedCLIP soft targets from label similarity; false = CLIP's identity targets
    max_logit_scale: float = 100.0  # the learnable temperature's cap (exp(logit_scale) <= this), as in CLIP
    # Weight of an auxiliary label loss: a linear head on each tower's embedding predicts the CheXpert labels
    # (BCE). Gets both towers off the collapsed start that contrastive learning from scratch sits on. 0 = off.
    label_weight: float = 0.0

    def validate(self) -> None:
        if self.max_logit_scale <= 1:
            raise ConfigError(f"loss.max_logit_scale must be > 1, got {self.max_logit_scale}")


@dataclass
class Stage0OptimConfig:
    lr: float = 5e-4  # peak learning rate (AdamW)
    min_lr: float = 0.0  # end of the cosine decay
    warmup_frac: float = 0.1  # linear warmup over this fraction of all steps
    weight_decay: float = 0.1  # not applied to biases, norms, embeddings' gains or the temperature
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    max_grad_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"optim.warmup_frac must be in [0, 1), got {self.warmup_frac}")


@dataclass
class Stage0RunConfig:
    output_dir: str = "outputs/demo/stage0"
    seed: int = 0
    epochs: int = 4
    max_steps: int | None = None  # stop after this many steps (None: run all epochs)
    batch_size: int = 64
    # Sort each group of `length_buckets` batches by report length before batching: text costs O(longest
    # report in the batch), so this roughly halves text-tower time; 1 = plain shuffling.
    length_buckets: int = 4
    threads: int = 2  # torch intra-op threads (also the PNG decoding pool)
    progress: bool = True  # tqdm bar
    log_every: int = 0  # also log loss / lr / temperature every N steps (0: only the bar)
    force: bool = False  # retrain even when output_dir holds a complete run with this config
    evaluate: bool = False  # after training, run evaluate_encoder and write stage0_eval.json

    def validate(self) -> None:
        for key in ("epochs", "batch_size", "length_buckets", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.batch_size < 2:
            raise ConfigError("run.batch_size must be >= 2: contrastive learning needs negatives in the batch")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"run.max_steps must be >= 1 or null, got {self.max_steps}")


@dataclass
class EncoderPretrainConfig:
    data: Stage0DataConfig = field(default_factory=Stage0DataConfig)
    model: Stage0ModelConfig = field(default_factory=Stage0ModelConfig)
    loss: Stage0LossConfig = field(default_factory=Stage0LossConfig)
    optim: Stage0OptimConfig = field(default_factory=Stage0OptimConfig)
    run: Stage0RunConfig = field(default_factory=Stage0RunConfig)


# Keys that do not change the trained weights: a finished run is reused whatever they say.
_NOT_IDENTITY = {"run": ("output_dir", "threads", "progress", "log_every", "force", "evaluate")}


def _identity_config(cfg: EncoderPretrainConfig) -> dict:
    d = to_dict(cfg)
    for section, keys in _NOT_IDENTITY.items():
        for k in keys:
            d[section].pop(k, None)
    return json.loads(json.dumps(d))  # tuples -> lists, as they come back from JSON


# ------------------------------------------------------------------------------------------------- data
@dataclass
class PairSet:
    """Image/report pairs held in memory: films as uint8 (decoded once), reports as tokens."""

    image_ids: list[str]
    captions: list[str]
    images: torch.Tensor  # (N, S, S) uint8 grayscale, already resized the encoder's way
    tokens: torch.Tensor  # (N, context_length) int64, 0-padded
    labels: torch.Tensor | None  # (N, C) float 0/1, or None without a labels file
    labelled: torch.Tensor | None  # (N,) bool: False where the labels file has no usable label
    classes: list[str] | None
    processing: ImageProcessingConfig

    def __len__(self) -> int:
        return len(self.image_ids)

    def pixels(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """uint8 films -> normalised float (B, 3, S, S), exactly what ImageTransform would have produced."""
        x = self.images[idx].float().div_(255.0)[:, None]  # (B, 1, S, S) in [0, 1]
        mean = torch.tensor(self.processing.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.processing.std).view(1, 3, 1, 1)
        return (x - mean) / std  # broadcast to (B, 3, S, S)

    @property
    def lengths(self) -> torch.Tensor:
        return (self.tokens != PAD_ID).sum(1)  # (N,)


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def read_labels(labels_file: Path, image_ids: Sequence[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(classes, labels (N, C), labelled (N,)) for image_ids from a labels file in the embedded format:

    {"classes": [...], "images": {image_id: {"labels": [0/1 per class], "labelled": bool, ...}}}
    """
    try:
        data = json.loads(Path(labels_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"labels file not found: {labels_file} (set data.labels_file, or null to train "
                                "without labels with loss.semantic=false)") from None  # fmt: skip
    except json.JSONDecodeError as e:
        raise ValueError(f"{labels_file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "classes" not in data or "images" not in data:
        raise ValueError(f'{labels_file}: expected {{"classes": [...], "images": {{image_id: {{"labels": [...]}}}}}}')
    classes, images = list(data["classes"]), data["images"]
    rows, flags = [], []
    for iid in image_ids:
        entry = images.get(iid)
        if entry is None:
            raise KeyError(f"{labels_file}: no labels for image_id {iid!r} (labels and annotations disagree; "
                           "rebuild the dataset or point data.labels_file at the matching file)")  # fmt: skip
        vec = entry["labels"]
        if len(vec) != len(classes):
            raise ValueError(f"{labels_file}: image_id {iid!r} has {len(vec)} labels for {len(classes)} classes")
        rows.append([float(v) for v in vec])
        flags.append(bool(entry.get("labelled", True)))
    return classes, torch.tensor(rows, dtype=torch.float32).reshape(-1, len(classes)), torch.tensor(flags)


def load_pairs(root: Path, ann_file: Path, labels_file: Path | None, processing: ImageProcessingConfig,
               tokenizer, threads: int = 2) -> PairSet:  # fmt: skip
    """Read a split once: films through the project's ImageTransform, kept as uint8; reports tokenised.

    Caching uint8 films saves re-decoding PNGs every epoch (the transform is deterministic at eval
    settings, and uint8 holds its output exactly: grayscale k/255 values before normalisation).
    """
    from xraygpt.data.dataset import CaptionDataset
    from xraygpt.data.image_processing import ImageTransform

    if not processing.grayscale_to_rgb:
        raise ValueError("stage 0 caches grayscale films; the encoder's processing must have grayscale_to_rgb=true")
    ds = CaptionDataset(root, ann_file, transform=ImageTransform(processing, train=False))
    if len(ds) == 0:
        raise ValueError(f"{ann_file} holds no pairs")
    mean, std = processing.mean[0], processing.std[0]

    def one(i: int) -> torch.Tensor:  # (S, S) uint8
        x = ds[i]["image"][0]  # normalised float (S, S): undo the normalisation exactly
        return (x * std + mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL decodes without the GIL
        images = torch.stack(list(pool.map(one, range(len(ds)))))
    records = [ds.record(i) for i in range(len(ds))]
    ids, captions = [r["image_id"] for r in records], [r["caption"] for r in records]
    tokens = tokenizer(captions).long()  # (N, context_length), truncated to the context with <eot> kept
    classes = labels = labelled = None
    if labels_file is not None:
        classes, labels, labelled = read_labels(labels_file, ids)
    return PairSet(ids, captions, images, tokens, labels, labelled, classes, processing)


@dataclass
class Stage0Data:
    root: Path
    train_file: Path
    eval_file: Path
    labels_file: Path | None
    identity: dict  # what went into the run (stage0_meta.json "data")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(cfg: EncoderPretrainConfig) -> Stage0Data:
    """Build/reuse the embedded dataset (or check a given folder) and name the files stage 0 reads."""
    d = cfg.data
    identity: dict[str, Any] = {"embedded": d.embedded}
    if d.embedded:
        from xraygpt.data.embedded import build_embedded_dataset

        t0 = time.perf_counter()
        ds = build_embedded_dataset(out_dir=Path(d.root) if d.root else None, limit=d.limit)
        root = ds.root
        identity.update(manifest_version=ds.manifest.get("version"), n_images=ds.manifest.get("n_images"),
                        splits=ds.manifest.get("splits"), build_reused=ds.reused,
                        build_seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
    else:
        root = Path(d.root).expanduser()
        if not (root / "image").is_dir():
            raise FileNotFoundError(f"data.root {root} has no image/ folder (expected XrayGPT's layout)")
    train_file, eval_file = _resolve(root, d.ann_file), _resolve(root, d.eval_ann_file)
    labels_file = _resolve(root, d.labels_file) if d.labels_file else None
    named = {"data.ann_file": train_file, "data.eval_ann_file": eval_file, "data.labels_file": labels_file}
    for what, p in named.items():
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"{what}: {p} not found")
    if cfg.loss.semantic and labels_file is None:
        raise ConfigError("loss.semantic=true needs labels: set data.labels_file, or loss.semantic=false")
    if d.label_set == "mesh":
        from xraygpt.data.mesh_labels import write_mesh_labels

        labels_file = write_mesh_labels(labels_file, train_file, Path(cfg.run.output_dir) / "labels_mesh.json",
                                        d.mesh_min_films)
    identity.update(root=str(root), ann_file=str(train_file), ann_sha256=_sha256(train_file),
                    labels_file=str(labels_file) if labels_file else None,
                    labels_sha256=_sha256(labels_file) if labels_file else None)  # fmt: skip
    if d.label_set != "chexpert":  # only then: runs made before label_set existed keep their identity
        identity.update(label_set=d.label_set, mesh_min_films=d.mesh_min_films)
    return Stage0Data(root, train_file, eval_file, labels_file, identity)


# ------------------------------------------------------------------------------------------------- loss
def semantic_similarity(labels: torch.Tensor) -> torch.Tensor:
    """(B, C) 0/1 label vectors -> (B, B) symmetric match strengths (MedCLIP's semantic matching).

    sim[i, j] = cosine(labels_i, labels_j) in [0, 1]; the diagonal is 1 (a pair always matches itself,
    including an unlabelled all-zero pair, which matches nothing else).
    """
    unit = F.normalize(labels.float(), dim=1)  # all-zero rows stay zero
    sim = unit @ unit.T  # (B, B)
    return sim.fill_diagonal_(1.0)


def semantic_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, C) labels -> (B, B) image->text soft targets: `semantic_similarity` with rows summing to 1."""
    sim = semantic_similarity(labels)
    return sim / sim.sum(1, keepdim=True)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     match: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Soft-target CLIP loss, both directions.

    Features (B, E) L2-normalised. `match` (B, B) >= 0 says how well image i matches report j (None = the
    identity, plain CLIP); each direction normalises its own rows, so a symmetric `match` gives both
    directions the same targets.
    """
    logits = logit_scale * image_features @ text_features.T  # (B, B): row i = image i against every report
    if match is None:
        match = torch.eye(len(logits), dtype=logits.dtype)
    if match.shape != logits.shape or bool((match.diagonal() <= 0).any()):
        raise ValueError(f"match must be ({len(logits)}, {len(logits)}) with a positive diagonal")
    t_i2t = match / match.sum(1, keepdim=True)
    t_t2i = match.T / match.T.sum(1, keepdim=True)
    loss_i2t = -(t_i2t * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t2i = -(t_t2i * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def label_loss(heads: nn.ModuleDict, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor,
               labelled: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """BCE of per-tower linear heads on the (B, E) unit embeddings against (B, C) labels; unlabelled rows skipped."""
    if not bool(labelled.any()):
        return img.new_zeros(())
    scale = img.shape[1] ** 0.5  # unit vectors -> unit-variance coordinates, so the heads start in range
    y = labels[labelled]
    return sum(F.binary_cross_entropy_with_logits(heads[k](f[labelled] * scale), y)
               for k, f in (("image", img), ("text", txt))) / 2  # fmt: skip


def encode_image(model: nn.Module, pixels: torch.Tensor, pool: str = "patch_mean", normalize: bool = True
                 ) -> torch.Tensor:  # fmt: skip
    """(B, 3, S, S) -> (B, E) image embedding of an open_clip ViT, pooled as `pool` says (see IMAGE_POOLS)."""
    v = model.visual
    if pool == "cls":
        x = v(pixels) if not v.output_tokens else v(pixels)[0]
    elif pool == "patch_mean" and hasattr(v, "trunk"):
        x = v(pixels)  # timm convnet tower pooled with "avg": its pooled output is the mean over the feature map
    elif pool == "patch_mean":
        if not hasattr(v, "proj") or not hasattr(v, "output_tokens"):
            raise ValueError(f"image_pool=patch_mean needs an open_clip VisionTransformer, got {type(v).__name__}")
        saved, v.output_tokens = v.output_tokens, True
        try:
            _, tokens = v(pixels)  # (B, T, W): patch tokens after ln_post, before the projection
        finally:
            v.output_tokens = saved
        x = tokens.mean(1)  # (B, W)
        x = x @ v.proj if v.proj is not None else x  # (B, E)
    else:
        raise ValueError(f"image pool must be one of {IMAGE_POOLS}, got {pool!r}")
    return F.normalize(x, dim=-1) if normalize else x


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """open_clip CLIP.encode_text on tokens trimmed to the longest report in the batch: (B, L) -> (B, E).

    Identical to the full-context call (causal attention: padding after <eot> never reaches earlier tokens,
    and pooling takes the <eot> position), but the cost follows the batch's real length, not 128.
    """
    from open_clip.transformer import text_global_pool

    n = int((tokens != PAD_ID).sum(1).max())
    tokens = tokens[:, :n]  # (B, n)
    x = model.token_embedding(tokens) + model.positional_embedding[:n]  # (B, n, W)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B, E)
    return F.normalize(x, dim=-1) if normalize else x


# ------------------------------------------------------------------------------------------------- training
def batch_order(lengths: torch.Tensor, batch_size: int, buckets: int, g: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches (full batches only): shuffled, then sorted by length within groups of `buckets`."""
    perm = torch.randperm(len(lengths), generator=g)
    if buckets > 1:
        group = batch_size * buckets
        parts = [perm[i : i + group] for i in range(0, len(perm), group)]
        perm = torch.cat([p[torch.argsort(lengths[p], stable=True)] for p in parts])
    batches = [perm[i : i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(total: int, warmup: int, lr: float, min_lr: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))) / lr

    return f


@dataclass
class Stage0Result:
    checkpoint: Path
    meta: dict
    reused: bool
    model: nn.Module | None = None  # the trained CLIP model (None when reused)


def _complete_run(out: Path, cfg: EncoderPretrainConfig, data_identity: dict) -> dict | None:
    """The meta of a finished run in `out` with the same config and data; None when there is none.

    Raises when `out` holds a finished run of a different config or data (never silently overwrite it).
    """
    meta_file, ckpt = out / META_NAME, out / CHECKPOINT_NAME
    if not (meta_file.is_file() and ckpt.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    want = {"config": _identity_config(cfg), "data": _data_key(data_identity)}
    have = {"config": meta.get("identity_config"), "data": _data_key(meta.get("data", {}))}
    if want != have:
        diff = [k for k in ("config", "data") if want[k] != have[k]]
        detail = ""
        if want["config"] != have["config"] and isinstance(have["config"], dict):
            keys = [f"{s}.{k}" for s in want["config"] for k in want["config"][s]
                    if (have["config"].get(s) or {}).get(k) != want["config"][s][k]]  # fmt: skip
            detail = f" (differs at {', '.join(keys)})"
        raise FileExistsError(f"{out} holds a stage-0 run with another {' and '.join(diff)}{detail}; set "
                              "run.force=true to overwrite it or choose another run.output_dir")  # fmt: skip
    return meta


def _data_key(identity: dict) -> dict:
    return {k: identity.get(k) for k in ("embedded", "manifest_version", "n_images", "ann_sha256", "labels_sha256")}


def pretrain_encoder(cfg: EncoderPretrainConfig, train: PairSet | None = None) -> Stage0Result:
    """Train (or reuse) the stage-0 encoder and save it; `train` skips loading the pairs again."""
    from tqdm.auto import tqdm

    from xraygpt.encoders.open_clip_encoder import (
        build_open_clip_model,
        get_model_cfg,
        get_open_clip_tokenizer,
        save_open_clip_checkpoint,
    )

    t_start = time.perf_counter()
    out = Path(cfg.run.output_dir).expanduser()
    get_model_cfg(cfg.model.name)  # unknown names fail before any work
    data = prepare_data(cfg)
    if not cfg.run.force:
        meta = _complete_run(out, cfg, data.identity)
        if meta is not None:
            log.info("stage 0: reusing the finished run in %s (run.force=true retrains)", out)
            if not (out / INIT_NAME).is_file():  # runs saved before the init file existed
                save_initial_encoder(cfg, out / INIT_NAME, meta.get("label_classes"))
            return Stage0Result(out / CHECKPOINT_NAME, meta, reused=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)  # an interrupted retrain must not look complete

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.run.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(cfg.run.seed)
            model = build_open_clip_model(cfg.model.name)
            tokenizer = get_open_clip_tokenizer(cfg.model.name)
            processing = _processing_for(cfg.model.name)
            t0 = time.perf_counter()
            if train is None:
                train = load_pairs(data.root, data.train_file, data.labels_file, processing, tokenizer,
                                   cfg.run.threads)  # fmt: skip
            load_seconds = time.perf_counter() - t0
            history, steps, train_seconds, heads = _train(model, train, cfg, tqdm)
    finally:
        torch.set_num_threads(threads_before)

    meta = {
        "version": META_VERSION,
        "model_name": cfg.model.name,
        "checkpoint": CHECKPOINT_NAME,
        "config": to_dict(cfg),
        "identity_config": _identity_config(cfg),
        "data": {**data.identity, "n_train": len(train),
                 "truncated_reports": int((train.tokens[:, -1] != PAD_ID).sum()),
                 "context_length": int(train.tokens.shape[1])},  # fmt: skip
        "processing": processing.to_dict(),
        "label_classes": train.classes if heads is not None else None,
        "train": {"steps": steps, "epoch_mean_loss": history, "logit_scale": round(model.logit_scale.exp().item(), 4),
                  "load_seconds": round(load_seconds, 2), "train_seconds": round(train_seconds, 2),
                  "total_seconds": round(time.perf_counter() - t_start, 2)},  # fmt: skip
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_open_clip_checkpoint(model, out / CHECKPOINT_NAME, meta={"stage0_meta": META_NAME, "seed": cfg.run.seed},
                              label_head=heads["image"] if heads is not None else None,
                              label_classes=train.classes, image_pool=cfg.model.image_pool)  # fmt: skip
    save_initial_encoder(cfg, out / INIT_NAME, train.classes if heads is not None else None)
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=1) + "\n")  # last: marks the run complete
    log.info("stage 0: saved %s (%d steps, loss %.4f -> %.4f, %.0f s)", out / CHECKPOINT_NAME, steps,
             history[0], history[-1], train_seconds)  # fmt: skip
    return Stage0Result(out / CHECKPOINT_NAME, meta, reused=False, model=model.eval())


def save_initial_encoder(cfg: EncoderPretrainConfig, path: Path, label_classes: list[str] | None) -> Path:
    """The untrained model (seeded by run.seed, as stage 0 and evaluate_encoder's random reference build it)
    with an untrained label head when stage 0 trains one: same architecture, same feature shapes, no learning."""
    from xraygpt.encoders.open_clip_encoder import build_open_clip_model, save_open_clip_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = build_open_clip_model(cfg.model.name)
        head = nn.Linear(model.text_projection.shape[-1], len(label_classes)) if label_classes else None
    return save_open_clip_checkpoint(model, path, meta={"untrained": True, "seed": cfg.run.seed}, label_head=head,
                                     label_classes=label_classes, image_pool=cfg.model.image_pool)  # fmt: skip


def _processing_for(name: str) -> ImageProcessingConfig:
    """The processing `build_encoder` will use for this config, so stage 0 and later stages see the same pixels."""
    from xraygpt.encoders import build_encoder

    return build_encoder(EncoderConfig(type="open_clip", name=name)).processing


def _train(model: nn.Module, train: PairSet, cfg: EncoderPretrainConfig, tqdm
           ) -> tuple[list[float], int, float, nn.ModuleDict | None]:  # fmt: skip
    """The training loop: (epoch mean losses, steps, seconds, the label heads or None)."""
    o, r = cfg.optim, cfg.run
    if cfg.loss.semantic and train.labels is None:
        raise ConfigError("loss.semantic=true needs labels for the training pairs (data.labels_file)")
    if len(train) < r.batch_size:
        raise ValueError(f"{len(train)} training pairs are fewer than run.batch_size={r.batch_size}")
    per_epoch = len(train) // r.batch_size
    total = per_epoch * r.epochs if r.max_steps is None else min(per_epoch * r.epochs, r.max_steps)
    groups = _param_groups(model, o.weight_decay)
    heads = None
    if cfg.loss.label_weight > 0:
        if train.labels is None:
            raise ConfigError("loss.label_weight > 0 needs labels for the training pairs (data.labels_file)")
        dim, n_cls = model.text_projection.shape[-1], train.labels.shape[1]
        # the image head is saved with the checkpoint (feature="labels"); the text head is not
        heads = nn.ModuleDict({"image": nn.Linear(dim, n_cls), "text": nn.Linear(dim, n_cls)})
        groups.append({"params": list(heads.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(o.warmup_frac * total), o.lr, o.min_lr))
    g = torch.Generator().manual_seed(r.seed)
    lengths, max_scale = train.lengths, math.log(cfg.loss.max_logit_scale)
    model.train()
    history: list[float] = []
    step, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, desc="stage 0", unit="step", disable=not r.progress, dynamic_ncols=True)
    while step < total:
        losses = []
        for idx in batch_order(lengths, r.batch_size, r.length_buckets, g):
            if step >= total:
                break
            img = encode_image(model, train.pixels(idx), cfg.model.image_pool)  # (B, E)
            txt = encode_text(model, train.tokens[idx])  # (B, E)
            match = semantic_similarity(train.labels[idx]) if cfg.loss.semantic else None  # (B, B)
            loss = contrastive_loss(img, txt, model.logit_scale.exp(), match)
            if heads is not None:
                loss = loss + cfg.loss.label_weight * label_loss(heads, img, txt, train.labels[idx],
                                                                 train.labelled[idx])  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)
            step += 1
            losses.append(loss.item())
            if r.log_every and step % r.log_every == 0:
                recent = float(np.mean(losses[-r.log_every:]))
                log.info("step %d/%d loss %.4f lr %.2e temperature %.4f (%.1f s)", step, total, recent,
                         sched.get_last_lr()[0], 1 / model.logit_scale.exp().item(), time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", t=f"{1 / model.logit_scale.exp().item():.3f}")
        history.append(round(float(np.mean(losses)), 5))
    bar.close()
    model.eval()
    if heads is not None:
        heads.eval()
    return history, step, time.perf_counter() - t0, heads


# ------------------------------------------------------------------------------------------------- evaluation
def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mann-Whitney AUROC with average ranks for ties; None without both a positive and a negative."""
    labels = np.asarray(labels).astype(bool)
    pos, n = int(labels.sum()), len(labels)
    if pos == 0 or pos == n:
        return None
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(n, np.float64)
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], n]
    for a, b in zip(starts, ends):  # tied block [a, b): average rank
        ranks[order[a:b]] = (a + b - 1) / 2 + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, l2: float = 1e-3, iters: int = 200
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One L2-regularised logistic regression per class on standardised features (full-batch L-BFGS).

    Returns (mean, std, W (D, C), b (C,)); score new features with `((x - mean) / std) @ W + b`.
    """
    x_train, y_train = x_train.double(), y_train.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x = (x_train - mean) / std  # (N, D)
    w = torch.zeros(x.shape[1], y_train.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y_train.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y_train) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, w.detach(), b.detach()


@torch.no_grad()
def pooled_patch_features(encoder: nn.Module, pairs: PairSet, batch_size: int = 128) -> torch.Tensor:
    """(N, D_img): the mean of the encoder's patch tokens per film (what llama_proj will see, averaged)."""
    feats = [encoder(pairs.pixels(slice(i, i + batch_size))).mean(1) for i in range(0, len(pairs), batch_size)]
    return torch.cat(feats).float()


@torch.no_grad()
def label_head_auroc(name: str, checkpoint: str | Path, pairs: PairSet, batch_size: int = 128
                     ) -> dict[str, float | None] | None:  # fmt: skip
    """Per-class AUROC of the checkpoint's own label head on `pairs`; None when it saved no head."""
    from xraygpt.encoders import build_encoder
    from xraygpt.encoders.open_clip_encoder import has_label_head

    if not has_label_head(checkpoint):
        return None
    enc = build_encoder(EncoderConfig(type="open_clip", name=name, checkpoint=str(checkpoint), feature="labels"))
    n_cls = len(enc.label_classes)
    scores = torch.cat([enc(pairs.pixels(slice(i, i + batch_size)))[:, 0, :n_cls]
                        for i in range(0, len(pairs), batch_size)]).double().numpy()  # fmt: skip
    keep = pairs.labelled.numpy()
    y = pairs.labels.numpy()[keep]
    return {c: _round(auroc(scores[keep, k], y[:, k])) for k, c in enumerate(enc.label_classes)}


def probe_auroc(train_x: torch.Tensor, train: PairSet, test_x: torch.Tensor, test: PairSet) -> dict[str, float | None]:
    """Per-class test AUROC of linear probes fit on the train features; unlabelled films are left out."""
    if train.labels is None or test.labels is None:
        raise ValueError("the linear probe needs labels for both splits (data.labels_file)")
    keep_tr, keep_te = train.labelled, test.labelled
    mean, std, w, b = fit_linear_probe(train_x[keep_tr], train.labels[keep_tr])
    scores = (((test_x[keep_te].double() - mean) / std) @ w + b).numpy()
    y = test.labels[keep_te].numpy()
    return {c: _round(auroc(scores[:, k], y[:, k])) for k, c in enumerate(test.classes)}


@torch.no_grad()
def retrieval_scores(model: nn.Module, pairs: PairSet, ks: Sequence[int] = (1, 5, 10), batch_size: int = 128,
                     image_pool: str = "patch_mean") -> dict[str, float]:  # fmt: skip
    """Image -> report retrieval over the distinct report texts of `pairs`.

    Identical reports (e.g. the same normal wording) are one gallery entry, and a query hits at k when its
    own report text is among the k nearest distinct texts. `label_match@1`: the top text's report has
    exactly the query's label vector (what an image that carries only its findings can at best do).
    """
    model.eval()
    distinct = sorted(set(pairs.captions))
    where = {c: i for i, c in enumerate(distinct)}
    first = {}
    for i, c in enumerate(pairs.captions):
        first.setdefault(c, i)
    gallery_tokens = pairs.tokens[[first[c] for c in distinct]]
    txt = torch.cat([encode_text(model, gallery_tokens[i : i + batch_size])
                     for i in range(0, len(distinct), batch_size)])  # (T, E)  # fmt: skip
    img = torch.cat([encode_image(model, pairs.pixels(slice(i, i + batch_size)), image_pool)
                     for i in range(0, len(pairs), batch_size)])  # (N, E)  # fmt: skip
    sim = img @ txt.T  # (N, T)
    target = torch.tensor([where[c] for c in pairs.captions])  # (N,)
    rank = (sim > sim[torch.arange(len(pairs)), target][:, None]).sum(1)  # texts strictly closer than the truth
    out = {f"R@{k}": round(float((rank < k).float().mean()), 4) for k in ks}
    if pairs.labels is not None:
        top = sim.argmax(1)
        top_labels = pairs.labels[[first[distinct[t]] for t in top.tolist()]]
        out["label_match@1"] = round(float((top_labels == pairs.labels).all(1).float().mean()), 4)
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def evaluate_encoder(cfg: EncoderPretrainConfig, checkpoint: str | Path | None = None, *,
                     train: PairSet | None = None, test: PairSet | None = None,
                     min_positives: int = 20) -> dict:  # fmt: skip
    """Trained encoder vs the same architecture with random weights, on the eval split (data.eval_ann_file).

    Retrieval: the full CLIP model (trained) vs the run's own initial weights (`build_open_clip_model` under
    run.seed). Probe: patch-token means from `build_encoder` with the checkpoint vs with none (the registry's
    seeded random init); logistic regression fit on the training split, AUROC on the eval split.
    """
    from xraygpt.encoders import build_encoder
    from xraygpt.encoders.open_clip_encoder import build_open_clip_model, get_open_clip_tokenizer

    checkpoint = Path(checkpoint) if checkpoint else Path(cfg.run.output_dir) / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise FileNotFoundError(f"stage-0 checkpoint not found: {checkpoint} (run scripts/train_encoder.py first)")
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.run.threads)
    try:
        processing = _processing_for(cfg.model.name)
        tokenizer = get_open_clip_tokenizer(cfg.model.name)
        if train is None:
            train = load_pairs(data.root, data.train_file, data.labels_file, processing, tokenizer, cfg.run.threads)
        if test is None:
            test = load_pairs(data.root, data.eval_file, data.labels_file, processing, tokenizer, cfg.run.threads)
        result: dict[str, Any] = {"checkpoint": str(checkpoint), "eval_ann_file": str(data.eval_file),
                                  "n_train": len(train), "n_test": len(test)}  # fmt: skip

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            random_clip = build_open_clip_model(cfg.model.name).eval()
        trained_clip = build_open_clip_model(cfg.model.name, checkpoint).eval()
        n_distinct = len(set(test.captions))
        result["retrieval"] = {
            "trained": retrieval_scores(trained_clip, test, image_pool=cfg.model.image_pool),
            "random": retrieval_scores(random_clip, test, image_pool=cfg.model.image_pool),
            "chance": {f"R@{k}": round(k / n_distinct, 4) for k in (1, 5, 10)},
            "n_queries": len(test),
            "n_distinct_reports": n_distinct,
            "rule": "image->text over the distinct report texts of the split; a hit when the query's own report "
                    "text is among the k nearest (identical reports count as one text)",
        }  # fmt: skip
        del trained_clip, random_clip

        if train.labels is not None and test.labels is not None:
            probe = {}
            for name, ckpt in (("trained", str(checkpoint)), ("random", None)):
                enc = build_encoder(EncoderConfig(type="open_clip", name=cfg.model.name, checkpoint=ckpt))
                probe[name] = probe_auroc(pooled_patch_features(enc, train), train, pooled_patch_features(enc, test),
                                          test)  # fmt: skip
            positives = test.labels[test.labelled].sum(0).int().tolist()
            scored = [c for c, n in zip(test.classes, positives) if n >= min_positives]
            result["probe_auroc"] = {
                **probe,
                "test_positives": dict(zip(test.classes, positives)),
                "macro": {k: _round(float(np.mean([probe[k][c] for c in scored]))) if scored else None
                          for k in probe},  # fmt: skip
                "macro_over": f"classes with >= {min_positives} test positives: {scored}",
                "features": "mean of the patch tokens (build_encoder, feature='patch'); L2 logistic regression "
                            "per class on standardised features; unlabelled films left out",
            }  # fmt: skip
            head = label_head_auroc(cfg.model.name, checkpoint, test)
            if head is not None:
                result["label_head_auroc"] = {
                    "trained": head,
                    "macro": _round(float(np.mean([head[c] for c in scored]))) if scored else None,
                    "scores": "the saved stage-0 image label head's logits (build_encoder, feature='labels')",
                }  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def write_eval(result: dict, path: Path) -> Path:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path


__all__ = [
    "CHECKPOINT_NAME", "EVAL_NAME", "INIT_NAME", "META_NAME", "EncoderPretrainConfig", "PairSet", "Stage0DataConfig",
    "Stage0LossConfig", "Stage0ModelConfig", "Stage0OptimConfig", "Stage0Result", "Stage0RunConfig", "auroc",
    "batch_order", "contrastive_loss", "encode_text", "evaluate_encoder", "fit_linear_probe", "label_head_auroc",
    "load_pairs",
    "pooled_patch_features", "prepare_data", "pretrain_encoder", "probe_auroc", "read_labels", "retrieval_scores",
    "save_initial_encoder", "semantic_similarity", "semantic_targets", "write_eval",
]  # fmt: skip
