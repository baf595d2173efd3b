"""Run logging: tqdm bar on the main process, metrics.jsonl per run, optional wandb (offline by default)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xraygpt.config import atomic_write_text

log = logging.getLogger(__name__)


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we restart from (they will be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class MetricsLogger:
    def __init__(self, output_dir: Path, cfg: Any, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.cfg = cfg
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        _truncate_after(self.path, resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.resume_step = resume_step

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def start(self, param_counts: dict[str, int], plan: Any) -> None:
        if not self.enabled:
            return
        run = self.cfg.run
        msg = (f"trainable params {param_counts['trainable']:,} | frozen {param_counts['frozen']:,} | "
               f"global batch {plan.global_batch} | {plan.steps_per_epoch} steps/epoch | steps {run.max_steps}")
        log.info(msg)
        print(msg, flush=True)
        if self.cfg.wandb.mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb_run = wandb.init(project=self.cfg.wandb.project, name=self.cfg.wandb.name,
                                            mode=self.cfg.wandb.mode, dir=str(self.path.parent),
                                            config=asdict(self.cfg), tags=list(self.cfg.wandb.tags),
                                            resume="allow")
            except Exception as e:  # logging must never kill a training run
                log.warning("wandb disabled: %s", e)
        if run.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.max_steps, initial=self.resume_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def step(self, step: int, *, loss: float, lr: float, samples_per_s: float, total: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, "lr": lr, "samples_per_s": round(samples_per_s, 3)}
        self._write(record)
        if self.wandb_run is not None:
            self.wandb_run.log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": samples_per_s}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.2f}")
        elif step % max(1, self.cfg.run.log_every) == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.4f} lr {lr:.3e} samples/s {samples_per_s:.2f}", flush=True)

    def validation(self, step: int, val_loss: float | None) -> None:
        if not self.enabled or val_loss is None:
            return
        self._write({"step": step, "val_loss": val_loss})
        if self.wandb_run is not None:
            self.wandb_run.log({"val/loss": val_loss}, step=step)
        msg = f"step {step}: validation loss {val_loss:.4f}"
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb_run.finish()
        self.file.close()
