"""Build the embedded paired dataset: real IU reports + one synthetic film per report, in XrayGPT's layout.

    <out>/image/<image_id>.png         rendered from the report's MeSH tags only (xraygpt.data.render)
    <out>/filter_cap.json              {"annotations": [{"image_id", "caption"}]}, caption = findings + impression
                                       as written (default), or with captions="rules" cleaned as the paper's
                                       summaries are (data_prep's offline `rules` cleaner: no comparisons with
                                       prior studies, no XXXX blanks, no view mentions, no repeated impression)
    <out>/splits/{train,val,test}.json same format; split by a hash of the report id (~70/10/20)
    <out>/labels.json                  {"classes": [14 CheXpert names], "images": {image_id: {labels, tags, ...}}}
    <out>/manifest.json                counts, versions, build time; written last, so it marks a complete build
    <out>/contact_sheet.png            4x4 films with their tags, for a person to look at

The report text is CC BY-NC-ND: it is read from the installed wheel at build time and written only here, in
the cache, never into the repository. The images are synthetic renderings, not patient images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from xraygpt.data.mesh import CHEXPERT_CLASSES, TagStats, parse_report_tags, parse_tag
from xraygpt.data.render import DEFAULT_SIZE, RENDER_VERSION, render_png_bytes
from xraygpt.data.reports import Report, apply_rule_filters, read_reports

DATA_VERSION = f"2-render{RENDER_VERSION}"  # bump on any change to the layout, captions, labels or splits
CAPTIONS = ("raw", "rules")  # raw: findings + impression as written; rules: the paper's clean summaries, offline
# The default stays raw: with rules captions the ablation's radiology LLM (LoRA, 100 steps) learned to ignore the
# findings in its slot and the +RadLLM row wrote normal reports for every film (benchmarks/ablation_history.md,
# session 11).
DEFAULT_CAPTIONS = "raw"
SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}
SHEET_CLASSES = (  # the contact sheet shows one film per class first, then fills up
    "No Finding", "Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Lung Opacity", "Consolidation",
    "Pneumonia", "Atelectasis", "Edema", "Lung Lesion", "Fracture", "Support Devices", "Pleural Other",
    "Enlarged Cardiomediastinum",
)  # fmt: skip


class EmbeddedDataError(RuntimeError):
    """The embedded dataset cannot be built where asked."""


@dataclass(frozen=True)
class EmbeddedDataset:
    """Where a built dataset lives, and its manifest."""

    root: Path
    manifest: dict[str, Any]
    reused: bool  # True when an existing complete build was returned as is

    @property
    def image_dir(self) -> Path:
        return self.root / "image"

    @property
    def ann_file(self) -> Path:
        return self.root / "filter_cap.json"

    @property
    def labels_file(self) -> Path:
        return self.root / "labels.json"

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    @property
    def contact_sheet(self) -> Path:
        return self.root / "contact_sheet.png"

    def split_file(self, name: str) -> Path:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; one of {list(SPLITS)}")
        return self.root / "splits" / f"{name}.json"


def split_of(report_id: str) -> str:
    """Deterministic split from a hash of the report id: a report's split never depends on the others."""
    u = int.from_bytes(hashlib.sha256(f"xraygpt-embedded-split:{report_id}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for name, frac in SPLITS.items():
        acc += frac
        if u < acc:
            return name
    return name


def image_id_of(report: Report) -> str:
    """The report's first listed image (e.g. CXR1_1_IM-0001-3001); the report id when it lists none."""
    return report.image_ids[0] if report.image_ids else report.report_id


def default_out_dir(limit: int | None = None, size: int = DEFAULT_SIZE, captions: str = DEFAULT_CAPTIONS) -> Path:
    from xraygpt.assets import cache_dir

    name = DATA_VERSION + (f"-s{size}" if size != DEFAULT_SIZE else "") + (f"-limit{limit}" if limit else "") + \
        ("" if captions == DEFAULT_CAPTIONS else f"-{captions}")
    return cache_dir("embedded_data", name)


def caption_identity(captions: str = DEFAULT_CAPTIONS) -> dict[str, str]:
    """What the captions of a build are made with: a build is reused only when this still matches, so a change
    to the cleaning rules (data_prep/cleaners.py) rebuilds the data, and the steps trained on it notice."""
    if captions not in CAPTIONS:
        raise ValueError(f"captions must be one of {list(CAPTIONS)}, got '{captions}'")
    if captions == "raw":
        return {"kind": "raw"}
    from data_prep.cleaners import RulesCleaner

    return {"kind": "rules", "rules_sha256": RulesCleaner().describe()["rules_sha256"]}


def data_identity(captions: str = DEFAULT_CAPTIONS) -> str:
    """One string naming the embedded data's version and caption rules (for step records that depend on it)."""
    ident = caption_identity(captions)
    return f"{DATA_VERSION} {ident['kind']}" + (f" {ident['rules_sha256'][:16]}" if "rules_sha256" in ident else "")


def captions_of(reports: Sequence[Report], captions: str) -> tuple[list[tuple[Report, str]], int]:
    """(report, caption) for each report whose caption is not empty, and how many were dropped as empty."""
    if captions == "raw":
        pairs = [(r, r.caption) for r in reports]
    else:
        from data_prep.cleaners import rules_summary

        pairs = [(r, rules_summary(r.findings, r.impression)) for r in reports]
    kept = [(r, c) for r, c in pairs if c]
    return kept, len(pairs) - len(kept)


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise EmbeddedDataError(
            f"Cannot write the embedded dataset to {out_dir}: {e.strerror or e}. Pass another folder "
            f"(scripts/build_embedded_data.py --out DIR) or set XRAYGPT_CACHE to a writable place."
        ) from None


def _complete_build(out_dir: Path, limit: int | None, size: int, captions: dict[str, str]) -> dict[str, Any] | None:
    """The manifest of a finished build with the same version, options and caption rules, else None."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    have = (manifest.get("version"), manifest.get("limit"), manifest.get("size"), manifest.get("captions"))
    if have != (DATA_VERSION, limit, size, captions):
        return None
    files = ["filter_cap.json", "labels.json", *(f"splits/{s}.json" for s in SPLITS)]
    if not all((out_dir / f).is_file() for f in files):
        return None
    image_dir = out_dir / "image"
    n_png = sum(1 for e in os.scandir(image_dir) if e.name.endswith(".png")) if image_dir.is_dir() else 0
    return manifest if n_png == manifest.get("n_images") else None


def _render_chunk(items: Sequence[tuple[str, tuple[str, ...], str, int]]) -> int:
    """Worker: render and write a chunk of (report_id, tags, png path, size). Returns how many were written."""
    for report_id, tags, path, size in items:
        png = render_png_bytes(report_id, [parse_tag(t) for t in tags], size)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(png)
        os.replace(tmp, path)
    return len(items)


def build_embedded_dataset(
    out_dir: Path | None = None,
    limit: int | None = None,
    force: bool = False,
    *,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
    reports_source: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    captions: str = DEFAULT_CAPTIONS,
) -> EmbeddedDataset:
    """Build (or reuse) the embedded dataset and return where it is.

    out_dir: default `cache_dir("embedded_data", <version>[-limit<N>][-rules])`.
    limit: keep only the first N reports that pass the filters and cleaning (fast builds for tests).
    force: rebuild even when a complete build with the same version is present.
    workers: render processes (default: min(2, CPUs); 1 renders in this process).
    reports_source: report tgz or folder (default: the IU tgz from the torchxrayvision wheel).
    progress: called as progress(done, total) while rendering.
    captions: "raw" (default) keeps findings + impression as written (XXXX blanks and comparisons included);
        "rules" cleans each caption as the paper's summaries (see the module docstring).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    caption_id = caption_identity(captions)
    if out_dir is None:
        try:
            out_dir = default_out_dir(limit, size, captions)
        except OSError as e:
            raise EmbeddedDataError(f"Cannot create the cache folder for the embedded dataset: {e}. Set "
                                    "XRAYGPT_CACHE to a writable place or pass out_dir.") from None  # fmt: skip
    out_dir = Path(out_dir).expanduser()
    if not force:
        manifest = _complete_build(out_dir, limit, size, caption_id)
        if manifest is not None:
            return EmbeddedDataset(out_dir, manifest, reused=True)
    _check_writable(out_dir)  # before any work

    t0 = time.perf_counter()
    manifest_file = out_dir / "manifest.json"
    manifest_file.unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    reports = read_reports(reports_source)
    filtered = apply_rule_filters(reports)
    kept, empty = captions_of(filtered.kept, captions)  # all of them (~1 s): `empty` counts the whole set
    kept = kept[:limit] if limit is not None else kept

    # captions, labels, splits
    stats = TagStats()
    annotations: list[dict[str, str]] = []
    by_split: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    labels: dict[str, dict[str, Any]] = {}
    class_counts = {s: dict.fromkeys(CHEXPERT_CLASSES, 0) for s in SPLITS}
    no_tags = 0
    jobs = []
    image_dir = out_dir / "image"
    if image_dir.exists():
        shutil.rmtree(image_dir)  # no stale images from an older build
    image_dir.mkdir(parents=True)
    for r, caption in kept:
        image_id = image_id_of(r)
        rf = parse_report_tags(r.mesh_major)
        stats.add(rf)
        no_tags += not r.mesh_major
        split = split_of(r.report_id)
        ann = {"image_id": image_id, "caption": caption}
        annotations.append(ann)
        by_split[split].append(ann)
        labels[image_id] = {"report_id": r.report_id, "split": split, "labels": rf.labels, "tags": r.mesh_major,
                            "labelled": rf.labelled}  # fmt: skip
        for c, v in zip(CHEXPERT_CLASSES, rf.labels):
            class_counts[split][c] += v
        jobs.append((r.report_id, tuple(r.mesh_major), str(image_dir / f"{image_id}.png"), size))

    _render_all(jobs, workers, progress)

    (out_dir / "splits").mkdir(exist_ok=True)
    _write_json(out_dir / "filter_cap.json", {"annotations": annotations})
    for s, anns in by_split.items():
        _write_json(out_dir / "splits" / f"{s}.json", {"annotations": anns})
    _write_json(out_dir / "labels.json", {"classes": list(CHEXPERT_CLASSES), "images": labels})
    _contact_sheet(out_dir, annotations, labels, size)

    manifest = {
        "version": DATA_VERSION,
        "render_version": RENDER_VERSION,
        "size": size,
        "limit": limit,
        "source": str(reports_source) if reports_source else "torchxrayvision:data/NLMCXR_reports.tgz",
        "reports_read": len(reports),
        "filter": {"kept": len(filtered.kept), "dropped": filtered.dropped},
        "captions": caption_id,
        "empty_after_cleaning": empty,
        "n_images": len(annotations),
        "splits": {s: len(a) for s, a in by_split.items()},
        "class_counts": class_counts,
        "reports_without_tags": no_tags,
        "reports_without_label": stats.reports_without_label,
        "tags": stats.to_dict(),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "Synthetic renderings from MeSH tags; captions are real IU X-ray reports (CC BY-NC-ND 4.0), "
                f"{'cleaned by data_prep rules' if captions == 'rules' else 'as written'}.",
    }
    _write_json(manifest_file, manifest, indent=1)
    return EmbeddedDataset(out_dir, manifest, reused=False)


def _render_all(jobs: list, workers: int | None, progress: Callable[[int, int], None] | None) -> None:
    workers = workers or min(2, os.cpu_count() or 1)
    total, done = len(jobs), 0
    chunk = 32
    chunks = [jobs[i : i + chunk] for i in range(0, total, chunk)]
    if workers <= 1 or total <= 2 * chunk:
        for c in chunks:
            done += _render_chunk(c)
            if progress:
                progress(done, total)
        return
    # spawn: safe whatever the parent has imported (torch, threads); workers import numpy + PIL only
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for n in pool.map(_render_chunk, chunks):
            done += n
            if progress:
                progress(done, total)


def _contact_sheet(out_dir: Path, annotations: list[dict[str, str]], labels: dict[str, dict], size: int) -> None:
    """4x4 films with their MeSH tags printed beneath: one per class first, so a person sees every sign."""
    from PIL import Image, ImageDraw, ImageFont

    chosen: list[str] = []
    for cls in SHEET_CLASSES:
        k = CHEXPERT_CLASSES.index(cls)
        for a in annotations:
            iid = a["image_id"]
            if labels[iid]["labels"][k] and iid not in chosen:
                chosen.append(iid)
                break
    for a in annotations:
        if len(chosen) >= 16:
            break
        if a["image_id"] not in chosen:
            chosen.append(a["image_id"])
    chosen = chosen[:16]
    tile, text_h = 256, 44
    font = ImageFont.load_default()
    sheet = Image.new("L", (4 * tile, 4 * (tile + text_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for n, iid in enumerate(chosen):
        r, c = divmod(n, 4)
        x, y = c * tile, r * (tile + text_h)
        with Image.open(out_dir / "image" / f"{iid}.png") as im:
            sheet.paste(im.convert("L").resize((tile, tile)), (x, y))
        lines = _wrap("; ".join(labels[iid]["tags"]) or "(no tags)", 42)[:3]
        for j, line in enumerate(lines):
            draw.text((x + 3, y + tile + 2 + 13 * j), line, fill=0, font=font)
    tmp = out_dir / ".contact_sheet.tmp.png"
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out_dir / "contact_sheet.png")


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return lines + [cur] if cur else lines
