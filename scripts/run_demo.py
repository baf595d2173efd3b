"""`make demo`: the whole pipeline on the embedded default, end to end, on a laptop-class CPU.

    python scripts/run_demo.py [--out outputs/demo] [--fresh]

1. build the embedded paired dataset (real IU reports + rendered radiographs)      scripts/build_embedded_data.py
2. convert the SmolLM2 GGUF into a plain HF folder once (own process: keeps its memory peak out of training)
3. stage 0: pretrain the small MedCLIP-style encoder                              configs/demo/stage0_encoder.yaml
4. stage 1: align the projection (SmolLM2-135M, frozen)                           configs/demo/stage1.yaml
5. stage 2: continue from stage 1                                                 configs/demo/stage2.yaml
6. evaluate on the test split against the shuffled-image control                  configs/demo/eval.yaml
Each step is skipped when its output already exists, so a rerun only does what is missing. Steps 3-6 share the
ablation's bookkeeping (xraygpt/ablation.py): each records its resolved config and the runs it was made from, and a
step whose config changed since it ran, or whose input step was made again, is redone with every step after it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without an install too

from xraygpt.ablation import Step, build_step, override_value, run_step  # noqa: E402

DEMO = REPO / "configs" / "demo"


def plan_demo(out: Path) -> list[tuple[str, Step]]:
    """Steps 3-6 (stage 0, stage 1, stage 2, evaluation) writing under `out`, each with the steps it is made from."""
    def at(key: str, path: Path) -> str:
        return f"{key}={override_value(path)}"

    enc = at("model.encoder.checkpoint", out / "stage0" / "encoder.safetensors")
    s0 = build_step("stage0", "stage0", "demo", str(DEMO / "stage0_encoder.yaml"),
                    [at("run.output_dir", out / "stage0")], out / "stage0")
    s1 = build_step("stage1", "train", "demo", str(DEMO / "stage1.yaml"),
                    [at("run.output_dir", out / "stage1"), enc], out / "stage1")
    s2 = build_step("stage2", "train", "demo", str(DEMO / "stage2.yaml"),
                    [at("run.output_dir", out / "stage2"), enc, at("run.init_from", out / "stage1")], out / "stage2")
    ev = build_step("eval", "eval", "demo", str(DEMO / "eval.yaml"),
                    [at("ckpt", out / "stage2"), at("output_dir", out / "eval")], out / "eval")
    s1.deps, s2.deps, ev.deps = [s0], [s0, s1], [s2]
    return [("3/6 stage 0 encoder", s0), ("4/6 stage 1", s1), ("5/6 stage 2", s2), ("6/6 evaluation", ev)]


def _once(title: str, marker: Path, cmd: list[str]) -> float:
    """A step without a config (data build, LLM conversion): run unless its marker file exists; seconds taken."""
    print(f"\n=== {title}", flush=True)
    if marker.exists():
        print(f"    already done ({marker}); skipping", flush=True)
        return 0.0
    print("    $ python " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return round(time.perf_counter() - t0, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="where the demo's runs go (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    os.chdir(REPO)  # every step runs from the checkout, as `make demo` does
    if args.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    timings = {"1/6 embedded data": _once("1/6 embedded data", out / ".data_built", ["scripts/build_embedded_data.py"])}
    # Converting the GGUF once in its own process keeps its ~2 GB peak out of the training step's memory.
    title = "2/6 LLM: SmolLM2 GGUF -> HF folder (once)"
    timings[title] = _once(title, out / ".llm_ready", ["-m", "xraygpt.llm"])
    for title, step in plan_demo(out):
        timings[title] = run_step(title, step, "subprocess", redo_under=out)["seconds"]

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
