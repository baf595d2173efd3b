"""Stage chaining: start a run's projection from an earlier stage (our output dir / model dir, or an original .pth)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xraygpt.model import CONFIG_NAME, WEIGHTS_NAME, XrayGPT
from xraygpt.train import checkpoint as ckpt

log = logging.getLogger(__name__)


class IncompatibleInitError(ValueError):
    """The checkpoint was trained for another encoder or LLM."""


def find_model_dir(source: Path) -> Path:
    """A folder holding xraygpt_config.json: the source itself, its final/ or best/, or its latest checkpoint."""
    if (source / CONFIG_NAME).is_file():
        return source
    for name in ("final", "best"):
        if (source / name / CONFIG_NAME).is_file():
            return source / name
    latest = ckpt.latest_checkpoint(source)
    if latest is not None and (latest / CONFIG_NAME).is_file():
        return latest
    raise FileNotFoundError(f"run.init_from={source}: no trained model found there (looked for {CONFIG_NAME} in it, "
                            f"in final/, best/ and in its latest checkpoint)")


def _identity(model_cfg: dict) -> tuple[str, str]:
    enc = model_cfg["encoder"]
    encoder = f"{enc['type']}:{enc['name']}" + (f" ({enc['checkpoint']})" if enc.get("checkpoint") else "")
    return encoder, model_cfg["llm"]["name_or_path"]


def init_projection(model: XrayGPT, source: str | Path) -> Path:
    """Load the trained projection from `source` into `model`, refusing another encoder/LLM pair."""
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"run.init_from={source} does not exist")
    if source.is_file():
        model.load_original_checkpoint(source)
        log.info("projection initialised from original checkpoint %s", source)
        return source
    folder = find_model_dir(source)
    saved = json.loads((folder / CONFIG_NAME).read_text())["model"]
    theirs = _identity(saved)
    ours = _identity({"encoder": vars(model.config.encoder), "llm": vars(model.config.llm)})
    if theirs != ours:
        raise IncompatibleInitError(
            f"run.init_from={folder} was trained with encoder {theirs[0]} and LLM {theirs[1]}, but this run uses "
            f"encoder {ours[0]} and LLM {ours[1]}. Point model.encoder / model.llm at the same ones, or train "
            f"stage 1 again for this pair.")
    model.load_trainable(folder / WEIGHTS_NAME)
    log.info("projection initialised from %s", folder)
    return folder
