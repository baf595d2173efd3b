"""Seeded bootstrap over samples: 95% percentile intervals for every metric and a paired test between runs.

Every metric is a function ``fn(W) -> {name: (B,)}`` of resample weights ``W`` (B, N): W[b, i] is how many times
sample i was drawn in resample b (rows sum to N). ``W = 1`` is the full set, i.e. the reported value. Writing
metrics this way lets corpus-level ones (BLEU, CIDEr, METEOR, micro-F1) be recomputed exactly on each resample
from per-sample statistics gathered once, instead of re-running the scorers 1,000 times.

Paired test (two runs scored on the same ids, same resamples): the statistic is d = m(A) - m(B); the two-sided
p-value is (1 + #{b : |d_b - d| >= |d|}) / (B + 1), the share of resampled differences at least as far from
the observed one as the observed one is from 0 (the bootstrap distribution shifted to the null, Koehn 2004 /
Berg-Kirkpatrick et al. 2012). Identical runs give p = 1; the smallest reportable p is 1 / (B + 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

MetricFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def resample_weights(n: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(B, n) draw counts of ``n_resamples`` bootstrap resamples of n samples, from ``numpy`` PCG64(seed)."""
    if n < 1:
        raise ValueError("cannot bootstrap an empty set")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    flat = (idx + n * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


def _evaluate(fns: Iterable[MetricFn], weights: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for fn in fns:
        for name, values in fn(weights).items():
            if name in out:
                raise ValueError(f"two metric functions both produce {name!r}")
            out[name] = np.asarray(values, dtype=float)
    return out


def bootstrap(fns: Iterable[MetricFn], n: int, n_resamples: int = 1000, seed: int = 0,
              ci: float = 0.95) -> dict[str, dict[str, float]]:
    """{metric: {"value", "ci_low", "ci_high"}}: the full-set value and a percentile interval.

    ``n_resamples=0`` gives values only (ci_low / ci_high are NaN).
    """
    fns = list(fns)
    point = _evaluate(fns, np.ones((1, n)))
    if n_resamples <= 0:
        return {k: {"value": float(v[0]), "ci_low": float("nan"), "ci_high": float("nan")} for k, v in point.items()}
    dist = _evaluate(fns, resample_weights(n, n_resamples, seed))
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out = {}
    for k, v in point.items():
        lo, hi = np.percentile(dist[k], [lo_q, hi_q])
        out[k] = {"value": float(v[0]), "ci_low": float(lo), "ci_high": float(hi)}
    return out


def paired_test(fns_a: Iterable[MetricFn], fns_b: Iterable[MetricFn], n: int, n_resamples: int = 1000,
                seed: int = 0, ci: float = 0.95) -> dict[str, dict[str, float]]:
    """{metric: {"a", "b", "delta", "ci_low", "ci_high", "p_value"}} for delta = a - b on shared resamples.

    Both runs must list the same samples in the same order (``Predictions.subset`` aligns them).
    """
    fns_a, fns_b = list(fns_a), list(fns_b)
    pa, pb = _evaluate(fns_a, np.ones((1, n))), _evaluate(fns_b, np.ones((1, n)))
    if n_resamples <= 0:
        raise ValueError("a paired bootstrap test needs n_resamples > 0")
    w = resample_weights(n, n_resamples, seed)
    da, db = _evaluate(fns_a, w), _evaluate(fns_b, w)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out = {}
    for k in pa:
        if k not in pb:
            continue
        delta = float(pa[k][0] - pb[k][0])
        d = da[k] - db[k]
        lo, hi = np.percentile(d, [lo_q, hi_q])
        extreme = int((np.abs(d - delta) >= abs(delta) - 1e-12).sum())
        out[k] = {"a": float(pa[k][0]), "b": float(pb[k][0]), "delta": delta, "ci_low": float(lo),
                  "ci_high": float(hi), "p_value": (1 + extreme) / (n_resamples + 1)}
    return out


def mean_metric(name: str, per_sample: np.ndarray) -> MetricFn:
    """A metric that is the mean of a per-sample score (ROUGE, COCO ROUGE-L)."""
    x = np.asarray(per_sample, dtype=float)

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        w = np.atleast_2d(w)
        return {name: (w @ x) / w.sum(axis=1)}

    return fn
