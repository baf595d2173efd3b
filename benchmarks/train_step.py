"""Training-step speed on the embedded default, measured side by side in one process.

    python benchmarks/train_step.py [--steps 6] [--out benchmarks/results/train_step.json]

1. recipe step (Trainer.train_step on cached features) vs a bare HF forward + backward of the same frozen LLM on
   the same batches (inputs_embeds with grad, same sequence lengths): throughput ratio (target >= 0.95);
2. recipe step with live encoding (load PNG, transform, frozen encoder) vs cached features: step-time ratio;
3. peak RSS of the process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from xraygpt.config import load_config
from xraygpt.train.config import TrainConfig
from xraygpt.train.trainer import Trainer


def timed_steps(fn, batches) -> list[float]:
    out = []
    for b in batches:
        t0 = time.perf_counter()
        fn(b)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cfg", default="configs/demo/stage1.yaml")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = [f"run.max_steps={args.steps + 1}", "run.progress=false", "wandb.mode=disabled", "run.resume=never",
            *args.overrides]
    results: dict = {"torch_threads": torch.get_num_threads()}
    trainers = {}
    for cached in (True, False):
        out = Path(f"/tmp/xraygpt_bench_{cached}")
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(TrainConfig, args.cfg, base + [f"run.output_dir={out}", f"run.feature_cache={str(cached).lower()}"])
        trainers[cached] = Trainer(cfg)
    n = args.steps + 1
    for cached, tr in trainers.items():
        loader = iter(tr._loader(0, n))
        micro = [[next(loader)] for _ in range(n)]
        t_load = []
        times = timed_steps(tr.train_step, micro)[1:]  # first step warms up
        results[f"recipe_{'cached' if cached else 'live'}_step_s"] = statistics.median(times)
        if not cached:
            loader = iter(tr._loader(0, n))
            for _ in range(n):
                t0 = time.perf_counter()
                next(loader)
                t_load.append(time.perf_counter() - t0)
            # live: the data loading (PNG decode + transform) happens outside train_step; add it
            results["live_loading_s"] = statistics.median(t_load)
            results["recipe_live_total_s"] = results["recipe_live_step_s"] + results["live_loading_s"]
        if cached:
            model = tr._unwrapped()
            llm = model.llm

            def bare(batch):
                mb = batch[0]
                emb = model.merge_image_features(mb["input_ids"], model.project(mb["image_features"]).detach())
                emb = emb.detach().requires_grad_(True)
                out = llm(inputs_embeds=emb, attention_mask=mb["attention_mask"], labels=mb["labels"], use_cache=False)
                out.loss.backward()

            results["bare_hf_step_s"] = statistics.median(timed_steps(bare, micro)[1:])
    results["recipe_vs_bare_throughput_ratio"] = results["bare_hf_step_s"] / results["recipe_cached_step_s"]
    results["cached_vs_live_step_time_ratio"] = results["recipe_cached_step_s"] / results["recipe_live_total_s"]
    results["batch_size"] = trainers[True].cfg.run.batch_size
    results["samples_per_s_cached"] = results["batch_size"] / results["recipe_cached_step_s"]
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
