"""Deterministic batch order: a pure function of (seed, global step), so resume needs only the step count.

Each epoch is a seeded permutation of the dataset cut into global batches of
`batch_size x num_processes x grad_accum` samples (a trailing partial batch is dropped). Optimizer step `s`
takes global batch `s mod steps_per_epoch` of epoch `s // steps_per_epoch`; micro-batch `m` of rank `r` is a
contiguous slice of it. The same global batch is therefore seen whatever the process count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    batch_size: int  # per process, per micro-batch
    num_processes: int
    grad_accum: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_samples // self.global_batch
        if steps == 0:
            raise ValueError(f"{self.num_samples} training samples are fewer than one global batch of "
                             f"{self.global_batch} (batch_size {self.batch_size} x processes {self.num_processes} x "
                             f"grad_accum {self.grad_accum}); lower run.batch_size or run.grad_accum")
        return steps

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def step_samples(self, step: int) -> tuple[int, list[int]]:
        """(epoch, sample indices of the whole global batch) for optimizer step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        return epoch, perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches for `step`: lists of (epoch, sample index)."""
        epoch, samples = self.step_samples(step)
        per_micro = self.batch_size * self.num_processes
        out = []
        for m in range(self.grad_accum):
            chunk = samples[m * per_micro:(m + 1) * per_micro]
            mine = chunk[rank * self.batch_size:(rank + 1) * self.batch_size]
            out.append([(epoch, i) for i in mine])
        return out

    def iter_micro_batches(self, start_step: int, end_step: int, rank: int) -> Iterator[list[tuple[int, int]]]:
        for step in range(start_step, end_step):
            yield from self.micro_batches(step, rank)
