"""Score a predictions JSONL: ROUGE, NLG (BLEU, METEOR, CIDEr), clinical efficacy, each with a bootstrap CI.

``score_predictions`` is the one call scripts make. Internally a run is first *prepared* (texts tokenised and
labelled, per-sample statistics gathered: the slow part, done once) into metric functions of resample weights,
which ``bootstrap`` then evaluates on the full set and on 1,000 resamples; ``tables.compare`` reuses the same
prepared runs for paired tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import bootstrap as bs
from .clinical import CheXbertLabeler, ClinicalCounts, label_counts, label_texts
from .nlg import CiderStats, Meteor, bleu_from_stats, bleu_stats, meteor_from_stats, tokenize
from .predictions import Predictions, read_predictions
from .rouge import coco_rouge_l_per_sample, rouge_per_sample

METRIC_GROUPS = {"rouge": ("rouge",), "nlg": ("bleu", "meteor", "cider"), "bleu": ("bleu",),
                 "meteor": ("meteor",), "cider": ("cider",), "clinical": ("clinical",)}
DEFAULT_METRICS = ("rouge", "nlg", "clinical")


def expand_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """("rouge", "nlg") -> ("rouge", "bleu", "meteor", "cider"), validated, order kept."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    out: list[str] = []
    for m in metrics:
        if m not in METRIC_GROUPS:
            raise ValueError(f"unknown metric group {m!r}; choose from {sorted(METRIC_GROUPS)}")
        out += [x for x in METRIC_GROUPS[m] if x not in out]
    return tuple(out)


@dataclass
class PreparedRun:
    """A predictions file turned into metric functions of bootstrap weights, plus what the report shows."""

    predictions: Predictions
    fns: list[bs.MetricFn] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.predictions)


def _timed(timing: dict[str, float], key: str, t0: float) -> float:
    t = time.perf_counter()
    timing[key] = round(t - t0, 3)
    return t


def prepare(preds: Predictions, metrics: Sequence[str] = DEFAULT_METRICS, tokenizer: str = "python",
            uncertain: str = "negative", labeler: str = "rules", chexbert_weights: str | None = None,
            meteor: Meteor | None = None) -> PreparedRun:
    """Gather per-sample statistics for the chosen metrics. Pass a running ``Meteor`` to share one JVM."""
    wanted = expand_metrics(metrics)
    run = PreparedRun(preds)
    refs, hyps = preds.references, preds.predictions
    t = time.perf_counter()
    own_meteor = None
    if "meteor" in wanted and meteor is None:
        meteor = own_meteor = Meteor()  # the JVM loads (~10 s) while the other metrics are computed below
    try:
        need_tokens = any(m in wanted for m in ("rouge", "bleu", "meteor", "cider"))
        if need_tokens:
            refs_tok, hyps_tok = tokenize(refs, tokenizer), tokenize(hyps, tokenizer)
            t = _timed(run.timing, "tokenize", t)
        if "rouge" in wanted:
            for name, x in rouge_per_sample(refs, hyps, use_stemmer=True).items():
                run.fns.append(bs.mean_metric(name, x))
            run.fns.append(bs.mean_metric("rougeL_coco", coco_rouge_l_per_sample(refs_tok, hyps_tok)))
            t = _timed(run.timing, "rouge", t)
        if "bleu" in wanted:
            stats = bleu_stats(refs_tok, hyps_tok)

            def bleu_fn(w: np.ndarray, stats: np.ndarray = stats) -> dict[str, np.ndarray]:
                b = bleu_from_stats(np.atleast_2d(w) @ stats)
                return {f"bleu{k + 1}": b[:, k] for k in range(4)}

            run.fns.append(bleu_fn)
            t = _timed(run.timing, "bleu", t)
        if "cider" in wanted:
            cider = CiderStats(refs_tok, hyps_tok)
            run.fns.append(lambda w, c=cider: {"cider": c.corpus(w)})
            t = _timed(run.timing, "cider", t)
        if "clinical" in wanted:
            if labeler == "chexbert":  # load the model once for both sides
                model = CheXbertLabeler(chexbert_weights)
                ref_labels, pred_labels = model(refs), model(hyps)
            else:
                ref_labels, pred_labels = label_texts(refs, labeler), label_texts(hyps, labeler)
            counts = ClinicalCounts.from_labels(ref_labels, pred_labels, uncertain)
            run.fns.append(counts.metrics)
            run.info["label_counts"] = {"reference": label_counts(ref_labels), "prediction": label_counts(pred_labels)}
            t = _timed(run.timing, "clinical", t)
        if "meteor" in wanted:
            mstats = meteor.stats(refs_tok, hyps_tok)
            meteor.check(mstats)  # our formula must give the jar's corpus score
            run.fns.append(lambda w, s=mstats: {"meteor": meteor_from_stats(np.atleast_2d(w) @ s)})
            t = _timed(run.timing, "meteor (incl. waiting for the JVM)", t)
    finally:
        if own_meteor is not None:
            own_meteor.close()
    run.info["settings"] = {
        "metrics": list(wanted), "tokenizer": tokenizer, "uncertain": uncertain, "labeler": labeler,
        "rouge": "rouge-score F1, use_stemmer=True; rougeL_coco: pycocoevalcap beta=1.2",
        "bleu": "pycocoevalcap corpus BLEU (closest ref length)", "cider": "pycocoevalcap CIDEr (n=4, sigma=6)",
        "meteor": "METEOR 1.5 jar, -l en -norm, corpus score",
    }
    return run


def score_prepared(run: PreparedRun, bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Values and CIs of a prepared run, as the JSON-ready dict ``score_predictions`` returns."""
    t = time.perf_counter()
    metrics = bs.bootstrap(run.fns, run.n, n_resamples=bootstrap, seed=seed, ci=ci)
    timing = dict(run.timing)
    timing["bootstrap"] = round(time.perf_counter() - t, 3)
    p = run.predictions
    settings = {**run.info.get("settings", {}), "bootstrap": bootstrap, "seed": seed, "ci": ci,
                "ci_method": "percentile, resampling samples with replacement"}
    return {
        "file": p.path,
        "n": len(p),
        "n_empty_predictions": p.n_empty,
        "empty_prediction_ids": p.empty_ids[:20],
        "settings": settings,
        "metrics": metrics,
        "label_counts": run.info.get("label_counts"),
        "timing_s": timing,
    }


def score_predictions(path: str | os.PathLike | Predictions, metrics: Sequence[str] = DEFAULT_METRICS,
                      bootstrap: int = 1000, seed: int = 0, tokenizer: str = "python", uncertain: str = "negative",
                      labeler: str = "rules", chexbert_weights: str | None = None, ci: float = 0.95) -> dict[str, Any]:
    """Score one predictions JSONL. Returns {"file", "n", "n_empty_predictions", "settings", "metrics": {name:
    {"value", "ci_low", "ci_high"}}, "label_counts", "timing_s"}.

    metrics: any of "rouge", "nlg" (= "bleu", "meteor", "cider"), "bleu", "meteor", "cider", "clinical".
    Metric names: rouge1 rouge2 rougeL rougeL_coco bleu1..bleu4 meteor cider
    ce_{micro,macro}_{precision,recall,f1}_{14,5} and per class ce_{precision,recall,f1}[<class>].
    METEOR needs Java (``nlg.JavaNotFoundError`` says what to install).
    """
    t = time.perf_counter()
    preds = path if isinstance(path, Predictions) else read_predictions(path)
    run = prepare(preds, metrics, tokenizer=tokenizer, uncertain=uncertain, labeler=labeler,
                  chexbert_weights=chexbert_weights)
    result = score_prepared(run, bootstrap=bootstrap, seed=seed, ci=ci)
    result["timing_s"]["total"] = round(time.perf_counter() - t, 3)
    return result
