"""The labels-only writer behind the R-L ceiling figure (benchmarks/labels_only_ceiling.py): its medoid is the
summary closest, by mean ROUGE-L, to the other summaries of its group."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

from xraygpt.eval.rouge import rouge_per_sample

sys.path.insert(0, str(REPO / "benchmarks"))
import labels_only_ceiling as ceiling  # noqa: E402

SUMMARIES = ["No acute disease.", "The heart is normal. The lungs are clear. No effusion.",
             "The heart is normal. The lungs are clear.", "The lungs are clear. No pneumothorax.",
             "Large right effusion."]


def test_medoid_has_the_highest_mean_rouge_l_against_the_others(monkeypatch):
    mean_rl = [rouge_per_sample([o for o in SUMMARIES if o != s], [s] * 4)["rougeL"].mean() for s in SUMMARIES]
    best = max(range(len(SUMMARIES)), key=mean_rl.__getitem__)
    assert sorted(mean_rl)[-1] > sorted(mean_rl)[-2]  # a unique best, so the check pins it
    assert ceiling.medoid(SUMMARIES, lambda t: t, "k") == SUMMARIES[best]
    assert ceiling.medoid(SUMMARIES[:1], lambda t: t, "k") == SUMMARIES[0]
    assert SUMMARIES[best] != "Large right effusion."
    # judged as written (cut): when the cut leaves only that summary any words, it is the medoid
    assert ceiling.medoid(SUMMARIES, lambda t: t if t.startswith("Large") else "", "k") == "Large right effusion."
    # copies count: one summary written four times is the typical one, although alone it is the farthest
    assert min(mean_rl) == mean_rl[SUMMARIES.index("Large right effusion.")]
    assert ceiling.medoid(SUMMARIES + ["Large right effusion."] * 3, lambda t: t, "k") == "Large right effusion."
    monkeypatch.setattr(ceiling, "POOL", 3)  # sampled search: seeded by the key, so the same answer twice
    assert ceiling.medoid(SUMMARIES, lambda t: t, "k") == ceiling.medoid(list(reversed(SUMMARIES)), lambda t: t, "k")


def test_the_built_writer_puts_one_sentence_per_abnormal_tag_after_the_second_sentence():
    normal = "The heart is normal. The lungs are clear. No effusion."
    tags = ["Calcified Granuloma/lung/upper lobe/right", "normal", "Cardiomegaly/mild", "No Indexing"]
    assert ceiling.with_findings(normal, tags) == (
        "The heart is normal. The lungs are clear. There is calcified granuloma in the right upper lobe. "
        "There is cardiomegaly. No effusion.")
    assert ceiling.with_findings(normal, ["normal"]) == normal  # a normal film gets the normal answer as it is


def test_row_split_scores_a_row_by_the_films_label_beside_the_normal_answer(tmp_path):
    normal = "The heart is normal. The lungs are clear."
    films = [("a", "The heart is normal. The lungs are clear.", [1, 0], True),
             ("b", "Large right effusion.", [0, 1], True), ("c", "Rotated film.", [0, 0], False)]
    images = {i: {"labels": lab, "labelled": ok} for i, _, lab, ok in films}
    preds = {"a": normal, "b": "Large right effusion.", "c": normal}  # the row gets every film right
    (tmp_path / "control").mkdir()
    for path, pred_of in ((tmp_path, preds.get), (tmp_path / "control", {"a": "Large right effusion."}.get)):
        path.joinpath("predictions.jsonl").write_text("".join(
            json.dumps({"image_id": i, "reference": ref, "prediction": pred_of(i) or normal}) + "\n"
            for i, ref, _, _ in films))
    split = ceiling.row_split(tmp_path, images, normal)
    assert split["normal"] == {"films": 1, "rougeL_matched": 1.0, "rougeL_shuffled": 0.0, "rougeL_gap": 1.0,
                               "rougeL_normal_answer": 1.0}
    assert ceiling.row_split(tmp_path, images)["normal"] == {"films": 1, "rougeL_matched": 1.0,
                                                             "rougeL_shuffled": 0.0, "rougeL_gap": 1.0}
    assert split["abnormal"]["films"] == 1 and split["abnormal"]["rougeL_matched"] == 1.0
    assert split["abnormal"]["rougeL_shuffled"] == split["abnormal"]["rougeL_normal_answer"] == 0.0
    assert split["unlabelled"]["films"] == 1 and split["all"]["films"] == 3
    (tmp_path / "control" / "predictions.jsonl").write_text(  # a control over another list of films
        json.dumps({"image_id": "a", "reference": films[0][1], "prediction": normal}) + "\n")
    with pytest.raises(ValueError, match="predictions and control/predictions list different films"):
        ceiling.row_split(tmp_path, images, normal)
