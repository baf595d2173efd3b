"""A rule-based CheXpert-style labeler: 14 observations per report, each positive / negative / uncertain / blank.

It follows the CheXpert labeler's three stages (Irvin et al. 2019) with regular expressions instead of a
dependency parse, so it runs anywhere in milliseconds and is easy to read and fix:

1. *Mentions*: phrases per observation ("effusion", "pleural fluid", "blunting of the costophrenic angle" ...),
   plus *attribute* mentions whose label comes from a predicate: "heart size is normal" (Cardiomegaly 0),
   "the mediastinum is widened" (Enlarged Cardiomediastinum 1), "costophrenic angles are sharp" (effusion 0).
2. *Cues* in the same clause: uncertainty ("cannot exclude", "may represent", "possible", "likely" ...) is matched
   before negation so that "not excluded" stays uncertain; negation ("no", "without", "free of", "negative for",
   "resolved", "has been removed" ...). A cue acts forward (pre: "no X") or backward (post: "X is not seen").
   Scopes stop at the sentence and at clause breaks ("but", "however", "although", ", the ...", "there is").
   A mention takes the label of the nearest cue in scope; with none it is positive.
3. *Aggregation*, as CheXpert: per observation, any positive mention -> 1; else any uncertain -> -1; else
   negative -> 0; no mention -> blank (NaN). "No Finding" is 1 when no observation other than Support Devices is
   positive or uncertain and no other abnormality (emphysema, granuloma, scoliosis, hernia ...) is asserted;
   otherwise blank, never 0. CHF / heart failure asserted also makes Cardiomegaly at least uncertain.

Choices worth knowing: "heart size is stable" alone is blank (no size stated); borderline / top-normal /
upper-limits-of-normal heart size is uncertain; "unlikely" is uncertain; an empty report is all blank (it
asserts nothing, so it is not "No Finding").
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CLASSES: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
BLANK = math.nan
OTHER = "_other_abnormality"  # asserted -> "No Finding" cannot be positive; not a scored class

# ----------------------------------------------------------------------------- mention phrases (regex)

_W = r"(?:[\w-]+\s+)"  # one word and its trailing space, for "collapse of the (...) lobe"

FINDINGS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"mediastinal\s+(?:widening|enlargement)",
        r"widening\s+of\s+the\s+(?:superior\s+)?mediastinum",
        r"(?:enlarged|widened)\s+cardiomediastinum",
        r"cardiomediastinal\s+enlargement",
    ),
    "Cardiomegaly": (r"cardiomegaly", r"cardiac\s+enlargement", r"enlargement\s+of\s+the\s+heart"),
    "Lung Opacity": (
        r"opacit(?:y|ies)",
        r"opacification",
        r"opacified",
        r"infiltrat(?:e|es|ion|ive)",
        r"air[\s-]?space\s+(?:disease|process|filling)",
        r"haziness",
        r"hazy",
        r"(?<!bone\s)densit(?:y|ies)",
        r"ground[\s-]?glass",
        r"reticul(?:ar|onodular)",
        r"interstitial\s+(?:disease|pattern|prominence)",
        r"increased\s+(?:interstitial\s+|lung\s+|pulmonary\s+|bronchovascular\s+)?markings",
    ),
    "Lung Lesion": (
        r"nodul(?:e|es|ar|arity)",
        r"mass(?:es)?(?!\s+effect)",
        r"tumou?rs?",
        r"neoplas(?:m|ms|tic)",
        r"carcinoma",
        r"cancer",
        r"malignan(?:cy|t)",
        r"metasta\w+",
        r"(?:lung|pulmonary|cavitary|cavitating|parenchymal|spiculated)\s+lesions?",
        r"cavitary|cavitation",
    ),
    "Edema": (
        r"o?edema(?:tous)?",
        r"(?:pulmonary\s+|vascular\s+|venous\s+)+congestion",
        r"fluid\s+overload",
        r"kerley\s+b?\s*lines",
        r"chf",
        r"(?:congestive\s+)?heart\s+failure",
        (r"(?:prominent|engorged|increased|indistinct|congested)\s+(?:central\s+)?(?:lung\s+|pulmonary\s+)?"
         r"(?:vasculature|vascularity|vessels|vascular\s+markings)"),
        (r"(?:prominence|engorgement|cephalization|indistinctness)\s+of\s+(?:the\s+)?(?:central\s+)?"
         r"(?:pulmonary\s+)?(?:vasculature|vascularity|vessels|vascular\s+markings)"),
        r"(?:pulmonary\s+)?(?:venous|vascular)\s+(?:engorgement|prominence|redistribution)",
        r"cephalization",
    ),
    "Consolidation": (r"consolidat(?:ion|ions|ive|ed|ing)",),
    "Pneumonia": (
        r"(?:broncho)?pneumonias?",
        r"pneumonic",
        r"pneumonitis",
        r"infection",
        r"infectious(?:\s+process)?",
    ),
    "Atelectasis": (
        r"atelecta\w+",
        r"(?:lobar|lobe|segmental|lung)\s+collapse",
        r"collapse\s+of\s+the\s+" + _W + r"{0,3}(?:lobe|lung)",
        r"collapsed\s+" + _W + r"?(?:lobe|lung)",
        r"volume\s+loss",
        r"plate[\s-]?like",
    ),
    "Pneumothorax": (r"pneumothora(?:x|ces)", r"hydropneumothorax"),
    "Pleural Effusion": (
        r"(?<!pericardial\s)effusions?",
        r"pleural\s+fluid",
        r"hydrothorax",
        r"hydropneumothorax",
        r"fluid\s+(?:in|within|along)\s+the\s+" + _W + r"?(?:fissure|pleural\s+space)",
        # IU X-ray anonymisation often turns "angle" into "XXXX", so the angle word is optional.
        r"blunt(?:ing|ed)\s+(?:of\s+)?(?:the\s+)?" + _W + r"?(?:costophrenic|cp)(?:\s+(?:angles?|sulc\w+|recess\w*))?",
        r"(?:costophrenic|cp)\s+(?:(?:angles?|sulc\w+|xxxx)\s+)?blunting",
    ),
    "Pleural Other": (
        r"pleural\s+(?:thickening|plaques?|scar(?:ring)?|calcifications?|fibrosis)",
        r"pleural[\s-]+parenchymal\s+(?:scarring|thickening|opacit\w+)",
        r"calcified\s+pleura\w*",
        r"fibrothorax",
        r"apical\s+(?:pleural\s+)?(?:cap|capping|thickening)",
    ),
    "Fracture": (r"fractur\w+", r"fx", r"compression\s+deformit(?:y|ies)"),
    "Support Devices": (
        (r"(?:endotracheal|et|nasogastric|ng|og|orogastric|enteric|feeding|chest|tracheostomy|trach|gastric"
        r"|dobhoff|thoracostomy|j|g)\s+tubes?"),
        r"\bett\b",
        r"tubes\s+and\s+lines|lines\s+and\s+tubes",
        (r"(?:central|venous|picc|ij|subclavian|jugular|arterial|femoral|midline|dialysis|swan[\s-]?ganz|port)\s+"
        r"(?:venous\s+)?(?:lines?|catheters?)"),
        r"picc",
        r"catheters?",
        r"pacemakers?|pacer",
        r"(?:pacing|pacemaker|pacer|icd|defibrillator|transvenous|epicardial)\s+(?:leads?|wires?)",
        r"a?icd",
        r"defibrillator",
        r"loop\s+recorder",
        r"port[\s-]?a[\s-]?cath|mediport|(?<!\w)port(?!\w)(?!able)",
        r"(?:sternotomy|sternal)\s+wires?",
        r"median\s+sternotomy|sternotomy",
        r"(?:prosthetic|mechanical|replaced)\s+(?:\w+\s+)?valves?|valve\s+replacement",
        r"stents?",
        r"(?:orthopedic|surgical|fixation|fusion|spinal)\s+hardware|hardware",
        r"(?:surgical|vascular|mediastinal|cholecystectomy|axillary|embolization)\s+clips|clips",
        r"(?:valve|valvular)\s+prosthes[ie]s|prosthetic\s+valve",
        r"(?:cardiac|electronic|implanted|implantable|medical|monitoring)\s+devices?",
        r"screws?",
        r"lvad|intra[\s-]?aortic\s+balloon\s+pump|iabp",
        r"pigtail|drains?",
        r"(?:vp|ventriculoperitoneal)\s+shunt",
        r"(?:ekg|ecg|monitoring|telemetry)\s+(?:leads|wires|electrodes)",
    ),
    OTHER: (
        r"emphysema\w*",
        r"copd|chronic\s+obstructive",
        r"hyper(?:inflat|expan|aerat)\w+|overinflat\w+",
        r"bullae|bullous|bulla|blebs?",
        r"granulomas?|granulomatous",
        r"calcified\s+(?:lymph\s+)?nodes?",
        r"calcifications?|calcified",
        r"scoliosis|kyphosis|kyphotic",
        r"degenerative",
        r"spondylosis|osteophyt\w+",
        r"osteopenia|osteoporo\w+",
        r"hernia",
        r"eventration",
        r"elevat(?:ed|ion)\s+(?:of\s+)?(?:the\s+)?" + _W + r"?hemidiaphragm",
        r"hemidiaphragm\s+(?:is\s+)?elevated",
        r"scar(?:s|ring)?",
        r"fibro(?:sis|tic)",
        r"bronchiectasis|bronchitis|bronchiolitis",
        r"airways?\s+disease",
        r"(?:bronchial\s+wall|peribronchial)\s+(?:thickening|cuffing)",
        r"tortuous|tortuosity|ectatic|ectasia|unfold(?:ing|ed)",
        r"atherosclero\w+",
        r"aneurysm\w*",
        r"pericardial\s+effusion",
        r"(?:lymph)?adenopathy",
        r"pneumoperitoneum|free\s+(?:intraperitoneal\s+)?air",
        r"pneumomediastinum",
        r"subcutaneous\s+(?:emphysema|air|gas)",
        r"cysts?|cystic",
        r"(?:lytic|sclerotic|blastic)\s+lesions?",
        r"deformit(?:y|ies)",
        r"thickening",
        r"aspiration",
        r"post[\s-]?(?:operative|surgical)\s+changes?",
    ),
}

# Hydropneumothorax and heart failure touch two observations.
EXTRA_CLASSES = {"hydropneumothorax": ("Pneumothorax", "Pleural Effusion")}

# Attribute mentions: a subject whose label is read from its predicate ("heart size is normal").
ATTRIBUTE_SUBJECTS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        r"heart\s+size|size\s+of\s+the\s+heart|cardiac\s+(?:size|silhouette|contours?|shadow)|heart\s+shadow",
        r"heart(?!\s+(?:failure|rate|disease|valve|border|size))",
        r"cardiac(?=\s+and\s+mediastinal)",
    ),
    "Enlarged Cardiomediastinum": (
        r"cardio[\s-]?mediastinal\s+(?:silhouette|contours?|shadow|size|structures)",
        r"cardiomediastinum",
        r"(?:superior\s+)?mediastinum",
        r"mediastinal\s+(?:silhouette|contours?|shadow|width|structures)",
        r"mediastinal(?=\s+and\s+hilar)",
    ),
    "Pleural Effusion": (r"(?:costophrenic|cp)\s+(?:angles?|sulc(?:us|i))",),
}
_CARDIAC_PREDICATES = (
    # (label, pattern); at one position the first listed wins, so uncertain phrases beat "normal".
    (UNCERTAIN, (r"top[\s-]+(?:of[\s-]+)?normal|upper\s+limits?\s+of\s+normal|upper\s+(?:range\s+of\s+)?normal"
                r"|high[\s-]+normal|borderline(?:\s+enlarged)?|at\s+the\s+upper\s+limit\w*")),
    (NEGATIVE, (r"not\s+(?:\w+\s+)?(?:enlarged|widened|increased|prominent)|no\s+longer\s+enlarged"
               r"|normal|within\s+normal\s+limits|unremarkable|normal[\s-]sized")),
    (POSITIVE, (r"(?:mildly\s+|moderately\s+|markedly\s+|severely\s+|slightly\s+)?"
               r"(?:enlarged|enlargement|increased|large|prominent|prominence|widened|widening|cardiomegaly)")),
)
_ANGLE_PREDICATES = (
    (NEGATIVE, r"sharp|clear|normal|preserved|well[\s-]defined|not\s+blunted"),
    (POSITIVE, r"blunted|blunting"),
)
PREDICATES = {"Cardiomegaly": _CARDIAC_PREDICATES, "Enlarged Cardiomediastinum": _CARDIAC_PREDICATES,
              "Pleural Effusion": _ANGLE_PREDICATES}
_PRE_FILLER = r"(?:(?:of|the|mildly|moderately|markedly|severely|slightly|minimally|stable|persistent|unchanged)\s+)*"

# ----------------------------------------------------------------------------- cues

_NOT_EXCLUDED = (r"(?:can\s*not|can't|cannot|could\s+not|not)\s+(?:be\s+)?(?:entirely\s+|completely\s+|totally\s+"
                 r"|definitely\s+|fully\s+|reliably\s+)?(?:excluded|ruled\s+out)")
# (kind, direction, pattern). direction: "pre" acts forward, "post" backward, "pre+post" both ways ("X is likely",
# "findings are likely due to X"), "both" forward and on the word right before ("X versus Y"), "segment" forward
# within its comma segment, "adj+post" backward and on the mention right after it ("resolved effusion"),
# "qmark" on the mention right before, and
# "none" claims the words so that nothing else reads them as a cue ("no change in", "to suggest").
CUES: tuple[tuple[str, str, str], ...] = (
    ("none", "none", r"to\s+(?:suggest|indicate|represent)"),
    ("none", "none", (r"no(?:t)?\s+(?:significant\s+|interval\s+|appreciable\s+|substantial\s+|definite\s+|"
                     r"significantly\s+)*(?:change|changed|increase|increased|decrease|decreased|worsening|worsened|"
                     r"progression|improvement|difference|growth)")),
    ("none", "none", r"without\s+(?:significant\s+|interval\s+)?(?:change|increase|decrease|worsening)"),
    ("unc", "post", _NOT_EXCLUDED),
    ("unc", "pre+post", (r"(?:is|are|was|were|seems?|appears?)\s+(?:most\s+|more\s+|less\s+)?"
                    r"(?:likely|possible|probable|suspected|questioned|questionable|uncertain|unlikely|"
                    r"a\s+consideration|considered|not\s+excluded)")),
    ("unc", "post", r"(?:may|might|could)\s+(?:also\s+)?be\s+(?:present|seen|noted|developing|superimposed|there)"),
    ("unc", "pre", (r"(?:can\s*not|can't|cannot|could\s+not|not|difficult\s+to)\s+(?:entirely\s+|completely\s+)?"
                   r"(?:exclude|rule\s+out)")),
    ("unc", "pre", r"(?:most\s+|more\s+|less\s+)?likely|unlikely|possibl[ey]|probabl[ey]|perhaps|presum\w+"),
    ("unc", "pre", (r"may|might|could|suggest(?:s|ing|ive\s+of|ion\s+of)?|suspicious\s+(?:for|of)"
                   r"|suspicion\s+(?:for|of)|suspect(?:ed)?|question(?:able|\s+of)?|concern(?:ing)?\s+for"
                   r"|worrisome(?:\s+for)?"
                   r"|equivocal|indeterminate|uncertain|unclear|rule\s+out|r/o|(?:evaluate|assess|eval)\s+for"
                   r"|differential(?:\s+diagnosis)?|consider(?:ed|ation)?")),
    ("unc", "both", r"versus|vs"),
    ("unc", "qmark", r"\?"),
    ("neg", "post", (r"(?:is\s+|are\s+|was\s+|were\s+|has\s+been\s+|have\s+been\s+)?not\s+(?:well\s+|clearly\s+|"
                    r"definitely\s+|currently\s+|convincingly\s+|definitively\s+|longer\s+)?(?:seen|identified|"
                    r"visuali[sz]ed|appreciated|demonstrated|present|evident|detected|noted|shown|apparent|"
                    r"visible|observed|depicted)")),
    ("neg", "post", (r"no\s+longer\s+(?:seen|present|visuali[sz]ed|evident|identified|noted|visible|apparent|"
                    r"demonstrated)")),
    ("neg", "post", (r"(?:has|have)\s+(?:since\s+|now\s+)?(?:completely\s+)?(?:resolved|cleared|been\s+removed|"
                    r"been\s+discontinued)")),
    ("neg", "post", r"(?:is|are|was|were)\s+(?:now\s+)?(?:absent|resolved|removed|excluded|gone|ruled\s+out)"),
    ("neg", "adj+post", r"resolved|removed"),
    ("neg", "post", r"ruled\s+out|excluded"),
    ("neg", "pre", (r"no|without|w/o|free\s+of|negative\s+for|clear\s+of|absence\s+of|absent|rather\s+than|neither|nor"
                   r"|(?:interval\s+)?(?:resolution|removal|clearing)\s+of|no\s+longer")),
    ("neg", "segment", r"not"),
)

# Clause breaks: cue scopes never cross them.
_CLAUSE_BREAK = re.compile(
    r"\b(?=(?:but|however|although|though|whereas|while|except|apart\s+from|aside\s+from|other\s+than|otherwise|"
    r"which|whose)\b)"
    r"|,\s*(?=(?:and\s+)?(?:the|a|an|there|this|these|it|with\s+the\s+exception)\b)"
    r"|\band\s+(?=(?:the|a|an|there)\b)"
    r"|\b(?=there\s+(?:is|are|has\s+been|have\s+been|was|were|may\s+be)\b)"
    r"|(?<=\?)"
)
# A comma segment holding one of these is a clause of its own for backward scopes and the "not" cue.
_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|seen|noted|present|demonstrated|identified|shows?|persists?|"
                   r"remains?|appears?|measures?)\b")
_SENTENCE = re.compile(r"(?<!\d)\.|\.(?!\d)|[;:\n!]")
_ABBREVIATIONS = (
    (re.compile(r"\bvs\.(?=\s)"), "versus"),
    (re.compile(r"\b(e\.g|i\.e|dr|approx|pt|mr|st)\.(?=\s)"), lambda m: m.group(1).replace(".", "")),
    (re.compile(r"\bw/o\b"), "without"),
    (re.compile(r"\bw/(?=\s|\w)"), "with "),
    (re.compile(r"\bs/p\b"), "status post"),
    (re.compile(r"\bb/l\b"), "bilateral"),
    (re.compile(r"\s+"), " "),
)


def _compile(patterns: Iterable[str]) -> re.Pattern:
    return re.compile(r"(?<![\w-])(?:" + "|".join(f"(?:{p})" for p in patterns) + r")(?![\w-])")


_FINDING_RE = {cls: _compile(pats) for cls, pats in FINDINGS.items()}
_ATTRIBUTE_RE = {cls: _compile(pats) for cls, pats in ATTRIBUTE_SUBJECTS.items()}
_CUE_RE = [(kind, direction, re.compile(r"(?<![\w-])(?:" + p + r")(?![\w-])" if p != r"\?" else p))
           for kind, direction, p in CUES]
_PRED_RE = {cls: [(lab, re.compile(r"(?<![\w-])(?:" + p + r")(?![\w-])")) for lab, p in preds]
            for cls, preds in PREDICATES.items()}
_PRE_PRED_RE = {cls: [(lab, re.compile(r"(?<![\w-])(?:" + p + r")\s+" + _PRE_FILLER + r"$")) for lab, p in preds]
                for cls, preds in PREDICATES.items()}

# ----------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class Mention:
    """One labelled mention, for ``explain``: which phrase, which observation(s), which label, and why."""

    text: str
    classes: tuple[str, ...]
    label: float
    reason: str  # "no cue", "neg pre 'no'", "predicate 'normal'" ...


@dataclass(frozen=True)
class _Cue:
    kind: str
    direction: str
    start: int
    end: int
    text: str


def _find_cues(clause: str) -> list[_Cue]:
    taken = np.zeros(len(clause) + 1, dtype=bool)
    cues = []
    for kind, direction, rx in _CUE_RE:
        for m in rx.finditer(clause):
            if taken[m.start() : m.end()].any():
                continue
            taken[m.start() : m.end()] = True
            if kind != "none":
                cues.append(_Cue(kind, direction, m.start(), m.end(), m.group(0)))
    return sorted(cues, key=lambda c: c.start)


def _segments(clause: str) -> list[tuple[int, int, bool]]:
    """Comma segments of a clause: (start, end, has_verb)."""
    out, start = [], 0
    for m in re.finditer(r",", clause):
        out.append((start, m.start(), bool(_VERB.search(clause[start : m.start()]))))
        start = m.end()
    out.append((start, len(clause), bool(_VERB.search(clause[start:]))))
    return out


def _segment_index(segments: list[tuple[int, int, bool]], pos: int) -> int:
    for k, (s, e, _) in enumerate(segments):
        if s <= pos <= e:
            return k
    return len(segments) - 1


def _cue_label(clause: str, start: int, end: int, cues: list[_Cue], segments) -> tuple[float, str]:
    """Label of the mention clause[start:end] from the nearest cue whose scope covers it."""
    seg = _segment_index(segments, start)
    best: tuple[int, _Cue] | None = None
    for c in cues:
        if c.end <= start:  # cue before the mention
            if c.direction in ("pre", "both", "pre+post"):
                ok = True
            elif c.direction == "segment":
                ok = _segment_index(segments, c.start) == seg
            elif c.direction in ("adj", "adj+post"):
                ok = bool(re.fullmatch(r"\s*(?:[\w-]+\s+){0,3}", clause[c.end : start]))
            else:
                ok = False
            dist = start - c.end
        elif c.start >= end:  # cue after the mention
            if c.direction in ("post", "pre+post", "adj+post"):
                cseg = _segment_index(segments, c.start)
                ok = all(not segments[k][2] for k in range(seg, cseg)) or cseg == seg
            elif c.direction == "both":
                ok = "," not in clause[end : c.start] and len(clause[end : c.start].split()) <= 1
            elif c.direction == "qmark":
                ok = not clause[end : c.start].strip()
            else:
                ok = False
            dist = c.start - end
        else:
            continue
        if ok and (best is None or dist < best[0]):
            best = (dist, c)
    if best is None:
        return POSITIVE, "no cue"
    c = best[1]
    label = NEGATIVE if c.kind == "neg" else UNCERTAIN
    return label, f"{c.kind} {c.direction} {c.text!r}"


def _attribute_label(clause: str, cls: str, m: re.Match, cues: list[_Cue]) -> tuple[float, str] | None:
    """Label of an attribute subject from its predicate: a modifier right before it, else the first one after."""
    before = clause[: m.start()]
    for lab, rx in _PRE_PRED_RE[cls]:
        pm = rx.search(before)
        if pm:
            return _hedge(lab, pm.start(), m.start(), cues, f"predicate {pm.group(0).strip()!r}")
    after = clause[m.end() :]
    found = None
    for lab, rx in _PRED_RE[cls]:
        pm = rx.search(after)
        if pm and (found is None or pm.start() < found[1].start()):
            found = (lab, pm)
    if found is None:
        return None
    lab, pm = found
    return _hedge(lab, m.start(), m.end() + pm.start(), cues, f"predicate {pm.group(0)!r}")


def _hedge(label: float, lo: int, hi: int, cues: list[_Cue], reason: str) -> tuple[float, str]:
    """'The heart may be enlarged': a positive predicate under an uncertainty cue between subject and predicate."""
    if label == POSITIVE:
        for c in cues:
            if c.kind == "unc" and lo - 12 <= c.start and c.end <= hi:
                return UNCERTAIN, f"{reason} hedged by {c.text!r}"
    return label, reason


def _clauses(sentence: str) -> list[str]:
    cuts = sorted({0, len(sentence), *(m.start() for m in _CLAUSE_BREAK.finditer(sentence))})
    return [sentence[a:b] for a, b in itertools.pairwise(cuts) if sentence[a:b].strip()]


@lru_cache(maxsize=65536)
def _label_sentence(sentence: str) -> tuple[Mention, ...]:
    out: list[Mention] = []
    for clause in _clauses(sentence):
        cues = _find_cues(clause)
        segments = _segments(clause)
        for cls, rx in _FINDING_RE.items():
            for m in rx.finditer(clause):
                classes = EXTRA_CLASSES.get(m.group(0), (cls,))
                if cls != classes[0]:  # a multi-class phrase is reported once, by its first class
                    continue
                label, reason = _cue_label(clause, m.start(), m.end(), cues, segments)
                out.append(Mention(m.group(0), classes, label, reason))
        attr_labels: list[tuple[int, int, str, tuple[float, str] | None]] = []
        for cls, rx in _ATTRIBUTE_RE.items():
            for m in rx.finditer(clause):
                attr_labels.append((m.start(), m.end(), cls, _attribute_label(clause, cls, m, cues)))
        attr_labels.sort()
        for k, (s, e, cls, res) in enumerate(attr_labels):
            if res is None:
                # "normal heart and mediastinum": a subject joined by and/or/comma shares its neighbour's predicate
                for j in (k - 1, k + 1):
                    if 0 <= j < len(attr_labels) and attr_labels[j][3] is not None:
                        a, b = sorted([(s, e), attr_labels[j][:2]])
                        if re.fullmatch(r"\s*(?:,|and|or|,\s*and)\s*", clause[a[1] : b[0]]):
                            res = (attr_labels[j][3][0], "shared " + attr_labels[j][3][1])
                            break
            if res is not None:
                out.append(Mention(clause[s:e], (cls,), res[0], res[1]))
    return tuple(out)


def _normalize(text: str) -> str:
    s = text.lower()
    for rx, repl in _ABBREVIATIONS:
        s = rx.sub(repl, s)
    return s.strip()


def explain(report: str) -> list[Mention]:
    """Every mention found in a report with its label and the reason, in reading order."""
    out: list[Mention] = []
    for sentence in _SENTENCE.split(_normalize(report)):
        if sentence.strip():
            out.extend(_label_sentence(sentence.strip()))
    return out


def label_report(report: str) -> dict[str, float]:
    """CheXpert labels of one report: {class: 1.0 / 0.0 / -1.0 / nan}, in ``CLASSES`` order."""
    labels: dict[str, list[float]] = {}
    finding = False
    for mention in explain(report):
        for cls in mention.classes:
            labels.setdefault(cls, []).append(mention.label)
            if cls != "Support Devices" and mention.label in (POSITIVE, UNCERTAIN):
                finding = True
        if mention.classes == ("Edema",) and mention.label in (POSITIVE, UNCERTAIN) and (
            "heart failure" in mention.text or mention.text == "chf"
        ):
            labels.setdefault("Cardiomegaly", []).append(UNCERTAIN)
    out = {}
    for cls in CLASSES[1:]:
        got = labels.get(cls)
        if not got:
            out[cls] = BLANK
        elif POSITIVE in got:
            out[cls] = POSITIVE
        elif UNCERTAIN in got:
            out[cls] = UNCERTAIN
        else:
            out[cls] = NEGATIVE
    nothing_said = not report.strip()
    return {"No Finding": BLANK if (finding or nothing_said) else POSITIVE, **out}


def label_reports(reports: Sequence[str]) -> np.ndarray:
    """Labels of many reports as an (N, 14) float array (1 / 0 / -1 / NaN), columns in ``CLASSES`` order."""
    out = np.empty((len(reports), len(CLASSES)))
    for i, r in enumerate(reports):
        d = label_report(r)
        out[i] = [d[c] for c in CLASSES]
    return out
