"""Radiology conversations from report summaries: the data of the paper's second LLM step, built at run time.

Source: a built embedded dataset (xraygpt.data.embedded): `splits/<split>.json` ({"annotations": [{"image_id",
"caption"}]}, caption = findings + impression) and `labels.json` (CheXpert labels from the MeSH tags). Only the
split asked for is read, so val/test report text never reaches the training conversations (tested). When the
report's own sections can be matched to the caption, findings and impression are asked about separately.

Each report gives one multi-turn conversation: the patient hands over the report and asks; the doctor answers
from the report only (its sentences, or its labels for normal vs abnormal), never beyond it. A labelled report
also gives a one-turn write-up in the vision stages' prompt form, `<Img>{findings}</Img> {instruction}`, with the
film's findings named from its manual MeSH labels where the image tokens will go, and the report summary as the
answer. It teaches the LLM two things the vision stages need: to write a whole report, and to take its content
from the <Img> slot. Without it a frozen 135M LLM did not learn to use the image slot in stage 1 even when that
slot held the true labels (benchmarks/ablation_history.md). The choice of
questions is a function of (seed, image id), so a rebuild gives the same file whatever the order or machine.

The IU reports are CC BY-NC-ND: the output goes to a cache or run folder, never into the repository.

    python -m xraygpt.llm_finetune.radiology_conversations --out radiology_train.json [--split train]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xraygpt.config import atomic_write_text
from xraygpt.conversation import IMAGE_PLACEHOLDER, default_prompt_file, read_prompt_file
from xraygpt.data.mesh import finding_phrase, parse_tag
from xraygpt.data.reports import ReportSourceError, normalize_ws, read_reports

log = logging.getLogger(__name__)

CONV_VERSION = 3  # bump on any change to the questions or answers
EMBEDDED_RADIOLOGY = "embedded:radiology"  # data.train_file; "embedded:radiology:val" for validation
BUILD_SPLITS = ("train", "val")  # test stays held out for evaluation

OPENERS = (
    'Here is my chest X-ray report: "{report}" {question}',
    'My doctor gave me this chest X-ray report: "{report}" {question}',
    'I had a chest X-ray and the report says: "{report}" {question}',
)
QUESTIONS: dict[str, tuple[str, ...]] = {
    "findings": ("What are the findings?", "What did the radiologist see on the film?",
                 "Can you go through the findings with me?"),
    "impression": ("What is the impression?", "What is the conclusion of the report?",
                   "Can you sum the report up briefly?"),
    "normal": ("Is my chest X-ray normal?", "Is this a normal chest X-ray?",
               "Does the report say my X-ray is normal?"),
    "heart": ("What does the report say about my heart?", "How do the heart and mediastinum look?"),
    "lungs": ("What does it say about my lungs?", "How do the lungs look?"),
    "pleura": ("Is there any fluid or air around the lungs?", "What does the report say about the pleura?"),
    "bones": ("What about the bones?", "Does the report mention my ribs or spine?"),
}
# The write-up asks in the vision stages' own prompt form: the film's labelled findings stand in the image slot of
# an instruction from the shipped prompt file, so the LLM learns to read what it is told between <Img> and </Img>.
WRITE_SUFFIX = ":write"  # id of a report's write-up conversation: <image_id>:write
# "qa": questions about findings, impression, structures, normal/abnormal; "write_up": the findings-to-report turn.
KINDS = ("qa", "write_up")
# What a write-up's slot names: "chexpert", the film's CheXpert-14 findings ("cardiomegaly and pleural effusion"), or
# "mesh", each abnormal MeSH tag the embedded renderer draws, with its side and zones ("calcified granuloma in the
# right upper lobe"): what the image shows beyond the label set. The vision stages' encoder must then carry it too.
SLOTS = ("chexpert", "mesh")
# Sentences about a structure: whole words, case-insensitive.
STRUCTURES: dict[str, re.Pattern[str]] = {
    "heart": re.compile(r"\b(heart|cardi\w*|mediastin\w*|aort\w*|hil(?:ar|um|a))\b", re.I),
    "lungs": re.compile(r"\b(lungs?|pulmonary|airspace|opacit\w*|consolidat\w*|pneumon\w*|atelecta\w*|edema|"
                        r"nodul\w*|granulom\w*|infiltrat\w*|interstiti\w*|emphysema\w*|hyperinflat\w*)\b", re.I),
    "pleura": re.compile(r"\b(pleura\w*|effusions?|pneumothora\w*|costophrenic)\b", re.I),
    "bones": re.compile(r"\b(bon[ey]s?|osseous|skelet\w*|ribs?|spine|spinal|vertebra\w*|fractur\w*|degenerative|"
                        r"clavicles?|sternotomy|scoliosis|osteophyt\w*)\b", re.I),
}
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b\d\.)\s+")  # not after a list number "1."
MAX_TURNS = 4


class RadiologyDataError(RuntimeError):
    """The embedded dataset is missing, incomplete, or its split files disagree with labels.json."""


@dataclass(frozen=True)
class ReportRecord:
    image_id: str
    caption: str  # findings + impression, as in the split file
    positives: tuple[str, ...]  # CheXpert classes labelled 1
    labelled: bool  # False when no usable MeSH tag gave labels
    tags: tuple[str, ...] = ()  # the report's MeSH major tags, as in labels.json
    findings: str | None = None  # None when the report's sections could not be matched to the caption
    impression: str | None = None


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _normal_answer(rec: ReportRecord) -> str | None:
    """Yes/no from the labels, naming the findings; None when the labels cannot say."""
    if not rec.labelled:
        return None
    devices = " Support devices are present." if "Support Devices" in rec.positives else ""
    pathology = [c.lower() for c in rec.positives if c not in ("No Finding", "Support Devices")]
    if pathology:
        return f"No. The report describes {_listed(pathology)}.{devices}"
    if "No Finding" in rec.positives:
        return f"Yes. The report describes no abnormality.{devices}"
    return None


def answers_for(rec: ReportRecord) -> dict[str, str]:
    """Every question kind this report can answer, with its answer (taken from the report only)."""
    out: dict[str, str] = {}
    if rec.findings and rec.impression:
        out["findings"], out["impression"] = rec.findings, rec.impression
    normal = _normal_answer(rec)
    if normal:
        out["normal"] = normal
    parts = sentences(rec.caption)
    for name, pattern in STRUCTURES.items():
        hits = [s for s in parts if pattern.search(s)]
        if hits:
            out[name] = " ".join(hits)
    return out


@functools.cache
def _vision_instructions() -> tuple[str, ...]:
    return tuple(read_prompt_file(default_prompt_file()))


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def findings_phrase(rec: ReportRecord, slot: str = "chexpert") -> str:
    """What a write-up's slot says (see SLOTS): the film's findings in words ("cardiomegaly and edema"), or "no
    abnormality"."""
    if slot == "mesh":
        # each drawn finding's phrase once, in tag order ("sign" tags always have one)
        found = list(dict.fromkeys(finding_phrase(f) for f in map(parse_tag, rec.tags) if f.status == "sign"))
    else:
        found = [c.lower() for c in rec.positives if c != "No Finding"]
    return _listed(found) if found else "no abnormality"


def write_up_for(rec: ReportRecord, seed: int, slot: str = "chexpert") -> dict[str, Any] | None:
    """The report summary written from the film's labelled findings; None for an unlabelled report."""
    if not rec.labelled or not rec.positives:
        return None
    findings = findings_phrase(rec, slot)
    rng = random.Random(f"radiology-write{CONV_VERSION}:{seed}:{rec.image_id}")
    request = rng.choice(_vision_instructions()).replace(IMAGE_PLACEHOLDER, findings)
    return {"id": rec.image_id + WRITE_SUFFIX,
            "conversations": [{"from": "human", "value": request}, {"from": "gpt", "value": rec.caption}]}


def conversation_for(rec: ReportRecord, seed: int) -> dict[str, Any] | None:
    """One ShareGPT conversation for a report, or None when it supports no question."""
    available = answers_for(rec)
    if not available:
        return None
    rng = random.Random(f"radiology-conv{CONV_VERSION}:{seed}:{rec.image_id}")
    kinds = sorted(available)
    rng.shuffle(kinds)
    kinds = kinds[: rng.randint(min(2, len(kinds)), min(MAX_TURNS, len(kinds)))]
    turns = []
    for k, kind in enumerate(kinds):
        question = rng.choice(QUESTIONS[kind])
        if k == 0:
            question = rng.choice(OPENERS).format(report=rec.caption, question=question)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": available[kind]}]
    return {"id": rec.image_id, "conversations": turns}


def _reports_by_id(manifest: dict[str, Any]) -> dict[str, Any]:
    """The dataset's source reports by id, for their separate sections; empty when the source is unreadable."""
    source = str(manifest.get("source", ""))
    try:
        reports = read_reports(None if source.startswith("torchxrayvision:") else Path(source))
    except (ReportSourceError, OSError, RuntimeError) as e:
        log.warning("report sections unavailable (%s): findings/impression questions are left out", e)
        return {}
    return {r.report_id: r for r in reports}


def load_records(dataset_root: str | Path, split: str) -> list[ReportRecord]:
    """Records of one split of a built embedded dataset, checked against labels.json."""
    root = Path(dataset_root)
    manifest_file, labels_file = root / "manifest.json", root / "labels.json"
    split_file = root / "splits" / f"{split}.json"
    if not manifest_file.is_file():
        raise RadiologyDataError(f"{root} is not a complete embedded dataset (no manifest.json); build it with "
                                 f"python scripts/build_embedded_data.py --out {root}")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    labels = json.loads(labels_file.read_text(encoding="utf-8"))
    classes, images = labels["classes"], labels["images"]
    reports = _reports_by_id(manifest)
    records = []
    for i, ann in enumerate(json.loads(split_file.read_text(encoding="utf-8"))["annotations"]):
        image_id, caption = ann["image_id"], ann["caption"]
        meta = images.get(image_id)
        if meta is None or meta["split"] != split:
            found = "no entry" if meta is None else f"split '{meta['split']}'"
            raise RadiologyDataError(f"{split_file} annotation {i} ({image_id}) has {found} in {labels_file}; "
                                     f"rebuild the dataset (scripts/build_embedded_data.py --force)")
        report = reports.get(meta["report_id"])
        matched = report is not None and normalize_ws(f"{report.findings} {report.impression}") == caption
        records.append(ReportRecord(
            image_id=image_id, caption=caption,
            positives=tuple(c for c, v in zip(classes, meta["labels"]) if v), labelled=bool(meta["labelled"]),
            tags=tuple(meta.get("tags", ())),
            findings=report.findings if matched else None, impression=report.impression if matched else None))
    return records


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """The conversation kinds asked for, checked: a non-empty subset of KINDS."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"radiology conversation kinds {list(kinds)}: choose one or more of {list(KINDS)}")
    return tuple(kinds)


def check_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise ValueError(f"radiology write-up slot '{slot}': choose one of {list(SLOTS)}")
    return slot


def build_conversations(records: list[ReportRecord], seed: int, kinds: Sequence[str] = KINDS,
                        slot: str = "chexpert") -> tuple[list[dict[str, Any]], int]:
    """ShareGPT conversations in record order (each report's Q&A, then its write-up with `slot` findings; only the
    `kinds` asked for), and how many records supported no question."""
    kinds, slot = check_kinds(kinds), check_slot(slot)
    out, unused = [], 0
    for rec in records:
        if "qa" in kinds:
            conv = conversation_for(rec, seed)
            if conv is None:
                unused += 1
            else:
                out.append(conv)
        write_up = write_up_for(rec, seed, slot) if "write_up" in kinds else None
        if write_up is not None:
            out.append(write_up)
    return out, unused


def write_radiology_conversations(dataset_root: str | Path, split: str, out_file: str | Path,
                                  seed: int = 0, kinds: Sequence[str] = KINDS,
                                  slot: str = "chexpert") -> dict[str, Any]:
    """Build one split's conversations into `out_file` (atomically); return counts."""
    if split not in BUILD_SPLITS:
        raise ValueError(f"split '{split}': conversations are built from {list(BUILD_SPLITS)} only; the test split "
                         f"stays held out for evaluation")
    records = load_records(dataset_root, split)
    conversations, unused = build_conversations(records, seed, kinds, slot)
    if not conversations:
        raise RadiologyDataError(f"{dataset_root} split '{split}' gave no conversation ({len(records)} reports)")
    atomic_write_text(out_file, json.dumps(conversations, ensure_ascii=False, indent=1) + "\n")
    turns = sum(len(c["conversations"]) // 2 for c in conversations)
    stats = {"file": str(out_file), "split": split, "seed": seed, "kinds": list(kinds), "slot": slot,
             "version": CONV_VERSION, "reports": len(records),
             "conversations": len(conversations),
             "write_ups": sum(c["id"].endswith(WRITE_SUFFIX) for c in conversations), "doctor_turns": turns,
             "reports_without_question": unused,
             "with_sections": sum(r.findings is not None for r in records)}
    log.info("radiology conversations: %s", stats)
    return stats


def embedded_root(embedded_dir: str | None, limit: int | None) -> Path:
    """A complete embedded dataset: the given folder as is, or the default cache build (built if missing)."""
    if embedded_dir is not None:
        if limit is not None:
            raise ValueError("data.radiology.limit applies to the default cache build only; with "
                             "data.radiology.embedded_dir set, build that folder with the limit you want")
        root = Path(embedded_dir).expanduser()
        if not (root / "manifest.json").is_file():
            raise RadiologyDataError(f"{root} (data.radiology.embedded_dir / --embedded-dir) holds no complete "
                                     f"embedded dataset; build it with python scripts/build_embedded_data.py "
                                     f"--out {root}")
        return root
    from xraygpt.data.embedded import build_embedded_dataset

    return build_embedded_dataset(limit=limit).root


def parse_spec(spec: str) -> str | None:
    """The split named by an `embedded:radiology[:split]` data file, or None for an ordinary path."""
    if not spec.startswith(EMBEDDED_RADIOLOGY):
        return None
    rest = spec[len(EMBEDDED_RADIOLOGY):]
    split = rest[1:] if rest.startswith(":") else ("train" if rest == "" else None)
    if split not in BUILD_SPLITS:
        raise ValueError(f"data file '{spec}': use '{EMBEDDED_RADIOLOGY}' (train split) or "
                         f"'{EMBEDDED_RADIOLOGY}:val'")
    return split


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output ShareGPT JSON file")
    parser.add_argument("--split", default="train", choices=BUILD_SPLITS)
    parser.add_argument("--embedded-dir", default=None, help="a built embedded dataset (default: the cache build)")
    parser.add_argument("--limit", type=int, default=None, help="default cache build from the first N reports")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="conversation kinds to build")
    parser.add_argument("--slot", default="chexpert", choices=SLOTS, help="what a write-up's slot names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        root = embedded_root(args.embedded_dir, args.limit)
        stats = write_radiology_conversations(root, args.split, args.out, args.seed, args.kinds, args.slot)
    except (RadiologyDataError, ValueError, OSError) as e:
        if argv is not None:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main()
