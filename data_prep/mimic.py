"""MIMIC-CXR: free-text report sections, and one (image, report) pair per selected image.

Real MIMIC reports are typed by hundreds of radiologists: headers in any case, `FINDINGS AND IMPRESSION:`,
no headers at all, a preamble (EXAMINATION / INDICATION / TECHNIQUE / COMPARISON) before the findings, text on
the header line or below it, hard line wraps at ~80 columns, numbered impressions. `extract_sections` turns
that into findings + impression strings; the result is a `Report` like the OpenI reader's, so the same rule
filters apply.

Layout read (PhysioNet): <reports>/files/p10/p10000032/s50414267.txt (a folder or mimic-cxr-reports.zip),
mimic-cxr-2.0.0-split.csv(.gz) and -metadata.csv(.gz); images in MIMIC-CXR-JPG at
files/p10/p10000032/s50414267/<dicom_id>.jpg.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xraygpt.data.reports import Report, ReportSourceError, normalize_ws

from .config import MimicConfig

# Header name (lower case, single spaces) -> section kind. Anything else in capitals is an "other" section.
_KINDS = {
    "findings": "findings", "finding": "findings", "findings and impression": "both",
    "findings/impression": "both", "impression and findings": "both", "impression/findings": "both",
    "findings & impression": "both", "impression": "impression", "impressions": "impression",
    "conclusion": "impression", "conclusions": "impression",
}
_PREAMBLE = {
    "examination", "exam", "indication", "indications", "clinical indication", "history", "clinical history",
    "clinical information", "reason for exam", "reason for examination", "reason for study", "comparison",
    "comparisons", "technique", "procedure", "type of examination", "study", "wet read", "final report",
    "notification", "recommendation", "recommendations", "recommendation(s)", "addendum", "clinical data",
}
_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Za-z][A-Za-z /&()'-]{0,48}?)[ \t]*:(?P<rest>.*)$")
_ENUM = re.compile(r"^\s*\(?\d{1,2}[.)]\s+")  # "1. ", "2) ", "(3) " at a line start


def _header_kind(line: str) -> tuple[str, str, str] | None:
    """(kind, name, rest of line) when the line opens a section, else None."""
    m = _HEADER.match(line)
    if not m:
        return None
    raw = m.group("name").strip()
    name = re.sub(r"\s+", " ", raw.lower())
    if name in _KINDS:
        return _KINDS[name], name, m.group("rest")
    if name in _PREAMBLE:
        return "preamble", name, m.group("rest")
    letters = re.sub(r"[^A-Za-z]", "", raw)
    if len(letters) >= 3 and raw.upper() == raw and len(raw.split()) <= 6:
        return "other", name, m.group("rest")  # e.g. "PORTABLE AP CHEST:", "CHEST, TWO VIEWS:"
    return None  # "Note: ..." or a colon inside a sentence


def _paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs with hard wraps joined; list enumerators dropped."""
    paras, current = [], []
    for line in lines:
        if not line.strip():
            if current:
                paras.append(current)
                current = []
            continue
        current.append(_ENUM.sub("", line))
    if current:
        paras.append(current)
    return [normalize_ws(" ".join(p)) for p in paras if normalize_ws(" ".join(p))]


@dataclass
class Sections:
    findings: str = ""
    impression: str = ""
    indication: str = ""
    comparison: str = ""
    headers: list[str] = field(default_factory=list)  # header names seen, in order (for debugging)


def extract_sections(text: str, combined_section: str = "both",
                     last_paragraph_as_impression: bool = False) -> Sections:
    """Split one MIMIC-CXR report into sections; see the module docstring for the variety handled."""
    segments: list[tuple[str, str, list[str]]] = [("unlabelled", "", [])]
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        header = _header_kind(line)
        if header is None:
            segments[-1][2].append(line)
        else:
            kind, name, rest = header
            if kind == "other" and segments[-1][0] == "findings":
                segments[-1][2].append(line)  # "PICC: tip in the SVC" inside the findings is findings text
                continue
            segments.append((kind, name, [rest] if rest.strip() else []))

    out = Sections()
    findings, impression, body = [], [], []  # body: unlabelled text, a findings candidate
    seen_impression = False
    for kind, name, lines in segments:
        paras = _paragraphs(lines)
        if name:
            out.headers.append(name)
        if kind == "findings":
            findings += paras
        elif kind == "impression":
            impression += paras
            seen_impression = True
        elif kind == "both":
            if combined_section == "both":
                findings += paras
                impression += paras
                seen_impression = True
        elif kind == "preamble":
            # A preamble header owns its first paragraph; text after a blank line is the report body that
            # radiologists often start without a FINDINGS header ("COMPARISON: None.\n\nThe lungs are ...").
            head, tail = paras[:1], paras[1:]
            if name.startswith(("indication", "clinical indication", "history", "clinical history", "reason")):
                out.indication = normalize_ws(" ".join([out.indication] + head))
            elif name.startswith("comparison"):
                out.comparison = normalize_ws(" ".join([out.comparison] + head))
            if name in {"wet read", "addendum", "notification", "recommendation", "recommendations",
                        "recommendation(s)"}:
                continue  # never part of the findings body
            if not seen_impression:
                body += tail
        elif kind in ("unlabelled", "other") and not seen_impression:
            body += [p for p in paras if p.upper() != "FINAL REPORT"]
    if not findings and body:
        if not impression and last_paragraph_as_impression and len(body) >= 2:
            impression = body[-1:]
            body = body[:-1]
        findings = body
    out.findings = normalize_ws(" ".join(findings))
    out.impression = normalize_ws(" ".join(impression))
    return out


# ---- files ----------------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise ReportSourceError(f"{path} does not exist; check the mimic.* paths in your config")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_csv(path: Path, needed: tuple[str, ...]) -> Iterator[dict[str, str]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportSourceError(f"{path}: missing column(s) {', '.join(missing)} (found {reader.fieldnames}); "
                                    "is this the MIMIC-CXR-JPG 2.0.0 table?")
        yield from reader


class _ReportFiles:
    """Reads sNNN.txt from the extracted folder or straight from mimic-cxr-reports.zip."""

    def __init__(self, root: Path):
        self.root = root
        if not root.exists():
            raise ReportSourceError(f"MIMIC report source {root} does not exist (a folder holding files/ or "
                                    "mimic-cxr-reports.zip)")
        self.zip: zipfile.ZipFile | None = None
        self.prefix = ""
        if root.is_file():
            self.zip = zipfile.ZipFile(root)
            names = self.zip.namelist()
            first = next((n for n in names if n.endswith(".txt") and "/p" in n), "")
            self.prefix = first[: first.find("files/")] if "files/" in first else ""
        elif not (root / "files").is_dir():
            raise ReportSourceError(f"{root} has no files/ folder; point mimic.reports at the folder that holds "
                                    "files/p10/... (or at mimic-cxr-reports.zip)")

    def read(self, rel: str) -> str | None:
        try:
            data = self.zip.read(self.prefix + rel) if self.zip else (self.root / rel).read_bytes()
        except (KeyError, FileNotFoundError):
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("cp1252", errors="replace")


@dataclass
class ImageRef:
    """One image of a kept report: the id written to annotations, its path under the image root, its split."""

    image_id: str
    path: str
    split: str  # "train" | "val" | "test"


@dataclass
class DatasetRead:
    reports: list[Report]
    images: dict[str, list[ImageRef]]  # report_id -> its selected images
    counts: dict[str, int]
    inputs: dict[str, str]


_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def study_paths(subject_id: str, study_id: str) -> tuple[str, str]:
    """(report file, image folder) relative paths for a study, PhysioNet layout."""
    p = f"p{subject_id}"
    folder = f"files/{p[:3]}/{p}/s{study_id}"
    return folder + ".txt", folder


def read_mimic(cfg: MimicConfig) -> DatasetRead:
    """Reports of the studies that have at least one image of a selected view, with those images."""
    split_of: dict[str, str] = {}
    for row in _read_csv(Path(cfg.split_csv), ("dicom_id", "study_id", "subject_id", "split")):
        split_of[row["dicom_id"]] = row["split"]
    views = {v.upper() for v in cfg.views}
    counts: Counter[str] = Counter()
    studies: dict[tuple[str, str], list[str]] = {}
    for row in _read_csv(Path(cfg.metadata_csv), ("dicom_id", "study_id", "subject_id", "ViewPosition")):
        counts["images_listed"] += 1
        if views and (row["ViewPosition"] or "").upper() not in views:
            counts["images_other_view"] += 1
            continue
        if row["dicom_id"] not in split_of:
            counts["images_without_split"] += 1
            continue
        studies.setdefault((row["subject_id"], row["study_id"]), []).append(row["dicom_id"])

    files = _ReportFiles(Path(cfg.reports))
    images_root = Path(cfg.images_dir) if cfg.images_dir else None
    reports: list[Report] = []
    images: dict[str, list[ImageRef]] = {}
    for (subject, study), dicoms in sorted(studies.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rel_txt, rel_dir = study_paths(subject, study)
        text = files.read(rel_txt)
        if text is None:
            counts["reports_missing"] += 1
            continue
        s = extract_sections(text, cfg.combined_section, cfg.last_paragraph_as_impression)
        report_id = f"s{study}"
        reports.append(Report(report_id=report_id, findings=s.findings, impression=s.impression,
                              image_ids=sorted(dicoms), indication=s.indication, comparison=s.comparison,
                              source=rel_txt))
        refs = []
        for dicom in sorted(dicoms):
            rel_img = f"{rel_dir}/{dicom}.jpg"
            if images_root is not None and not (images_root / rel_img).is_file():
                counts["images_missing"] += 1
                continue
            split = _SPLITS.get(split_of[dicom], split_of[dicom])
            refs.append(ImageRef(image_id=dicom, path=rel_img, split=split))
        images[report_id] = refs
    counts["reports_read"] = len(reports)
    inputs = {"reports": str(cfg.reports), "split_csv": str(cfg.split_csv), "metadata_csv": str(cfg.metadata_csv),
              "images_dir": str(cfg.images_dir), "views": ",".join(sorted(views)) or "all"}
    return DatasetRead(reports=reports, images=images, counts=dict(counts), inputs=inputs)
