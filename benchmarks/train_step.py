"""Training-step speed on the embedded default, three variants measured side by side in one process.

    python benchmarks/train_step.py [--steps 16] [--out benchmarks/results/train_step.json] [key=value ...]

Variants, run on the same batches (same samples, prompts and sequence lengths) and interleaved step by step
in a rotating order, so warm-up, thermal and background drift hit all three alike:

- `recipe_cached`: one loop iteration of the recipe with the feature cache: fetch the batch from the
  DataLoader (memory-mapped features) + `Trainer.train_step` (forward, backward, clip, AdamW, scheduler);
- `recipe_live`: the same without the cache: fetch (decode the PNG, transform) + `train_step` (frozen encoder
  forward inside the model, then the same LLM work);
- `bare_hf`: a bare HF forward + backward of the same frozen LLM on the same merged `inputs_embeds`
  (requires_grad, as the projection's output does), no optimizer: the floor the recipe is compared with.

Reports the medians, `recipe_vs_bare_throughput_ratio` (bare / recipe_cached, target >= 0.95),
`cached_vs_live_step_time_ratio` (recipe_cached / recipe_live), the encoder's share of a live step, and the
process's peak RSS. Run it on a quiet machine: another torch process on the same cores distorts every figure.
Paper-sized encoder instead of the embedded one: add e.g. `model.encoder.type=medclip model.encoder.name=vit
model.encoder.checkpoint=null` (MedCLIP's Swin-T tower, seeded random weights; speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xraygpt.config import load_config
from xraygpt.train.config import TrainConfig
from xraygpt.train.trainer import Trainer


def build_trainer(cfg_path: str, overrides: list[str], steps: int, cached: bool, out: Path) -> Trainer:
    cfg = load_config(TrainConfig, cfg_path, [
        f"run.max_steps={steps}", "run.progress=false", "wandb.mode=disabled", "run.resume=never",
        "run.eval_every=0", "run.save_every=0", f"run.output_dir={out}", f"run.feature_cache={str(cached).lower()}",
        *overrides])
    return Trainer(cfg)


def bare_step_fn(trainer: Trainer):
    """HF forward + backward of the frozen LLM on the recipe's merged embeddings (merge done outside timing)."""
    model = trainer._unwrapped()

    def prepare(batch: dict) -> dict:
        with torch.no_grad():
            emb = model.merge_image_features(batch["input_ids"], model.project(batch["image_features"]))
        return {"inputs_embeds": emb, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    def step(inputs: dict) -> None:
        emb = inputs["inputs_embeds"].detach().requires_grad_(True)  # (B, T, H): grad flows as into llama_proj
        out = model.llm(inputs_embeds=emb, attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                        use_cache=False)
        out.loss.backward()

    return prepare, step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cfg", default="configs/demo/stage1.yaml")
    p.add_argument("--steps", type=int, default=16, help="timed steps per variant (after 2 warm-up rounds)")
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    warmup = 2
    n = args.steps + warmup
    work = Path(tempfile.mkdtemp(prefix="xraygpt_bench_"))
    try:
        cached = build_trainer(args.cfg, args.overrides, n, True, work / "cached")
        live = build_trainer(args.cfg, args.overrides, n, False, work / "live")
        cached_iter, live_iter = iter(cached._loader(0, n)), iter(live._loader(0, n))
        prepare, bare = bare_step_fn(cached)
        load_s: list[float] = []  # live batch fetch (PNG decode + transform)
        encode_s: list[float] = []  # live encoder forward, timed apart after the loop

        def run_cached():
            cached.train_step([next(cached_iter)])

        def run_live():
            t0 = time.perf_counter()
            batch = next(live_iter)
            load_s.append(time.perf_counter() - t0)
            live.train_step([batch])

        bare_batches = iter([prepare(b) for b in cached._loader(0, n)])

        def run_bare():
            bare(next(bare_batches))

        variants = {"recipe_cached": run_cached, "recipe_live": run_live, "bare_hf": run_bare}
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for step in range(n):
            order = names[step % 3:] + names[:step % 3]  # rotate who goes first
            for name in order:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
        live_model = live._unwrapped()
        with torch.no_grad():  # the frozen encoder's share of a live step, timed on the same films afterwards
            for batch in live._loader(0, n):
                t0 = time.perf_counter()
                live_model.get_image_features(batch["pixel_values"])
                encode_s.append(time.perf_counter() - t0)
        med = {k: statistics.median(v[warmup:]) for k, v in times.items()}
        cfg = cached.cfg
        results = {
            "what": "median seconds per step; the recipe variants include fetching their batch, bare_hf gets it ready",
            "config": args.cfg, "overrides": args.overrides,
            "encoder": cfg.model.encoder.to_dict(), "llm": cfg.model.llm.name_or_path,
            "llm_dtype": str(cached._unwrapped().llm.dtype), "batch_size": cfg.run.batch_size,
            "timed_steps": args.steps, "warmup_steps": warmup, "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            **{f"{k}_step_s": v for k, v in med.items()},
            "live_loading_s": statistics.median(load_s[warmup:]),
            "live_encoder_forward_s": statistics.median(encode_s[warmup:]),
            "recipe_vs_bare_throughput_ratio": med["bare_hf"] / med["recipe_cached"],
            "cached_vs_live_step_time_ratio": med["recipe_cached"] / med["recipe_live"],
            "samples_per_s_cached": cfg.run.batch_size / med["recipe_cached"],
            "samples_per_s_live": cfg.run.batch_size / med["recipe_live"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "all_step_s": times,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "all_step_s"}, indent=2))


if __name__ == "__main__":
    main()
