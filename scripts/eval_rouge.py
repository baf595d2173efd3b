"""Benchmark tables for a trained model: batched generation on a split, then ROUGE / NLG / clinical F1 with CIs.

    python scripts/eval_rouge.py --cfg configs/eval.yaml ckpt=outputs/demo/stage2 data.ann_file=splits/test.json
    python scripts/eval_rouge.py --cfg configs/eval.yaml ckpt=xraygpt.pth control=true

Writes predictions.jsonl (resumable: rerun to finish a killed run) and table.md/json/csv in output_dir.
"""

from __future__ import annotations

from xraygpt.cli import run_main
from xraygpt.eval.generate import EvalConfig
from xraygpt.eval.run import evaluate


def _main(cfg: EvalConfig) -> dict:
    report = evaluate(cfg)
    print(report["table_markdown"])
    print("wrote", ", ".join(report["files"].values()))
    return report


def main(argv: list[str] | None = None) -> dict:
    return run_main(EvalConfig, _main, __doc__, argv)


if __name__ == "__main__":
    main()
