"""Build the embedded paired dataset (real IU reports + synthetic films rendered from their MeSH tags).

    python scripts/build_embedded_data.py [--out DIR] [--limit N] [--force] [--size 256] [--workers 2] \
        [--captions raw|rules]

Reuses a complete build of the same version unless --force. See xraygpt/data/embedded.py for the layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from xraygpt.data.embedded import CAPTIONS, DEFAULT_CAPTIONS, EmbeddedDataError, build_embedded_dataset
from xraygpt.data.reports import ReportSourceError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the embedded IU-report + rendered-film dataset.")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the xraygpt cache)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N reports that pass the filters")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--workers", type=int, default=None, help="render processes (default min(2, CPUs))")
    ap.add_argument("--captions", choices=CAPTIONS, default=DEFAULT_CAPTIONS,
                    help="raw (default): findings + impression as written; rules: the paper's clean summaries via "
                         "data_prep's offline rules (point a config's data.root at the --out folder)")  # fmt: skip
    args = ap.parse_args(argv)

    bar = tqdm(total=0, unit="img", desc="rendering", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        ds = build_embedded_dataset(args.out, args.limit, args.force, size=args.size, workers=args.workers,
                                    progress=progress, captions=args.captions)  # fmt: skip
    except (EmbeddedDataError, ReportSourceError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    bar.close()
    m = ds.manifest
    f = m["filter"]
    print(("reused" if ds.reused else "built") + f" embedded dataset {m['version']} at {ds.root}")
    print(f"  reports read {m['reports_read']}, kept {f['kept']}; dropped "
          + ", ".join(f"{k} {v}" for k, v in f["dropped"].items()))  # fmt: skip
    print(f"  captions {m['captions']['kind']}" + (f" ({m['empty_after_cleaning']} empty after cleaning, dropped)"
                                                  if m["captions"]["kind"] == "rules" else ""))
    print(f"  images {m['n_images']} ({m['size']} px); splits " + ", ".join(f"{k} {v}" for k, v in m["splits"].items()))
    print(f"  tags: {m['tags']['n_tags']} ({', '.join(f'{k} {v}' for k, v in m['tags']['status'].items())}); "
          f"reports without a usable tag {m['reports_without_label']}")  # fmt: skip
    print(f"  build time {m['build_seconds']} s")
    print(f"  annotations {ds.ann_file}\n  splits {ds.root / 'splits'}\n  labels {ds.labels_file}\n"
          f"  contact sheet {ds.contact_sheet}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
