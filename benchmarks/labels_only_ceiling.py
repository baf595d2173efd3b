"""How much ROUGE-L can knowing a film's findings buy? A ceiling for the ablation's R-L target (issue 8).

    python benchmarks/labels_only_ceiling.py [--limit 200] [--max-tokens 64] [--data DATASET_ROOT] \\
        [--out benchmarks/results/labels_only_ceiling.json]

The writer knows only a key of the test film and answers with the medoid train summary of the films that share
that key: the one with the highest mean ROUGE-L against the others (a seeded sample of 100 candidates and peers in
larger groups). An unseen key backs off to the film's CheXpert set, then to the "No Finding" answer. Keys, from
coarse to fine: the CheXpert-14 label set (what the ablation's image token carries), the set with each finding's
side, the MeSH terms, the raw MeSH tags. One more writer builds its answer instead of picking it:
the "No Finding" answer with one plain sentence per abnormal MeSH tag put after its second sentence ("There is
calcified granuloma in the right upper lobe."), the shape of report that R-L rewards when a film has a finding;
and its twin built from the CheXpert-14 set alone ("There is cardiomegaly."), which tells the shape from the content.
Scored as the ablation scores a row: ROUGE-L F1 on the first `limit` test films, each film's own key vs the key of
the film the shuffled-image control gives it (the eval's derangement), answers cut at `max_tokens` tokens of
SmolLM2's tokenizer (the eval's max_new_tokens). The gap has a paired 95% bootstrap interval.

With `--row-eval DIR` (an eval folder with its shuffled-image control: the ablation's best row's control step,
e.g. outputs/ablation/embedded/rows/radllm/control, or any row's eval folder with control.rows=all) it also
splits that row's own R-L by the film's label (normal / abnormal) and sets it beside the "No Finding" answer
written for every film: where a row's report for an abnormal film scores below that one normal answer, the text the
row writes for findings costs R-L. Writes numbers only: the IU reports are CC BY-NC-ND.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from xraygpt.data.embedded import build_embedded_dataset
from xraygpt.data.mesh import MeshFinding, finding_phrase, parse_tag
from xraygpt.eval.generate import EvalConfig, derangement
from xraygpt.eval.predictions import read_predictions
from xraygpt.eval.rouge import rouge_per_sample
from xraygpt.llm_finetune.radiology_conversations import sentences

POOL = 100


def medoid(summaries: Sequence[str], cut: Callable[[str], str], key: str) -> str:
    """The summary (as written, i.e. cut) with the highest mean ROUGE-L F1 against the other summaries: its own
    copy is left out of its peers, other copies of the same text count (a common report is a typical one)."""
    pool = sorted(set(summaries))
    if len(pool) == 1:
        return pool[0]
    rng = random.Random(f"medoid:{key}")
    cands = pool if len(pool) <= POOL else rng.sample(pool, POOL)
    peers = list(summaries) if len(summaries) <= POOL else rng.sample(list(summaries), POOL)

    def score(c: str) -> float:
        others = list(peers)
        if c in others:
            others.remove(c)
        others = others or [c]
        return float(rouge_per_sample(others, [cut(c)] * len(others))["rougeL"].mean())

    return max(cands, key=score)


def tag_sentence(f: MeshFinding) -> str | None:
    """One plain sentence naming an abnormal finding, e.g. "There is calcified granuloma in the right upper lobe."
    None for a normal or unindexed tag."""
    phrase = finding_phrase(f)
    return f"There is {phrase}." if phrase else None


def with_sentences(normal: str, found: Sequence[str]) -> str:
    """The normal answer with `found` sentences after its second sentence (unchanged without any)."""
    head = sentences(normal)
    return " ".join([*head[:2], *found, *head[2:]])


def with_findings(normal: str, tags: Sequence[str]) -> str:
    """The normal answer with a sentence per abnormal tag after its second sentence (unchanged without any)."""
    return with_sentences(normal, [s for s in map(tag_sentence, map(parse_tag, tags)) if s])


def row_split(eval_dir: Path, images: dict, normal: str | None = None) -> dict:
    """A row's R-L on normal and abnormal films, matched and shuffled (and their gap), beside the normal answer
    for every film when `normal` is given."""
    if not (eval_dir / "control" / "predictions.jsonl").is_file():
        raise FileNotFoundError(f"{eval_dir}: no control/predictions.jsonl; give an eval folder run with control=true "
                                "(in an ablation: rows/<best row>/control, or rows/<row>/eval with control.rows=all)")
    own = read_predictions(eval_dir / "predictions.jsonl")
    ctrl = read_predictions(eval_dir / "control" / "predictions.jsonl")
    if own.ids != ctrl.ids:
        raise ValueError(f"{eval_dir}: predictions and control/predictions list different films")
    refs = own.references
    matched = rouge_per_sample(refs, own.predictions)["rougeL"]
    shuffled = rouge_per_sample(refs, ctrl.predictions)["rougeL"]
    template = rouge_per_sample(refs, [normal] * len(refs))["rougeL"] if normal is not None else None
    kind = np.array(["unlabelled" if not images[i]["labelled"] else "normal" if images[i]["labels"][0] else "abnormal"
                     for i in own.ids])
    out = {}
    for k in ("normal", "abnormal", "unlabelled", "all"):
        m = kind == k if k != "all" else np.ones(len(kind), bool)
        if m.any():
            out[k] = {"films": int(m.sum()), "rougeL_matched": round(float(matched[m].mean()), 4),
                      "rougeL_shuffled": round(float(shuffled[m].mean()), 4),
                      "rougeL_gap": round(float(matched[m].mean() - shuffled[m].mean()), 4)}
            if template is not None:
                out[k]["rougeL_normal_answer"] = round(float(template[m].mean()), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="first N test films (the ablation uses 200)")
    parser.add_argument("--max-tokens", type=int, default=64, help="cut answers here (the eval's max_new_tokens)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--row-eval", default=None,
                        help="an eval folder with control/ (e.g. an ablation's rows/<best>/control) to split by "
                             "normal/abnormal")
    parser.add_argument("--data", default=None, help="an embedded-format dataset root, e.g. a --captions rules build "
                                                      "(default: the embedded build)")
    parser.add_argument("--out", default="benchmarks/results/labels_only_ceiling.json")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from xraygpt.llm import resolve_llm_path

    start = time.time()
    tok = AutoTokenizer.from_pretrained(resolve_llm_path("embedded:smollm2")[0])

    def cut(text: str) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][: args.max_tokens])

    root = Path(args.data) if args.data else Path(build_embedded_dataset().root)
    labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))
    classes, images = labels["classes"], labels["images"]

    def split(name: str) -> list[dict]:
        return json.loads((root / "splits" / f"{name}.json").read_text(encoding="utf-8"))["annotations"]

    train = [a for a in split("train") if images[a["image_id"]]["labelled"]]
    test = split("test")[: args.limit]

    def chexpert(i: str) -> tuple:
        return tuple(c for c, v in zip(classes, images[i]["labels"]) if v)

    def with_side(i: str) -> tuple:
        return tuple(sorted({(c, f.laterality or "") for f in map(parse_tag, images[i]["tags"]) for c in f.chexpert}))

    def terms(i: str) -> tuple:
        return tuple(sorted({f.term for f in map(parse_tag, images[i]["tags"])}))

    def raw(i: str) -> tuple:
        return tuple(sorted(images[i]["tags"]))

    def writer(key_of: Callable[[str], tuple]) -> tuple[dict, int]:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for a in train:
            groups[key_of(a["image_id"])].append(a["caption"])
        return {k: cut(medoid(v, cut, repr(k))) for k, v in groups.items()}, len(groups)

    writers = {"chexpert14_set": chexpert, "chexpert14_set_with_side": with_side, "mesh_terms": terms,
               "mesh_tags": raw}
    fallback, n_fallback = writer(chexpert)
    normal = fallback[("No Finding",)]
    refs = [a["caption"] for a in test]
    ids = [a["image_id"] for a in test]
    perm = derangement(len(test), EvalConfig().seed)
    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(test), size=(args.resamples, len(test)))

    def score_row(name: str, own: list[str], n_groups: int | None) -> dict:
        matched = rouge_per_sample(refs, own)["rougeL"]
        shuffled = rouge_per_sample(refs, [own[j] for j in perm])["rougeL"]
        diff = matched - shuffled
        lo, hi = np.percentile(diff[boot].mean(1), [2.5, 97.5])
        print(f"{name:34s} {n_groups or '':>5} groups  R-L {matched.mean():.3f} vs {shuffled.mean():.3f}  "
              f"gap {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]", flush=True)
        return {"rougeL_matched": round(float(matched.mean()), 4), "rougeL_shuffled": round(float(shuffled.mean()), 4),
                "gap": round(float(diff.mean()), 4), "gap_ci95": [round(float(lo), 4), round(float(hi), 4)]}

    rows = {}
    for name, key_of in writers.items():
        answers, n_groups = (fallback, n_fallback) if key_of is chexpert else writer(key_of)
        own = [answers.get(key_of(i)) or fallback.get(chexpert(i)) or normal for i in ids]
        rows[name] = {"groups": n_groups, "test_keys_seen": sum(key_of(i) in answers for i in ids),
                      **score_row(name, own, n_groups)}
    built = [cut(with_findings(normal, images[i]["tags"])) for i in ids]
    rows["normal_answer_with_tag_sentences"] = score_row("normal_answer_with_tag_sentences", built, None)
    # the same shape from the label set alone: is it the shape that R-L rewards, or what the sentences say?
    built14 = [cut(with_sentences(normal, [f"There is {c.lower()}." for c in chexpert(i) if c != "No Finding"]))
               for i in ids]
    rows["normal_answer_with_chexpert_sentences"] = score_row("normal_answer_with_chexpert_sentences", built14, None)
    normal_everywhere = rouge_per_sample(refs, [normal] * len(refs))["rougeL"]
    result = {"benchmark": "labels_only_ceiling", "data": str(root), "test_films": len(test),
              "max_tokens": args.max_tokens, "train_summaries": len(train), "rows": rows,
              "normal_answer_for_every_film_rougeL": round(float(normal_everywhere.mean()), 4),
              "seconds": round(time.time() - start, 1),
              "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}
    if args.row_eval:
        result["row_split"] = {"eval_dir": args.row_eval, **row_split(Path(args.row_eval), images, normal)}
        for k, v in result["row_split"].items():
            if isinstance(v, dict):
                print(f"row, {k:10s} {v['films']:4d} films  R-L {v['rougeL_matched']:.3f} vs {v['rougeL_shuffled']:.3f}"
                      f"  (the normal answer: {v['rougeL_normal_answer']:.3f})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
