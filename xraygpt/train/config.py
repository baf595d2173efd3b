"""The training recipe's config: one dataclass per YAML section, defaults that say everything.

Stage 1 / stage 2 differ only in their YAML (data, lr schedule, `init_from`); see configs/*.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xraygpt.model import ModelConfig


@dataclass
class DataConfig:
    root: str = ""  # dataset folder holding image/<image_id>.(jpg|png); ${oc.env:...} interpolation works
    ann_file: str = "filter_cap.json"  # training annotations, relative to root unless absolute
    val_ann_file: str | None = None  # validation annotations (same format); None = no validation
    prompt_file: str | None = None  # one instruction per line with <ImageHere>; None = the shipped file
    on_missing: str = "error"  # missing image: "error" | "skip" (counted)
    limit: int | None = None  # use only the first N training samples (smoke runs)
    val_limit: int | None = None
    num_workers: int = 0  # DataLoader workers for image decoding
    augment: bool = False  # mild geometric jitter; off by default so the feature cache stays exact
    embedded: bool = False  # build/locate the embedded IU dataset and use it as root
    # Batches padded to a multiple of this many tokens: few distinct shapes, so CPU kernel caches (oneDNN) stay
    # small and warm. Padding to the longest only made RSS grow ~20 MB a step on the embedded stage 1. null: off
    pad_to_multiple_of: int | None = 16

    def validate(self) -> None:
        if self.on_missing not in ("error", "skip"):
            raise ValueError(f"data.on_missing must be 'error' or 'skip', got '{self.on_missing}'")
        if not self.root and not self.embedded:
            raise ValueError("data.root is empty: point it at a dataset folder (or set data.embedded=true)")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of must be >= 1 or null, got {self.pad_to_multiple_of}")


@dataclass
class OptimConfig:
    """AdamW + linear warmup from warmup_lr + per-step cosine from init_lr to min_lr (original XrayGPT values)."""

    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 500
    weight_decay: float = 0.05  # only on >= 2-D weights
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        if self.warmup_steps < 0 or self.init_lr <= 0 or self.min_lr < 0:
            raise ValueError("optim: warmup_steps >= 0, init_lr > 0 and min_lr >= 0 are required")


PROJ_INITS = ("default", "embedding_scale")  # how a fresh projection starts (xraygpt/train/init.py)


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    seed: int = 42
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per device (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    total_batch_size: int | None = None  # if set, must equal batch_size x processes x grad_accum
    mixed_precision: str = "no"  # no | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end (if val data)
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # step checkpoints kept besides the best
    resume: str = "never"  # never | auto | <checkpoint dir>
    init_from: str | None = None  # stage 2: stage-1 output dir / model dir / original .pth
    # a fresh projection (no init_from): "default" = nn.Linear's init; "embedding_scale" = that init rescaled so
    # image embeds start at the norm of the LLM's word embeddings (xraygpt/train/init.py says why)
    proj_init: str = "default"
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this invocation: time-sliced jobs
    feature_cache: bool = False  # precompute frozen-encoder outputs once (eval transform)
    feature_cache_dir: str | None = None  # default: $XRAYGPT_CACHE/features
    progress: bool = True  # tqdm bar
    threads: int | None = None  # torch CPU threads (None = torch default)
    # > 0: each run of this many global batches (of the epoch's shuffled order) is sorted by length before it is cut
    # into batches, whose order is then shuffled: less padding, ~20% fewer tokens a step on the embedded data at 16
    # (xraygpt/train/batches.py). 0 = plain shuffling. Changes which samples share a batch, so results move a little.
    group_by_length: int = 0

    def validate(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"run.mixed_precision must be no|bf16|fp16, got '{self.mixed_precision}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"run.device must be auto|cpu|cuda, got '{self.device}'")
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("run.batch_size, run.grad_accum and run.max_steps must be >= 1")
        if self.group_by_length < 0:
            raise ValueError(f"run.group_by_length must be >= 0 (0 = off), got {self.group_by_length}")
        if self.proj_init not in PROJ_INITS:
            raise ValueError(f"run.proj_init must be {'|'.join(PROJ_INITS)}, got '{self.proj_init}'")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "xraygpt"
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb.mode must be offline|online|disabled, got '{self.mode}'")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(embedded=True))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
