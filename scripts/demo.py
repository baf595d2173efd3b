"""Web demo: upload a chest film, read the summary, ask follow-up questions (gradio, 'demo' extra).

    python scripts/demo.py --ckpt outputs/demo/stage2                    # http://127.0.0.1:7860
    python scripts/demo.py --ckpt xraygpt.pth --cfg configs/stage2.yaml --device cuda
    python scripts/demo.py --ckpt outputs/demo/stage2 --share            # public link: read the warning first

Binds 127.0.0.1 by default: medical images stay on this machine. --host 0.0.0.0 opens it to the network and
--share to the internet (gradio.live relay); both print a warning.
"""

from __future__ import annotations

import argparse
import sys

from xraygpt.cli import USER_ERRORS, setup_logging
from xraygpt.inference import load_model
from xraygpt.model import GenerationConfig
from xraygpt.web import DemoSettings, launch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model folder (save_pretrained / train.py output) or original .pth")
    p.add_argument("--cfg", help="YAML model config, needed to rebuild the frozen parts of an original .pth")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a PUBLIC gradio.live link (prints a warning)")
    p.add_argument("--max-new-tokens", type=int, default=GenerationConfig().max_new_tokens)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        model = load_model(args.ckpt, args.cfg, device=args.device)
        launch(model, host=args.host, port=args.port, share=args.share,
               settings=DemoSettings(max_new_tokens=args.max_new_tokens))
    except USER_ERRORS as e:
        if args.debug or argv is not None:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
