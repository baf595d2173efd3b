"""Chat prompt files shared by the LLM report cleaner (data_prep) and the GPT judge (xraygpt.eval.judge).

Format: an optional `### system` part, then a `### user` part with {placeholders}. A relative path is looked up
in the working directory, then beside the installed package (so `xraygpt/prompts/...` works from anywhere).
The file's sha256 goes into every cache key, so an edited prompt never reuses answers to the old one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding xraygpt/ (repo or site-packages)


def resolve_prompt_path(path: str | Path, what: str = "prompt file", hint: str = "") -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if (PACKAGE_ROOT / p).is_file():
        return PACKAGE_ROOT / p
    raise FileNotFoundError(f"{what} {path} not found (looked in the working directory and {PACKAGE_ROOT}){hint}")


@dataclass(frozen=True)
class ChatPromptFile:
    path: Path
    system: str  # "" when the file has no system part
    user: str  # "" when the file has no user part: callers check their placeholders
    sha256: str

    @property
    def version(self) -> str:
        return f"{self.path.stem}:{self.sha256[:12]}"

    @classmethod
    def read(cls, path: str | Path, what: str = "prompt file", hint: str = "") -> ChatPromptFile:
        p = resolve_prompt_path(path, what, hint)
        raw = p.read_text(encoding="utf-8")
        parts = re.split(r"^###\s*(system|user)\s*$", raw, flags=re.MULTILINE | re.IGNORECASE)
        sections = {parts[i].lower(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
        return cls(p, sections.get("system", ""), sections.get("user", ""), hashlib.sha256(raw.encode()).hexdigest())
