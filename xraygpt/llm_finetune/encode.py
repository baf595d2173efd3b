"""Conversations -> token ids and labels, with the vision stages' template, tokenized the same way.

One two-turn conversation with the default template (each piece tokenized on its own, as
xraygpt.processing does for the vision stages, so an answer starts at the same token boundary there):

    [bos] tok("###Patient: {q1} ###Doctor: ") tok("{a1}###") tok("###Patient: {q2} ###Doctor: ") tok("{a2}###")
    labels: -100 ..............................  a1 ids + end  -100 ............................  a2 ids + end

Loss falls on the doctor's answers and their end marker only (generation stops on that marker).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from xraygpt.conversation import ConversationTemplate
from xraygpt.llm_finetune.conversations import Conversation, DataReport, Problem, check_usable, read_sharegpt
from xraygpt.processing import IGNORE_INDEX, EncodedSample, PromptProcessor


class ConversationEncoder:
    def __init__(self, tokenizer, template: ConversationTemplate, max_len: int, pad_to_multiple_of: int | None = None):
        # The vision stages' processor gives us the same bos rule and its padding (pad id, attention 0, label
        # -100); text-only samples never hold image slots, so its image-token count is irrelevant here.
        self.processor = PromptProcessor(tokenizer, template, num_image_tokens=1)
        self.tokenizer = tokenizer
        self.template = template
        self.max_len = max_len
        self.pad_to_multiple_of = pad_to_multiple_of

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode(self, conv: Conversation) -> EncodedSample:
        ids: list[int] = list(self.processor.bos)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        for k, (question, answer) in enumerate(conv.turns):
            system = self.template.system if k == 0 else ""
            prompt = self._tok(f"{system}{self.template.user_turn(question)}{self.template.assistant_prefix()}")
            target = self._tok(self.template.answer(answer))
            ids += prompt + target
            labels += [IGNORE_INDEX] * len(prompt) + target
        return EncodedSample(ids, labels)

    def collate(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """Right-padded batch: input_ids, attention_mask, labels, each (B, L)."""
        return self.processor.pad(samples, "right", self.pad_to_multiple_of)


def encode_file(path: str | Path, encoder: ConversationEncoder, limit: int | None = None,
                on_bad: str = "skip") -> tuple[list[EncodedSample], DataReport]:
    """Usable conversations of `path`, tokenized; longer than the context ones skipped (counted).

    Raises ValueError naming the file when nothing usable is left.
    """
    conversations, report = read_sharegpt(path, on_bad)
    samples: list[EncodedSample] = []
    for conv in conversations:
        sample = encoder.encode(conv)
        if len(sample.input_ids) > encoder.max_len:
            problem = Problem(conv.index, conv.id, "too_long",
                              f"{len(sample.input_ids)} tokens > data.max_len {encoder.max_len}")
            if on_bad == "error":
                raise ValueError(f"{path}: {problem.where()}: {problem.detail} (raise data.max_len, or "
                                 f"data.on_bad=skip to skip it)")
            report.skipped.append(problem)
            continue
        samples.append(sample)
    if limit is not None:
        samples = samples[:limit]
    report.used = len(samples)
    check_usable(report)
    return samples, report


class EncodedConversations(Dataset):
    """Indexed by (epoch, sample index), the key xraygpt.train.batches.BatchPlan yields."""

    def __init__(self, samples: list[EncodedSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> EncodedSample:
        return self.samples[key[1]]
