"""Step checkpoints that are complete or absent, never half-written.

    <output_dir>/checkpoints/step_000100/   model.safetensors + xraygpt_config.json (the trained projection)
                                            training_state.pt  optimizer + scheduler; rng_<rank>.pt per process
                                            trainer_state.json  step, epoch, best validation loss
    <output_dir>/checkpoints/latest         text: name of the newest complete step dir (written atomically)

A step dir is written under a temp name and renamed into place, so a kill during a save leaves only a
`.tmp-*` folder that the next run deletes; `latest` is updated after the rename.

Test hook: `XRAYGPT_TEST_SLOW_SAVE=<seconds>` sleeps that long before each file of a step checkpoint, so the
kill/resume tests (tests/test_kill_resume.py) can land a SIGKILL inside a checkpoint write. Unset: no effect.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xraygpt.config import atomic_write_text
from xraygpt.model import refusal_reason

STEP_RE = re.compile(r"^step_(\d{6,})$")
LATEST = "latest"
STATE_NAME = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    best_val_loss: float | None = None
    best_step: int | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2) + "\n"


def slow_save_pause() -> None:
    """The `XRAYGPT_TEST_SLOW_SAVE` hook (see the module docstring); a no-op in normal runs."""
    delay = os.environ.get("XRAYGPT_TEST_SLOW_SAVE")
    if delay:
        time.sleep(float(delay))


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete step dirs, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The `latest` pointer if it names a complete dir, else the newest complete dir."""
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_NAME).is_file():
            return candidate
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def clean_partial(output_dir: Path) -> list[Path]:
    """Delete temp dirs left by a run killed mid-save."""
    root = checkpoints_dir(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """A fresh temp dir for the step's files (`accelerate.save_state` writes into it from every process)."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(output_dir: Path, state: TrainerState, tmp: Path, keep_last: int,
                      protect: set[str] = frozenset()) -> Path:
    """Mark the temp dir complete, rename it into place, move `latest`, prune old step dirs."""
    root = checkpoints_dir(output_dir)
    final = root / step_dir_name(state.step)
    slow_save_pause()
    atomic_write_text(tmp / STATE_NAME, state.to_json())  # last file: marks the dir complete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(root / LATEST, final.name + "\n")
    prune(output_dir, keep_last, set(protect) | {final.name})
    return final


def prune(output_dir: Path, keep_last: int, protect: set[str]) -> None:
    done = complete_checkpoints(output_dir)
    for p in done[: max(0, len(done) - keep_last)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_NAME).read_text()))


def save_training_state(folder: Path, optimizer, scheduler, rank: int, is_main: bool) -> None:
    """Optimizer/scheduler (main process) and this process's RNG states; plain tensors, loadable weights_only."""
    folder = Path(folder)
    slow_save_pause()
    if is_main:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   folder / "training_state.pt")
    slow_save_pause()
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / f"rng_{rank}.pt")


def load_tensors(path: Path):
    """torch.load(weights_only=True) with errors that name the file: pickled code is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to load it with weights_only=True ({refusal_reason(e)}). "
                         f"scripts/train.py writes plain tensors only, so this file was not written by it: delete "
                         f"{path.parent} and resume from an earlier checkpoint") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {str(e).strip()[:200]}); the checkpoint is "
                         f"damaged: delete {path.parent} and resume from an earlier checkpoint") from None


def load_training_state(folder: Path, optimizer, scheduler, rank: int) -> None:
    state = load_tensors(Path(folder) / "training_state.pt")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = Path(folder) / f"rng_{rank}.pt"
    if rng_file.is_file():  # absent when resuming with more processes than saved: fresh RNG is fine
        rng = load_tensors(rng_file)
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
