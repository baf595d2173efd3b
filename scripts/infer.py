"""Summarise chest films with a trained XrayGPT: one summary per file, batched.

    python scripts/infer.py --ckpt outputs/demo/stage2 film1.png film2.jpg scan.dcm
    python scripts/infer.py --ckpt xraygpt.pth --cfg configs/stage2.yaml films/*.jpg --json summaries.jsonl
    python scripts/infer.py --ckpt outputs/demo/stage2 film.png --question "Is there a pleural effusion?"

--ckpt is a model folder (save_pretrained, or a scripts/train.py output dir: its final/, best/ or latest checkpoint
is used) or an original XrayGPT .pth, whose encoder and LLM then come from --cfg (a YAML with a `model:` section).
Images: PNG/JPEG of any bit depth or mode, DICOM with the 'dicom' extra. A file that cannot be read is named on
stderr and skipped; the others are still summarised, and the exit status is 1 at the end. Decoding is greedy
unless --do-sample is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xraygpt.cli import USER_ERRORS, setup_logging
from xraygpt.conversation import DEFAULT_INSTRUCTION
from xraygpt.inference import generation_config, load_model, summarize_files
from xraygpt.model import GenerationConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = GenerationConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, DICOM ...)")
    p.add_argument("--ckpt", required=True, help="model folder or original .pth")
    p.add_argument("--cfg", help="YAML model config, needed to rebuild the frozen parts of an original .pth")
    p.add_argument("--question", default=DEFAULT_INSTRUCTION, help="instruction asked of every film (default: "
                                                                     "%(default)r)")
    p.add_argument("--json", metavar="OUT.jsonl", help="also write one JSON line per file (image, question, "
                                                       "summary, error)")
    p.add_argument("--batch-size", type=int, default=8, help="films per generation batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--num-beams", type=int, default=defaults.num_beams)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam decoding")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="only with --do-sample")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="only with --do-sample")
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def check_writable(path: Path) -> None:
    """Create the parent folder and make sure `path` can be written, leaving an existing file untouched."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise PermissionError(f"--json {path} cannot be written ({e.strerror or e}); choose a file in a folder "
                              f"you can write") from None


def run(args: argparse.Namespace) -> int:
    gen = generation_config(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty)
    torch.manual_seed(args.seed)
    if args.json:  # a bad output path is found before the model loads, not after
        check_writable(Path(args.json))
    model = load_model(args.ckpt, args.cfg, device=args.device)
    out = None
    if args.json:
        out = open(args.json, "w", encoding="utf-8")
    failed = []
    try:
        for result in summarize_files(model, args.images, question=args.question, batch_size=args.batch_size,
                                      progress=not args.no_progress, generation=gen):
            if out is not None:
                out.write(result.to_json() + "\n")
                out.flush()
            if result.ok:  # tqdm.write keeps the progress bar (stderr) intact
                tqdm.write(f"{result.image}: {result.summary}", file=sys.stdout)
            else:
                failed.append(result.image)
                tqdm.write(f"error: {result.error}", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} file(s) could not be read: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all summarised, 1 some file unreadable, 2 a usage error (bad checkpoint, config, flag)."""
    args = parse_args(argv)
    setup_logging()
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.debug or argv is not None:  # called from Python (tests, notebooks): keep the exception
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
