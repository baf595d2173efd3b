"""How much ROUGE-L can knowing a film's findings buy? A ceiling for the ablation's R-L target (issue 8).

    python benchmarks/labels_only_ceiling.py [--limit 200] [--max-tokens 64] \\
        [--out benchmarks/results/labels_only_ceiling.json]

The writer knows only a key of the test film and answers with the medoid train summary of the films that share
that key: the one with the highest mean ROUGE-L against the others (a seeded sample of 100 candidates and peers in
larger groups). An unseen key backs off to the film's CheXpert set, then to the "No Finding" answer. Keys, from
coarse to fine: the CheXpert-14 label set (what the ablation's image token carries), the set with each finding's
side, the MeSH terms, the raw MeSH tags. Scored as the ablation scores a row: ROUGE-L F1 on the first `limit`
test films, each film's own key vs the key of the film the shuffled-image control gives it (the eval's
derangement), answers cut at `max_tokens` tokens of SmolLM2's tokenizer (the eval's max_new_tokens). The gap has a
paired 95% bootstrap interval. Writes numbers only: the IU reports are CC BY-NC-ND.
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
from xraygpt.data.mesh import parse_tag
from xraygpt.eval.generate import EvalConfig, derangement
from xraygpt.eval.rouge import rouge_per_sample

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="first N test films (the ablation uses 200)")
    parser.add_argument("--max-tokens", type=int, default=64, help="cut answers here (the eval's max_new_tokens)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/labels_only_ceiling.json")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from xraygpt.llm import resolve_llm_path

    start = time.time()
    tok = AutoTokenizer.from_pretrained(resolve_llm_path("embedded:smollm2")[0])

    def cut(text: str) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][: args.max_tokens])

    root = Path(build_embedded_dataset().root)
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
    rows = {}
    for name, key_of in writers.items():
        answers, n_groups = (fallback, n_fallback) if key_of is chexpert else writer(key_of)
        own = [answers.get(key_of(i)) or fallback.get(chexpert(i)) or normal for i in ids]
        matched = rouge_per_sample(refs, own)["rougeL"]
        shuffled = rouge_per_sample(refs, [own[j] for j in perm])["rougeL"]
        diff = matched - shuffled
        lo, hi = np.percentile(diff[boot].mean(1), [2.5, 97.5])
        rows[name] = {"groups": n_groups, "test_keys_seen": sum(key_of(i) in answers for i in ids),
                      "rougeL_matched": round(float(matched.mean()), 4),
                      "rougeL_shuffled": round(float(shuffled.mean()), 4),
                      "gap": round(float(diff.mean()), 4), "gap_ci95": [round(float(lo), 4), round(float(hi), 4)]}
        print(f"{name:26s} {n_groups:5d} groups  R-L {matched.mean():.3f} vs {shuffled.mean():.3f}  "
              f"gap {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]", flush=True)
    result = {"benchmark": "labels_only_ceiling", "test_films": len(test), "max_tokens": args.max_tokens,
              "train_summaries": len(train), "rows": rows, "seconds": round(time.time() - start, 1),
              "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
