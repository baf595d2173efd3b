"""Pairwise GPT judge: which of two runs' predictions is closer to the reference, sample by sample.

    python scripts/eval_gpt_judge.py --cfg configs/judge.yaml run1.predictions=a/predictions.jsonl \
        run2.predictions=b/predictions.jsonl dataset=iu_embedded
    python scripts/eval_gpt_judge.py --cfg configs/judge.yaml dry_run=true      # see the request and the cost

Writes judgments.jsonl (per sample, with the randomised A/B order), judge.md and judge.json (win / tie / loss of
run 1 against run 2 with bootstrap CIs, position bias) in output_dir. A killed run resumes where it stopped.
"""

from __future__ import annotations

from xraygpt.cli import run_main
from xraygpt.eval.judge import JudgeConfig, judge_runs


def _main(cfg: JudgeConfig) -> dict:
    report = judge_runs(cfg)
    if "markdown" in report:
        print(report["markdown"])
        print("wrote", ", ".join(report["files"].values()))
    return report


def main(argv: list[str] | None = None) -> dict:
    return run_main(JudgeConfig, _main, __doc__, argv)


if __name__ == "__main__":
    main()
