"""AdamW over the trainable parameters only: weight decay on >= 2-D weights, none on biases and norms."""

from __future__ import annotations

import torch
from torch import nn

from xraygpt.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen: no optimizer state at all
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.init_lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)
