"""The `rules` cleaner (paper example side by side, sentence rules, the real IU reports) and the LLM prompt."""

from __future__ import annotations

import re

import pytest

from data_prep.cleaners import (
    PromptTemplate,
    RulesCleaner,
    clean_sentence,
    has_blank,
    postprocess,
    rules_summary,
    split_sentences,
)
from xraygpt.data.reports import Report, apply_rule_filters, read_reports

# The worked example of the XrayGPT authors (README-DATASET.md of mbzuai-oryx/XrayGPT, also section 4 of
# Thawkar et al. 2023): a MIMIC-CXR report before and after their gpt-3.5-turbo cleaning.
PAPER_FINDINGS = (
    "PA and lateral views of the chest were provided demonstrating no focal consolidation, effusion or "
    "pneumothorax. Cardiomediastinal silhouette appears normal and stable.  There is a compression deformity "
    "involving a mid thoracic vertebral body, which appears new from the prior chest radiograph of ___.   No free "
    "air below the right hemidiaphragm. There are tiny surgical clips in the left base of neck, likely indicating "
    "prior thyroid surgery.")
PAPER_IMPRESSION = ("No acute intrathoracic process.  Interval development of a mid thoracic spine compression "
                    "fracture.")
PAPER_SUMMARY = (
    "The chest x-ray findings reveal no evidence of focal consolidation, effusion, or pneumothorax. The "
    "cardiomediastinal silhouette appears stable and normal. There is a newly developed mid thoracic spine "
    "compression fracture but no free air below the right hemidiaphragm. The presence of surgical clips in the "
    "left base of the neck suggests prior thyroid surgery. The impression suggests that there is no acute "
    "intrathoracic condition detected in the x-ray aside from the new development of mid thoracic spine "
    "compression fracture.")
OURS = (
    "No focal consolidation, effusion or pneumothorax. Cardiomediastinal silhouette appears normal and stable. "
    "There is a compression deformity involving a mid thoracic vertebral body, which appears new. No free air "
    "below the right hemidiaphragm. There are tiny surgical clips in the left base of neck, likely indicating prior "
    "thyroid surgery. No acute intrathoracic process. New development of a mid thoracic spine compression "
    "fracture.")

# What the paper's summary keeps, and what it removes; both summaries are checked against both lists.
KEPT_FACTS = [r"no (evidence of )?focal consolidation, effusion,? or pneumothorax", r"cardiomediastinal silhouette",
              r"\bnew(ly)?\b.*compression (deformity|fracture)", r"no free air below the right hemidiaphragm",
              r"surgical clips", r"thyroid surgery", r"no acute intrathoracic", r"mid thoracic"]
REMOVED = [r"___", r"\bPA\b", r"lateral views?", r"prior chest radiograph", r"\binterval\b", r"new from"]


def test_paper_example_side_by_side():
    ours = rules_summary(PAPER_FINDINGS, PAPER_IMPRESSION)
    print("\n  paper (gpt-3.5-turbo):", PAPER_SUMMARY, "\n  ours  (rules)        :", ours)
    assert ours == OURS
    for summary in (PAPER_SUMMARY, ours):
        for fact in KEPT_FACTS:
            assert re.search(fact, summary, re.IGNORECASE), (fact, summary)
        for gone in REMOVED:
            assert not re.search(gone, summary, re.IGNORECASE), (gone, summary)


@pytest.mark.parametrize("sentence,expected", [
    # comparisons: dropped, unless the finding can be kept without the comparison
    ("Compared to the prior study, there is a new left pleural effusion.", "There is a new left pleural effusion."),
    ("Moderate cardiomegaly is unchanged.", None),
    ("The left effusion has increased since ___.", None),
    ("Interval placement of a right PICC line.", "New placement of a right PICC line."),
    ("Bibasilar opacities are again seen.", None),
    ("Previously seen nodule is not visualized.", None),
    ("Right upper lobe opacity, new from the prior exam of ___.", "Right upper lobe opacity, new."),
    ("Surgical clips indicate prior cholecystectomy.", "Surgical clips indicate prior cholecystectomy."),
    # views
    ("PA and lateral views of the chest were obtained.", None),
    ("Portable AP upright chest radiograph.", None),
    ("On the lateral view, there is blunting of the posterior costophrenic angle.",
     "There is blunting of the posterior costophrenic angle."),
    ("A small nodule is seen on the lateral view only.", "A small nodule is seen."),
    # blanks
    ("The findings were discussed with Dr. ___ by telephone at ___ on ___.", None),
    ("Calcified hilar lymph XXXX are present.", "Calcified hilar lymph nodes are present."),
    ("XXXX are normal.", None),
    ("There is no XXXX of pneumothorax.", None),
    ("Patchy XXXX opacity is present in the right base.", "Patchy opacity is present in the right base."),
    ("Mild tortuosity of the thoracic XXXX.", None),
    ("No acute abnormality on chest x-XXXX.", "No acute abnormality on chest x-ray."),
    ("Heart size is normal", "Heart size is normal."),
])
def test_sentence_rules(sentence, expected):
    assert clean_sentence(sentence) == expected


def test_sentences_merge_and_enumerations():
    assert split_sentences("1. Small effusion. 2. Dr. ___ was paged. Measuring 1.5 cm.") == [
        "Small effusion.", "Dr. ___ was paged.", "Measuring 1.5 cm."]
    # impression sentences already in the findings are not repeated; an identical combined section is used once
    assert rules_summary("Lungs are clear. No effusion is seen.", "Lungs are clear. No acute process.") == (
        "Lungs are clear. No effusion is seen. No acute process.")
    assert rules_summary("Lungs are clear.", "Lungs are clear.") == "Lungs are clear."
    out = list(RulesCleaner().clean([Report("r1", "Unchanged cardiomegaly.", "No change since ___.")]))
    assert (out[0].ok, out[0].reason) == (False, "empty after cleaning")


def test_embedded_iu_reports_filters_and_rules_cleaner():
    """The real 3,955 IU reports: the paper's filters keep 3,398; no summary keeps a blank. No text is printed."""
    reports = read_reports()
    filt = apply_rule_filters(reports)
    assert len(reports) == 3955 and len(filt.kept) == 3398
    assert filt.dropped == {"no_findings": 530, "no_impression": 6, "findings_too_short": 13,
                            "impression_too_short": 8}
    with_blank = sum(has_blank(f"{r.findings} {r.impression}") for r in filt.kept)
    assert with_blank == 1606  # reports that had XXXX before cleaning
    outcomes = list(RulesCleaner().clean(filt.kept))
    assert len(outcomes) == 3398 and all(o.ok for o in outcomes)
    assert not [o.report_id for o in outcomes if "XXXX" in o.summary or has_blank(o.summary)]
    assert not [o.report_id for o in outcomes if re.search(r"\b(PA and lateral|again seen|unchanged)\b",
                                                           o.summary, re.IGNORECASE)]


def test_prompt_template_loads_versions_and_fills():
    p = PromptTemplate.load("xraygpt/prompts/clean_report_v1.txt")
    assert p.version.startswith("clean_report_v1:") and len(p.sha256) == 64
    msgs = p.messages("Lungs {clear} ___.", "No acute process.")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Findings: Lungs {clear} ___." in msgs[1]["content"]  # braces in report text are safe
    assert "Impression: No acute process." in msgs[1]["content"]
    assert "{findings}" not in msgs[1]["content"]


def test_prompt_template_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("### user\nSummarise {findings}\n")
    with pytest.raises(ValueError, match=r"bad\.txt: a cleaning prompt needs .*\{impression\}"):
        PromptTemplate.load(bad)
    with pytest.raises(FileNotFoundError, match="prompt file nope.txt not found"):
        PromptTemplate.load("nope.txt")


def test_postprocess():
    assert postprocess('Summary: "Lungs are clear.\n No effusion."') == "Lungs are clear. No effusion."
    assert postprocess("  **Summary**: Heart normal. ") == "Heart normal."
