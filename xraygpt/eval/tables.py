"""Result tables: Markdown in the paper's layout, JSON and CSV; ``compare`` builds the Table-1-style comparison.

Layout: ``Method | R-1 | R-2 | R-L`` (rouge-score, as XrayGPT's Table 1), then R-L (COCO), BLEU-1..4, METEOR,
CIDEr, then clinical-efficacy F1 (micro / macro over 14 classes and over the 5 common ones). Each cell is the
value with its bootstrap interval, ``0.321 [0.310, 0.333]``. A second table gives clinical P / R / F1, a third
per-class F1, and with two runs or more a paired-test table against the first run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import bootstrap as bs
from .chexpert_labeler import CLASSES
from .nlg import Meteor
from .predictions import Predictions, PredictionsError, read_predictions
from .score import DEFAULT_METRICS, expand_metrics, prepare, score_prepared

MAIN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("rouge1", "R-1"), ("rouge2", "R-2"), ("rougeL", "R-L"), ("rougeL_coco", "R-L (COCO)"),
    ("bleu1", "B-1"), ("bleu2", "B-2"), ("bleu3", "B-3"), ("bleu4", "B-4"), ("meteor", "METEOR"), ("cider", "CIDEr"),
    ("ce_micro_f1_14", "CE F1 micro-14"), ("ce_macro_f1_14", "CE F1 macro-14"),
    ("ce_micro_f1_5", "CE F1 micro-5"), ("ce_macro_f1_5", "CE F1 macro-5"),
)
CLINICAL_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (f"ce_{avg}_{stat}_{k}", f"{avg} {stat[0].upper()}-{k}")
    for k in ("14", "5") for avg in ("micro", "macro") for stat in ("precision", "recall", "f1")
)


def fmt(m: dict[str, float] | None, digits: int = 3) -> str:
    """``0.321 [0.310, 0.333]``; just the value when there is no interval; "–" when missing."""
    if m is None:
        return "–"
    v = f"{m['value']:.{digits}f}"
    if math.isnan(m.get("ci_low", math.nan)):
        return v
    return f"{v} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _present(results: Sequence[dict], columns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, h) for k, h in columns if any(k in r["metrics"] for r in results)]


def to_markdown(report: dict[str, Any]) -> str:
    """Markdown for a ``compare`` report (one run or several)."""
    runs = report["runs"]
    out = []
    s = runs[0]["settings"]
    line = (f"Bootstrap: {s['bootstrap']} resamples over samples, seed {s['seed']}, {int(100 * s['ci'])}% "
            f"percentile intervals. COCO tokenizer: {s['tokenizer']}.")
    if "clinical" in s.get("metrics", []):
        line += f" Clinical: {s['labeler']} labeler, positive = label 1, uncertain counted as {s['uncertain']}."
    out.append(line)
    out.append("")
    cols = _present(runs, MAIN_COLUMNS)
    out += _table(["Method", *(h for _, h in cols)],
                  [[r["name"], *(fmt(r["metrics"].get(k)) for k, _ in cols)] for r in runs])
    out.append("")
    out += _table(["Method", "N", "empty predictions", "file"],
                  [[r["name"], str(r["n"]), str(r["n_empty_predictions"]), f"`{r['file']}`"] for r in runs])
    ccols = _present(runs, CLINICAL_COLUMNS)
    if ccols:
        out += ["", "Clinical efficacy (precision / recall / F1, micro and macro, 14 and 5 classes):", ""]
        out += _table(["Method", *(h for _, h in ccols)],
                      [[r["name"], *(fmt(r["metrics"].get(k)) for k, _ in ccols)] for r in runs])
        out += ["", "Per-class F1 (support = positive references):", ""]
        rows = []
        for c in CLASSES:
            support = runs[0].get("label_counts", {}) or {}
            n_pos = support.get("reference", {}).get(c, {}).get("positive", "")
            rows.append([c, str(n_pos), *(fmt(r["metrics"].get(f"ce_f1[{c}]")) for r in runs)])
        out += _table(["Class", "support", *(r["name"] for r in runs)], rows)
    for pair in report.get("paired", []):
        out += ["", (f"Paired bootstrap test: {pair['run']} minus {pair['baseline']} "
                    f"(same {pair['n']} ids, {pair['bootstrap']} shared resamples; two-sided p):"), ""]
        keys = [(k, h) for k, h in MAIN_COLUMNS if k in pair["metrics"]]
        rows = []
        for k, h in keys:
            m = pair["metrics"][k]
            rows.append([h, f"{m['b']:.3f}", f"{m['a']:.3f}",
                         f"{m['delta']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]", f"{m['p_value']:.4f}"])
        out += _table(["Metric", pair["baseline"], pair["run"], "Δ [95% CI]", "p"], rows)
    return "\n".join(out) + "\n"


def to_csv_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per run: name, file, n, empty, then value / ci_low / ci_high for every metric."""
    keys: list[str] = []
    for r in report["runs"]:
        keys += [k for k in r["metrics"] if k not in keys]
    header = ["method", "file", "n", "n_empty_predictions"]
    for k in keys:
        header += [k, f"{k}_ci_low", f"{k}_ci_high"]
    rows = []
    for r in report["runs"]:
        row: list[Any] = [r["name"], r["file"], r["n"], r["n_empty_predictions"]]
        for k in keys:
            m = r["metrics"].get(k)
            row += [m["value"], m["ci_low"], m["ci_high"]] if m else ["", "", ""]
        rows.append(row)
    return header, rows


def _json_safe(x: Any) -> Any:
    """NaN (no interval when bootstrap=0) -> null, so the JSON is standard."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_tables(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write table.md, table.json and table.csv into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "table.md", "json": out / "table.json", "csv": out / "table.csv"}
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    header, rows = to_csv_rows(report)
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return paths


def compare(paths_or_results: Sequence[str | os.PathLike | Predictions | dict], names: Sequence[str] | None = None,
            metrics: Sequence[str] = DEFAULT_METRICS, bootstrap: int = 1000, seed: int = 0,
            tokenizer: str = "python", uncertain: str = "negative", labeler: str = "rules",
            chexbert_weights: str | None = None, ci: float = 0.95) -> dict[str, Any]:
    """Score several runs and test each against the first: {"runs": [...], "paired": [...]}.

    Items are predictions files (or ``Predictions``), or ready ``score_predictions`` dicts (shown as they are,
    without a paired test, since those lack per-sample statistics). Paired tests need both runs to cover the
    same ids; the references must agree, else the two files do not describe the same test set.
    """
    items = list(paths_or_results)
    if not items:
        raise ValueError("compare needs at least one predictions file")
    if names is None:
        names = [Path(x["file"] if isinstance(x, dict) else getattr(x, "path", x)).stem for x in items]
    if len(names) != len(items):
        raise ValueError(f"{len(names)} names for {len(items)} runs")
    wanted = expand_metrics(metrics)
    meteor = Meteor() if "meteor" in wanted and any(not isinstance(x, dict) for x in items) else None
    try:
        prepared: list[Any] = []
        for x in items:
            if isinstance(x, dict):
                prepared.append(x)
                continue
            preds = x if isinstance(x, Predictions) else read_predictions(x)
            prepared.append(prepare(preds, wanted, tokenizer=tokenizer, uncertain=uncertain, labeler=labeler,
                                    chexbert_weights=chexbert_weights, meteor=meteor))
    finally:
        if meteor is not None:
            meteor.close()
    runs = []
    for name, p in zip(names, prepared):
        result = dict(p) if isinstance(p, dict) else score_prepared(p, bootstrap=bootstrap, seed=seed, ci=ci)
        result["name"] = name
        runs.append(result)
    paired = []
    base = prepared[0]
    if len(items) > 1 and bootstrap > 0 and not isinstance(base, dict):
        for name, p in zip(names[1:], prepared[1:]):
            if isinstance(p, dict):
                continue
            order = _alignment(base.predictions, p.predictions)
            # Re-index the resample weights instead of re-scoring: column j of `other` is sample order[j] of base.
            fns = [lambda w, fn=fn, order=order: fn(np.atleast_2d(w)[:, order]) for fn in p.fns]
            test = bs.paired_test(fns, base.fns, base.n, n_resamples=bootstrap, seed=seed, ci=ci)
            paired.append({"baseline": names[0], "run": name, "n": base.n, "bootstrap": bootstrap, "seed": seed,
                           "metrics": test})
    return {"runs": runs, "paired": paired}


def _alignment(base: Predictions, other: Predictions) -> np.ndarray:
    """For each of ``other``'s samples, its index in ``base``; checks same ids and the same references."""
    a, b = set(base.ids), set(other.ids)
    if a != b:
        only_a, only_b = sorted(a - b), sorted(b - a)
        raise PredictionsError(
            f"paired test needs the same ids: {len(only_a)} only in {base.path} (e.g. {only_a[:3]}), "
            f"{len(only_b)} only in {other.path} (e.g. {only_b[:3]})"
        )
    index = {i: k for k, i in enumerate(base.ids)}
    order = np.array([index[i] for i in other.ids])
    bad = [i for i, ref in zip(other.ids, other.references)
           if " ".join(ref.split()) != " ".join(base.references[index[i]].split())]
    if bad:
        raise PredictionsError(
            f"{len(bad)} id(s) have different references in {base.path} and {other.path} (e.g. {bad[:3]}); "
            "both runs must be scored against the same test set"
        )
    return order
