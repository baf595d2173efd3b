"""Multi-turn chat about one film: the image is encoded once, questions and answers accumulate as turns.

The prompt follows the model's conversation template (MiniGPT-4's single-separator layout), image in the oldest
turn still kept:

    [bos] ###Patient: <Img>[IMG]*T</Img> {q1} ###Doctor: {a1}###Patient: {q2} ###Doctor: {a2}###Patient: {q3} ###Doctor:

Answers are tokenized on their own, as in training, so each starts at the same token boundary it was trained at.
When prompt + max_new_tokens would not fit the LLM's context, the oldest question/answer turns are dropped (with
a warning); the image is never dropped, it moves into the oldest turn that remains.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from xraygpt.conversation import IMAGE_PLACEHOLDER
from xraygpt.data.image_processing import ImageTransform
from xraygpt.inference import ImageLike, generation_config, to_pixels
from xraygpt.model import GenerationConfig, XrayGPT


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


def context_limit(model: XrayGPT) -> int:
    """The LLM's context length in tokens (max_position_embeddings), for models that declare one."""
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if not limit:
        raise ValueError(f"{type(model.llm).__name__} declares no max_position_embeddings: pass max_context= to "
                         f"Conversation")
    return int(limit)


class Conversation:
    """A chat about one film. `ask(question) -> answer`; follow-ups see the earlier turns.

    image: a path, a PIL image, or normalised pixels (3, S, S). `max_context` defaults to the LLM's context length;
    `generation` / keyword overrides set the decoding (greedy unless told otherwise), per conversation, and `ask`
    takes per-question overrides too.
    """

    def __init__(self, model: XrayGPT, image: ImageLike, *, max_context: int | None = None,
                 generation: GenerationConfig | None = None, **overrides: Any):
        self.model = model
        self.generation = generation_config(generation, **overrides)
        self.max_context = int(max_context) if max_context is not None else context_limit(model)
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")
        pixels = to_pixels(image, ImageTransform(model.encoder.processing, train=False))  # (3, S, S)
        with torch.no_grad():
            self.image_embeds = model.encode_images(pixels[None])  # (1, T, D_llm), computed once
        self.turns: list[Turn] = []
        self.dropped_turns = 0  # how many old turns left the context so far

    def reset(self) -> None:
        """Forget the turns; keep the image."""
        self.turns = []
        self.dropped_turns = 0

    # ---------------------------------------------------------------------------------------------- prompt
    def _tok(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _follow_up(self, question: str) -> str:
        """A later user turn. The previous answer already ends with the separator, so the role's copy is cut."""
        template = self.model.template
        turn = template.user_turn(question) + template.assistant_prefix()
        return turn[len(template.end_sym):] if turn.startswith(template.end_sym) else turn

    def encode(self, question: str, turns: list[Turn] | None = None) -> list[int]:
        """Input ids for asking `question` after `turns` (default: the kept turns); image slots hold IMAGE_TOKEN_ID."""
        turns = self.turns if turns is None else turns
        questions = [t.question for t in turns] + [question]
        ids = self.model.processor.encode_prompt(questions[0])  # [bos] ... [IMG]*T ... ###Doctor:
        for turn, nxt in zip(turns, questions[1:]):
            ids += self._tok(self.model.template.answer(turn.answer))  # "{answer}###"
            ids += self._tok(self._follow_up(nxt))  # "Patient: {q} ###Doctor: "
        return ids

    @staticmethod
    def _check_question(question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question: type a question about the film (e.g. 'Is the heart enlarged?')")
        if IMAGE_PLACEHOLDER in question:
            raise ValueError(f"the question contains '{IMAGE_PLACEHOLDER}': the conversation places the image "
                             f"itself, ask in plain text")
        return question.strip()

    # ------------------------------------------------------------------------------------------------- ask
    def fit(self, question: str, max_new_tokens: int) -> list[int]:
        """Ids for `question`, dropping the oldest turns until prompt + max_new_tokens fit the context."""
        kept = list(self.turns)
        dropped = 0
        ids = self.encode(question, kept)
        while len(ids) + max_new_tokens > self.max_context:
            if not kept:
                raise ValueError(
                    f"the question alone needs {len(ids)} prompt tokens ({self.model.num_image_tokens} for the image) "
                    f"+ max_new_tokens={max_new_tokens}, more than the {self.max_context}-token context: shorten the "
                    f"question or lower max_new_tokens")
            kept.pop(0)
            dropped += 1
            ids = self.encode(question, kept)
        if dropped:
            warnings.warn(f"the conversation no longer fits the {self.max_context}-token context: dropped the "
                          f"{dropped} oldest question/answer turn(s); the image is kept", stacklevel=3)
            self.turns = kept
            self.dropped_turns += dropped
        return ids

    @torch.no_grad()
    def ask(self, question: str, **overrides: Any) -> str:
        """Answer `question` about the film, given the earlier turns; the turn is kept for follow-ups."""
        question = self._check_question(question)
        gen = generation_config(self.generation, **overrides)
        ids = self.fit(question, gen.max_new_tokens)
        input_ids = torch.tensor([ids], dtype=torch.long)  # (1, L)
        attention_mask = torch.ones_like(input_ids)  # (1, L)
        answer = self.model.generate_from_ids(input_ids, attention_mask, self.image_embeds, gen)[0]
        self.turns.append(Turn(question, answer))
        return answer

    @property
    def history(self) -> list[tuple[str, str]]:
        """(question, answer) pairs still in context, oldest first."""
        return [(t.question, t.answer) for t in self.turns]
