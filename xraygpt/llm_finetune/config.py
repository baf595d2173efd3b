"""Config of the LLM fine-tuning recipe: the vision recipe's optim/run/wandb sections plus model and data.

`run`, `optim` and `wandb` are the vision recipe's own dataclasses (same keys, same meaning, same checks), so
both recipes resume, log and schedule alike. Two `run` keys mean something here: `run.init_from` is a previous
fine-tune's output folder (the chain medical -> radiology), and the feature-cache keys do not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xraygpt.conversation import TEMPLATES
from xraygpt.llm import LLMConfig
from xraygpt.llm_finetune.radiology_conversations import KINDS, check_kinds, check_slot
from xraygpt.train.config import OptimConfig, RunConfig, WandbConfig

METHODS = ("lora", "full")
ON_BAD = ("skip", "error")
# Attention and MLP projections of LLaMA-family models (SmolLM2, Vicuna): LoRA on all of them.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """Low-rank adapters; merged into the base weights when the run ends (the output is a plain model)."""

    r: int = 8
    alpha: int = 16  # scaling = alpha / r
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR))

    def validate(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"model.lora: r >= 1 and alpha > 0 are required, got r={self.r} alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name the linear layers to adapt, e.g. "
                             f"{LLAMA_LINEAR}")


@dataclass
class FinetuneModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)  # the base model (ignored weights-wise with run.init_from)
    method: str = "lora"  # lora | full
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"model.method must be one of {list(METHODS)}, got '{self.method}'")
        if self.llm.load_in_8bit or self.llm.load_in_4bit:
            raise ValueError("model.llm.load_in_8bit/4bit: quantized fine-tuning (QLoRA) is not supported here; "
                             "load the base in float32/bfloat16")


@dataclass
class RadiologySource:
    """Where `embedded:radiology` conversations come from: the embedded IU dataset's split files."""

    embedded_dir: str | None = None  # a built embedded dataset; None = the default cache build (built if missing)
    limit: int | None = None  # build the embedded dataset from the first N reports only (smoke runs)
    seed: int = 0  # question choice per report
    # "qa" (questions about the report) and/or "write_up" (findings in the image slot -> the whole report). Write-ups
    # alone teach a small LLM to condition its report on what the slot says in far fewer steps (README, ablation).
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    # What a write-up's slot names: "chexpert" (the CheXpert-14 findings) or "mesh" (each drawn MeSH finding with
    # its side and zones); see radiology_conversations.SLOTS
    slot: str = "chexpert"

    def validate(self) -> None:
        check_kinds(self.kinds)
        check_slot(self.slot)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.radiology.limit must be >= 1 or null, got {self.limit}")


@dataclass
class FinetuneDataConfig:
    # ShareGPT JSON [{"id", "conversations": [{"from": "human"|"gpt", "value"}]}], or "embedded:radiology"
    # (conversations built at run time from the embedded dataset's train split into <output_dir>/data/).
    train_file: str | None = None
    val_file: str | None = None  # same format, or "embedded:radiology:val"; None = no validation
    template: str = "xraygpt"  # the vision stages' conversation template (xraygpt.conversation.TEMPLATES)
    max_len: int = 512  # tokens per conversation; longer ones are skipped (counted), never truncated
    limit: int | None = None  # use only the first N usable training conversations
    val_limit: int | None = None
    on_bad: str = "skip"  # a malformed conversation: "skip" (counted, named in a warning) | "error"
    pad_to_multiple_of: int | None = 16  # as the vision recipe's data.pad_to_multiple_of (few shapes, flat RSS)
    radiology: RadiologySource = field(default_factory=RadiologySource)

    def validate(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template must be one of {sorted(TEMPLATES)}, got '{self.template}'")
        if self.on_bad not in ON_BAD:
            raise ValueError(f"data.on_bad must be one of {list(ON_BAD)}, got '{self.on_bad}'")
        if self.max_len < 8:
            raise ValueError(f"data.max_len must be >= 8 tokens, got {self.max_len}")
        for key in ("limit", "val_limit", "pad_to_multiple_of"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key} must be >= 1 or null, got {value}")


def _default_optim() -> OptimConfig:
    # LoRA-sized defaults; the paper-scale values live in configs/llm/*.yaml.
    return OptimConfig(init_lr=2e-4, min_lr=2e-5, warmup_lr=1e-6, warmup_steps=20, weight_decay=0.0)


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(default_factory=_default_optim)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/llm/run", batch_size=4))
    wandb: WandbConfig = field(default_factory=WandbConfig)
