"""Cleaners turn a report's findings + impression into one training summary. One interface, two kinds:

* `rules`: offline sentence rules (no network, deterministic): drop comparisons with prior studies, remove
  de-identification blanks (`___`, `XXXX`) and view mentions, merge findings and impression;
* `llm`: a chat model through any OpenAI-compatible endpoint with the versioned prompt in
  xraygpt/prompts/clean_report_v1.txt, run by `xraygpt.openai_client.ChatClient` (retries, cache, journal).

Both yield `CleanOutcome`s, one per report, in any order; a failure is an outcome with a reason.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from xraygpt.data.reports import Report, normalize_ws
from xraygpt.openai_client import ChatClient, ChatEndpointConfig, ChatJob
from xraygpt.prompt_file import ChatPromptFile

# MIMIC writes ___; IU writes XXXX, sometimes glued to a word ("dual-XXXX", "XXXXthorax"): the whole token goes.
BLANK = r"(?:_{2,}|[A-Za-z0-9'/-]*X{4,}[A-Za-z0-9'/-]*|\bXX+\b)"
_BLANK_RE = re.compile(BLANK)


def has_blank(text: str) -> bool:
    return bool(_BLANK_RE.search(text))


@dataclass
class CleanOutcome:
    report_id: str
    summary: str | None
    ok: bool
    reason: str | None = None
    source: str = "rules"  # rules | api | cache | journal


class Cleaner(Protocol):
    name: str

    def clean(self, reports: Sequence[Report]) -> Iterator[CleanOutcome]: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


# ==== rules ====================================================================================================

_ABBREV = re.compile(r"(?:\b(?:Dr|Drs|Mr|Mrs|Ms|vs|approx|e\.g|i\.e|St|No|Fig)\.)$", re.IGNORECASE)
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[\"(\[]?[A-Z0-9_])")
_ENUM = re.compile(r"(?:^|(?<=[.:;]\s))\(?\d{1,2}[.)]\s+(?=[A-Za-z])")

_VIEW = r"(?:PA|AP|frontal|lateral|portable|upright|semi-?upright|supine|erect|decubitus|oblique|lordotic)"
_IMG = r"(?:views?|radiographs?|images?|films?|projections?|exam(?:ination)?s?|studies|study)"
_SHOWS = r"(?:demonstrat\w*|show\w*|reveal\w*)"

# Sentences that only describe the acquisition ("PA and lateral views of the chest were obtained.",
# "The examination consists of frontal and lateral radiographs of the chest.", "Portable AP chest.").
_ACQUIRED = re.compile(r"\b(?:consists?\s+of|(?:was|were|is|are)\s+(?:obtained|provided|performed|submitted|"
                       r"acquired|taken|reviewed)|single|two|three)\b", re.IGNORECASE)
_VIEW_WORDS = re.compile(rf"\b(?:{_VIEW}|{_IMG})\b", re.IGNORECASE)
_FINDING_WORDS = re.compile(r"\b(?:no|not|normal|clear|opacit\w*|effusions?|pneumothora\w*|consolidation|heart|"
                            r"lungs?|cardiac|mediastin\w*|tube|catheter|line|nodules?|mass|fracture|atelectasis)\b",
                            re.IGNORECASE)
# "... views of the chest were provided demonstrating no consolidation" -> "No consolidation"
_VIEW_PREFIX = re.compile(rf"^[^.]*?\b{_VIEW}\b[^.]*?\b{_IMG}\b[^.]*?\b{_SHOWS}\s+(?:that\s+)?", re.IGNORECASE)
# "On the lateral view, ..." / "Lateral view shows ..." at a sentence start
_VIEW_LEAD = re.compile(rf"^(?:on|in)\s+(?:the\s+)?{_VIEW}(?:\s+and\s+{_VIEW})?\s+{_IMG},?\s+", re.IGNORECASE)
# "... seen on the lateral view only" inside a sentence
_VIEW_INLINE = re.compile(rf"\s+(?:only\s+)?(?:on|in)\s+(?:the\s+)?(?:both\s+)?{_VIEW}(?:\s+and\s+{_VIEW})?\s+{_IMG}"
                          r"(?:\s+only)?\b", re.IGNORECASE)

_PRIOR_REF = (r"(?:(?:the|a|most|recent|prior|previous|preceding|earlier|last|outside|recent|day|one|"
              r"chest|study|studies|exam\w*|radiograph\w*|films?|images?|imaging|ct|cxr|x-?rays?|of|on|dated|"
              rf"from|{BLANK}|\d[\d/:-]*)\s*)+")
_COMPARE_LEAD = re.compile(
    r"^(?:as\s+)?(?:compared\s+(?:to|with)|in\s+comparison\s+(?:to|with)|relative\s+to|since|when\s+compared"
    r"\s+(?:to|with))\s+(?:the\s+)?(?:prior|previous|preceding|earlier|recent|most recent|last|outside|"
    rf"{BLANK}|yesterday|\d)[^,]*,\s*", re.IGNORECASE)
_NEW_FROM = re.compile(rf"\bnew\s+(?:from|since|compared\s+(?:to|with)|relative\s+to)\s+{_PRIOR_REF}",
                       re.IGNORECASE)
_TRAILING_COMPARE = re.compile(
    r",?\s*(?:(?:as\s+)?compared\s+(?:to|with)|in\s+comparison\s+(?:to|with)|relative\s+to|since)\s+"
    rf"(?:the\s+)?(?=(?:prior|previous|preceding|earlier|recent|most\s+recent|last|outside|{BLANK}|yesterday|"
    rf"\d))(?:{_PRIOR_REF})", re.IGNORECASE)
_INTERVAL_NEW = re.compile(r"\binterval\s+(development|appearance|placement|insertion)\s+of\b", re.IGNORECASE)
# Anything still comparing with an earlier study after the rewrites above: the sentence goes.
_COMPARISON = re.compile(
    r"\b(?:compared\s+(?:to|with)|comparison|unchanged|interval(?:ly)?|again|previous(?:ly)?|since|new\s+from"
    r"|(?:the|a|most\s+recent|recent)\s+prior\b|prior\s+(?:study|studies|exam\w*|radiograph\w*|films?|images?|"
    r"chest|ct|x-?rays?|cxr|imaging|one)\b|no\s+(?:significant\s+|substantial\s+|appreciable\s+)?change|"
    r"(?:not|little)\s+(?:significantly\s+)?changed|without\s+(?:significant\s+)?change|redemonstrat\w*|"
    r"re-demonstrat\w*|persist\w*|remain(?:s|ed|ing)?|as\s+before|than\s+before|(?:has|have|had)\s+(?:been\s+)?"
    r"(?:increased|decreased|improved|worsened|resolved|progressed|enlarged|cleared|diminished|grown)|"
    r"improv(?:ed|ing|ement)|worsen(?:ed|ing)|resolution|resolv(?:ed|ing)|not\s+available|"
    r"available\s+for\s+(?:comparison|review))\b",
    re.IGNORECASE)
# A view still named after the rewrites above: the sentence goes ("PA and lateral chest show ...").
_VIEW_LEFT = re.compile(rf"\b(?:PA|AP)\b(?!\s+window)|\b(?:frontal|lateral)\s+(?:and\s+\w+\s+)?{_IMG}\b")
# Advice is not image content.
_ADVICE = re.compile(r"\b(?:recommend\w*|may\s+be\s+of\s+benefit|could\s+be\s+(?:obtained|performed)|follow-?up|"
                     r"further\s+evaluation|clinical\s+correlation|correlate\s+clinically)\b", re.IGNORECASE)
_COMMUNICATION = re.compile(
    r"\b(?:discussed\s+with|communicated|notified|paged|telephoned|(?:by|via)\s+(?:tele)?phone|called\s+to|"
    r"findings\s+were\s+(?:called|conveyed|relayed|reported)|informed|e-?mailed)\b", re.IGNORECASE)

# Blanks that only point at a date, time or person: drop the phrase.
_BLANK_PHRASE = re.compile(
    rf"\s*,?\s*\b(?:on|at|dated|from|by|since|Drs?\.?|(?:(?:study|exam\w*|radiograph\w*|films?|ct|x-?rays?)\s+of))"
    rf"\s+(?:the\s+)?{BLANK}(?:\s*(?:,|and|at|on|-)?\s*{BLANK})*(?=\s*(?:[,.;:)]|$|and\b|at\b|on\b))",
    re.IGNORECASE)
# The few IU blanks whose missing word is certain from its neighbour.
_CERTAIN_FILLS = [
    (re.compile(r"\blymph\s+X{2,}\b", re.IGNORECASE), "lymph nodes"),
    (re.compile(r"\bcostophrenic\s+X{2,}\b", re.IGNORECASE), "costophrenic angle"),
    (re.compile(r"\bpulmonary\s+X{2,}\b", re.IGNORECASE), "pulmonary vasculature"),
    (re.compile(r"\bX{2,}\s+sternotomy\b", re.IGNORECASE), "median sternotomy"),
    (re.compile(r"\bx-X{2,}", re.IGNORECASE), "x-ray"),
]
# A blank between two function words ("no XXXX of", "the XXXX are") took the noun: the sentence cannot be saved.
_FUNC = r"(?:the|a|an|no|any|of|and|or|with|in|on|to|is|are|was|were|for|by|at)"
# So did a blank right before a verb ("Aortic XXXX appear normal") or at the very end ("of the aortic XXXX.").
_UNREPAIRABLE = re.compile(
    rf"(?:^|\b{_FUNC}\s+){BLANK}(?:\s+{BLANK})*\s+{_FUNC}\b|\w-{BLANK}|"
    rf"{BLANK}\s+(?:is|are|was|were|appears?|has|have|remains?|demonstrates?|shows?)\b|{BLANK}\W*$",
    re.IGNORECASE)
_DANGLING_END = re.compile(r"\b(?:the|a|an|of|and|or|with|in|on|at|to|is|are|was|were|has|have|by|for|"
                           r"from|than|as|no|without)\W*$", re.IGNORECASE)
_VERB_START = re.compile(r"^(?:(?:the|a|an)\s+)?(?:is|are|was|were|has|have|appears?|demonstrates?|shows?|"
                         r"and|or|of|,)\b", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """Sentences of a section; list enumerators dropped, abbreviations ("Dr.", "e.g.") kept inside."""
    text = _ENUM.sub("", normalize_ws(text))
    parts = _SENT_END.split(text)
    out: list[str] = []
    for part in parts:
        if out and _ABBREV.search(out[-1]):
            out[-1] = f"{out[-1]} {part}"
        else:
            out.append(part)
    return [p.strip() for p in out if p.strip()]


def _tidy(s: str) -> str:
    s = re.sub(r"\(\s*\)", "", s)
    s = re.sub(r"\(\s+", "(", s)
    s = re.sub(r"\.(?:\s*\.)+", ".", s)
    s = re.sub(r"\s+([,.;:])", r"\1", s)
    s = re.sub(r"([,;:])(?=[.])", "", s)
    s = re.sub(r",\s*,", ",", s)
    s = re.sub(r"^[\s,;:.-]+", "", s)
    s = normalize_ws(s)
    s = s.rstrip(",;: ")
    if not s:
        return ""
    s = s[0].upper() + s[1:]
    if s[-1] not in ".!?":
        s += "."
    return s


def _remove_blanks(s: str) -> str | None:
    """The sentence without blanks, or None when the blank took a word the sentence cannot stand without."""
    if not has_blank(s):
        return s
    for pattern, fill in _CERTAIN_FILLS:
        s = pattern.sub(fill, s)
    s = _BLANK_PHRASE.sub("", s)
    if not has_blank(s):
        return s
    if _UNREPAIRABLE.search(s):
        return None
    started_with_blank = bool(re.match(rf"^\W*(?:the\s+)?{BLANK}", s, re.IGNORECASE))
    s = _BLANK_RE.sub(" ", s)
    s = re.sub(r"\s+([,.;:])", r"\1", normalize_ws(s))
    body = s.rstrip(".!? ")
    if started_with_blank and _VERB_START.match(body.lstrip(" ,")):
        return None  # "XXXX are normal." -> the subject is gone
    if _VERB_START.match(body) or _DANGLING_END.search(body) or len(body.split()) < 2:
        return None
    return s


def _view_only(s: str) -> bool:
    if not _VIEW_WORDS.search(s) or _FINDING_WORDS.search(s) or re.search(rf"\b{_SHOWS}\b", s, re.IGNORECASE):
        return False
    return bool(_ACQUIRED.search(s)) or len(s.split()) <= 8


def clean_sentence(s: str) -> str | None:
    """One sentence through the rules; None when it is dropped."""
    if _COMMUNICATION.search(s) or _ADVICE.search(s):
        return None
    # views
    m = _VIEW_PREFIX.match(s)
    if m and len(s) - m.end() > 3:
        s = s[m.end():]
    elif _view_only(s):
        return None
    s = _VIEW_LEAD.sub("", s)
    s = _VIEW_INLINE.sub("", s)
    # comparisons: salvage the finding where the wording allows, otherwise drop the sentence
    s = _COMPARE_LEAD.sub("", s)
    s = _NEW_FROM.sub("new ", s)
    s = _TRAILING_COMPARE.sub("", s)
    s = _INTERVAL_NEW.sub(lambda m: f"new {m.group(1).lower()} of", s)
    if _COMPARISON.search(s) or _VIEW_LEFT.search(s):
        return None
    # blanks
    out = _remove_blanks(s)
    if out is None:
        return None
    out = _tidy(out)
    if len(out.split()) < 2 or has_blank(out):
        return None
    return out


def clean_section(text: str) -> list[str]:
    return [c for c in (clean_sentence(s) for s in split_sentences(text)) if c]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()


def rules_summary(findings: str, impression: str) -> str:
    """Findings then impression, each sentence cleaned; impression sentences already said are not repeated."""
    sentences = clean_section(findings)
    seen = {_norm(s) for s in sentences}
    for s in clean_section(impression) if impression != findings else []:
        if _norm(s) not in seen:
            sentences.append(s)
            seen.add(_norm(s))
    return " ".join(sentences)


class RulesCleaner:
    """Offline, deterministic; see `clean_sentence` for the rules in order."""

    name = "rules"

    def clean(self, reports: Sequence[Report]) -> Iterator[CleanOutcome]:
        for r in reports:
            summary = rules_summary(r.findings, r.impression)
            if not summary:
                yield CleanOutcome(r.report_id, None, False, "empty after cleaning")
            else:
                yield CleanOutcome(r.report_id, summary, True)

    def describe(self) -> dict:
        src = Path(__file__).read_bytes()
        return {"name": self.name, "rules_sha256": hashlib.sha256(src).hexdigest()}

    def close(self) -> None:
        pass


# ==== llm ======================================================================================================


@dataclass
class PromptTemplate:
    """A prompt file with `### system` and `### user` parts; {findings} and {impression} are filled in."""

    path: Path
    system: str
    user: str
    sha256: str

    @property
    def version(self) -> str:
        return f"{self.path.stem}:{self.sha256[:12]}"

    @classmethod
    def load(cls, path: str | Path) -> PromptTemplate:
        f = ChatPromptFile.read(path)
        if "{findings}" not in f.user or "{impression}" not in f.user:
            raise ValueError(f"{f.path}: a cleaning prompt needs a '### user' part containing {{findings}} and "
                             "{impression} (and optionally a '### system' part before it)")
        return cls(f.path, f.system, f.user, f.sha256)

    def messages(self, findings: str, impression: str) -> list[dict[str, str]]:
        # str.replace, not str.format: report text may contain braces
        user = self.user.replace("{findings}", findings).replace("{impression}", impression)
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]


_PREFIX = re.compile(r"^\s*(?:\*\*)?(?:summary|clean(?:ed)? summary)(?:\*\*)?\s*:\s*", re.IGNORECASE)


def postprocess(text: str) -> str:
    """The model's answer as a one-paragraph summary: no "Summary:" label, no wrapping quotes."""
    text = _PREFIX.sub("", text.strip())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return normalize_ws(text)


class LLMCleaner:
    """Cleaning through a chat model; resumable via the journal in the output folder."""

    name = "llm"

    def __init__(self, endpoint: ChatEndpointConfig, prompt_file: str | Path, journal_path: Path | None,
                 max_length_ratio: float = 2.0, retry_failed: bool = False):
        self.endpoint = endpoint
        self.prompt = PromptTemplate.load(prompt_file)
        self.max_length_ratio = max_length_ratio
        self.client = ChatClient(endpoint, prompt_version=self.prompt.version, journal_path=journal_path,
                                 retry_failed=retry_failed)
        self._inputs: dict[str, Report] = {}

    def jobs(self, reports: Sequence[Report]) -> Iterator[ChatJob]:
        """Built lazily: 200k prompts never sit in memory at once."""
        for r in reports:
            yield ChatJob(r.report_id, self.prompt.messages(r.findings, r.impression))

    def _validate(self, job: ChatJob, text: str) -> str | None:
        summary = postprocess(text)
        if not summary:
            return "empty summary"
        if has_blank(summary):
            return "de-identification blank left in the summary"
        r = self._inputs[job.id]
        n_in = len(f"{r.findings} {r.impression}".split())
        if len(summary.split()) > self.max_length_ratio * n_in + 10:
            return f"summary of {len(summary.split())} words for {n_in} input words"
        return None

    def clean(self, reports: Sequence[Report]) -> Iterator[CleanOutcome]:
        self._inputs = {r.report_id: r for r in reports}
        for res in self.client.run(self.jobs(reports), validate=self._validate):
            summary = postprocess(res.text) if res.ok and res.text else None
            yield CleanOutcome(res.id, summary, res.ok, res.reason, res.source)

    def describe(self) -> dict:
        return {"name": self.name, "model": self.endpoint.model, "provider": self.endpoint.provider,
                "prompt_file": str(self.prompt.path.name), "prompt_version": self.prompt.version,
                "prompt_sha256": self.prompt.sha256, "usage": self.client.stats.as_dict(self.endpoint)}

    def close(self) -> None:
        self.client.close()
