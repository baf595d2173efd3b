"""Deterministic batch order: a pure function of (seed, global step), so resume needs only the step count.

Each epoch is a seeded permutation of the dataset cut into global batches of
`batch_size x num_processes x grad_accum` samples (a trailing partial batch is dropped). Optimizer step `s`
takes global batch `s mod steps_per_epoch` of epoch `s // steps_per_epoch`; micro-batch `m` of rank `r` is a
contiguous slice of it. The same global batch is therefore seen whatever the process count.

With `group` > 0 and per-sample `lengths`, each run of `group` global batches of that permutation is sorted by
length (longest first) before it is cut, and those batches are then taken in a seeded random order: a batch holds
samples of similar length, so padding (and the time it costs) shrinks, while the epoch's sample order stays random at
the scale of the group (transformers' group_by_length does the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    batch_size: int  # per process, per micro-batch
    num_processes: int
    grad_accum: int
    seed: int
    lengths: tuple[int, ...] | None = None  # per sample (tokens); only read when group > 0
    group: int = 0  # global batches per length-sorted group; 0 = plain shuffling
    # the last epoch's permutation: every step of an epoch reads it (a loader plans all its steps at once)
    _epoch_cache: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.group < 0:
            raise ValueError(f"run.group_by_length must be >= 0 (0 = off), got {self.group}")
        if self.group and (self.lengths is None or len(self.lengths) != self.num_samples):
            raise ValueError(f"length grouping needs one length per sample ({self.num_samples}), got "
                             f"{None if self.lengths is None else len(self.lengths)}")

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
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()
            self._epoch_cache[epoch] = self._make_permutation(epoch)
        return self._epoch_cache[epoch]

    def _make_permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        if not self.group:
            return perm
        lengths, gb = torch.tensor(self.lengths), self.global_batch
        parts = []
        for part in perm.split(gb * self.group):  # (<= group * gb,) each
            part = part[torch.argsort(lengths[part], descending=True, stable=True)]
            n = len(part) // gb
            parts += [part[: n * gb].view(n, gb)[torch.randperm(n, generator=g)].reshape(-1), part[n * gb:]]
        return torch.cat(parts)

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
