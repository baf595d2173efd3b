"""By hand: time to score 600 predictions with every metric and 1,000 bootstrap resamples, and how the built-in
CheXpert labeler agrees with the IU X-ray MeSH tags (an independent, manual annotation).

    python benchmarks/eval_metrics_speed.py --out benchmarks/results/eval_metrics_speed.json

The predictions are built at run time from the embedded IU reports (reference = a report; prediction = the same
report for every 5th sample, another report otherwise, empty for 12) in a temp folder; no report text is written
to the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def build(n: int, folder: Path) -> tuple[Path, Path]:
    from xraygpt.data.reports import read_reports
    from xraygpt.eval.predictions import append_predictions

    reports = [r for r in read_reports() if r.findings and r.impression]
    random.Random(0).shuffle(reports)
    refs, others = reports[:n], reports[n : 2 * n]
    a = [{"image_id": r.report_id, "reference": r.caption,
          "prediction": "" if i % 50 == 7 else (r.caption if i % 5 == 0 else o.caption)}
         for i, (r, o) in enumerate(zip(refs, others))]
    b = [dict(x, prediction=x["reference"] if i % 3 == 0 else a[(i + 1) % n]["prediction"]) for i, x in enumerate(a)]
    pa, pb = folder / "run_a.jsonl", folder / "run_b.jsonl"
    append_predictions(pa, a)
    append_predictions(pb, b)
    return pa, pb


def labeler_vs_mesh() -> dict:
    """Per-class agreement of labeler(report) == 1 with MeSH-derived positives over all IU reports with tags."""
    from xraygpt.data.mesh import CHEXPERT_CLASSES, parse_report_tags
    from xraygpt.data.reports import read_reports
    from xraygpt.eval.chexpert_labeler import CLASSES, label_reports

    assert tuple(CHEXPERT_CLASSES) == CLASSES
    reports = [r for r in read_reports() if r.caption]
    tags = [parse_report_tags(r.mesh_major) for r in reports]
    keep = [i for i, t in enumerate(tags) if t.labelled]
    t0 = time.perf_counter()
    labels = label_reports([reports[i].caption for i in keep])
    seconds = time.perf_counter() - t0
    mesh = np.array([tags[i].labels for i in keep], dtype=bool)
    ours = labels == 1
    out = {"reports": len(keep), "label_seconds": round(seconds, 3), "per_class": {}}
    for j, c in enumerate(CLASSES):
        a, b = ours[:, j], mesh[:, j]
        tp, fp, fn = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        out["per_class"][c] = {"mesh_positive": int(mesh[:, j].sum()), "labeler_positive": int(ours[:, j].sum()),
                               "agreement": round(float((ours[:, j] == mesh[:, j]).mean()), 4), "f1": round(f1, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/eval_metrics_speed.json")
    args = ap.parse_args()
    from xraygpt.eval.score import score_predictions
    from xraygpt.eval.tables import compare

    result: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "n": args.n, "bootstrap": args.bootstrap,
                    "load_average_1m_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb = build(args.n, Path(tmp))
        t0 = time.perf_counter()
        single = score_predictions(pa, bootstrap=args.bootstrap)
        result["score_one_file_all_metrics_s"] = round(time.perf_counter() - t0, 3)
        result["score_one_file_stages_s"] = single["timing_s"]
        t0 = time.perf_counter()
        score_predictions(pa, metrics=("rouge", "bleu", "cider", "clinical"), bootstrap=args.bootstrap)
        result["score_one_file_without_meteor_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        rep = compare([pa, pb], names=["a", "b"], bootstrap=args.bootstrap)
        result["compare_two_files_with_paired_test_s"] = round(time.perf_counter() - t0, 3)
        result["values_run_a"] = {k: round(v["value"], 4) for k, v in single["metrics"].items() if "[" not in k}
        paired = rep["paired"][0]["metrics"]
        result["paired_p_values"] = {k: round(v["p_value"], 4) for k, v in paired.items() if "[" not in k}
    result["labeler_vs_iu_mesh"] = labeler_vs_mesh()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_s")}, indent=2))
    print(json.dumps(result["labeler_vs_iu_mesh"], indent=2))


if __name__ == "__main__":
    main()
