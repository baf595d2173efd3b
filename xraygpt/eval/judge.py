"""Pairwise GPT judge: for each sample a chat model says which of two runs' predictions is closer to the reference.

Why pairwise with a random order: LLM judges prefer one position. Each sample's A/B order comes from a hash of
(seed, image_id), so it is balanced over a test set, the same on every rerun and whatever the batch or limit,
and recorded per sample in judgments.jsonl; the report gives how often the judge picked position A vs B, so the
bias can be measured and not only hoped away.

Requests go through `xraygpt.openai_client.ChatClient` (retries, disk cache, resume journal), as data-prep does.
The judge must end its answer with `Answer: A`, `Answer: B` or `Answer: tie`; anything else fails validation,
is retried `endpoint.invalid_retries` times and then counts as invalid (excluded from the rates, reported).
Pairs that need no judge cost no call: identical texts are a tie, an empty prediction loses to a non-empty one,
two empty ones tie.

Outputs in `output_dir`: judgments.jsonl (one line per sample), judge.json and judge.md (win / tie / loss of
run 1 against run 2 with bootstrap CIs, position bias, usage), progress.jsonl (the resume journal).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from data_prep.guard import WHY, safe_url
from xraygpt.config import ConfigError, atomic_write_text
from xraygpt.openai_client import (
    ChatClient,
    ChatEndpointConfig,
    ChatJob,
    endpoint_url,
    estimate_tokens,
    is_local_endpoint,
)
from xraygpt.prompt_file import ChatPromptFile

from . import bootstrap as bs
from .predictions import Predictions, PredictionsError, read_predictions

log = logging.getLogger(__name__)

JOURNAL_NAME = "progress.jsonl"
VERDICTS = ("A", "B", "tie")
OUTCOMES = ("win", "tie", "loss")  # of run 1 against run 2
PLACEHOLDERS = ("reference", "response_a", "response_b")


# ---- config --------------------------------------------------------------------------------------------------


@dataclass
class JudgeRunConfig:
    predictions: str = ""  # predictions JSONL (xraygpt.eval.generate's format)
    name: str = ""  # shown in the report; empty: the file's folder name


def _judge_endpoint() -> ChatEndpointConfig:
    # gpt-4o-mini list prices per 1k tokens (check yours); 256 tokens: three sentences and the answer line.
    return ChatEndpointConfig(model="gpt-4o-mini", max_tokens=256, price_prompt_per_1k=0.00015,
                              price_completion_per_1k=0.0006)


@dataclass
class JudgeConfig:
    run1: JudgeRunConfig = field(default_factory=lambda: JudgeRunConfig("outputs/demo/eval/predictions.jsonl"))
    run2: JudgeRunConfig = field(default_factory=lambda: JudgeRunConfig("outputs/demo/eval/control/predictions.jsonl"))
    output_dir: str = "outputs/eval/judge"
    prompt_file: str = "xraygpt/prompts/judge_v1.txt"  # relative to the working directory or the package root
    endpoint: ChatEndpointConfig = field(default_factory=_judge_endpoint)
    # Where the references come from. MIMIC-CXR text goes only to a local endpoint unless allow_remote_mimic=true
    # states that the endpoint is covered by the PhysioNet data use agreement (see data_prep/guard.py).
    dataset: Literal["mimic", "openi", "iu_embedded", "other"] = "mimic"
    allow_remote_mimic: bool = False
    seed: int = 0  # A/B order per sample, and the bootstrap
    bootstrap: int = 1000  # resamples; 0 = values only
    ci: float = 0.95
    limit: int | None = None  # judge the first N samples of run 1's file (smoke runs, cost control)
    resume: bool = True  # reuse output_dir/progress.jsonl; false starts over (the cache still saves calls)
    retry_failed: bool = False  # on resume, also redo samples the journal records as failed or invalid
    dry_run: bool = False  # print the first request and the cost estimate, send nothing

    def validate(self) -> None:
        for key in ("run1", "run2"):
            if not getattr(self, key).predictions:
                raise ConfigError(f"{key}.predictions is empty: give a predictions JSONL file "
                                  f"({key}.predictions=path/to/predictions.jsonl)")
        if self.bootstrap < 0 or not 0 < self.ci < 1:
            raise ConfigError(f"bootstrap must be >= 0 and 0 < ci < 1, got {self.bootstrap} and {self.ci}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 (or null for all), got {self.limit}")


# ---- prompt --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompt:
    """A prompt file with `### system` and `### user` parts; {reference}, {response_a}, {response_b} are filled."""

    path: Path
    system: str
    user: str
    sha256: str

    @property
    def version(self) -> str:
        """Part of every cache key: an edited prompt never reuses answers to the old one."""
        return f"{self.path.stem}:{self.sha256[:12]}"

    @classmethod
    def load(cls, path: str | Path) -> JudgePrompt:
        f = ChatPromptFile.read(path, "judge prompt file", "; set prompt_file=<path>")
        missing = [f"{{{k}}}" for k in PLACEHOLDERS if f"{{{k}}}" not in f.user]
        if missing:
            raise ValueError(f"{f.path}: the '### user' part must contain {', '.join(missing)} (a judge prompt fills "
                             "in {reference}, {response_a} and {response_b}; an optional '### system' part goes first)")
        return cls(f.path, f.system, f.user, f.sha256)

    def messages(self, reference: str, response_a: str, response_b: str) -> list[dict[str, str]]:
        values = {"reference": reference, "response_a": response_a, "response_b": response_b}
        # One pass, so a prediction that happens to contain "{response_b}" is not filled in again.
        user = re.sub(r"\{(reference|response_a|response_b)\}", lambda m: values[m.group(1)], self.user)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": user}]


# ---- per-sample logic ----------------------------------------------------------------------------------------

_ANSWER = re.compile(r"^(?:final\s+)?answer\s*[:=-]?\s*(?:response\s+)?\(?(a|b|tie)\)?\s*[.!]?$", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'tie' from a last line like `Answer: B` (markdown and case tolerated); None otherwise."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    last = re.sub(r"[*_`\"']", "", lines[-1]).strip()
    m = _ANSWER.match(last)
    if m is None:
        return None
    return "tie" if m.group(1).lower() == "tie" else m.group(1).upper()


def validate_answer(job: ChatJob, text: str) -> str | None:
    """ChatClient validation hook: an answer without the final verdict line is retried, then invalid."""
    return None if parse_verdict(text) else "no final line 'Answer: A', 'Answer: B' or 'Answer: tie'"


def _safe_config(cfg: JudgeConfig) -> dict[str, Any]:
    """The config as saved in the report: a key pasted into the endpoint URL (user:key@host) is removed."""
    d = asdict(cfg)
    if d.get("endpoint", {}).get("base_url"):
        d["endpoint"]["base_url"] = safe_url(d["endpoint"]["base_url"])
    return d


def run1_position(seed: int, image_id: str) -> str:
    """Where run 1's prediction goes for this sample, 'A' or 'B': a hash, so independent of order and limit."""
    return "A" if hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[0] % 2 == 0 else "B"


@dataclass
class Pair:
    image_id: str
    reference: str
    pred1: str  # "" when empty
    pred2: str
    position: str  # run 1's position, "A" or "B"

    @property
    def response_a(self) -> str:
        return self.pred1 if self.position == "A" else self.pred2

    @property
    def response_b(self) -> str:
        return self.pred2 if self.position == "A" else self.pred1

    def rule(self) -> tuple[str, str] | None:
        """(decided_by, outcome for run 1) when no judge is needed, else None."""
        e1, e2 = not self.pred1.strip(), not self.pred2.strip()
        if e1 and e2:
            return "both_empty", "tie"
        if e1 or e2:
            return "one_empty", "loss" if e1 else "win"
        if " ".join(self.pred1.split()) == " ".join(self.pred2.split()):
            return "identical", "tie"
        return None


def outcome_of(verdict: str, position: str) -> str:
    """Run 1's outcome from the judge's positional verdict."""
    if verdict == "tie":
        return "tie"
    return "win" if verdict == position else "loss"


def aligned_pairs(p1: Predictions, p2: Predictions, seed: int) -> list[Pair]:
    """One pair per id, in run 1's file order; both files must hold the same ids with the same references."""
    ids1, ids2 = set(p1.ids), set(p2.ids)
    if ids1 != ids2:
        only1, only2 = sorted(ids1 - ids2), sorted(ids2 - ids1)
        raise PredictionsError(
            f"the two predictions files cover different samples: {p1.path} has {len(p1)} ids, {p2.path} has "
            f"{len(p2)}; {len(only1)} only in the first (e.g. {only1[:3]}), {len(only2)} only in the second "
            f"(e.g. {only2[:3]}). Judge runs generated on the same split (or regenerate the shorter one).")
    second = p2.subset(p1.ids)
    differ = [i for i, r1, r2 in zip(p1.ids, p1.references, second.references) if r1.split() != r2.split()]
    if differ:
        raise PredictionsError(
            f"{len(differ)} id(s) have different references in {p1.path} and {p2.path} (e.g. {differ[:3]}): the "
            "two runs were not generated on the same test set")
    return [Pair(i, ref, a, b, run1_position(seed, i))
            for i, ref, a, b in zip(p1.ids, p1.references, p1.predictions, second.predictions)]


# ---- summary -------------------------------------------------------------------------------------------------


def _share(name: str, hits: np.ndarray, among: np.ndarray):
    """Metric fn: weighted share of `hits` among samples where `among` holds (NaN when none)."""
    hits, among = hits.astype(float), among.astype(float)

    def fn(w: np.ndarray) -> dict[str, np.ndarray]:
        w = np.atleast_2d(w)
        num, den = w @ hits, w @ among
        return {name: np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)}

    return fn


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided test of k successes in n against p = 0.5 (position bias); 1.0 when n = 0."""
    if n == 0:
        return 1.0
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return float(min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9))))


def summarize(records: list[dict], n_resamples: int, seed: int, ci: float) -> dict[str, Any]:
    """Win / tie / loss rates of run 1 (valid samples) with CIs, and the judge's position counts."""
    valid = [r for r in records if r["outcome"] in OUTCOMES]
    counts = Counter(r["outcome"] for r in records)
    out: dict[str, Any] = {"n": len(records), "n_valid": len(valid),
                           "counts": {k: counts.get(k, 0) for k in (*OUTCOMES, "invalid")},
                           "decided_by": dict(Counter(r["decided_by"] for r in records))}
    if valid:
        outcome = np.array([r["outcome"] for r in valid])
        fns = [bs.mean_metric(k, (outcome == k).astype(float)) for k in OUTCOMES]
        fns.append(bs.mean_metric("net", (outcome == "win").astype(float) - (outcome == "loss")))
        out["rates"] = bs.bootstrap(fns, len(valid), n_resamples=n_resamples, seed=seed, ci=ci)
    else:
        out["rates"] = None
    judged = [r for r in valid if r["decided_by"] == "judge"]
    verdicts = Counter(r["verdict"] for r in judged)
    n_a, n_b = verdicts.get("A", 0), verdicts.get("B", 0)
    position: dict[str, Any] = {
        "run1_at_A": sum(r["run1_position"] == "A" for r in records),
        "run1_at_A_among_judged": sum(r["run1_position"] == "A" for r in judged),
        "judged": len(judged), "picked_A": n_a, "picked_B": n_b, "picked_tie": verdicts.get("tie", 0),
        "binomial_p_A_vs_B": binomial_two_sided_p(n_a, n_a + n_b),
        "share_A_of_A_or_B": None,
    }
    if n_a + n_b:
        v = np.array([r["verdict"] for r in judged])
        share = bs.bootstrap([_share("share_A", v == "A", v != "tie")], len(judged), n_resamples=n_resamples,
                             seed=seed, ci=ci)
        position["share_A_of_A_or_B"] = share["share_A"]
    out["position"] = position
    return out


# ---- report --------------------------------------------------------------------------------------------------


def _finite(x: Any) -> Any:
    """NaN -> None (no interval when bootstrap = 0), so the JSON is standard."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _cell(m: dict[str, float] | None, pct: bool = True) -> str:
    if m is None:
        return "–"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    v = f"{scale * m['value']:.1f}{unit}"
    if m.get("ci_low") is None or math.isnan(m["ci_low"]):
        return v
    return f"{v} [{scale * m['ci_low']:.1f}, {scale * m['ci_high']:.1f}]"


def to_markdown(report: dict[str, Any]) -> str:
    s, r1, r2 = report["settings"], report["run1"]["name"], report["run2"]["name"]
    summ, pos = report["summary"], report["summary"]["position"]
    rates = summ["rates"] or {}
    lines = [f"# GPT judge: {r1} vs {r2}", "",
             f"Judge `{s['model']}` at {s['endpoint']}, prompt `{s['prompt_version']}`, temperature "
             f"{s['temperature']}. {summ['n']} samples; the A/B order is random per sample (seed {s['seed']}). "
             f"Rates over the {summ['n_valid']} valid samples, {s['bootstrap']} bootstrap resamples, "
             f"{int(100 * s['ci'])}% percentile intervals.", "",
             f"| outcome for {r1} | count | rate [{int(100 * s['ci'])}% CI] |", "|---|---|---|"]
    labels = {"win": f"win ({r1} closer)", "tie": "tie", "loss": f"loss ({r2} closer)"}
    for k in OUTCOMES:
        lines.append(f"| {labels[k]} | {summ['counts'][k]} | {_cell(rates.get(k))} |")
    lines.append(f"| net (win − loss) | | {_cell(rates.get('net'))} |")
    by = summ["decided_by"]
    lines += ["", f"Invalid (no parsable verdict after retries, or the request failed): {summ['counts']['invalid']}, "
              "excluded from the rates.",
              f"Decided without a call: identical texts {by.get('identical', 0)}, one prediction empty "
              f"{by.get('one_empty', 0)} (it loses), both empty {by.get('both_empty', 0)} (tie). Empty predictions: "
              f"{r1} {report['run1']['n_empty_predictions']}, {r2} {report['run2']['n_empty_predictions']}.", "",
              f"Position bias: of {pos['judged']} judged samples the judge picked position A {pos['picked_A']} times, "
              f"B {pos['picked_B']}, tie {pos['picked_tie']}; A's share of A-or-B verdicts "
              f"{_cell(pos['share_A_of_A_or_B'])} (two-sided binomial p = {pos['binomial_p_A_vs_B']:.3g} against "
              f"50%). {r1} stood at position A in {pos['run1_at_A_among_judged']} of them "
              f"({pos['run1_at_A']} of all {summ['n']} samples).", "",
              f"Usage: {report['usage_summary']}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], records: list[dict], out_dir: Path) -> dict[str, Path]:
    paths = {"jsonl": out_dir / "judgments.jsonl", "json": out_dir / "judge.json", "md": out_dir / "judge.md"}
    atomic_write_text(paths["jsonl"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(paths["json"], json.dumps(_finite(report), indent=2, allow_nan=False, ensure_ascii=False)
                      + "\n")
    atomic_write_text(paths["md"], to_markdown(report))
    return paths


# ---- the run -------------------------------------------------------------------------------------------------


def check_data_use(cfg: JudgeConfig, out: TextIO) -> str:
    """Refuse to send MIMIC-CXR references to a non-local endpoint unless the user states it is covered."""
    if cfg.dataset != "mimic":
        return f"references from {cfg.dataset}"
    url = safe_url(endpoint_url(cfg.endpoint))
    if is_local_endpoint(cfg.endpoint):
        return "local endpoint"
    if cfg.dry_run:
        print(f"[data-use] dry run: a real run would send MIMIC-CXR reference text to {url}; it refuses unless "
              "allow_remote_mimic=true.", file=out)
        return "dry run"
    if not cfg.allow_remote_mimic:
        raise PermissionError(
            f"Refusing to send MIMIC-CXR reference text to the non-local endpoint {url}. {WHY} If your endpoint is "
            "covered, rerun with allow_remote_mimic=true; use a local server (endpoint.base_url="
            "http://127.0.0.1:8000/v1); or, if these references are not MIMIC-CXR, say where they come from "
            "(dataset=openi|iu_embedded|other).")
    print(f"[data-use] sending MIMIC-CXR reference text to {url} (allow_remote_mimic=true).", file=out)
    return "remote endpoint approved by allow_remote_mimic"


def _name(run: JudgeRunConfig) -> str:
    return run.name or Path(run.predictions).parent.name or Path(run.predictions).stem


def _dry_run(client: ChatClient, jobs: list[ChatJob], cfg: JudgeConfig, out: TextIO) -> dict[str, Any]:
    if jobs:
        print(f"[dry-run] POST {endpoint_url(cfg.endpoint)}/chat/completions  (sample {jobs[0].id})", file=out)
        print(json.dumps(client.payload(jobs[0].messages), indent=2, ensure_ascii=False), file=out)
    prompt_tokens = sum(estimate_tokens(" ".join(m["content"] for m in j.messages)) for j in jobs)
    completion_tokens = len(jobs) * (cfg.endpoint.max_tokens or 256)
    cost = (prompt_tokens * cfg.endpoint.price_prompt_per_1k
            + completion_tokens * cfg.endpoint.price_completion_per_1k) / 1000
    print(f"[dry-run] {len(jobs)} requests, about {prompt_tokens} prompt tokens and at most {completion_tokens} "
          f"completion tokens, at most ${cost:.2f} before cache hits; nothing was sent.", file=out)
    return {"dry_run": True, "requests": len(jobs), "prompt_tokens_estimate": prompt_tokens,
            "completion_tokens_max": completion_tokens, "cost_usd_max": round(cost, 4)}


def _record(pair: Pair, names: tuple[str, str], decided_by: str, verdict: str | None, outcome: str,
            source: str, reason: str | None = None, text: str | None = None) -> dict[str, Any]:
    a, b = names if pair.position == "A" else names[::-1]
    return {"image_id": pair.image_id, "run1_position": pair.position, "position_a": a, "position_b": b,
            "decided_by": decided_by, "verdict": verdict, "outcome": outcome, "source": source, "reason": reason,
            "judge_text": text}


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="judging", unit="sample", file=sys.stderr, mininterval=2.0, disable=None)


def judge_runs(cfg: JudgeConfig, out: TextIO | None = None) -> dict[str, Any]:
    """Judge run 1 against run 2 sample by sample; write and return the report (see the module docstring)."""
    out = out or sys.stdout
    p1, p2 = read_predictions(cfg.run1.predictions), read_predictions(cfg.run2.predictions)
    pairs = aligned_pairs(p1, p2, cfg.seed)[: cfg.limit]
    names = (_name(cfg.run1), _name(cfg.run2))
    if names[0] == names[1]:
        names = (f"{names[0]} (1)", f"{names[1]} (2)")
    prompt = JudgePrompt.load(cfg.prompt_file)
    data_use = check_data_use(cfg, out)
    out_dir = Path(cfg.output_dir)
    journal = out_dir / JOURNAL_NAME
    if not cfg.resume and journal.exists() and not cfg.dry_run:
        journal.unlink()  # start over; the response cache still saves the calls
    to_judge = {p.image_id: p for p in pairs if p.rule() is None}
    jobs = [ChatJob(p.image_id, prompt.messages(p.reference, p.response_a, p.response_b))
            for p in to_judge.values()]
    client = ChatClient(cfg.endpoint, prompt_version=prompt.version,
                        journal_path=None if cfg.dry_run else journal, retry_failed=cfg.retry_failed)
    try:
        if cfg.dry_run:
            return _dry_run(client, jobs, cfg, out)
        results = {}
        bar = _progress(len(jobs))
        for res in client.run(jobs, validate=validate_answer):
            results[res.id] = res
            bar.update(1)
        bar.close()
    finally:
        client.close()

    records = []
    for p in pairs:
        ruled = p.rule()
        if ruled is not None:
            records.append(_record(p, names, ruled[0], None, ruled[1], "rule"))
            continue
        res = results[p.image_id]
        verdict = parse_verdict(res.text) if res.ok else None
        outcome = outcome_of(verdict, p.position) if verdict else "invalid"
        records.append(_record(p, names, "judge", verdict, outcome, res.source, res.reason, res.text))

    ep = cfg.endpoint
    report: dict[str, Any] = {
        "run1": {"name": names[0], "file": p1.path, "n": len(p1), "n_empty_predictions": p1.n_empty},
        "run2": {"name": names[1], "file": p2.path, "n": len(p2), "n_empty_predictions": p2.n_empty},
        "summary": summarize(records, cfg.bootstrap, cfg.seed, cfg.ci),
        "settings": {"model": ep.model, "endpoint": safe_url(endpoint_url(ep)), "provider": ep.provider,
                     "temperature": ep.temperature, "max_tokens": ep.max_tokens, "prompt_file": str(prompt.path),
                     "prompt_version": prompt.version, "prompt_sha256": prompt.sha256, "seed": cfg.seed,
                     "bootstrap": cfg.bootstrap, "ci": cfg.ci, "limit": cfg.limit, "dataset": cfg.dataset,
                     "data_use": data_use},
        "usage": client.stats.as_dict(ep),
        "usage_summary": client.stats.summary(ep),
        "config": _safe_config(cfg),
    }
    paths = write_report(report, records, out_dir)
    report["files"] = {k: str(v) for k, v in paths.items()}
    report["markdown"] = to_markdown(report)
    return report

