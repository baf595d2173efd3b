"""`make demo`: the whole pipeline on the embedded default, end to end, on a laptop-class CPU.

    python scripts/run_demo.py [--out outputs/demo] [--fresh]

1. build the embedded paired dataset (real IU reports + rendered radiographs)      scripts/build_embedded_data.py
2. convert the SmolLM2 GGUF into a plain HF folder once (own process: keeps its memory peak out of training)
3. stage 0: pretrain the small MedCLIP-style encoder                              configs/demo/stage0_encoder.yaml
4. stage 1: align the projection (SmolLM2-135M, frozen)                           configs/demo/stage1.yaml
5. stage 2: continue from stage 1                                                 configs/demo/stage2.yaml
6. evaluate on the test split against the shuffled-image control                  configs/demo/eval.yaml
Each step is skipped when its output already exists, so a rerun only does what is missing; a step whose config
changed since it ran (and every step after it) is redone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


STAMP = ".demo_step.json"  # in a step's output folder: the command and config text it ran with


class Steps:
    """Runs the demo's steps in order, each in its own process, skipping what is done.

    A training/eval step records what it ran (command + its YAML's text) in its folder. When that changed since
    (an edited config), or when an earlier step ran again in this invocation, the step's folder is removed and the
    step redone, so the table never comes from stale models.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.upstream_ran = False

    def run(self, title: str, done: Path, cmd: list[str], folder: Path | None = None,
            config: Path | None = None) -> None:
        print(f"\n=== {title}", flush=True)
        stamp = _stamp(cmd, config)
        if done.exists():
            why = self._stale(folder, stamp)
            if why is None:
                print(f"    already done ({done}); skipping", flush=True)
                self.timings[title] = 0.0
                return
            print(f"    {why}: removing {folder} and redoing the step", flush=True)
            shutil.rmtree(folder)
        print("    $ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
        self.timings[title] = round(time.perf_counter() - t0, 1)
        if folder is not None:
            (folder / STAMP).write_text(json.dumps({"cmd": cmd, "stamp": stamp}, indent=1))
            self.upstream_ran = True
        print(f"    done in {self.timings[title]:.0f} s", flush=True)

    def _stale(self, folder: Path | None, stamp: str) -> str | None:
        if folder is None:
            return None
        if self.upstream_ran:
            return "an earlier step ran again"
        record = folder / STAMP
        if record.is_file() and json.loads(record.read_text()).get("stamp") != stamp:
            return "its command or config changed since it ran"
        return None  # no record: made by hand or by an older version, trusted as it is


def _stamp(cmd: list[str], config: Path | None) -> str:
    text = (REPO / config).read_text() if config is not None else ""
    return hashlib.sha256(json.dumps([cmd, text]).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="where the demo's runs go (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    args = p.parse_args(argv)
    out = REPO / args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    steps = Steps()
    o = f"run.output_dir={args.out}"
    enc = f"{args.out}/stage0/encoder.safetensors"
    steps.run("1/6 embedded data", out / ".data_built", ["scripts/build_embedded_data.py"])
    (out / ".data_built").parent.mkdir(parents=True, exist_ok=True)
    (out / ".data_built").touch()
    # Converting the GGUF once in its own process keeps its ~2 GB peak out of the training step's memory.
    steps.run("2/6 LLM: SmolLM2 GGUF -> HF folder (once)", out / ".llm_ready", ["-m", "xraygpt.llm"])
    (out / ".llm_ready").touch()
    demo = Path("configs/demo")
    steps.run("3/6 stage 0 encoder", out / "stage0" / "encoder.safetensors",
              ["scripts/train_encoder.py", "--cfg", str(demo / "stage0_encoder.yaml"), f"{o}/stage0"],
              out / "stage0", demo / "stage0_encoder.yaml")
    steps.run("4/6 stage 1", out / "stage1" / "final" / "xraygpt_config.json",
              ["scripts/train.py", "--cfg", str(demo / "stage1.yaml"), f"{o}/stage1",
               f"model.encoder.checkpoint={enc}"],
              out / "stage1", demo / "stage1.yaml")
    steps.run("5/6 stage 2", out / "stage2" / "final" / "xraygpt_config.json",
              ["scripts/train.py", "--cfg", str(demo / "stage2.yaml"), f"{o}/stage2", f"model.encoder.checkpoint={enc}",
               f"run.init_from={args.out}/stage1"], out / "stage2", demo / "stage2.yaml")
    steps.run("6/6 evaluation", out / "eval" / "table.json",
              ["scripts/eval_rouge.py", "--cfg", str(demo / "eval.yaml"), f"ckpt={args.out}/stage2",
               f"output_dir={args.out}/eval"], out / "eval", demo / "eval.yaml")
    timings = steps.timings

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
