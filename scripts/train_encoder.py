"""Stage 0: pretrain the small open_clip encoder contrastively (MedCLIP semantic matching) and save it.

    python scripts/train_encoder.py --cfg configs/demo/stage0_encoder.yaml [key=value ...]

Writes <run.output_dir>/encoder.safetensors (later stages: model.encoder.checkpoint=<that file>) and
stage0_meta.json; with run.evaluate=true also stage0_eval.json (retrieval and probe AUROC vs random weights).
"""

from __future__ import annotations

import json

from xraygpt.cli import run_main
from xraygpt.encoders.pretrain import EVAL_NAME, EncoderPretrainConfig, evaluate_encoder, pretrain_encoder, write_eval


def run(cfg: EncoderPretrainConfig) -> dict:
    result = pretrain_encoder(cfg)
    print(f"stage 0 {'reused' if result.reused else 'trained'}: {result.checkpoint}")
    if not cfg.run.evaluate:
        return result.meta
    metrics = evaluate_encoder(cfg, result.checkpoint)
    path = write_eval(metrics, result.checkpoint.parent / EVAL_NAME)
    summary = {"retrieval": metrics["retrieval"], "probe_macro_auroc": metrics.get("probe_auroc", {}).get("macro")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    return run_main(EncoderPretrainConfig, run, __doc__, argv)


if __name__ == "__main__":
    main()
