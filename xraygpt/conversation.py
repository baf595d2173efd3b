"""Conversation templates and the instruction (prompt) file.

XrayGPT wraps the image in a Vicuna-style turn:  `###Patient: <Img><ImageHere></Img> {instruction} ###Doctor: `
and trains the LLM to answer `{summary}###`. The original prompt file holds one instruction per line; only lines
containing `<ImageHere>` count (we keep that rule, so the original files load unchanged).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_WRAP = "<Img><ImageHere></Img>"
DEFAULT_INSTRUCTION = "Describe the given chest x-ray image in detail."


@dataclass(frozen=True)
class ConversationTemplate:
    """Role markers and separators of one conversation style."""

    name: str
    user_role: str  # e.g. "###Patient"
    assistant_role: str  # e.g. "###Doctor"
    end_sym: str = "###"  # appended to every answer; generation stops on it
    system: str = ""  # optional text before the first turn

    def user_turn(self, instruction: str) -> str:
        return f"{self.user_role}: {instruction} "

    def assistant_prefix(self) -> str:
        return f"{self.assistant_role}: "

    def prompt(self, instruction: str) -> str:
        """Full single-turn prompt, ending where the model starts to answer."""
        instruction = with_image(instruction)
        return f"{self.system}{self.user_turn(instruction)}{self.assistant_prefix()}"

    def answer(self, text: str) -> str:
        return f"{text}{self.end_sym}"


TEMPLATES: dict[str, ConversationTemplate] = {
    # The original XrayGPT code (conversation.py / minigpt4 config): Patient asks, Doctor answers.
    "xraygpt": ConversationTemplate("xraygpt", "###Patient", "###Doctor"),
    # The paper's figure: the doctor asks, the assistant answers.
    "xraygpt_paper": ConversationTemplate("xraygpt_paper", "###Doctor", "###Assistant"),
    # MiniGPT-4's template, for comparison runs.
    "minigpt4": ConversationTemplate("minigpt4", "###Human", "###Assistant"),
}


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template '{name}'; valid: {sorted(TEMPLATES)}") from None


def with_image(instruction: str) -> str:
    """Make sure an instruction holds exactly one image slot; plain questions get the `<Img>` wrap in front."""
    count = instruction.count(IMAGE_PLACEHOLDER)
    if count == 0:
        return f"{IMAGE_WRAP} {instruction.strip()}"
    if count > 1:
        raise ValueError(f"instruction has {count} '{IMAGE_PLACEHOLDER}' slots, expected exactly one: {instruction!r}")
    return instruction.strip()


def check_instruction(instruction: str, where: str = "instruction") -> str:
    """Strict version for prompt files: exactly one `<ImageHere>`."""
    count = instruction.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise ValueError(f"{where}: expected exactly one '{IMAGE_PLACEHOLDER}', found {count}: {instruction!r}")
    return instruction.strip()


def read_prompt_file(path: str | Path) -> list[str]:
    """Instructions from an original-style prompt file: lines holding `<ImageHere>` (others are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if IMAGE_PLACEHOLDER in line:
            prompts.append(check_instruction(line, f"{path}:{lineno}"))
    if not prompts:
        raise ValueError(f"{path}: no line contains '{IMAGE_PLACEHOLDER}'. Each instruction line must hold one, "
                         f"e.g. '{IMAGE_WRAP} {DEFAULT_INSTRUCTION}'")
    return prompts


def default_prompt_file() -> Path:
    return Path(__file__).parent / "templates" / "xray_instructions.txt"


def pick_instruction(prompts: list[str], seed: int, epoch: int, index: int) -> str:
    """Per-sample instruction, reproducible from (seed, epoch, sample index) whatever the batch or process."""
    rng = random.Random(f"{seed}:{epoch}:{index}")
    return prompts[rng.randrange(len(prompts))]
