"""`make demo`: the whole pipeline on the embedded default, end to end, on a laptop-class CPU.

    python scripts/run_demo.py [--out outputs/demo] [--fresh]

1. build the embedded paired dataset (real IU reports + rendered radiographs)      scripts/build_embedded_data.py
2. convert the SmolLM2 GGUF into a plain HF folder once (own process: keeps its memory peak out of training)
3. stage 0: pretrain the small MedCLIP-style encoder                              configs/demo/stage0_encoder.yaml
4. stage 1: align the projection (SmolLM2-135M, frozen)                           configs/demo/stage1.yaml
5. stage 2: continue from stage 1                                                 configs/demo/stage2.yaml
6. evaluate on the test split against the shuffled-image control                  configs/demo/eval.yaml
Each step is skipped when its output already exists, so a rerun only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(title: str, done: Path, cmd: list[str], timings: dict[str, float]) -> None:
    print(f"\n=== {title}", flush=True)
    if done.exists():
        print(f"    already done ({done}); skipping", flush=True)
        timings[title] = 0.0
        return
    print("    $ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
    timings[title] = round(time.perf_counter() - t0, 1)
    print(f"    done in {timings[title]:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="where the demo's runs go (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    args = p.parse_args(argv)
    out = REPO / args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    o = f"run.output_dir={args.out}"
    enc = f"{args.out}/stage0/encoder.safetensors"
    step("1/6 embedded data", out / ".data_built", ["scripts/build_embedded_data.py"], timings)
    (out / ".data_built").parent.mkdir(parents=True, exist_ok=True)
    (out / ".data_built").touch()
    # Converting the GGUF once in its own process keeps its ~2 GB peak out of the training step's memory.
    step("2/6 LLM: SmolLM2 GGUF -> HF folder (once)", out / ".llm_ready", ["-m", "xraygpt.llm"], timings)
    (out / ".llm_ready").touch()
    step("3/6 stage 0 encoder", out / "stage0" / "encoder.safetensors",
         ["scripts/train_encoder.py", "--cfg", "configs/demo/stage0_encoder.yaml", f"{o}/stage0"], timings)
    step("4/6 stage 1", out / "stage1" / "final" / "xraygpt_config.json",
         ["scripts/train.py", "--cfg", "configs/demo/stage1.yaml", f"{o}/stage1", f"model.encoder.checkpoint={enc}"],
         timings)
    step("5/6 stage 2", out / "stage2" / "final" / "xraygpt_config.json",
         ["scripts/train.py", "--cfg", "configs/demo/stage2.yaml", f"{o}/stage2", f"model.encoder.checkpoint={enc}",
          f"run.init_from={args.out}/stage1"], timings)
    step("6/6 evaluation", out / "eval" / "table.json",
         ["scripts/eval_rouge.py", "--cfg", "configs/demo/eval.yaml", f"ckpt={args.out}/stage2",
          f"output_dir={args.out}/eval"], timings)

    print("\n=== Results (embedded test split; synthetic renderings of real IU reports, see README)")
    print((out / "eval" / "table.md").read_text())
    preds = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()[:3]]
    for rec in preds:
        print(f"--- {rec['image_id']}\n  reference : {rec['reference']}\n  generated : {rec['prediction']}")
    total = time.perf_counter() - t0
    # ru_maxrss of RUSAGE_CHILDREN: the largest peak RSS of any step (each runs in its own process), in KiB
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    (out / "demo_timings.json").write_text(json.dumps({"steps_s": timings, "total_s": round(total, 1),
                                                       "peak_rss_mib": round(peak_mib, 1)}, indent=2))
    print(f"\nDemo finished in {total / 60:.1f} min (per step: {timings}); peak RSS of a step {peak_mib:.0f} MiB.")
    print(f"Web demo on this model:  .venv/bin/python scripts/demo.py --ckpt {args.out}/stage2   (opens on 127.0.0.1)")


if __name__ == "__main__":
    main()
