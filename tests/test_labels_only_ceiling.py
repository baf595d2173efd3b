"""The labels-only writer behind the R-L ceiling figure (benchmarks/labels_only_ceiling.py): its medoid is the
summary closest, by mean ROUGE-L, to the other summaries of its group."""

from __future__ import annotations

import sys

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
