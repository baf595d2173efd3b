"""From dataset samples to model batches: per-sample seeded instruction, tokenization, stacking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xraygpt.conversation import pick_instruction
from xraygpt.processing import PromptProcessor


class InstructionDataset(Dataset):
    """Indexed by (epoch, sample index); adds the sample's instruction, and cached features when given.

    The instruction is a function of (seed, epoch, index) only, so it does not depend on the batch, the
    number of processes, or whether the run was resumed.
    """

    def __init__(self, base, prompts: Sequence[str], seed: int, features: np.ndarray | None = None):
        self.base = base
        self.prompts = list(prompts)
        self.seed = seed
        self.features = features  # (N, T, D_img) memmap from the feature cache, or None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if self.features is not None:
            record = self.base.record(index)
            sample = {"image_features": torch.from_numpy(np.array(self.features[index], dtype=np.float32)),
                      "caption": record["caption"], "image_id": record["image_id"]}
        else:
            sample = dict(self.base[index])
        sample["instruction"] = pick_instruction(self.prompts, self.seed, epoch, index)
        return sample


class TrainCollator:
    def __init__(self, processor: PromptProcessor, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.processor([s["instruction"] for s in samples], [s["caption"] for s in samples],
                                               padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        if "image_features" in samples[0]:
            batch["image_features"] = torch.stack([s["image_features"] for s in samples])  # (B, T, D_img)
        else:
            batch["pixel_values"] = torch.stack([s["image"] for s in samples])  # (B, 3, H, W)
        batch["image_ids"] = [s["image_id"] for s in samples]
        return batch
