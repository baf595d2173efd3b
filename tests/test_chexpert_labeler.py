"""The built-in CheXpert labeler against hand-written sentences with expected labels (tests/data/).

Every sentence is scored on all 14 classes: a class not listed in "labels" is expected blank. Accuracy is
reported per expected value (positive / negative / uncertain / blank) and overall; the bar is 95% each.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xraygpt.eval.chexpert_labeler import CLASSES, explain, label_report, label_reports

DATA = Path(__file__).parent / "data" / "labeler_sentences.jsonl"
VALUE_NAMES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", "blank": "blank"}


def _cases() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def _key(v: float):
    return "blank" if math.isnan(v) else float(v)


def test_labeler_sentence_set_accuracy():
    cases = _cases()
    assert len(cases) >= 80
    for c in cases:
        assert set(c["labels"]) <= set(CLASSES), c
    correct, total = Counter(), Counter()
    wrong = []
    exact = 0
    for c in cases:
        got = label_report(c["text"])
        ok_all = True
        for cls in CLASSES:
            want = float(c["labels"][cls]) if cls in c["labels"] else math.nan
            k = _key(want)
            total[k] += 1
            if _key(got[cls]) == k:
                correct[k] += 1
            else:
                ok_all = False
                wrong.append(f"{c['text']!r}: {cls} expected {VALUE_NAMES[k]}, got {VALUE_NAMES[_key(got[cls])]}")
        exact += ok_all
    per_value = {VALUE_NAMES[k]: correct[k] / total[k] for k in total}
    cells = sum(correct.values()) / sum(total.values())
    print(f"\nlabeler on {len(cases)} sentences: cell accuracy {cells:.4f}, sentences fully right {exact}/{len(cases)}")
    for name, acc in per_value.items():
        print(f"  {name:9s} {acc:.4f}  ({total[next(k for k in VALUE_NAMES if VALUE_NAMES[k] == name)]} cells)")
    for w in wrong:
        print("  wrong:", w)
    assert set(per_value) == {"positive", "negative", "uncertain", "blank"}
    for name, acc in per_value.items():
        assert acc >= 0.95, (name, acc, wrong)


@pytest.mark.parametrize("category", ["negation", "uncertainty", "laterality", "normal", "devices", "fracture"])
def test_every_category_is_covered(category):
    assert sum(c["category"] == category for c in _cases()) >= 5


def test_no_finding_rule():
    # Positive only when no pathology (Support Devices excepted) is positive or uncertain; never 0.
    assert label_report("Lungs are clear. Endotracheal tube in good position.")["No Finding"] == 1.0
    assert math.isnan(label_report("Possible left lower lobe pneumonia.")["No Finding"])
    assert math.isnan(label_report("Moderate thoracic scoliosis.")["No Finding"])  # another abnormality
    assert label_report("No pneumothorax.")["No Finding"] == 1.0
    # An empty report asserts nothing: every class blank, No Finding included.
    assert all(math.isnan(v) for v in label_report("").values())


def test_aggregation_priority_positive_over_uncertain_over_negative():
    text = "No right pleural effusion. Possible small left effusion. Small left effusion on the lateral view."
    assert label_report(text)["Pleural Effusion"] == 1.0
    assert label_report("No right pleural effusion. Possible small left effusion.")["Pleural Effusion"] == -1.0


def test_label_reports_matrix_and_explain():
    arr = label_reports(["No pneumothorax.", "Small right pneumothorax."])
    assert arr.shape == (2, 14)
    j = CLASSES.index("Pneumothorax")
    assert arr[0, j] == 0.0 and arr[1, j] == 1.0
    assert np.isnan(arr[0, CLASSES.index("Edema")])
    (m,) = explain("Pneumonia cannot be excluded.")
    assert m.classes == ("Pneumonia",) and m.label == -1.0 and "excluded" in m.reason
