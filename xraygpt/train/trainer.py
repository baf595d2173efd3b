"""The two-stage training recipe (stage 1 MIMIC, stage 2 OpenI from stage 1), single or multi-process.

Setup happens in dependency order and rejects bad options before any step runs:
config -> accelerator -> output dir -> model (+ init_from) -> data (+ feature cache) -> optimizer -> resume.

Loss normalisation: each optimizer step's loss is the mean over every answer token of the whole global batch
(all micro-batches, all processes), so 1 process x batch 8 and 2 processes x batch 4 give the same update.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from xraygpt.config import atomic_write_text, save_config
from xraygpt.conversation import default_prompt_file, read_prompt_file
from xraygpt.model import XrayGPT
from xraygpt.processing import IGNORE_INDEX
from xraygpt.train import checkpoint as ckpt
from xraygpt.train.batches import BatchPlan
from xraygpt.train.collate import InstructionDataset, TrainCollator
from xraygpt.train.config import TrainConfig
from xraygpt.train.data import build_datasets
from xraygpt.train.init import feature_sample, init_projection, scale_projection_to_embeddings
from xraygpt.train.metrics_log import MetricsLogger
from xraygpt.train.optim import build_optimizer
from xraygpt.train.schedule import build_scheduler

log = logging.getLogger(__name__)


def caption_lengths(dataset, tokenizer, max_txt_len: int) -> tuple[int, ...]:
    """Tokens of each sample's caption as the processor feeds it (cut at max_txt_len): what length grouping sorts."""
    captions = [dataset.record(i)["caption"] for i in range(len(dataset))]
    return tuple(min(len(ids), max_txt_len) for ids in tokenizer(captions, add_special_tokens=False)["input_ids"])


class TrainingError(RuntimeError):
    """A setup problem found before any step ran."""


def _check_device(cfg: TrainConfig) -> None:
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device=cuda but no CUDA/ROCm GPU is visible; use run.device=cpu (or auto)")
    if cfg.run.mixed_precision != "no":
        on_gpu = torch.cuda.is_available() and cfg.run.device != "cpu"
        if not on_gpu:
            raise TrainingError(f"run.mixed_precision={cfg.run.mixed_precision} needs a GPU; on CPU use "
                                f"run.mixed_precision=no")
        if cfg.run.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise TrainingError("run.mixed_precision=bf16 but this GPU has no bf16 support; use fp16")


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    _check_device(cfg)
    return Accelerator(cpu=cfg.run.device == "cpu", mixed_precision=cfg.run.mixed_precision)


def loader_generator() -> torch.Generator:
    """A DataLoader draws a seed from the global RNG each time it is iterated unless given its own generator; a
    resumed run iterates a new loader, so the global RNG (dropout, sampling) would drift from an uninterrupted run."""
    return torch.Generator().manual_seed(0)


def resume_training(resume: str, out: Path, accelerator, optimizer, scheduler,
                    load_weights: Callable[[Path], Any]) -> ckpt.TrainerState | None:
    """`run.resume` (never | auto | <checkpoint dir>): drop partial saves, find the checkpoint, restore the trained
    weights (`load_weights(step_dir)`, the trainer's own format), optimizer, scheduler and RNG; its state, or None."""
    if resume == "never":
        return None
    if accelerator.is_main_process:
        ckpt.clean_partial(out)
    accelerator.wait_for_everyone()
    target = ckpt.latest_checkpoint(out) if resume == "auto" else Path(resume)
    if target is None:
        log.info("run.resume=auto: no checkpoint in %s, starting fresh", out)
        return None
    if not (target / ckpt.STATE_NAME).is_file():
        raise TrainingError(f"run.resume={resume}: {target} is not a complete checkpoint")
    load_weights(target)
    ckpt.load_training_state(target, optimizer, scheduler, accelerator.process_index)
    state = ckpt.read_state(target)
    if accelerator.is_main_process:
        log.info("resumed from %s (step %d)", target, state.step)
    return state


def prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.run.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"run.output_dir {out} is not writable ({e.strerror}); choose another") from None
    existing = ckpt.latest_checkpoint(out)
    if existing is not None and cfg.run.resume == "never":
        raise TrainingError(
            f"run.output_dir {out} already holds checkpoints of a run (latest: {existing.name}). "
            f"Continue it with run.resume=auto, or choose another run.output_dir.")
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.accelerator = build_accelerator(cfg)
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.output_dir = prepare_output_dir(cfg) if self.is_main else Path(cfg.run.output_dir)
        acc.wait_for_everyone()
        if cfg.run.total_batch_size is not None:
            actual = cfg.run.batch_size * acc.num_processes * cfg.run.grad_accum
            if actual != cfg.run.total_batch_size:
                raise TrainingError(
                    f"run.total_batch_size={cfg.run.total_batch_size} but batch_size {cfg.run.batch_size} x "
                    f"processes {acc.num_processes} x grad_accum {cfg.run.grad_accum} = {actual}; adjust "
                    f"run.grad_accum or run.batch_size")
        prompt_file = cfg.data.prompt_file or str(default_prompt_file())
        self.prompts = read_prompt_file(prompt_file)

        torch.manual_seed(cfg.run.seed)
        self.model = XrayGPT(cfg.model)
        if cfg.run.init_from:
            init_projection(self.model, cfg.run.init_from)
        counts = self.model.parameter_counts()
        self.param_counts = counts
        if self.is_main:
            log.info("parameters: trainable %s, frozen %s", f"{counts['trainable']:,}", f"{counts['frozen']:,}")

        self.data = build_datasets(cfg, self.model, acc)
        if cfg.run.proj_init == "embedding_scale" and not cfg.run.init_from:  # same sample, same factor: every process
            scale_projection_to_embeddings(self.model, feature_sample(self.model, self.data.train,
                                                                      self.data.train_features))
        lengths = caption_lengths(self.data.train, self.model.tokenizer, cfg.model.max_txt_len) \
            if cfg.run.group_by_length else None
        self.plan = BatchPlan(len(self.data.train), cfg.run.batch_size, acc.num_processes, cfg.run.grad_accum,
                              cfg.run.seed, lengths, cfg.run.group_by_length)
        _ = self.plan.steps_per_epoch  # fail early if the dataset is smaller than one global batch
        self.train_set = InstructionDataset(self.data.train, self.prompts, cfg.run.seed, self.data.train_features)
        self.collate = TrainCollator(self.model.processor, cfg.data.pad_to_multiple_of)

        self.optimizer = build_optimizer(self.model, cfg.optim)
        o = cfg.optim
        self.scheduler = build_scheduler(self.optimizer, init_lr=o.init_lr, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
                                         warmup_steps=o.warmup_steps, total_steps=cfg.run.max_steps)
        # The scheduler stays outside accelerate: prepared, it would step once per process per call.
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.state = ckpt.TrainerState()
        self._resume()
        self.logger = MetricsLogger(self.output_dir, cfg, enabled=self.is_main, resume_step=self.state.step)

    # ------------------------------------------------------------------------------------------ resume
    def _resume(self) -> None:
        state = resume_training(self.cfg.run.resume, self.output_dir, self.accelerator, self.optimizer,
                                self.scheduler, lambda target: self._unwrapped().load_trainable(
                                    target / "model.safetensors"))  # fmt: skip
        if state is not None:
            self.state = state

    # -------------------------------------------------------------------------------------------- steps
    def _loader(self, start: int, end: int) -> DataLoader:
        batches = list(self.plan.iter_micro_batches(start, end, self.accelerator.process_index))
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=self.collate,
                          num_workers=self.cfg.data.num_workers, persistent_workers=False,
                          generator=loader_generator())

    def _global_token_count(self, micro: list[dict[str, Any]]) -> torch.Tensor:
        n = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        count = torch.tensor(float(n), device=self.accelerator.device)
        return self.accelerator.reduce(count, reduction="sum")

    def _forward(self, batch: dict[str, Any], num_items: torch.Tensor):
        keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_features")
        inputs = {k: batch[k].to(self.accelerator.device) for k in keys if k in batch}
        return self.model(**inputs, num_items_in_batch=num_items)

    def train_step(self, micro: list[dict[str, Any]]) -> float:
        """One optimizer step over this rank's micro-batches; returns the global mean token loss."""
        acc = self.accelerator
        self.model.train()
        num_items = self._global_token_count(micro)
        loss_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            ctx = acc.no_sync(self.model) if not last else _nullcontext()
            with ctx:
                loss = self._forward(batch, num_items).loss  # sum over my tokens / global token count
                # DDP averages gradients over processes; scale back so the global-token mean is exact.
                acc.backward(loss * acc.num_processes)
            loss_sum += loss.detach().float()
        if self.cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(loss_sum, reduction="sum"))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean validation loss over the validation set (all processes)."""
        if self.data.val is None:
            return None
        acc = self.accelerator
        self.model.eval()
        val_set = InstructionDataset(self.data.val, self.prompts, self.cfg.run.seed + 1, self.data.val_features)
        indices = list(range(acc.process_index, len(val_set), acc.num_processes))
        bs = self.cfg.run.batch_size
        batches = [[(0, i) for i in indices[j:j + bs]] for j in range(0, len(indices), bs)]
        loader = DataLoader(val_set, batch_sampler=batches, collate_fn=self.collate,
                            num_workers=self.cfg.data.num_workers, generator=loader_generator())
        total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        for batch in loader:
            n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(acc.device).float()
            out = self._forward(batch, n)
            total += out.loss.float() * n
            count += n
        total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
        return float(total / count.clamp(min=1))

    # ---------------------------------------------------------------------------------------- saving
    def _unwrapped(self) -> XrayGPT:
        return self.accelerator.unwrap_model(self.model)

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        tmp = ckpt.checkpoints_dir(self.output_dir) / f".tmp-{ckpt.step_dir_name(self.state.step)}"
        if self.is_main:
            tmp = ckpt.begin_checkpoint(self.output_dir, self.state.step)
        acc.wait_for_everyone()
        # Only trainable state: optimizer, scheduler, each process's RNG (never the frozen LLM's weights).
        ckpt.save_training_state(tmp, self.optimizer, self.scheduler, acc.process_index, acc.is_main_process)
        acc.wait_for_everyone()
        if self.is_main:
            ckpt.slow_save_pause()
            self._unwrapped().save_pretrained(tmp)
            protect = {ckpt.step_dir_name(self.state.best_step)} if self.state.best_step is not None else set()
            ckpt.commit_checkpoint(self.output_dir, self.state, tmp, self.cfg.run.keep_last, protect)
        acc.wait_for_everyone()

    def save_model(self, name: str) -> Path:
        path = self.output_dir / name
        if self.is_main:
            self._unwrapped().save_pretrained(path)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        start, end = self.state.step, cfg.run.max_steps
        stop = end if cfg.run.stop_after is None else min(end, start + cfg.run.stop_after)
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        self.logger.start(self.param_counts, self.plan)
        micro_per_step = cfg.run.grad_accum
        loader = iter(self._loader(start, stop))
        t0 = time.perf_counter()
        samples_done = 0
        last_val = None
        for step in range(start, stop):
            micro = [next(loader) for _ in range(micro_per_step)]
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step(micro)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower optim.init_lr or check data")
            self.state.step = step + 1
            samples_done += self.plan.global_batch
            elapsed = time.perf_counter() - t0
            self.logger.step(self.state.step, loss=loss, lr=lr, samples_per_s=samples_done / max(elapsed, 1e-9),
                             total=end)
            is_last = self.state.step == end
            due = bool(cfg.run.eval_every) and self.state.step % cfg.run.eval_every == 0
            if self.data.val is not None and (is_last or due):
                last_val = self.evaluate()
                self.logger.validation(self.state.step, last_val)
                if self.state.best_val_loss is None or last_val < self.state.best_val_loss:
                    self.state.best_val_loss, self.state.best_step = last_val, self.state.step
                    self.save_model("best")
            if is_last or self.state.step == stop or (cfg.run.save_every and self.state.step % cfg.run.save_every == 0):
                self.save_checkpoint()
        final = self.save_model("final") if self.state.step == end else None
        seconds = time.perf_counter() - t0
        summary = {"steps": self.state.step, "final_dir": str(final) if final else None,
                   "best_val_loss": self.state.best_val_loss, "best_step": self.state.best_step,
                   "last_val_loss": last_val, "train_seconds": seconds,
                   "samples_per_s": samples_done / max(seconds, 1e-9), "params": self.param_counts}
        if self.is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.logger.close(summary)
        return summary


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Entry point used by scripts/train.py."""
    return Trainer(cfg).fit()
