"""Parse IU X-ray MeSH `<major>` tags into structured findings, rendering signs and CheXpert-style labels.

A tag is a term followed by slash-separated qualifiers, e.g. ``Opacity/lung/base/left/mild``: term
``Opacity``, anatomy ``lung``, zone ``base``, laterality ``left``, severity ``mild``. Each finding maps to
zero or more *signs* (what the renderer draws) and zero or more of the 14 CheXpert classes (what evaluation
scores). Tags we cannot interpret are kept and counted, never fatal: a new vocabulary must not stop a build.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

CHEXPERT_CLASSES: tuple[str, ...] = (
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

# What the renderer can draw. "normal" draws nothing beyond the patient's anatomy.
SIGNS: tuple[str, ...] = (
    "normal",
    "cardiomegaly",
    "mediastinum",  # widened mediastinum
    "effusion",
    "pneumothorax",
    "opacity",  # airspace opacity / infiltrate / density
    "interstitial",  # reticular markings, fibrosis
    "consolidation",  # lobar consolidation with air bronchograms (also pneumonia)
    "atelectasis",
    "edema",  # perihilar haze + septal lines (also congestion, heart failure)
    "nodule",  # nodule / mass / (calcified) granuloma
    "fracture",
    "device",  # lines, tubes, pacemaker, sternotomy wires, clips, stents
    "hyperinflation",
    "hypoinflation",
    "spine",  # degenerative spine (osteophytes, endplate sclerosis)
    "scoliosis",
    "diaphragm",  # elevated hemidiaphragm
    "pleural_thickening",
    "aorta",  # tortuous / calcified aorta
    "hiatal_hernia",
)

# Qualifier vocabulary, lower case. Anything else is counted as an unknown qualifier.
LATERALITY = ("right", "left", "bilateral")
ZONES = (
    "apex", "upper lobe", "middle lobe", "lingula", "lower lobe", "base", "hilum", "retrocardiac",
    "paratracheal", "costophrenic angle", "cardiophrenic angle", "supracardiac", "pleural sinus", "sulcus",
    "posterior", "anterior", "azygos lobe",
)  # fmt: skip
# Ordinal severity: 0 borderline, 1 mild/small, 2 moderate, 3 severe/large.
SEVERITY = {"borderline": 0, "mild": 1, "small": 1, "moderate": 2, "severe": 3, "large": 3}
ANATOMY = (
    "lung", "thoracic vertebrae", "lumbar vertebrae", "cervical vertebrae", "spine", "ribs", "clavicle",
    "sternum", "humerus", "shoulder", "aorta", "aorta, thoracic", "mediastinum", "pleura", "heart",
    "heart ventricles", "heart atria", "diaphragm", "abdomen", "thorax", "breast", "breast implants", "neck",
    "lymph nodes", "trachea", "trachea, carina", "blood vessels", "bronchi", "pulmonary alveoli",
    "coronary vessels", "aortic valve", "mitral valve", "pulmonary artery", "esophagus", "adipose tissue",
)  # fmt: skip
DESCRIPTORS = (
    "degenerative", "multiple", "tortuous", "hypoinflation", "hyperdistention", "interstitial", "prominent",
    "round", "patchy", "scattered", "enlarged", "chronic", "bronchovascular", "elevated", "blunted", "streaky",
    "focal", "healed", "flattened", "diffuse", "obscured", "irregular", "reticular", "abnormal", "multilobar",
    "acute",
)  # fmt: skip

# Recognised terms that draw nothing on a frontal sketch (lateral-view-only, outside the chest, or too vague).
UNRENDERED_TERMS = frozenset(
    {
        "technical quality of image unsatisfactory", "kyphosis", "foreign bodies", "nipple shadow",
        "epicardial fat", "adipose tissue", "shoulder", "sulcus", "mastectomy", "breast implants",
        "pulmonary artery", "hypertension, pulmonary", "shift", "sclerosis", "lucency", "deformity", "ribs",
        "bone diseases, metabolic", "osteoporosis", "pericardial effusion", "lymph nodes", "trachea",
        "trachea, carina", "subcutaneous emphysema", "pneumoperitoneum", "cicatrix", "spinal fusion",
        "heart", "cardiac shadow", "mediastinum", "diaphragm", "costophrenic angle", "lung", "spine",
        "thoracic vertebrae", "lumbar vertebrae", "cervical vertebrae", "aorta", "aorta, thoracic",
        "heart ventricles", "heart atria", "thickening", "pleura", "calcinosis", "arthritis", "blood vessels",
    }
)  # fmt: skip

_NO_INDEXING = "no indexing"
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class MeshFinding:
    """One parsed `<major>` tag."""

    raw: str
    term: str  # lower case, e.g. "pleural effusion"
    laterality: str | None = None  # "right" | "left" | "bilateral"
    zones: tuple[str, ...] = ()  # "base", "upper lobe", ...
    anatomy: tuple[str, ...] = ()  # "lung", "ribs", ...
    severity: int | None = None  # 0 borderline .. 3 severe/large (see SEVERITY)
    descriptors: tuple[str, ...] = ()  # "patchy", "healed", "multiple", ...
    unknown_qualifiers: tuple[str, ...] = ()
    signs: tuple[tuple[str, str], ...] = ()  # (sign, variant) pairs for the renderer; variant may be ""
    chexpert: tuple[str, ...] = ()
    status: str = "sign"  # "normal" | "sign" | "unrendered" | "unknown" | "no_indexing"

    def has(self, word: str) -> bool:
        return word in self.descriptors or word in self.zones or word in self.anatomy


def finding_phrase(f: MeshFinding) -> str | None:
    """An abnormal finding in plain words, e.g. "calcified granuloma in the right upper lobe"; None for a normal or
    unindexed tag. Descriptors, term, then where (side and zones); severity is left out."""
    if f.status in ("normal", "no_indexing"):
        return None
    what = " ".join([*f.descriptors, f.term])
    where = " ".join(x for x in (f.laterality, *f.zones) if x)
    return f"{what} in the {where}" if where else what


def parse_tag(raw: str) -> MeshFinding:
    """Parse one MeSH major tag. Never raises: unknown terms come back with status "unknown"."""
    parts = [_WS.sub(" ", p).strip().lower() for p in raw.split("/")]
    term, quals = parts[0], [q for q in parts[1:] if q]
    laterality: str | None = None
    zones: list[str] = []
    anatomy: list[str] = []
    descriptors: list[str] = []
    unknown: list[str] = []
    severity: int | None = None
    for q in quals:
        if q in LATERALITY:
            # "right" + "left" in one tag means both sides
            laterality = q if laterality in (None, q) else "bilateral"
        elif q in SEVERITY:
            severity = max(severity if severity is not None else -1, SEVERITY[q])
        elif q in ZONES:
            zones.append(q)
        elif q in ANATOMY:
            anatomy.append(q)
        elif q in DESCRIPTORS:
            descriptors.append(q)
        else:
            unknown.append(q)
    f = MeshFinding(
        raw=raw.strip(),
        term=term,
        laterality=laterality,
        zones=tuple(zones),
        anatomy=tuple(anatomy),
        severity=severity,
        descriptors=tuple(descriptors),
        unknown_qualifiers=tuple(unknown),
    )
    signs, chexpert, status = _classify(f)
    return replace(f, signs=tuple(signs), chexpert=tuple(chexpert), status=status)


def _classify(f: MeshFinding) -> tuple[list[tuple[str, str]], list[str], str]:
    """(signs, CheXpert classes, status) for one finding. The one place that knows the vocabulary."""
    t, has = f.term, f.has
    if t == "normal":
        return [("normal", "")], [], "normal"
    if t == _NO_INDEXING or not t:
        return [], [], "no_indexing"

    # heart and mediastinum
    if t == "cardiomegaly" or (t in ("cardiac shadow", "heart", "heart ventricles", "heart atria") and has("enlarged")):
        return [("cardiomegaly", "")], ["Cardiomegaly"], "sign"
    if t == "mediastinum" and (has("prominent") or has("enlarged")):
        return [("mediastinum", "paratracheal" if has("paratracheal") else "")], ["Enlarged Cardiomediastinum"], "sign"

    # pleura
    if t == "pleural effusion" or t == "hemothorax":
        return [("effusion", "")], ["Pleural Effusion"], "sign"
    if t in ("costophrenic angle", "pleura") and has("blunted"):
        return [("effusion", "blunted")], ["Pleural Effusion"], "sign"
    if t in ("hydropneumothorax", "hemopneumothorax"):
        return [("effusion", ""), ("pneumothorax", "")], ["Pleural Effusion", "Pneumothorax"], "sign"
    if t == "pneumothorax":
        return [("pneumothorax", "")], ["Pneumothorax"], "sign"
    if (t in ("thickening", "cicatrix") and has("pleura")) or t == "pleura":
        return [("pleural_thickening", "")], ["Pleural Other"], "sign"

    # lung parenchyma
    interstitial = has("interstitial") or has("reticular")
    if t in ("opacity", "density", "airspace disease", "infiltrate"):
        return [("interstitial" if interstitial else "opacity", "")], ["Lung Opacity"], "sign"
    if t in ("markings", "lung diseases, interstitial", "pulmonary fibrosis", "fibrosis") or (
        t in ("lung", "thickening") and (interstitial or has("bronchovascular"))
    ):
        return [("interstitial", "")], ["Lung Opacity"], "sign"
    if t == "consolidation":
        return [("consolidation", "")], ["Consolidation"], "sign"
    if t == "pneumonia":
        return [("consolidation", "pneumonia")], ["Pneumonia"], "sign"
    if t in ("pulmonary atelectasis", "volume loss"):
        return [("atelectasis", "")], ["Atelectasis"], "sign"
    if t in ("pulmonary edema", "heart failure"):
        return [("edema", "")], ["Edema"], "sign"
    if t == "pulmonary congestion":
        return [("edema", "congestion")], ["Edema"], "sign"
    if t == "nodule" or t == "cavitation":
        return [("nodule", "")], ["Lung Lesion"], "sign"
    if t == "mass":
        return [("nodule", "mass")], ["Lung Lesion"], "sign"
    if t in ("granuloma", "calcified granuloma", "granulomatous disease"):
        return [("nodule", "calcified")], ["Lung Lesion"], "sign"
    if t == "calcinosis" and (has("lung") or has("hilum")):
        return [("nodule", "calcified")], ["Lung Lesion"], "sign"

    # volumes and diaphragm
    if t in (
        "emphysema", "pulmonary emphysema", "pulmonary disease, chronic obstructive", "lung, hyperlucent",
        "bullous emphysema",
    ) or (t == "lung" and has("hyperdistention")):  # fmt: skip
        return [("hyperinflation", "")], [], "sign"
    if t == "diaphragm" and has("flattened"):
        return [("hyperinflation", "flattened")], [], "sign"
    if t == "lung" and has("hypoinflation"):
        return [("hypoinflation", "")], [], "sign"
    if (t == "diaphragm" and has("elevated")) or t == "diaphragmatic eventration":
        return [("diaphragm", "")], [], "sign"

    # bones
    if t == "fractures, bone":
        return [("fracture", _bone_site(f))], ["Fracture"], "sign"
    if t == "scoliosis":
        return [("scoliosis", "")], [], "sign"
    spine_anatomy = any(a in f.anatomy for a in ("spine", "thoracic vertebrae", "lumbar vertebrae"))
    if (
        (t in ("spine", "thoracic vertebrae", "lumbar vertebrae") and has("degenerative"))
        or t in ("osteophyte", "spondylosis", "hyperostosis, diffuse idiopathic skeletal")
        or (t == "arthritis" and (spine_anatomy or not f.anatomy))
        or (t == "deformity" and spine_anatomy)
    ):
        return [("spine", "")], [], "sign"

    # support devices
    device = _device_variant(f)
    if device:
        return [("device", device)], ["Support Devices"], "sign"

    # great vessels, hernia
    if t in ("aorta", "aorta, thoracic") and (has("tortuous") or has("enlarged") or has("prominent")):
        return [("aorta", "tortuous")], [], "sign"
    if t == "atherosclerosis" or (t == "calcinosis" and (has("aorta") or has("aorta, thoracic"))):
        return [("aorta", "calcified")], [], "sign"
    if t == "aortic aneurysm":
        return [("aorta", "aneurysm")], [], "sign"
    if t in ("hernia, hiatal", "hernia, diaphragmatic"):
        return [("hiatal_hernia", "")], [], "sign"

    if t in UNRENDERED_TERMS:
        return [], [], "unrendered"
    return [], [], "unknown"


def _bone_site(f: MeshFinding) -> str:
    for site in ("clavicle", "thoracic vertebrae", "lumbar vertebrae", "humerus", "shoulder", "ribs"):
        if site in f.anatomy:
            return {"lumbar vertebrae": "thoracic vertebrae", "shoulder": "humerus"}.get(site, site)
    return "ribs"  # sternum and unspecified: the rib cage is what a frontal film shows


def _device_variant(f: MeshFinding) -> str:
    t, has = f.term, f.has
    if t == "catheters, indwelling":
        return "line"
    if t == "implanted medical device":
        return "valve" if (has("aortic valve") or has("mitral valve")) else "pacemaker"
    if t == "sutures":
        return "sternotomy" if (has("sternum") or has("mediastinum")) else "clips"
    if t == "surgical instruments":
        return "sternotomy" if (has("mediastinum") or has("heart") or has("sternum")) else "clips"
    if t == "tube, inserted":
        return "ng_tube" if has("abdomen") else ("chest_tube" if has("thorax") else "et_tube")
    if t == "medical device":
        return "port"
    if t == "stents":
        return "stent"
    return ""


# ------------------------------------------------------------------------------------------- reports
@dataclass
class ReportFindings:
    """All tags of one report, parsed, with the labels evaluation uses."""

    findings: list[MeshFinding]
    labels: list[int]  # 0/1 per CHEXPERT_CLASSES
    labelled: bool  # False when the report has no usable tag (none, or only "No Indexing")

    @property
    def signs(self) -> list[tuple[str, MeshFinding]]:
        return [(sign, f) for f in self.findings for sign, _ in f.signs]


def parse_report_tags(tags: Sequence[str]) -> ReportFindings:
    """Parse a report's tags and derive CheXpert labels.

    "No Finding" follows CheXpert: positive when no pathology (Support Devices excepted) is positive and
    every tag was understood. A report without usable tags gets all zeros and `labelled=False`.
    """
    findings = [parse_tag(t) for t in tags if t and t.strip()]
    positives = {c for f in findings for c in f.chexpert}
    usable = [f for f in findings if f.status != "no_indexing"]
    labelled = bool(usable)
    pathology = positives - {"Support Devices"}
    no_finding = labelled and not pathology and all(f.status != "unknown" for f in usable)
    if no_finding:
        positives.add("No Finding")
    return ReportFindings(findings, [int(c in positives) for c in CHEXPERT_CLASSES], labelled)


@dataclass
class TagStats:
    """Vocabulary coverage over many reports."""

    n_tags: int = 0
    status: Counter = field(default_factory=Counter)  # status -> tags
    unknown_terms: Counter = field(default_factory=Counter)
    unrendered_terms: Counter = field(default_factory=Counter)
    unknown_qualifiers: Counter = field(default_factory=Counter)
    reports_without_label: int = 0

    def add(self, rf: ReportFindings) -> None:
        self.reports_without_label += not rf.labelled
        for f in rf.findings:
            self.n_tags += 1
            self.status[f.status] += 1
            if f.status == "unknown":
                self.unknown_terms[f.term] += 1
            elif f.status == "unrendered":
                self.unrendered_terms[f.term] += 1
            self.unknown_qualifiers.update(f.unknown_qualifiers)

    def to_dict(self) -> dict:
        return {
            "n_tags": self.n_tags,
            "status": dict(sorted(self.status.items())),
            "unknown_terms": dict(self.unknown_terms.most_common()),
            "unrendered_terms": dict(self.unrendered_terms.most_common()),
            "unknown_qualifiers": dict(self.unknown_qualifiers.most_common()),
            "reports_without_label": self.reports_without_label,
        }


def tag_stats(all_tags: Iterable[Sequence[str]]) -> TagStats:
    stats = TagStats()
    for tags in all_tags:
        stats.add(parse_report_tags(tags))
    return stats
