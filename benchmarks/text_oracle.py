"""Does a fine-tuned LLM write what its slot says? The text oracle for the ablation's radiology LLM (issue 8).

    python benchmarks/text_oracle.py --llm outputs/ablation/embedded/llm/radiology/final [DIR ...] \\
        [--data DATASET_ROOT] [--limit 96] [--guidance 1] [--out benchmarks/results/text_oracle.json]

The LLM alone, no image: each validation film's CheXpert findings are put into the slot as words, exactly as the
write-up conversations it was fine-tuned on put them (`<Img>cardiomegaly and edema</Img> Describe ...`), and it
writes greedily (64 new tokens, repetition penalty 1.1, float32: the eval's settings). The same LLM is given
another film's findings (the eval's derangement) as the control. An LLM that reads its slot scores a higher
CheXpert-14 micro-F1 (rules labeler) with the film's own findings; one that writes the same normal report
whatever the slot says scores the same twice. The vision rows can only steer an LLM through that slot, so this
is the first thing to check about a radiology fine-tune. `--guidance s` decodes each token from
l(empty slot) + s (l(slot) - l(empty slot)), the text twin of the eval's `generation.image_guidance`. Films: the
first `limit` labelled validation films with findings. Writes numbers only (the IU reports are CC BY-NC-ND).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from xraygpt.conversation import get_template
from xraygpt.eval.chexpert_labeler import label_reports
from xraygpt.eval.generate import derangement
from xraygpt.eval.rouge import rouge_per_sample
from xraygpt.llm_finetune.radiology_conversations import SLOTS, ReportRecord, findings_phrase, load_records

INSTRUCTION = "Describe the given chest x-ray image in detail."


def slot_prompt(findings: str, template: str = "xraygpt") -> str:
    """The single-turn prompt with `findings` as the slot's text, as the write-up conversations encode it (not
    `template.prompt`, which would put an image slot in front of an instruction that has none)."""
    t = get_template(template)
    return f"{t.system}{t.user_turn(f'<Img>{findings}</Img> {INSTRUCTION}')}{t.assistant_prefix()}"


def micro_f1(references: Sequence[str], predictions: Sequence[str]) -> float:
    """CheXpert-14 micro-F1 of the predictions' positive labels against the references' (uncertain = negative)."""
    y, p = label_reports(list(references)) == 1, label_reports(list(predictions)) == 1
    denom = int(y.sum() + p.sum())
    return 2 * int((y & p).sum()) / denom if denom else 0.0


@torch.no_grad()
def write(llm_dir: str | Path, slots: Sequence[str], batch_size: int = 16, max_new_tokens: int = 64,
          guidance: float = 1.0) -> list[str]:
    """Greedy answers of the LLM in `llm_dir` to one prompt per slot text, cut at the template's end marker. With
    `guidance` != 1 each step decodes l(empty slot) + s * (l(slot) - l(empty slot)), as the eval's image guidance
    does with a null image."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from xraygpt.model import ImageGuidance

    tok = AutoTokenizer.from_pretrained(llm_dir)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(llm_dir, torch_dtype=torch.float32).eval()
    end = get_template("xraygpt").end_sym
    out: list[str] = []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []  # as the fine-tune's sequences start
    processors = LogitsProcessorList([] if guidance == 1.0 else [ImageGuidance(guidance)])
    for i in range(0, len(slots), batch_size):
        chunk = list(slots[i:i + batch_size])
        n_real = len(chunk)
        chunk += [""] * (n_real if guidance != 1.0 else 0)  # the null rows: the same prompt, an empty slot
        prompts = [bos + tok(slot_prompt(s), add_special_tokens=False).input_ids for s in chunk]
        n = max(map(len, prompts))  # left padding: every answer starts at column n
        input_ids = torch.tensor([[tok.pad_token_id] * (n - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
        ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=1.1, pad_token_id=tok.pad_token_id,
                             logits_processor=processors)[:n_real]  # fmt: skip
        out += [tok.decode(row[n:], skip_special_tokens=True).split(end)[0].strip() for row in ids]
    return out


def score(llm_dir: str | Path, records: Sequence[ReportRecord], guidance: float = 1.0, slot: str = "chexpert") -> dict:
    refs = [r.caption for r in records]
    own = write(llm_dir, [findings_phrase(r, slot) for r in records], guidance=guidance)
    perm = derangement(len(records), 0)
    other = write(llm_dir, [findings_phrase(records[j], slot) for j in perm], guidance=guidance)
    return {"llm": str(llm_dir), "films": len(records), "guidance": guidance, "slot": slot,
            "ce_micro_f1_14_own": round(micro_f1(refs, own), 4),
            "ce_micro_f1_14_other": round(micro_f1(refs, other), 4),
            "rougeL_own": round(float(rouge_per_sample(refs, own)["rougeL"].mean()), 4),
            "rougeL_other": round(float(rouge_per_sample(refs, other)["rougeL"].mean()), 4),
            "distinct_reports_own": len(set(own))}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", nargs="+", required=True, help="fine-tuned LLM folders (HF format)")
    parser.add_argument("--data", default=None, help="an embedded-format dataset root (default: the embedded build)")
    parser.add_argument("--limit", type=int, default=96, help="first N labelled validation films with findings")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="slot guidance against an empty slot (1 = off), as the eval's generation.image_guidance")
    parser.add_argument("--slot", default="chexpert", choices=SLOTS,
                        help="what the slot names, as the fine-tune's data.radiology.slot")
    parser.add_argument("--out", default="benchmarks/results/text_oracle.json")
    args = parser.parse_args(argv)
    start = time.time()
    if args.data is None:
        from xraygpt.data.embedded import build_embedded_dataset

        args.data = str(build_embedded_dataset().root)
    records = [r for r in load_records(args.data, "val") if r.labelled and r.positives][: args.limit]
    if not records:
        raise SystemExit(f"error: no labelled validation film in {args.data}/splits/val.json")
    rows = []
    for llm in args.llm:
        rows.append(score(llm, records, args.guidance, args.slot))
        r = rows[-1]
        print(f"{llm}: CheXpert-14 own {r['ce_micro_f1_14_own']:.3f} vs other {r['ce_micro_f1_14_other']:.3f}; "
              f"R-L {r['rougeL_own']:.3f} vs {r['rougeL_other']:.3f}; {r['distinct_reports_own']} distinct reports",
              flush=True)  # fmt: skip
    result = {"benchmark": "text_oracle", "data": args.data, "rows": rows, "seconds": round(time.time() - start, 1),
              "threads": torch.get_num_threads(),
              "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
