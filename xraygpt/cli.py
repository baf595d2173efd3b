"""Shared command-line plumbing for scripts/: `--cfg file.yaml key=value ...`, logging, clean error exits."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from xraygpt.config import ConfigError, load_config

T = TypeVar("T")

# Errors that are the user's to fix: print one clear line, no traceback soup.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, ImportError, PermissionError, KeyError, RuntimeError)


def parse_cfg_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=False, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.max_steps=10")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(schema: type[T], fn: Callable[[T], Any], description: str, argv: list[str] | None = None) -> Any:
    args = parse_cfg_args(description, argv)
    setup_logging()
    try:
        cfg = load_config(schema, args.cfg, args.overrides)
        return fn(cfg)
    except USER_ERRORS as e:
        if args.debug or argv is not None:  # called from Python (tests, notebooks): keep the exception
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
