"""Evaluation metrics: exact values on fixed strings, bootstrap recomputation against the reference scorers,
determinism, the paired test, predictions validation and resume, tables and the CLI.

Hand-computed values are derived in comments. Java-dependent checks (METEOR, PTB tokenizer) share one METEOR
process and are skipped where no `java` is installed.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

from xraygpt.eval import bootstrap as bs
from xraygpt.eval.chexpert_labeler import CLASSES
from xraygpt.eval.clinical import (
    FIVE_CLASSES,
    CheXbertWeightsMissing,
    ClinicalCounts,
    clinical_from_counts,
    label_texts,
)
from xraygpt.eval.nlg import (
    CiderStats,
    JavaNotFoundError,
    Meteor,
    bleu_from_stats,
    bleu_stats,
    find_java,
    meteor_from_stats,
    ptb_tokenize,
    python_tokenize,
)
from xraygpt.eval.predictions import (
    PredictionsError,
    append_prediction,
    append_predictions,
    done_ids,
    read_predictions,
)
from xraygpt.eval.rouge import coco_rouge_l_per_sample, rouge_per_sample
from xraygpt.eval.score import prepare, score_predictions, score_prepared
from xraygpt.eval.tables import compare, to_markdown, write_tables

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="METEOR / PTB need Java (apt-get install default-jre-headless)")

# Short hand-written reports (not from any dataset).
REFS = [
    "The heart is normal in size. No pleural effusion or pneumothorax.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Moderate cardiomegaly. Mild pulmonary edema.",
    "Lungs are clear. No acute cardiopulmonary process.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Endotracheal tube 4 cm above the carina. No pneumothorax.",
    "Heart size is enlarged. Bilateral pleural effusions.",
    "No focal consolidation. Healed right rib fractures.",
]
PREDS = [
    "Heart size is normal. No pleural effusion or pneumothorax.",
    "Small left pleural effusion.",
    "The heart is enlarged. Pulmonary edema.",
    "The lungs are clear.",
    "Right lower lobe pneumonia.",
    "",
    "Cardiomegaly with small bilateral effusions.",
    "No acute fracture.",
]


def _write(path, refs, preds, ids=None):
    ids = ids or [f"s{i}" for i in range(len(refs))]
    append_predictions(path, [{"image_id": i, "reference": r, "prediction": p} for i, r, p in zip(ids, refs, preds)])
    return path


@pytest.fixture(scope="module")
def meteor():
    if not HAS_JAVA:
        pytest.skip("no java")
    m = Meteor()
    yield m
    m.close()


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_on_fixed_strings():
    # ref tokens: the heart is normal in size (6); pred: heart size is normal (4).
    # 4 shared -> P 1, R 4/6 -> F 0.8.  R-2: only "is normal" shared, P 1/3, R 1/5 -> F 0.25.
    # R-L: LCS "heart is normal" = 3 -> P 3/4, R 1/2 -> F 0.6.
    r = rouge_per_sample(["The heart is normal in size."], ["Heart size is normal."])
    assert r["rouge1"][0] == pytest.approx(0.8, abs=1e-12)
    assert r["rouge2"][0] == pytest.approx(0.25, abs=1e-12)
    assert r["rougeL"][0] == pytest.approx(0.6, abs=1e-12)
    # COCO ROUGE-L, beta 1.2: (1 + 1.44) * 0.75 * 0.5 / (0.5 + 1.44 * 0.75) = 0.915 / 1.58
    coco = coco_rouge_l_per_sample([python_tokenize("The heart is normal in size.")],
                                   [python_tokenize("Heart size is normal.")])
    assert coco[0] == pytest.approx(0.915 / 1.58, abs=1e-12)
    # Stemming as the paper: "effusions" and "effusion" match; an empty prediction scores 0.
    r = rouge_per_sample(["bilateral effusions", "no effusion"], ["bilateral effusion", ""])
    assert r["rouge1"].tolist() == [1.0, 0.0]


def test_rouge_matches_rouge_score_default_tokenizer():
    from rouge_score import rouge_scorer

    ours = rouge_per_sample(REFS, PREDS)
    ref = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for i, (r, p) in enumerate(zip(REFS, PREDS)):
        s = ref.score(r, p)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert ours[k][i] == s[k].fmeasure


# ----------------------------------------------------------------------------- tokenizer, BLEU, CIDEr


def test_python_tokenizer_follows_coco_rules():
    text = "Heart size is normal (upper limits). No pneumothorax; can't exclude CT. 1.5 cm nodule, patient's x-ray."
    assert python_tokenize(text) == (
        "heart size is normal -lrb- upper limits -rrb- no pneumothorax ca n't exclude ct. "
        "1.5 cm nodule patient 's x-ray"
    )


@needs_java
def test_python_tokenizer_equals_ptb_on_report_text():
    texts = REFS + PREDS + ["Status post CABG; sternotomy wires are intact (unchanged).",
                            "Cannot exclude a T12 fracture.", "Right-sided PICC line, tip at the cavoatrial junction!",
                            "XXXX-year-old: 2.5 x 3 cm mass?"]
    assert [python_tokenize(t) for t in texts] == ptb_tokenize(texts)


def test_bleu_on_fixed_strings():
    from pycocoevalcap.bleu.bleu import Bleu

    refs = ["no pleural effusion or pneumothorax", "heart size is normal"]
    hyps = ["no pleural effusion", "heart size is normal"]
    # Totals: hypothesis 3 + 4 = 7 words, reference 5 + 4 = 9; every hypothesis n-gram matches (1-4 grams:
    # 7/7, 5/5, 3/3, 1/1), so BLEU-n = brevity penalty = exp(1 - 9/7) for every n.
    ours = bleu_from_stats(bleu_stats(refs, hyps).sum(axis=0))[0]
    assert ours == pytest.approx([math.exp(-2 / 7)] * 4, abs=1e-9)
    coco, _ = Bleu(4).compute_score({k: [r] for k, r in enumerate(refs)}, {k: [h] for k, h in enumerate(hyps)},
                                    verbose=0)
    assert ours == pytest.approx(coco, abs=1e-12)
    # One sentence with no 4-gram: pycocoevalcap's smoothing gives (1e-15 / 1e-9) ** (1/4) = 10 ** -1.5 times BP.
    b = bleu_from_stats(bleu_stats(refs[:1], hyps[:1]))[0]
    assert b[3] == pytest.approx(10**-1.5 * math.exp(1 - 5 / 3), rel=1e-6)


def test_cider_on_a_tiny_corpus():
    from pycocoevalcap.cider.cider import Cider

    # Two exact copies with no shared n-gram: idf = log 2 everywhere, cosine 1 for 1- and 2-grams, 0 for the
    # missing 3- and 4-grams -> mean 0.5, times 10 = 5 per sample.
    c = CiderStats(["left effusion", "heart normal"], ["left effusion", "heart normal"])
    assert c.corpus(np.ones((1, 2)))[0] == pytest.approx(5.0, abs=1e-12)
    refs = [python_tokenize(r) for r in REFS]
    hyps = [python_tokenize(p) for p in PREDS]
    stats = CiderStats(refs, hyps)
    coco, coco_per = Cider().compute_score({k: [r] for k, r in enumerate(refs)}, {k: [h] for k, h in enumerate(hyps)})
    assert stats.corpus(np.ones((1, len(refs))))[0] == pytest.approx(coco, abs=1e-12)
    assert stats.per_sample(np.ones((1, len(refs))))[0] == pytest.approx(coco_per, abs=1e-12)


def test_cider_and_bleu_resamples_equal_rescoring_the_resampled_corpus():
    """A bootstrap resample scored from statistics == pycocoevalcap on the corpus with duplicated samples."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = [python_tokenize(r) for r in REFS]
    hyps = [python_tokenize(p) for p in PREDS]
    w = bs.resample_weights(len(refs), 3, seed=1)
    cider = CiderStats(refs, hyps).corpus(w)
    bleu = bleu_from_stats(w @ bleu_stats(refs, hyps))
    for b in range(3):
        idx = [i for i in range(len(refs)) for _ in range(int(w[b, i]))]
        gts = {k: [refs[i]] for k, i in enumerate(idx)}
        res = {k: [hyps[i]] for k, i in enumerate(idx)}
        assert cider[b] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
        assert bleu[b] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0], abs=1e-12)


# ----------------------------------------------------------------------------- METEOR


@needs_java
def test_meteor_statistics_reproduce_the_jar(meteor):
    refs = [python_tokenize(r) for r in REFS]
    hyps = [python_tokenize(p) for p in PREDS]
    stats = meteor.stats(refs, hyps)
    corpus = meteor.check(stats)  # raises if our formula disagrees with the jar's corpus score
    assert 0 < corpus < 1
    assert meteor.check(stats[[0, 0, 3]]) == pytest.approx(meteor_from_stats(stats[[0, 0, 3]].sum(0))[0], abs=1e-12)
    # Identical texts score 1 (no fragmentation penalty); the empty prediction scores 0.
    same = meteor.stats(refs[:1], refs[:1])
    assert meteor_from_stats(same)[0] == pytest.approx(1.0)
    assert meteor_from_stats(stats[5:6])[0] == 0.0


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(JavaNotFoundError, match="default-jre-headless"):
        find_java()


# ----------------------------------------------------------------------------- bootstrap


def test_resample_weights_are_seeded_counts():
    w = bs.resample_weights(50, 200, seed=3)
    assert w.shape == (200, 50) and (w.sum(axis=1) == 50).all()
    assert np.array_equal(w, bs.resample_weights(50, 200, seed=3))
    assert not np.array_equal(w, bs.resample_weights(50, 200, seed=4))


def test_bootstrap_is_deterministic_and_brackets_the_value():
    x = np.random.default_rng(0).random(300)
    fn = bs.mean_metric("m", x)
    a = bs.bootstrap([fn], 300, n_resamples=500, seed=7)["m"]
    b = bs.bootstrap([fn], 300, n_resamples=500, seed=7)["m"]
    c = bs.bootstrap([fn], 300, n_resamples=500, seed=8)["m"]
    assert a == b and a != c
    assert a["value"] == pytest.approx(x.mean())
    assert a["ci_low"] < a["value"] < a["ci_high"]
    # The 95% interval of a mean is close to +-1.96 standard errors.
    se = x.std() / math.sqrt(len(x))
    assert a["ci_high"] - a["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_test_sanity():
    rng = np.random.default_rng(0)
    x = rng.random(200)
    same = bs.paired_test([bs.mean_metric("m", x)], [bs.mean_metric("m", x)], 200, n_resamples=1000, seed=0)["m"]
    assert same["delta"] == 0 and same["p_value"] == 1.0
    better = bs.paired_test([bs.mean_metric("m", x + 0.1)], [bs.mean_metric("m", x)], 200, n_resamples=1000)["m"]
    assert better["delta"] == pytest.approx(0.1) and better["p_value"] == pytest.approx(1 / 1001)
    noisy = bs.paired_test([bs.mean_metric("m", x + rng.normal(0, 0.3, 200))], [bs.mean_metric("m", x)], 200)["m"]
    assert noisy["p_value"] > 0.05  # pure noise, no real difference


# ----------------------------------------------------------------------------- clinical


def test_clinical_f1_matches_sklearn():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    choices = np.array([1.0, 0.0, -1.0, np.nan])
    ref = rng.choice(choices, size=(60, 14), p=[0.2, 0.3, 0.1, 0.4])
    pred = rng.choice(choices, size=(60, 14), p=[0.2, 0.3, 0.1, 0.4])
    for policy in ("negative", "positive"):
        m = ClinicalCounts.from_labels(ref, pred, policy).metrics(np.ones((1, 60)))
        yr = (ref == 1) | ((ref == -1) if policy == "positive" else False)
        yp = (pred == 1) | ((pred == -1) if policy == "positive" else False)
        five = [CLASSES.index(c) for c in FIVE_CLASSES]
        for avg in ("micro", "macro"):
            for suffix, idx in (("14", slice(None)), ("5", five)):
                p, r, f, _ = precision_recall_fscore_support(yr[:, idx], yp[:, idx], average=avg, zero_division=0)
                assert m[f"ce_{avg}_precision_{suffix}"][0] == pytest.approx(p)
                assert m[f"ce_{avg}_recall_{suffix}"][0] == pytest.approx(r)
                assert m[f"ce_{avg}_f1_{suffix}"][0] == pytest.approx(f)


def test_clinical_zero_division_is_zero():
    z = np.zeros((1, 14))
    m = clinical_from_counts(z, z, z)
    assert m["ce_micro_f1_14"][0] == 0.0 and m["ce_f1[Edema]"][0] == 0.0


def test_chexbert_backend_needs_local_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("XRAYGPT_CHEXBERT_WEIGHTS", raising=False)
    with pytest.raises(CheXbertWeightsMissing, match="never downloaded"):
        label_texts(["No pneumothorax."], labeler="chexbert")
    with pytest.raises(CheXbertWeightsMissing, match="not found"):
        label_texts(["No pneumothorax."], labeler="chexbert", chexbert_weights=str(tmp_path / "nope.pth"))


def test_chexbert_backend_loads_a_checkpoint_in_the_original_format(tmp_path):
    """A tiny random BERT saved as CheXbert saves (DataParallel 'module.' keys): heads map to CheXpert codes."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from xraygpt.eval.clinical import CHEXBERT_CONDITIONS, CheXbertLabeler

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pneumothorax", "small", "left", "effusion", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    cfg.save_pretrained(tmp_path)
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    heads = [torch.nn.Linear(32, 4) for _ in range(13)] + [torch.nn.Linear(32, 2)]
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for j, h in enumerate(heads):
        state[f"module.linear_heads.{j}.weight"], state[f"module.linear_heads.{j}.bias"] = h.weight, h.bias
    torch.save({"model_state_dict": state}, tmp_path / "chexbert.pth")

    labeler = CheXbertLabeler(tmp_path / "chexbert.pth", bert_dir=tmp_path)
    texts = ["No pneumothorax.", "Small left effusion."]
    out = labeler(texts)
    enc = labeler.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = bert(**enc)[0][:, 0]
    codes = {0: np.nan, 1: 1.0, 2: 0.0, 3: -1.0}
    for j, cond in enumerate(CHEXBERT_CONDITIONS):
        want = [codes[int(k)] for k in heads[j](cls).argmax(-1)]
        np.testing.assert_array_equal(out[:, CLASSES.index(cond)], want)


# ----------------------------------------------------------------------------- predictions files


def test_predictions_validation_errors(tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"image_id": "a", "reference": "x", "prediction": "y"}\n'
                   '{"image_id": "b", "reference": "x", "prediction": "y"}\n'
                   '{"image_id": "a", "reference": "x", "prediction": "z"}\n')
    with pytest.raises(PredictionsError, match=r"dup\.jsonl: duplicate image_id 'a' on lines 1 and 3"):
        read_predictions(dup)
    noref = tmp_path / "noref.jsonl"
    noref.write_text('{"image_id": "a", "reference": "x", "prediction": "y"}\n{"image_id": "b", "prediction": "y"}\n')
    with pytest.raises(PredictionsError, match=r"noref\.jsonl:2: record is missing 'reference'"):
        read_predictions(noref)
    noid = tmp_path / "noid.jsonl"
    noid.write_text('{"reference": "x", "prediction": "y"}\n')
    with pytest.raises(PredictionsError, match=r"noid\.jsonl:1: record is missing 'image_id'"):
        read_predictions(noid)
    emptyref = tmp_path / "emptyref.jsonl"
    emptyref.write_text('{"image_id": 7, "reference": "  ", "prediction": "y"}\n')
    with pytest.raises(PredictionsError, match=r"emptyref\.jsonl:1: reference for image_id '7' is missing or empty"):
        read_predictions(emptyref)
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"image_id": "a", "reference": "x", "prediction": "y"}\n{"image_id": "b", "refer')
    with pytest.raises(PredictionsError, match=r"cut\.jsonl:2: not valid JSON.*truncated"):
        read_predictions(cut)


def test_empty_predictions_are_scored_and_counted(tmp_path):
    path = _write(tmp_path / "p.jsonl", REFS, PREDS)
    p = read_predictions(path)
    assert p.n_empty == 1 and p.empty_ids == ["s5"] and p.predictions[5] == ""
    r = score_predictions(path, metrics=("rouge", "bleu", "cider", "clinical"), bootstrap=50)
    assert r["n"] == 8 and r["n_empty_predictions"] == 1
    assert all(math.isfinite(m["value"]) for m in r["metrics"].values())


def test_resume_helpers_with_a_truncated_last_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    assert done_ids(path) == set()
    for i in range(3):
        append_prediction(path, {"image_id": f"id{i}", "reference": "r", "prediction": "p"})
    with path.open("ab") as f:  # a run killed in the middle of a write
        f.write(b'{"image_id": "id3", "refere')
    assert done_ids(path) == {"id0", "id1", "id2"}
    append_prediction(path, {"image_id": "id3", "reference": "r", "prediction": "p"})
    assert done_ids(path) == {"id0", "id1", "id2", "id3"}
    assert read_predictions(path).ids == ["id0", "id1", "id2", "id3"]
    # Damage in the middle is not an interruption: refuse to resume.
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(PredictionsError, match=r"preds\.jsonl:2: damaged line"):
        done_ids(path)


# ----------------------------------------------------------------------------- end to end, tables, CLI


@pytest.fixture(scope="module")
def iu_runs(tmp_path_factory):
    """40 real IU X-ray reports (read at run time, never stored): a perfect run and a shuffled one."""
    from xraygpt.data.reports import read_reports

    reports = [r.caption for r in read_reports() if r.findings and r.impression][:40]
    d = tmp_path_factory.mktemp("iu")
    ids = [f"r{i}" for i in range(40)]
    perfect = _write(d / "perfect.jsonl", reports, reports, ids)
    shuffled = _write(d / "shuffled.jsonl", reports, reports[1:] + reports[:1], ids)
    return perfect, shuffled


def test_perfect_predictions_score_one(iu_runs, meteor):
    run = prepare(read_predictions(iu_runs[0]), meteor=meteor)
    r = score_prepared(run, bootstrap=100)["metrics"]
    for k in ("rouge1", "rouge2", "rougeL", "rougeL_coco", "bleu1", "bleu4", "meteor", "ce_micro_f1_14"):
        assert r[k]["value"] == pytest.approx(1.0), k
        assert r[k]["ci_low"] == pytest.approx(1.0) and r[k]["ci_high"] == pytest.approx(1.0), k
    assert r["cider"]["value"] > 5


def test_compare_tables_and_paired_test(iu_runs, tmp_path):
    perfect, shuffled = iu_runs
    metrics = ("rouge", "bleu", "cider", "clinical")
    rep = compare([perfect, shuffled], names=["copy", "shuffled"], metrics=metrics, bootstrap=200)
    pair = rep["paired"][0]
    assert pair["baseline"] == "copy" and pair["run"] == "shuffled"
    assert pair["metrics"]["rouge1"]["delta"] < -0.3 and pair["metrics"]["rouge1"]["p_value"] == pytest.approx(1 / 201)
    md = to_markdown(rep)
    assert "| Method | R-1 | R-2 | R-L | R-L (COCO) | B-1 |" in md
    assert re.search(r"\| shuffled \| 0\.\d{3} \[0\.\d{3}, 0\.\d{3}\] \|", md)
    paths = write_tables(rep, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["runs"][1]["name"] == "shuffled"
    header, *rows = paths["csv"].read_text().splitlines()
    assert header.startswith("method,file,n,n_empty_predictions,rouge1,rouge1_ci_low,rouge1_ci_high") and len(rows) == 2
    # A run listing the same ids in another order is aligned, not rejected: the paired test is unchanged.
    p = read_predictions(shuffled)
    rev = _write(tmp_path / "rev.jsonl", p.references[::-1], p.predictions[::-1], p.ids[::-1])
    rep2 = compare([perfect, rev], metrics=metrics, bootstrap=200)
    for k, m in pair["metrics"].items():  # equal up to float summation order
        assert rep2["paired"][0]["metrics"][k] == pytest.approx(m, abs=1e-12), k
    # Different id sets cannot be paired.
    short = _write(tmp_path / "short.jsonl", p.references[:5], p.predictions[:5], p.ids[:5])
    with pytest.raises(PredictionsError, match="same ids"):
        compare([perfect, short], metrics=("rouge",), bootstrap=10)


def test_cli_writes_the_three_tables(iu_runs, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "eval_tables.py"
    spec = importlib.util.spec_from_file_location("eval_tables", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main([str(iu_runs[1]), "--out", str(tmp_path), "--bootstrap", "20", "--metrics", "rouge", "clinical"])
    assert {p.name for p in tmp_path.iterdir()} == {"table.md", "table.json", "table.csv"}
    assert "| shuffled |" in capsys.readouterr().out
