"""Text side of XrayGPT batches: prompts + answers -> input_ids with image slots, labels, attention mask.

One sample's token layout (T = the encoder's number of image tokens):

    [bos] tok("###Patient: <Img") [IMG]*T tok("</Img> {instruction} ###Doctor: ") tok("{answer}###")
    labels: -100 ..................................................................  answer ids + end ids

`IMAGE_TOKEN_ID` (-200) marks the T slots; `XrayGPT.merge_image_features` fills them with projected image
features. Prompts and answers are tokenized separately, so the answer starts at the same token boundary in
training and in generation. Training pads on the right, generation on the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xraygpt.conversation import IMAGE_PLACEHOLDER, ConversationTemplate

IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]


class PromptProcessor:
    """Tokenizes conversation prompts and answers into model inputs (no images here: see XrayGPT)."""

    def __init__(self, tokenizer, template: ConversationTemplate, num_image_tokens: int,
                 max_txt_len: int = 160, add_bos: bool = True):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; load it with xraygpt.llm.load_llm or set one")
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.max_txt_len = max_txt_len
        self.bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode_prompt(self, instruction: str) -> list[int]:
        """Prompt ids with T image slots, ending right before the answer."""
        text = self.template.prompt(instruction)
        before, after = text.split(IMAGE_PLACEHOLDER)  # template.prompt guarantees exactly one slot
        return self.bos + self._tok(before) + [IMAGE_TOKEN_ID] * self.num_image_tokens + self._tok(after)

    def encode_answer(self, answer: str) -> list[int]:
        """Answer ids + end marker, truncated to max_txt_len tokens (as the original's max_txt_len)."""
        if not answer.strip():
            raise ValueError("empty answer/caption: every training sample needs a non-empty summary")
        return self._tok(self.template.answer(answer.strip()))[: self.max_txt_len]

    def encode(self, instruction: str, answer: str | None = None) -> EncodedSample:
        prompt = self.encode_prompt(instruction)
        if answer is None:
            return EncodedSample(prompt, [IGNORE_INDEX] * len(prompt))
        target = self.encode_answer(answer)
        return EncodedSample(prompt + target, [IGNORE_INDEX] * len(prompt) + target)

    def pad(self, samples: Sequence[EncodedSample], padding_side: str,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """Pad to the longest sample (rounded up to `pad_to_multiple_of`). Pad positions: pad id, attention 0,
        label -100."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(s.input_ids) for s in samples)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(samples), length), pad_id, dtype=torch.long)  # (B, L)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(samples), length), dtype=torch.long)  # (B, L)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            ids[i, span] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[i, span] = torch.tensor(s.labels, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def __call__(self, instructions: Sequence[str], answers: Sequence[str] | None = None,
                 padding_side: str | None = None, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """Batch of prompts (+ answers for training). Default padding: right with answers, left without."""
        if answers is not None and len(answers) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers")
        samples = [self.encode(q, None if answers is None else answers[i]) for i, q in enumerate(instructions)]
        side = padding_side or ("right" if answers is not None else "left")
        return self.pad(samples, side, pad_to_multiple_of)
