"""The paper's ablation table (XrayGPT Table 1) in one command: train and evaluate every row, then the table.

    python scripts/run_ablation.py --cfg configs/ablation/embedded.yaml [key=value ...]
    python scripts/run_ablation.py --cfg configs/ablation/embedded.yaml medical_data=/data/medical_conversations.json

Rows (see the YAML): Baseline (random encoder + base LLM), +MedCLIP (stage-0 encoder), +RadLLM (+ the LLM
fine-tuned on radiology conversations), +MedVicuna rows when medical conversations are given; the control is the
best row with shuffled images. Writes <output_dir>/ablation.md and ablation.json; a rerun reuses finished steps.
"""

from __future__ import annotations

from xraygpt.ablation import AblationConfig, run_ablation
from xraygpt.cli import run_main


def _main(cfg: AblationConfig) -> dict:
    report = run_ablation(cfg)
    print("\n" + report["markdown"])
    print("wrote", ", ".join(report["files"].values()))
    return report


def main(argv: list[str] | None = None) -> dict:
    return run_main(AblationConfig, _main, __doc__, argv)


if __name__ == "__main__":
    main()
