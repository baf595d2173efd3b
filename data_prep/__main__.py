"""python -m data_prep <dataset> --cfg configs/data/<dataset>.yaml [--dry-run] [--limit N] [key=value ...]"""

from __future__ import annotations

import argparse
import logging
import sys

from xraygpt.config import ConfigError, load_config
from xraygpt.data.reports import ReportSourceError
from xraygpt.openai_client import ChatConfigError

from .config import DATASETS, DataPrepConfig
from .guard import DataUseError
from .pipeline import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--cfg", required=True, help="configs/data/<dataset>.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the requests it would send; send nothing")
    parser.add_argument("--limit", type=int, default=None, help="clean only the first N kept reports")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. cleaner=llm")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    overrides = list(args.overrides)
    if args.dry_run:
        overrides.append("dry_run=true")
    if args.limit is not None:
        overrides.append(f"limit={args.limit}")
    try:
        cfg = load_config(DataPrepConfig, args.cfg, overrides)
        if cfg.dataset != args.dataset:
            raise ConfigError(f"{args.cfg} is for dataset '{cfg.dataset}' but the command asks for "
                              f"'{args.dataset}'; use configs/data/{args.dataset}.yaml")
        run(cfg)
    except DataUseError as e:
        print(f"data-use guard: {e}", file=sys.stderr)
        return 3
    except (ConfigError, ChatConfigError, ReportSourceError, FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
