"""Read FastChat/ShareGPT conversation files, keep the usable conversations and name every one we skip.

    [{"id": "...", "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}]

A usable conversation alternates patient ("human") and doctor ("gpt") turns, starts with the patient, and has
no empty turn. Real dumps hold a few broken records; one bad record must not stop a 100k-conversation run, but
it must not pass silently either: each skip is counted under a reason, with the file, index and id named.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HUMAN, GPT = "human", "gpt"
ROLES = (HUMAN, GPT)
# Why a conversation was skipped. too_long is found later, when the conversation is tokenized.
REASONS = ("malformed", "unknown_role", "empty_turn", "starts_with_doctor", "not_alternating", "no_doctor_turn",
           "too_long")
FORMAT_HINT = ('expected ShareGPT JSON: a list of {"id": ..., "conversations": [{"from": "human"|"gpt", '
               '"value": "..."}, ...]}')


class BadConversation(ValueError):
    """One record cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Conversation:
    id: str
    index: int  # position in its file, for messages
    turns: tuple[tuple[str, str], ...]  # (patient text, doctor answer) pairs, in order


@dataclass(frozen=True)
class Problem:
    index: int
    id: str
    reason: str
    detail: str

    def where(self) -> str:
        return f"index {self.index} (id {self.id})"


@dataclass
class DataReport:
    """What happened to one file's records: used, skipped (with reasons), kept with a note."""

    path: str
    total: int = 0
    used: int = 0
    skipped: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # kept, but changed: a trailing patient turn dropped

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.skipped))

    def summary(self, examples: int = 5) -> str:
        """One warning line per reason, naming the first few indices."""
        lines = [f"{self.path}: skipped {len(self.skipped)} of {self.total} conversations"]
        for reason, n in self.counts().items():
            first = [p for p in self.skipped if p.reason == reason][:examples]
            shown = "; ".join(f"{p.where()}: {p.detail}" for p in first)
            lines.append(f"  {reason} x{n}: {shown}{' ...' if n > examples else ''}")
        if self.notes:
            shown = ", ".join(p.where() for p in self.notes[:examples])
            lines.append(f"  kept {len(self.notes)} after dropping a final patient turn with no answer: {shown}"
                         f"{' ...' if len(self.notes) > examples else ''}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total": self.total, "used": self.used, "skipped": self.counts(),
                "skipped_records": [p.__dict__ for p in self.skipped],
                "trailing_patient_turn_dropped": [p.index for p in self.notes]}


def _record_id(record: Any, index: int) -> str:
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return f"#{index}"


def parse_conversation(record: Any, index: int) -> tuple[Conversation, bool]:
    """One ShareGPT record -> Conversation; second value: a trailing patient turn was dropped.

    Raises BadConversation naming the turn at fault.
    """
    cid = _record_id(record, index)
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise BadConversation("malformed", "no 'conversations' list")
    messages = record["conversations"]
    turns: list[tuple[str, str]] = []
    for t, msg in enumerate(messages):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise BadConversation("malformed", f"turn {t} is not a {{'from', 'value'}} mapping")
        role, value = msg["from"], msg["value"]
        if role not in ROLES:
            raise BadConversation("unknown_role", f"turn {t} has role {role!r} (valid: {', '.join(ROLES)})")
        if not isinstance(value, str) or not value.strip():
            raise BadConversation("empty_turn", f"turn {t} ({role}) is empty")
        expected = HUMAN if t % 2 == 0 else GPT
        if role != expected:
            if t == 0:
                raise BadConversation("starts_with_doctor", "turn 0 is from 'gpt'; a conversation opens with 'human'")
            raise BadConversation("not_alternating", f"turn {t} is from {role!r} after a {role!r} turn")
        if role == GPT:
            turns.append((messages[t - 1]["value"].strip(), value.strip()))
    trailing = len(messages) % 2 == 1
    if not turns:
        raise BadConversation("no_doctor_turn", "no 'gpt' answer to learn from")
    return Conversation(cid, index, tuple(turns)), trailing


def read_sharegpt(path: str | Path, on_bad: str = "skip") -> tuple[list[Conversation], DataReport]:
    """All usable conversations of a file and the report of the rest. on_bad="error" raises at the first."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path} ({FORMAT_HINT})")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {FORMAT_HINT}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: the top level is a {type(records).__name__}; {FORMAT_HINT}")
    report = DataReport(str(path), total=len(records))
    conversations = []
    for index, record in enumerate(records):
        try:
            conv, trailing = parse_conversation(record, index)
        except BadConversation as e:
            problem = Problem(index, _record_id(record, index), e.reason, e.detail)
            if on_bad == "error":
                raise ValueError(f"{path}: {problem.where()}: {e} (data.on_bad=skip skips such records)") from None
            report.skipped.append(problem)
            continue
        if trailing:
            report.notes.append(Problem(index, conv.id, "trailing_patient_turn", "dropped"))
        conversations.append(conv)
    return conversations, report


def check_usable(report: DataReport) -> None:
    """Warn about skips; fail when nothing usable is left."""
    if report.used == 0:
        detail = report.summary() if report.total else f"{report.path}: the file holds no records"
        raise ValueError(f"no usable conversation left in {report.path}:\n{detail}\n{FORMAT_HINT}")
    if report.skipped or report.notes:
        log.warning("%s", report.summary())
