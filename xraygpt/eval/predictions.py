"""Predictions JSONL: one generated report per line, read strictly for scoring and appended safely for resume.

A record is ``{"image_id": ..., "reference": ..., "prediction": ..., <anything else>}``. Reading for scoring is
strict (a duplicate id, a missing key or a broken line stops with the file and line), because a silently
skipped sample changes every number in a published table. Writing is append-only with flush + fsync per call,
so a killed generation run leaves at most one partial last line, which ``done_ids`` ignores and
``append_prediction`` cuts off before writing again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("image_id", "reference", "prediction")


class PredictionsError(ValueError):
    """A predictions file cannot be scored as it is (the message names the file and line)."""


@dataclass
class Predictions:
    """A validated predictions file, in file order."""

    path: str
    ids: list[str]
    references: list[str]
    predictions: list[str]  # None / missing-text predictions are kept as "" and counted in empty_ids
    records: list[dict[str, Any]] = field(repr=False)
    empty_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_empty(self) -> int:
        return len(self.empty_ids)

    def subset(self, ids: Iterable[str]) -> Predictions:
        """The same file restricted to (and reordered by) ``ids``; used to align two runs for a paired test."""
        index = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise PredictionsError(
                f"{self.path}: {len(missing)} id(s) are missing, e.g. {missing[:5]}; both runs must cover the same ids."
            )
        order = [index[i] for i in ids]
        empty = set(self.empty_ids)
        return Predictions(
            path=self.path,
            ids=[self.ids[k] for k in order],
            references=[self.references[k] for k in order],
            predictions=[self.predictions[k] for k in order],
            records=[self.records[k] for k in order],
            empty_ids=[self.ids[k] for k in order if self.ids[k] in empty],
        )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(type(value).__name__)
    return value


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read and validate a predictions JSONL file.

    Errors (``PredictionsError``): file missing or empty, a line that is not a JSON object, a record without
    ``image_id`` / ``reference`` / ``prediction``, an empty reference, a duplicate ``image_id`` (both lines named).
    An empty or null prediction is not an error: it is scored as the empty string and listed in ``empty_ids``.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"Predictions file not found: {path}")
    ids: list[str] = []
    refs: list[str] = []
    preds: list[str] = []
    records: list[dict[str, Any]] = []
    empty: list[str] = []
    first_line: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = len(lines)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (
                " (the last line looks truncated: the generation run was probably interrupted; "
                "resume it to finish the file)"
                if lineno == last
                else ""
            )
            raise PredictionsError(f"{path}:{lineno}: not valid JSON: {e.msg}{hint}") from None
        if not isinstance(rec, dict):
            raise PredictionsError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise PredictionsError(
                f"{path}:{lineno}: record is missing {', '.join(repr(k) for k in missing)} "
                f"(every line needs {', '.join(REQUIRED_KEYS)}); keys present: {sorted(rec)}"
            )
        image_id = rec["image_id"]
        if image_id is None or (isinstance(image_id, str) and not image_id.strip()):
            raise PredictionsError(f"{path}:{lineno}: 'image_id' is empty")
        image_id = str(image_id)
        if image_id in first_line:
            raise PredictionsError(
                f"{path}: duplicate image_id {image_id!r} on lines {first_line[image_id]} and {lineno}; "
                "each id must be scored once (deduplicate the file or regenerate it)"
            )
        first_line[image_id] = lineno
        try:
            ref = _text(rec["reference"])
            pred = _text(rec["prediction"])
        except TypeError as e:
            raise PredictionsError(f"{path}:{lineno}: 'reference' and 'prediction' must be strings, got {e}") from None
        if ref is None or not ref.strip():
            raise PredictionsError(f"{path}:{lineno}: reference for image_id {image_id!r} is missing or empty")
        if pred is None or not pred.strip():
            empty.append(image_id)
            pred = ""
        ids.append(image_id)
        refs.append(ref)
        preds.append(pred)
        records.append(rec)
    if not ids:
        raise PredictionsError(f"{path}: no predictions in the file")
    return Predictions(path=str(path), ids=ids, references=refs, predictions=preds, records=records, empty_ids=empty)


def done_ids(path: str | os.PathLike) -> set[str]:
    """Ids already written to a partial predictions file (empty set when it does not exist).

    A last line without its newline is an interrupted write and does not count; a broken line anywhere else
    means the file was damaged by something other than an interruption, so it raises.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete, _, _partial = data.rpartition(b"\n")
    done: set[str] = set()
    for lineno, line in enumerate(complete.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done.add(str(rec["image_id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise PredictionsError(
                f"{path}:{lineno}: damaged line in the middle of a predictions file (not an interrupted write); "
                "fix or delete the file before resuming"
            ) from None
    return done


def _drop_partial_last_line(path: Path) -> None:
    """Cut an interrupted last write (bytes after the final newline) so the next append starts a clean line."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline in blocks; a record is small, so this reads a few KB at most.
        pos = size
        block = 4096
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            k = chunk.rfind(b"\n")
            if k >= 0:
                f.truncate(start + k + 1)
                return
            pos = start
        f.truncate(0)


def append_predictions(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Append records as JSON lines, then flush and fsync once; returns how many were written."""
    path = Path(path)
    lines = []
    for rec in records:
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise PredictionsError(f"append to {path}: record is missing {missing}; got keys {sorted(rec)}")
        lines.append(json.dumps(dict(rec), ensure_ascii=False) + "\n")
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _drop_partial_last_line(path)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    return len(lines)


def append_prediction(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record durably (flush + fsync), repairing an interrupted last line first."""
    append_predictions(path, [record])
