"""Which null image should image guidance contrast against? A by-hand comparison on validation films (issue 8).

    python benchmarks/guidance_nulls.py [--ckpt outputs/ablation/embedded/rows/radllm/stage2] [--limit 200] \\
        [--specs zeros:2 zeros:3 mean:2 normal:2 normal:3] [--out benchmarks/results/guidance_nulls.json]

`generation.image_guidance=s` decodes each token from l(null) + s (l(film) - l(null)). The shipped null is zero
image features. With the ablation's `encoder.feature=labels` zero means every finding logit at 0, i.e. 50% of
every finding: not a film the model ever saw. This benchmark swaps in two in-distribution nulls, computed from the
**train** split's films with the model's own frozen encoder:
- `mean`: the mean feature of all train films;
- `normal`: the mean feature of the train films labelled "No Finding" (labels.json, from the MeSH tags).
Each spec `null:scale` is evaluated as the ablation evaluates a row (configs/demo/eval.yaml, shuffled-image control,
ROUGE + CheXpert with paired bootstrap) on the first `limit` validation films; a rerun with the same `--workdir`
re-scores the predictions already there instead of generating them again. It also splits R-L by the film's
label (normal / abnormal), which shows where the R-L gap comes from. Writes numbers only (the IU reports are
CC BY-NC-ND).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import types
from pathlib import Path

import torch
from labels_only_ceiling import row_split  # benchmarks/ is on sys.path when this runs as a script

from xraygpt.config import load_config
from xraygpt.data.dataset import CaptionDataset
from xraygpt.data.image_processing import ImageTransform
from xraygpt.eval.generate import EvalConfig, load_model, resolve_split
from xraygpt.eval.run import evaluate
from xraygpt.model import XrayGPT

NULLS = ("zeros", "mean", "normal")


@torch.no_grad()
def train_nulls(model: XrayGPT, root: Path, images: dict, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The candidate null features (1, T, D_img), from the train split's films (`images`: labels.json's)."""
    ds = CaptionDataset(root, root / "splits/train.json", transform=ImageTransform(model.encoder.processing,
                                                                                   train=False))
    feats, normal = [], []
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        feats.append(model.get_image_features(torch.stack([ds[i]["image"] for i in idx])).float())
        normal += [images[ds.record(i)["image_id"]]["labels"][0] == 1 for i in idx]
    feats = torch.cat(feats)  # (N, T, D_img)
    is_normal = torch.tensor(normal)
    return {"zeros": torch.zeros_like(feats[:1]), "mean": feats.mean(0, keepdim=True),
            "normal": feats[is_normal].mean(0, keepdim=True)}


def use_null(model: XrayGPT, null: torch.Tensor) -> None:
    """Make this model instance's guidance contrast against `null` (1, T, D_img) instead of zero features."""
    model.null_image_embeds = types.MethodType(lambda self, n, like: self.project(null.expand(n, -1, -1)), model)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="outputs/ablation/embedded/rows/radllm/stage2")
    parser.add_argument("--eval-cfg", default="configs/demo/eval.yaml")
    parser.add_argument("--split", default="splits/val.json", help="never the test split: this picks a setting")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--specs", nargs="+", default=["zeros:2", "zeros:3", "mean:2", "normal:2", "normal:3"],
                        help="null:scale pairs, null one of " + ", ".join(NULLS))
    parser.add_argument("--workdir", default="outputs/bench/guidance_nulls", help="predictions go here")
    parser.add_argument("--out", default="benchmarks/results/guidance_nulls.json")
    args = parser.parse_args(argv)
    specs = []
    for spec in args.specs:
        name, _, scale = spec.partition(":")
        if name not in NULLS or not scale:
            parser.error(f"--specs {spec!r}: give null:scale with null one of {', '.join(NULLS)}, e.g. normal:2")
        specs.append((name, float(scale)))

    model = load_model(args.ckpt).eval()
    base = load_config(EvalConfig, args.eval_cfg, [f"ckpt={args.ckpt}", f"data.ann_file={args.split}",
                                                   f"data.limit={args.limit}", "metrics=[rouge,clinical]",
                                                   "control=true", "progress=false"])
    root, _ = resolve_split(base)
    images = json.loads((root / "labels.json").read_text())["images"]
    nulls = train_nulls(model, root, images)
    results = []
    for name, scale in specs:
        t0 = time.perf_counter()
        use_null(model, nulls[name])
        run_dir = Path(args.workdir) / f"{name}_g{scale:g}"
        cfg = dataclasses.replace(base, output_dir=str(run_dir), generation=dataclasses.replace(
            base.generation, image_guidance=scale))
        report = evaluate(cfg, model=model)
        paired = report["paired"][0]["metrics"]  # a: the shuffled run, b: the matched one, delta = a - b
        row = {"null": name, "scale": scale, "seconds": round(time.perf_counter() - t0, 1)}
        for key, metric in (("rougeL", "rougeL"), ("ce_micro_f1_14", "ce_micro_f1_14")):
            p = paired[metric]
            row[key] = {"matched": round(p["b"], 4), "shuffled": round(p["a"], 4), "gap": round(-p["delta"], 4),
                        "ci": [round(-p["ci_high"], 4), round(-p["ci_low"], 4)]}
        row["rougeL_by_label"] = row_split(run_dir, images)
        results.append(row)
        print(f"{name}:{scale:g}  R-L {row['rougeL']['matched']:.3f} vs {row['rougeL']['shuffled']:.3f} "
              f"gap {row['rougeL']['gap']:+.3f}  CE-14 {row['ce_micro_f1_14']['matched']:.3f} vs "
              f"{row['ce_micro_f1_14']['shuffled']:.3f} gap {row['ce_micro_f1_14']['gap']:+.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
    out = {"ckpt": args.ckpt, "split": args.split, "limit": args.limit, "machine": platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
