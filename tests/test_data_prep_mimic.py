"""MIMIC-CXR section extraction and the reader, on hand-written reports (no MIMIC data exists in this repo).

Every report below was invented for these tests in the style of MIMIC-CXR free text. `write_mimic_tree` is
also used by the pipeline, resume and benchmark code to build a small PhysioNet-layout tree.
"""

from __future__ import annotations

import csv
import gzip
import zipfile
from pathlib import Path

import pytest

from data_prep.config import MimicConfig
from data_prep.mimic import extract_sections, read_mimic, study_paths
from xraygpt.data.reports import ReportSourceError, apply_rule_filters

STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___-year-old woman with cough and fever.  Evaluate for
 pneumonia.

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 The heart size is top normal.  There is a patchy opacity in the right
 lower lobe concerning for pneumonia.  No pleural effusion or pneumothorax.
 Mild degenerative changes of the thoracic spine.

 IMPRESSION:

 Right lower lobe opacity, concerning for pneumonia in the appropriate
 clinical setting.
"""

MIXED_CASE_INLINE = """Findings: Lungs are well expanded and clear. Cardiomediastinal and hilar
contours are within normal limits. No pleural effusion.
Impression: No acute cardiopulmonary abnormality.
"""

COMBINED = """EXAMINATION: CHEST (PORTABLE AP)
INDICATION: Intubated patient, assess tube position.
FINDINGS AND IMPRESSION:
Endotracheal tube terminates 4 cm above the carina.  Enteric tube courses below
the diaphragm with tip out of view.  Bibasilar atelectasis.  No pneumothorax.
"""

NO_FINDINGS_HEADER = """EXAMINATION:  Chest radiograph, two views.

COMPARISON:  Chest radiograph from ___.

Heart size is normal.  The aorta is mildly tortuous.  The lungs are clear
without focal consolidation, effusion, or pneumothorax.

IMPRESSION:  No acute intrathoracic process.
"""

NO_HEADERS = """Heart size is mildly enlarged. There is mild pulmonary vascular congestion
without frank edema. Small bilateral pleural effusions are present.

Mild cardiomegaly with vascular congestion and small effusions.
"""

NUMBERED_WET_READ = """WET READ: ___ ___ 10:12 PM
  Left lower lobe opacity, possibly atelectasis.
______________________________________________________________________________
                                 FINAL REPORT
HISTORY:  Shortness of breath.

FINDINGS:  Left lower lobe opacity obscures the left hemidiaphragm, which may
reflect atelectasis or consolidation.  Small left pleural effusion.  Right lung
is clear.  Heart size is normal.

IMPRESSION:
1.  Left lower lobe opacity, atelectasis versus pneumonia.
2.  Small left pleural effusion.

NOTIFICATION:  The findings were discussed with Dr. ___ by telephone at ___.
"""

CONCLUSION_AND_CAPS_HEADER = """PORTABLE AP CHEST RADIOGRAPH:
Right-sided PICC line terminates in the mid SVC.  Lungs are clear.  There is no
pneumothorax or pleural effusion.  Normal cardiac silhouette.

CONCLUSION:  Right PICC terminating in the mid SVC.
"""

COLON_IN_TEXT = """FINDINGS:
Support devices: a right IJ catheter ends at the cavoatrial junction.  The
lungs are clear and there is no effusion.
PICC: tip in the low SVC.
IMPRESSION:  Lines in standard position, no acute process.
"""


@pytest.mark.parametrize("text,findings,impression", [
    (STANDARD,
     ("The heart size is top normal. There is a patchy opacity in the right lower lobe concerning for pneumonia. "
     "No pleural effusion or pneumothorax. Mild degenerative changes of the thoracic spine."),
     "Right lower lobe opacity, concerning for pneumonia in the appropriate clinical setting."),
    (MIXED_CASE_INLINE,
     ("Lungs are well expanded and clear. Cardiomediastinal and hilar contours are within normal limits. "
     "No pleural effusion."),
     "No acute cardiopulmonary abnormality."),
    (COMBINED,
     ("Endotracheal tube terminates 4 cm above the carina. Enteric tube courses below the diaphragm with tip out "
     "of view. Bibasilar atelectasis. No pneumothorax."),
     ("Endotracheal tube terminates 4 cm above the carina. Enteric tube courses below the diaphragm with tip out "
     "of view. Bibasilar atelectasis. No pneumothorax.")),
    (NO_FINDINGS_HEADER,
     ("Heart size is normal. The aorta is mildly tortuous. The lungs are clear without focal consolidation, "
     "effusion, or pneumothorax."),
     "No acute intrathoracic process."),
    (NO_HEADERS,
     ("Heart size is mildly enlarged. There is mild pulmonary vascular congestion without frank edema. Small "
     "bilateral pleural effusions are present. Mild cardiomegaly with vascular congestion and small effusions."),
     ""),
    (NUMBERED_WET_READ,
     ("Left lower lobe opacity obscures the left hemidiaphragm, which may reflect atelectasis or consolidation. "
     "Small left pleural effusion. Right lung is clear. Heart size is normal."),
     "Left lower lobe opacity, atelectasis versus pneumonia. Small left pleural effusion."),
    (CONCLUSION_AND_CAPS_HEADER,
     ("Right-sided PICC line terminates in the mid SVC. Lungs are clear. There is no pneumothorax or pleural "
     "effusion. Normal cardiac silhouette."),
     "Right PICC terminating in the mid SVC."),
    (COLON_IN_TEXT,
     ("Support devices: a right IJ catheter ends at the cavoatrial junction. The lungs are clear and there is no "
     "effusion. PICC: tip in the low SVC."),
     "Lines in standard position, no acute process."),
], ids=["standard", "mixed-case-inline", "combined", "no-findings-header", "no-headers", "numbered-wet-read",
        "conclusion-caps-header", "colon-in-text"])
def test_extract_sections(text, findings, impression):
    s = extract_sections(text)
    assert s.findings == findings
    assert s.impression == impression


def test_preamble_sections_are_kept_apart():
    s = extract_sections(STANDARD)
    assert s.indication == "___-year-old woman with cough and fever. Evaluate for pneumonia."
    assert s.comparison == "___"
    assert s.headers == ["examination", "indication", "technique", "comparison", "findings", "impression"]
    assert "Chest PA and lateral" not in s.findings


def test_section_options():
    s = extract_sections(NO_HEADERS, last_paragraph_as_impression=True)
    assert s.impression == "Mild cardiomegaly with vascular congestion and small effusions."
    assert s.findings.endswith("Small bilateral pleural effusions are present.")
    s = extract_sections(COMBINED, combined_section="drop")
    assert (s.findings, s.impression) == ("", "")
    # CRLF files and headers in lower case
    s = extract_sections(MIXED_CASE_INLINE.replace("\n", "\r\n").lower())
    assert s.impression == "no acute cardiopulmonary abnormality."


# ---- a PhysioNet-layout tree ---------------------------------------------------------------------------------


def write_mimic_tree(root: Path, studies: list[dict], zipped: bool = False, gz: bool = True,
                     images: bool = True) -> MimicConfig:
    """studies: [{"subject", "study", "text", "split", "images": [(dicom, view), ...]}] -> a MimicConfig."""
    reports = root / "mimic-cxr-reports"
    jpg = root / "mimic-cxr-jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    split_rows, meta_rows = [], []
    for st in studies:
        rel_txt, rel_dir = study_paths(st["subject"], st["study"])
        if st.get("text") is not None:
            (reports / rel_txt).parent.mkdir(parents=True, exist_ok=True)
            (reports / rel_txt).write_text(st["text"])
        for dicom, view in st["images"]:
            split_rows.append({"dicom_id": dicom, "study_id": st["study"], "subject_id": st["subject"],
                               "split": st["split"]})
            meta_rows.append({"dicom_id": dicom, "subject_id": st["subject"], "study_id": st["study"],
                              "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                              "Rows": "3056", "Columns": "2544"})
            if images:
                (jpg / rel_dir).mkdir(parents=True, exist_ok=True)
                (jpg / rel_dir / f"{dicom}.jpg").write_bytes(b"\xff\xd8\xff")

    def write_csv(path: Path, rows: list[dict]) -> Path:
        path = path.with_suffix(".csv.gz") if gz else path
        with (gzip.open(path, "wt", newline="") if gz else path.open("w", newline="")) as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    split_csv = write_csv(jpg / "mimic-cxr-2.0.0-split.csv", split_rows)
    meta_csv = write_csv(jpg / "mimic-cxr-2.0.0-metadata.csv", meta_rows)
    source = reports
    if zipped:
        source = root / "mimic-cxr-reports.zip"
        with zipfile.ZipFile(source, "w") as z:
            for f in sorted(reports.rglob("*.txt")):
                z.write(f, f"mimic-cxr-reports/{f.relative_to(reports)}")
    return MimicConfig(reports=str(source), split_csv=str(split_csv), metadata_csv=str(meta_csv),
                       images_dir=str(jpg) if images else None)


FIXTURE_STUDIES = [
    {"subject": "10000001", "study": "50000001", "text": STANDARD, "split": "train",
     "images": [("aaaa-0001", "PA"), ("aaaa-0002", "LATERAL")]},
    {"subject": "10000002", "study": "50000002", "text": NO_FINDINGS_HEADER, "split": "validate",
     "images": [("bbbb-0001", "AP")]},
    {"subject": "10000003", "study": "50000003", "text": NO_HEADERS, "split": "train",  # dropped: no impression
     "images": [("cccc-0001", "PA")]},
    {"subject": "11000004", "study": "50000004", "text": COMBINED, "split": "test",
     "images": [("dddd-0001", "AP"), ("dddd-0002", "AP")]},
    {"subject": "10000005", "study": "50000005", "text": STANDARD, "split": "train",  # lateral only
     "images": [("eeee-0001", "LL")]},
    {"subject": "10000006", "study": "50000006", "text": None, "split": "train",  # report file missing
     "images": [("ffff-0001", "PA")]},
]


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_read_mimic_pairs_views_splits(tmp_path, zipped):
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES, zipped=zipped)
    data = read_mimic(cfg)
    assert [r.report_id for r in data.reports] == ["s50000001", "s50000002", "s50000003", "s50000004"]
    assert data.counts == {"images_listed": 8, "images_other_view": 2, "reports_missing": 1, "reports_read": 4}
    # one pair per frontal image, dicom id as image_id, the official split kept ("validate" -> "val")
    got = {rid: [(i.image_id, i.split) for i in refs] for rid, refs in data.images.items()}
    assert got == {"s50000001": [("aaaa-0001", "train")], "s50000002": [("bbbb-0001", "val")],
                   "s50000003": [("cccc-0001", "train")],
                   "s50000004": [("dddd-0001", "test"), ("dddd-0002", "test")]}
    assert data.images["s50000004"][0].path == "files/p11/p11000004/s50000004/dddd-0001.jpg"
    filt = apply_rule_filters(data.reports)
    assert [r.report_id for r in filt.kept] == ["s50000001", "s50000002", "s50000004"]
    assert filt.dropped == {"no_findings": 0, "no_impression": 1, "findings_too_short": 0,
                            "impression_too_short": 0}


def test_read_mimic_all_views_and_missing_images(tmp_path):
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES)
    cfg.views = []
    (Path(cfg.images_dir) / "files/p10/p10000001/s50000001/aaaa-0002.jpg").unlink()
    data = read_mimic(cfg)
    assert [i.image_id for i in data.images["s50000001"]] == ["aaaa-0001"]
    assert [i.image_id for i in data.images["s50000005"]] == ["eeee-0001"]
    assert data.counts["images_missing"] == 1 and "images_other_view" not in data.counts


def test_read_mimic_bad_inputs_name_the_file(tmp_path):
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES, gz=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("dicom_id,study_id\nx,1\n")
    with pytest.raises(ReportSourceError, match=r"bad\.csv: missing column\(s\) subject_id, split"):
        read_mimic(MimicConfig(reports=cfg.reports, split_csv=str(bad), metadata_csv=cfg.metadata_csv))
    with pytest.raises(ReportSourceError, match="nowhere.csv does not exist"):
        read_mimic(MimicConfig(reports=cfg.reports, split_csv=str(tmp_path / "nowhere.csv"),
                               metadata_csv=cfg.metadata_csv))
    with pytest.raises(ReportSourceError, match="has no files/ folder"):
        read_mimic(MimicConfig(reports=str(tmp_path), split_csv=cfg.split_csv, metadata_csv=cfg.metadata_csv))
