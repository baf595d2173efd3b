"""Learning rate: linear warmup from `warmup_lr` to `init_lr`, then per-step cosine down to `min_lr`."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate used for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return warmup_lr + (init_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, init_lr: float, min_lr: float, warmup_lr: float,
                    warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor times `init_lr` (the optimizer's base lr) is `lr_at(step)`."""
    for group in optimizer.param_groups:
        group["lr"] = init_lr
        group["initial_lr"] = init_lr

    def factor(step: int) -> float:
        return lr_at(step, init_lr=init_lr, min_lr=min_lr, warmup_lr=warmup_lr, warmup_steps=warmup_steps,
                     total_steps=total_steps) / init_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
