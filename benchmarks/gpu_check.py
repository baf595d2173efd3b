"""GPU check (run by hand on a CUDA/ROCm machine): the recipe in bf16 on a SmolLM2-shaped LLaMA, and batched generation.

    python benchmarks/gpu_check.py --tokenizer <folder with the SmolLM2 tokenizer> \\
        --out benchmarks/results/gpu_check.json

Uses a randomly initialised LLaMA of SmolLM2-135M's exact shape (hidden 576, 30 layers) so that the check needs no
weights; timings are those of the real architecture. Verifies: training runs with run.device=cuda and
mixed_precision=bf16, loss is finite and falls, the feature cache works on GPU, and batched greedy generation
equals one-by-one generation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xraygpt.config import load_config  # noqa: E402
from xraygpt.train.config import TrainConfig  # noqa: E402
from xraygpt.train.trainer import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = Path(tempfile.mkdtemp())
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "llm")
    tok.save_pretrained(tmp / "llm")
    root = tmp / "data"
    (root / "image").mkdir(parents=True)
    rng = np.random.default_rng(0)
    caps = ["The lungs are clear. No acute cardiopulmonary disease.", "Small right pleural effusion. No pneumothorax.",
            "The heart is enlarged. Mild pulmonary edema.", "Left lower lobe opacity, likely pneumonia."]
    anns = []
    for i in range(512):
        arr = (rng.random((256, 256)) * 80).astype(np.uint8)
        arr[:, : 40 * (i % 4 + 1)] += 120
        Image.fromarray(arr, "L").save(root / "image" / f"img{i}.png")
        anns.append({"image_id": f"img{i}", "caption": caps[i % 4]})
    (root / "train.json").write_text(json.dumps({"annotations": anns}))
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for cache in (False, True):
        overrides = [f"model.llm.name_or_path={tmp / 'llm'}", "model.llm.dtype=bfloat16", f"data.root={root}",
                     "data.ann_file=train.json", "data.embedded=false", f"run.output_dir={tmp / f'run{cache}'}",
                     "run.device=cuda", "run.mixed_precision=bf16", "run.batch_size=32", f"run.max_steps={args.steps}",
                     "optim.warmup_steps=5", "optim.init_lr=1e-3", "run.progress=false", "wandb.mode=disabled",
                     f"run.feature_cache={str(cache).lower()}", f"run.feature_cache_dir={tmp / 'features'}",
                     "data.num_workers=4"]
        t0 = time.perf_counter()
        summary = train(load_config(TrainConfig, None, overrides))
        losses = [json.loads(line)["loss"] for line in (tmp / f"run{cache}" / "metrics.jsonl").read_text().splitlines()]
        results[f"train_cache_{cache}"] = {"samples_per_s": summary["samples_per_s"],
                                           "wall_s": time.perf_counter() - t0,
                                           "first_loss": losses[0], "last_loss": losses[-1],
                                           "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    from xraygpt.model import GenerationConfig, XrayGPT

    model = XrayGPT.from_pretrained(tmp / "runTrue" / "final").cuda()
    model.llm.to(torch.bfloat16)
    px = torch.randn(16, 3, 224, 224, device="cuda")
    gen = GenerationConfig(max_new_tokens=32)
    t0 = time.perf_counter()
    batched = model.generate(px, generation=gen)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [model.generate(px[i:i + 1], generation=gen)[0] for i in range(16)]
    t_single = time.perf_counter() - t0
    results["generation"] = {"batch16_s": t_batch, "one_by_one_s": t_single, "speedup": t_single / t_batch,
                             "identical_text": batched == single,
                             "n_differ": sum(a != b for a, b in zip(batched, single))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
