"""Fine-tune the LLM on text conversations (full or LoRA) before it is frozen inside XrayGPT.

    python scripts/finetune_llm.py --cfg configs/llm/radiology_embedded.yaml [key=value ...]
    python scripts/finetune_llm.py --cfg configs/llm/medical.yaml data.train_file=/data/medical_conversations.json
    accelerate launch --config_file configs/accelerate/ddp_4gpu.yaml scripts/finetune_llm.py \
        --cfg configs/llm/medical.yaml

Writes <run.output_dir>/final/ (a plain HF model folder: use it as model.llm.name_or_path in the vision stages,
or as run.init_from of the next fine-tune), checkpoints/, metrics.jsonl, config.yaml, data_report.json,
summary.json.
"""

from __future__ import annotations

from xraygpt.cli import run_main
from xraygpt.llm_finetune.config import FinetuneConfig
from xraygpt.llm_finetune.trainer import finetune


def main(argv: list[str] | None = None) -> dict:
    return run_main(FinetuneConfig, finetune, __doc__, argv)


if __name__ == "__main__":
    main()
