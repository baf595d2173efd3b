"""read → rule filters → clean → pairs → outputs. `run(cfg)` is the whole data-prep job for one dataset.

Outputs in `cfg.output_dir` (all written atomically, so a killed run never leaves half a file):
    filter_cap.json        {"annotations": [{"image_id", "caption"}]}: the train split, the original format
    train.json, val.json, test.json   same format plus "report_id" and "image" (path under the image root)
    failures.jsonl         one line per report the cleaner could not clean: report_id, reason
    manifest.json          inputs, counts per rule and per outcome, cleaner, model, prompt hash, versions
    progress.jsonl         (llm cleaner) the resume journal
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from xraygpt.config import atomic_write_text, to_dict
from xraygpt.data.reports import apply_rule_filters
from xraygpt.openai_client import endpoint_url, estimate_tokens

from .cleaners import Cleaner, CleanOutcome, LLMCleaner, RulesCleaner
from .config import DataPrepConfig
from .guard import check_data_use, safe_url
from .mimic import DatasetRead, read_mimic
from .openi import read_openi

SPLITS = ("train", "val", "test")
JOURNAL_NAME = "progress.jsonl"


def natural_key(report_id: str) -> tuple:
    """"CXR2" before "CXR10": --limit takes the first reports in the order a person would list them."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", report_id))


def read_dataset(cfg: DataPrepConfig) -> DatasetRead:
    if cfg.dataset == "mimic":
        return read_mimic(cfg.mimic)
    return read_openi(cfg.openi, embedded=cfg.dataset == "iu_embedded")


def build_cleaner(cfg: DataPrepConfig, out_dir: Path) -> Cleaner:
    if cfg.cleaner == "rules":
        return RulesCleaner()
    return LLMCleaner(cfg.llm.endpoint, cfg.llm.prompt_file, journal_path=out_dir / JOURNAL_NAME,
                      max_length_ratio=cfg.llm.max_length_ratio, retry_failed=cfg.llm.retry_failed)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("xraygpt", "openai", "omegaconf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _file_info(path: str | None) -> dict | str:
    if not path or path == "None":
        return "none"
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "bytes": p.stat().st_size}
    return {"path": str(p), "exists": p.exists()}


def _writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output_dir {path} is not writable ({e.strerror}); set output_dir=<a folder you can "
                      "write>") from None


def _public_config(cfg: DataPrepConfig) -> dict:
    """The config for the manifest, with any user:password part of the endpoint URLs removed."""
    data = to_dict(cfg)
    endpoint = data["llm"]["endpoint"]
    for key in ("base_url", "azure_endpoint"):
        if endpoint.get(key):
            endpoint[key] = safe_url(endpoint[key])
    return data


def _dry_run(cfg: DataPrepConfig, cleaner: Cleaner, reports: list, out: TextIO) -> dict:
    if not isinstance(cleaner, LLMCleaner):
        print(f"[dry-run] cleaner 'rules' sends nothing; {len(reports)} reports would be cleaned offline.", file=out)
        return {"dry_run": True, "reports": len(reports)}
    jobs = list(cleaner.jobs(reports))
    url = safe_url(endpoint_url(cfg.llm.endpoint))
    for job in jobs[: cfg.dry_run_show]:
        print(f"[dry-run] POST {url}/chat/completions  (report {job.id})", file=out)
        print(json.dumps(cleaner.client.payload(job.messages), indent=2, ensure_ascii=False), file=out)
    prompt_tokens = sum(estimate_tokens(" ".join(m["content"] for m in j.messages)) for j in jobs)
    completion_tokens = sum(estimate_tokens(f"{r.findings} {r.impression}") for r in reports)
    ep = cfg.llm.endpoint
    cost = (prompt_tokens * ep.price_prompt_per_1k + completion_tokens * ep.price_completion_per_1k) / 1000
    print(f"[dry-run] {len(jobs)} requests to {url} (model {ep.model}), about {prompt_tokens} prompt + "
          f"{completion_tokens} completion tokens, about ${cost:.2f} before cache hits; nothing was sent.",
          file=out)
    return {"dry_run": True, "reports": len(jobs), "prompt_tokens_estimate": prompt_tokens,
            "completion_tokens_estimate": completion_tokens, "cost_usd_estimate": round(cost, 4)}


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="cleaning", unit="report", file=sys.stderr, mininterval=2.0,
                    disable=None)  # None: off when stderr is not a terminal
    except ImportError:  # pragma: no cover
        return None


def _link_images(pairs: dict[str, list[dict]], images_dir: str | None, link_dir: str) -> int:
    if not images_dir:
        raise ValueError("link_images_dir needs the dataset's images_dir (the real image files to link to)")
    root, dst = Path(images_dir).resolve(), Path(link_dir)
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for rows in pairs.values():
        for row in rows:
            link = dst / f"{row['image_id']}{Path(row['image']).suffix}"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(root / row["image"])
            n += 1
    return n


def run(cfg: DataPrepConfig, out: TextIO | None = None) -> dict:
    """Run data prep for `cfg.dataset`; returns the manifest (also written to output_dir/manifest.json)."""
    out = out or sys.stdout
    started = time.time()
    out_dir = Path(cfg.output_dir)
    # The guard speaks first: before reading, cleaning or sending anything.
    verdict = check_data_use(cfg.dataset, cfg.cleaner, cfg.llm.endpoint, cfg.llm.allow_remote_mimic,
                             dry_run=cfg.dry_run, out=out)
    if not cfg.dry_run:
        _writable_dir(out_dir)

    data = read_dataset(cfg)
    filt = apply_rule_filters(data.reports, cfg.filters.min_findings_words, cfg.filters.min_impression_words)
    print(f"[filter] {len(data.reports)} reports: kept {len(filt.kept)}; dropped "
          + ", ".join(f"{k} {v}" for k, v in filt.dropped.items()), file=out)
    kept = sorted(filt.kept, key=lambda r: natural_key(r.report_id))
    with_images = [r for r in kept if data.images.get(r.report_id)]
    if len(with_images) < len(kept):
        print(f"[filter] {len(kept) - len(with_images)} kept reports have no usable image and are not cleaned",
              file=out)
    todo = with_images[: cfg.limit] if cfg.limit else with_images

    journal = out_dir / JOURNAL_NAME
    if not cfg.resume and journal.exists() and not cfg.dry_run:
        journal.unlink()  # start over; the response cache still saves the calls
    cleaner = build_cleaner(cfg, out_dir)
    try:
        if cfg.dry_run:
            return _dry_run(cfg, cleaner, todo, out)
        outcomes: dict[str, CleanOutcome] = {}
        bar = _progress(len(todo))
        for outcome in cleaner.clean(todo):
            outcomes[outcome.report_id] = outcome
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        described = cleaner.describe()
    finally:
        cleaner.close()

    pairs: dict[str, list[dict]] = {s: [] for s in SPLITS}
    failures = []
    for r in todo:
        o = outcomes[r.report_id]
        if not o.ok or not o.summary:
            failures.append({"report_id": r.report_id, "reason": o.reason or "no summary"})
            continue
        for ref in data.images[r.report_id]:
            pairs[ref.split].append({"image_id": ref.image_id, "caption": o.summary, "report_id": r.report_id,
                                     "image": ref.path})

    for split in SPLITS:
        atomic_write_text(out_dir / f"{split}.json", json.dumps({"annotations": pairs[split]}, indent=1,
                                                                ensure_ascii=False) + "\n")
    original = [{"image_id": p["image_id"], "caption": p["caption"]} for p in pairs["train"]]
    atomic_write_text(out_dir / "filter_cap.json", json.dumps({"annotations": original}, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    linked = None
    if cfg.link_images_dir:
        images_dir = cfg.mimic.images_dir if cfg.dataset == "mimic" else cfg.openi.images_dir
        linked = _link_images(pairs, images_dir, cfg.link_images_dir)

    sources = Counter(o.source for o in outcomes.values())
    reasons = Counter((o.reason or "").split(" (after")[0] for o in outcomes.values() if not o.ok)
    manifest = {
        "dataset": cfg.dataset,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 2),
        "inputs": {k: _file_info(v) if k in {"reports", "split_csv", "metadata_csv", "images_dir"} else v
                   for k, v in data.inputs.items()},
        "counts": {
            "reader": data.counts,
            "filter": {"input": len(data.reports), "kept": len(filt.kept), **filt.dropped},
            "kept_without_images": len(kept) - len(with_images),
            "cleaned": len(todo),
            "outcome": {"ok": sum(o.ok for o in outcomes.values()), "failed": len(failures),
                        "by_source": dict(sources), "failure_reasons": dict(reasons)},
            "pairs": {s: len(v) for s, v in pairs.items()},
            "images_linked": linked,
        },
        "cleaner": described,
        "model": cfg.llm.endpoint.model if cfg.cleaner == "llm" else None,
        "endpoint": safe_url(endpoint_url(cfg.llm.endpoint)) if cfg.cleaner == "llm" else None,
        "prompt_sha256": described.get("prompt_sha256"),
        "data_use": verdict,
        "versions": _versions(),
        "config": _public_config(cfg),
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    ok = manifest["counts"]["outcome"]["ok"]
    print(f"[done] {ok}/{len(todo)} reports cleaned ({dict(sources)}), {len(failures)} failed; pairs "
          + ", ".join(f"{s} {len(v)}" for s, v in pairs.items()) + f"; outputs in {out_dir}", file=out)
    if isinstance(cleaner, LLMCleaner):
        print(f"[usage] {cleaner.client.stats.summary(cfg.llm.endpoint)}", file=out)
    return manifest
