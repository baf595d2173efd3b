"""Metric tables (ROUGE, BLEU, METEOR, CIDEr, clinical F1, bootstrap CIs) for one or more predictions files.

    python scripts/eval_tables.py preds.jsonl --out results/
    python scripts/eval_tables.py trained.jsonl shuffled.jsonl --names XrayGPT shuffled-image --out results/

Writes table.md, table.json and table.csv in --out. With two files or more, each is paired-tested against the
first. METEOR needs Java; without it pass --metrics rouge bleu cider clinical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xraygpt.eval.score import METRIC_GROUPS
from xraygpt.eval.tables import compare, to_markdown, write_tables


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", nargs="+", help="predictions JSONL file(s); the first is the paired-test baseline")
    p.add_argument("--names", nargs="+", help="one display name per file (default: file stems)")
    p.add_argument("--out", default="eval_results", help="output folder (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples; 0 = values only (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", nargs="+", default=["rouge", "nlg", "clinical"], choices=sorted(METRIC_GROUPS))
    p.add_argument("--tokenizer", default="python", choices=["python", "ptb"],
                   help="COCO tokenisation for BLEU/METEOR/CIDEr/ROUGE-L(COCO); ptb runs Java (default: %(default)s)")
    p.add_argument("--uncertain", default="negative", choices=["negative", "positive"],
                   help="how a CheXpert 'uncertain' label counts in clinical F1 (default: %(default)s)")
    p.add_argument("--labeler", default="rules", choices=["rules", "chexbert"])
    p.add_argument("--chexbert-weights", help="local CheXbert checkpoint (only with --labeler chexbert)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.names and len(args.names) != len(args.predictions):
        sys.exit(f"--names has {len(args.names)} names for {len(args.predictions)} files")
    report = compare(args.predictions, names=args.names, metrics=args.metrics, bootstrap=args.bootstrap,
                     seed=args.seed, tokenizer=args.tokenizer, uncertain=args.uncertain, labeler=args.labeler,
                     chexbert_weights=args.chexbert_weights)
    paths = write_tables(report, Path(args.out))
    print(to_markdown(report))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return report


if __name__ == "__main__":
    main()
