"""The model side of LLM fine-tuning: what to start from, what trains, what a checkpoint and the output hold.

- Start: the base LLM (`model.llm`, any xraygpt.llm source), or a previous fine-tune's output (`run.init_from`),
  whose recorded base must be the same `model.llm.name_or_path` (a chain never silently switches models).
- Train: every weight (`full`) or LoRA adapters on the named linear layers (`lora`, peft).
- Checkpoint: the trainable weights only (`trainable.safetensors`: the adapters for LoRA).
- Output: a plain HF folder (LoRA merged into the weights) + tokenizer + `xraygpt_finetune.json` (the chain), so
  the vision recipe loads it as any LLM: `model.llm.name_or_path=<output_dir>/final`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xraygpt.llm import load_llm
from xraygpt.llm_finetune.config import FinetuneConfig, LoraSettings

log = logging.getLogger(__name__)

LINEAGE_NAME = "xraygpt_finetune.json"
TRAINABLE_NAME = "trainable.safetensors"
LINEAGE_VERSION = 1


class IncompatibleInitError(ValueError):
    """run.init_from was fine-tuned from another base model."""


def find_finetune_output(source: str | Path) -> Path:
    """The HF folder of a previous fine-tune: `source` itself when it is one, else `source/final`."""
    source = Path(source).expanduser()
    for folder in (source, source / "final"):
        if (folder / "config.json").is_file() and (folder / LINEAGE_NAME).is_file():
            return folder
    raise FileNotFoundError(
        f"run.init_from={source}: no fine-tuned model there (looked for config.json and {LINEAGE_NAME} in it and "
        f"in final/). Give the output_dir of a finished scripts/finetune_llm.py run; to start from a plain model "
        f"folder instead, set model.llm.name_or_path=<folder>.")


def read_lineage(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / LINEAGE_NAME).read_text(encoding="utf-8"))


def resolve_start(cfg: FinetuneConfig) -> tuple[str, dict[str, Any] | None]:
    """(what load_llm should load, the parent fine-tune's lineage or None)."""
    if not cfg.run.init_from:
        return cfg.model.llm.name_or_path, None
    folder = find_finetune_output(cfg.run.init_from)
    parent = read_lineage(folder)
    if parent["base_model"] != cfg.model.llm.name_or_path:
        raise IncompatibleInitError(
            f"run.init_from={folder} was fine-tuned from base model '{parent['base_model']}', but this run names "
            f"model.llm.name_or_path='{cfg.model.llm.name_or_path}'. Set model.llm.name_or_path="
            f"{parent['base_model']} (the chain keeps one base), or drop run.init_from.")
    if parent.get("template") != cfg.data.template:
        log.warning("run.init_from=%s used template '%s'; this run uses '%s' (the vision stages must use the last one)",
                    folder, parent.get("template"), cfg.data.template)
    return str(folder), parent


def linear_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap a frozen causal LM with trainable LoRA adapters (peft)."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError("model.method=lora needs peft: pip install -e '.[llm]' (or use model.method=full)")
    from peft import LoraConfig, get_peft_model

    unknown = sorted(set(lora.target_modules) - linear_names(model))
    if unknown:
        raise ValueError(f"model.lora.target_modules {unknown} name no linear layer of {type(model).__name__}; "
                         f"its linear layers are {sorted(linear_names(model))}")
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def build_model(cfg: FinetuneConfig) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """(model with its trainable part set, tokenizer, parent lineage). The caller seeds torch first."""
    source, parent = resolve_start(cfg)
    model, tokenizer = load_llm(dataclasses.replace(cfg.model.llm, name_or_path=source))  # frozen, eval
    if cfg.model.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = apply_lora(model, cfg.model.lora)
    return model, tokenizer, parent


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold (tied weights appear once: named_parameters de-duplicates)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: Path) -> None:
    save_file(trainable_state(model), str(path))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy saved trainable weights into `model`; the names must match exactly."""
    saved = load_file(str(path))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model (model.method / model.lora changed since it was saved?): "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def lineage(cfg: FinetuneConfig, parent: dict[str, Any] | None, steps_done: int) -> dict[str, Any]:
    """What the output folder was made from: the base, the template, every fine-tune step of the chain."""
    step = {"output_dir": str(cfg.run.output_dir), "method": cfg.model.method, "train_file": cfg.data.train_file,
            "steps": steps_done, "init_from": cfg.run.init_from}
    return {"version": LINEAGE_VERSION, "base_model": cfg.model.llm.name_or_path, "template": cfg.data.template,
            "chain": (parent["chain"] if parent else []) + [step]}


def is_peft(model: nn.Module) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def export_merged(model: nn.Module, tokenizer, folder: Path, info: dict[str, Any]) -> Path:
    """Write a plain HF folder (LoRA merged in place: train no further after this), replacing `folder` atomically."""
    plain = model.merge_and_unload() if is_peft(model) else model
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / LINEAGE_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are shared on clusters
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
