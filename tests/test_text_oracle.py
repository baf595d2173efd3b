"""The text-oracle benchmark (benchmarks/text_oracle.py): its prompt is the write-ups' prompt, its F1 is the
labeler's micro-F1, and it runs end to end on a tiny real LLaMA over the embedded validation films."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from xraygpt.llm_finetune.radiology_conversations import ReportRecord, findings_phrase, load_records, write_up_for

sys.path.insert(0, str(REPO / "benchmarks"))
import text_oracle  # noqa: E402


def test_slot_prompt_is_the_templates_prompt_with_the_findings_in_the_slot():
    assert text_oracle.slot_prompt("cardiomegaly and edema") == (
        "###Patient: <Img>cardiomegaly and edema</Img> Describe the given chest x-ray image in detail. ###Doctor: ")


def test_findings_phrase_is_what_the_write_ups_put_in_the_slot():
    rec = ReportRecord("x", "The heart is enlarged.", ("Cardiomegaly", "Edema", "Support Devices"), True)
    assert findings_phrase(rec) == "cardiomegaly, edema and support devices"
    assert "<Img>cardiomegaly, edema and support devices</Img>" in write_up_for(rec, 0)["conversations"][0]["value"]
    assert findings_phrase(ReportRecord("y", "Clear.", ("No Finding",), True)) == "no abnormality"


def test_micro_f1_counts_the_labelers_positive_findings():
    refs = ["The heart is enlarged.", "No acute disease.", "There is a small right pleural effusion."]
    assert text_oracle.micro_f1(refs, refs) == 1.0
    assert text_oracle.micro_f1(refs, [refs[1], refs[2], refs[0]]) == 0.0
    assert text_oracle.micro_f1(refs, [refs[0], refs[0], refs[2]]) == pytest.approx(2 * 2 / (3 + 3))


@pytest.mark.slow
def test_runs_end_to_end_on_a_tiny_llm(tmp_path, tiny_llm_dir):
    from xraygpt.data.embedded import build_embedded_dataset

    root = build_embedded_dataset(tmp_path / "emb", limit=60, workers=1).root
    films = [r for r in load_records(root, "val") if r.labelled and r.positives]
    assert len(films) >= 2
    out = tmp_path / "oracle.json"
    result = text_oracle.main(["--llm", str(tiny_llm_dir), "--data", str(root), "--limit", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    (row,) = result["rows"]
    assert row["llm"] == str(tiny_llm_dir) and row["films"] == 2
    assert 1 <= row["distinct_reports_own"] <= 2
    for k in ("ce_micro_f1_14_own", "ce_micro_f1_14_other", "rougeL_own", "rougeL_other"):
        assert 0.0 <= row[k] <= 1.0
    with pytest.raises(SystemExit, match="no labelled validation film"):
        empty = tmp_path / "empty"
        (empty / "splits").mkdir(parents=True)
        (empty / "splits" / "val.json").write_text('{"annotations": []}')
        for name in ("labels.json", "manifest.json"):
            (empty / name).write_text(Path(root, name).read_text())
        text_oracle.main(["--llm", str(tiny_llm_dir), "--data", str(empty), "--out", str(out)])


def _first_token_logprobs(model, tok, slot: str) -> torch.Tensor:
    """log-softmax of the next-token scores after the slot prompt, repetition penalty 1.1 applied as HF does."""
    ids = [tok.bos_token_id] + tok(text_oracle.slot_prompt(slot), add_special_tokens=False).input_ids
    with torch.no_grad():
        scores = model(torch.tensor([ids])).logits[0, -1].float()
    seen = torch.tensor(sorted(set(ids)))
    s = scores[seen]
    scores[seen] = torch.where(s < 0, s * 1.1, s / 1.1)
    return torch.log_softmax(scores, -1)


def test_slot_guidance_decodes_null_plus_scale_times_the_slots_shift(tiny_llm_dir):
    """--guidance s: each answer's first token is argmax l(empty slot) + s (l(slot) - l(empty slot)), computed here
    by separate forward passes; the null rows never reach the answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()
    slots = ["cardiomegaly and edema", "no abnormality", "pneumothorax"]
    null = _first_token_logprobs(model, tok, "")
    expected = {}
    for scale in (1.0, 4.0):
        firsts = [int((null + scale * (_first_token_logprobs(model, tok, s) - null)).argmax()) for s in slots]
        expected[scale] = [tok.decode([t], skip_special_tokens=True).strip() for t in firsts]
        got = text_oracle.write(tiny_llm_dir, slots, batch_size=2, max_new_tokens=1, guidance=scale)
        assert got == expected[scale]
    assert expected[4.0] != expected[1.0]  # the scale changes the answer: the test can tell guidance from none
