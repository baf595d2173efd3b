"""A finer label set for the stage-0 label head: the CheXpert-14 classes plus drawn MeSH findings, sides and zones.

The CheXpert-14 set caps what one image token can tell the LLM: a writer that knows only that set and answers with
the best train summary for it gains R-L +0.026 over another film's set; one that knows each finding's side and
zone, +0.040 to +0.054 (benchmarks/labels_only_ceiling.py). The embedded renderer draws each MeSH finding on its
side and in its zones, so an encoder can learn them. This module derives that label set from the embedded dataset's
`labels.json` (each image's MeSH `tags`): one class per drawn finding term, per (term, side) and per (term, zone)
seen on at least `min_films` training films, after the CheXpert classes. Classes come from the train split only.

    classes: [...CheXpert-14..., "calcified granuloma", "calcified granuloma|right", "opacity|base", ...]
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from xraygpt.config import atomic_write_text
from xraygpt.data.mesh import MeshFinding, parse_tag

MIN_FILMS = 15  # a class needs this many training films (rarer ones cannot be learned from ~2,300 films)


def finding_keys(f: MeshFinding) -> list[str]:
    """The classes one drawn finding belongs to: its term, term|side, term|zone ([] if the renderer skips it)."""
    if f.status != "sign":
        return []
    sides = [f.laterality] if f.laterality else []
    return [f.term, *(f"{f.term}|{w}" for w in [*sides, *f.zones])]


def image_keys(tags: Iterable[str]) -> set[str]:
    return {k for t in tags for k in finding_keys(parse_tag(t))}


def mesh_label_set(labels: dict[str, Any], train_ids: Sequence[str], min_films: int = MIN_FILMS) -> dict[str, Any]:
    """labels.json's content with the MeSH classes appended to every image's label vector (same format)."""
    counts = Counter(k for i in train_ids for k in image_keys(labels["images"][i].get("tags", ())))
    extra = sorted(k for k, n in counts.items() if n >= min_films)
    images = {}
    for i, meta in labels["images"].items():
        have = image_keys(meta.get("tags", ()))
        images[i] = {**meta, "labels": [*meta["labels"], *(int(k in have) for k in extra)]}
    return {**labels, "classes": [*labels["classes"], *extra], "images": images,
            "mesh": {"min_films": min_films, "extra_classes": len(extra), "from_split": "train"}}


def write_mesh_labels(labels_file: Path, train_file: Path, out_file: Path, min_films: int = MIN_FILMS) -> Path:
    """Derive the MeSH label set from `labels_file` and the training annotations; write it atomically."""
    labels = json.loads(Path(labels_file).read_text(encoding="utf-8"))
    missing = [k for k in ("classes", "images") if k not in labels]
    if missing:
        raise ValueError(f"{labels_file}: no {missing} (expected the embedded dataset's labels.json)")
    train_ids = [a["image_id"] for a in json.loads(Path(train_file).read_text(encoding="utf-8"))["annotations"]]
    unknown = [i for i in train_ids if i not in labels["images"]]
    if unknown:
        raise KeyError(f"{labels_file}: no entry for {len(unknown)} training image(s), e.g. {unknown[0]!r}; rebuild "
                       "the dataset (scripts/build_embedded_data.py --force)")
    atomic_write_text(out_file, json.dumps(mesh_label_set(labels, train_ids, min_films)) + "\n")
    return Path(out_file)
