"""The LLM fine-tuning loop: conversations -> loss on the doctor's turns -> checkpoints -> merged HF folder.

Built from the vision recipe's parts (xraygpt.train): accelerator, output-dir guard, batch plan, AdamW groups,
warmup + cosine schedule, atomic step checkpoints with RNG state, metrics.jsonl + tqdm. So resume is exact (the
joined loss sequence equals an uninterrupted run bit for bit on CPU) and a step's loss is the mean over every
answer token of the global batch, whatever the process count.

Setup order, rejecting bad options before anything heavy loads:
options -> accelerator -> output dir -> data files -> model (+ init_from) -> tokenized data -> optimizer -> resume.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from xraygpt.config import atomic_write_text, save_config
from xraygpt.conversation import get_template
from xraygpt.llm_finetune import model as ft_model
from xraygpt.llm_finetune.config import FinetuneConfig
from xraygpt.llm_finetune.encode import ConversationEncoder, EncodedConversations, encode_file
from xraygpt.llm_finetune.radiology_conversations import (
    EMBEDDED_RADIOLOGY,
    embedded_root,
    parse_spec,
    write_radiology_conversations,
)
from xraygpt.processing import IGNORE_INDEX
from xraygpt.train import checkpoint as ckpt
from xraygpt.train.batches import BatchPlan
from xraygpt.train.metrics_log import MetricsLogger
from xraygpt.train.optim import build_optimizer
from xraygpt.train.schedule import build_scheduler
from xraygpt.train.trainer import (
    TrainingError,
    build_accelerator,
    loader_generator,
    prepare_output_dir,
    resume_training,
)

log = logging.getLogger(__name__)

MISSING_TRAIN_FILE = (
    "data.train_file is not set. Supply conversations in ShareGPT JSON ([{\"id\", \"conversations\": [{\"from\": "
    "\"human\"|\"gpt\", \"value\"}]}]): for the paper's first step, medical doctor-patient dialogues (e.g. "
    "ChatDoctor's HealthCareMagic/iCliniq sets, each record's patient question as the 'human' turn and the "
    "doctor's reply as the 'gpt' turn), as data.train_file=/path/medical_conversations.json; for the radiology "
    f"step on the embedded reports, data.train_file={EMBEDDED_RADIOLOGY}.")


def check_options(cfg: FinetuneConfig) -> None:
    """Reject what cannot work before any model or data loads."""
    if not cfg.data.train_file:
        raise TrainingError(MISSING_TRAIN_FILE)
    if cfg.run.feature_cache:
        raise TrainingError("run.feature_cache caches image features: it does not apply to text fine-tuning; "
                            "remove it (run.feature_cache=false)")
    if parse_spec(cfg.data.train_file) == "val":
        raise TrainingError(f"data.train_file={cfg.data.train_file} would train on the validation split; use "
                            f"{EMBEDDED_RADIOLOGY} (train split)")
    if cfg.data.val_file and parse_spec(cfg.data.val_file) == "train":
        raise TrainingError(f"data.val_file={cfg.data.val_file} is the training split; use "
                            f"{EMBEDDED_RADIOLOGY}:val")


class FinetuneTrainer:
    def __init__(self, cfg: FinetuneConfig):
        check_options(cfg)
        self.cfg = cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.accelerator = acc = build_accelerator(cfg)
        self.is_main = acc.is_main_process
        self.output_dir = prepare_output_dir(cfg) if self.is_main else Path(cfg.run.output_dir)
        acc.wait_for_everyone()
        self._check_total_batch()
        train_file, val_file = self._data_file(cfg.data.train_file), self._data_file(cfg.data.val_file)

        torch.manual_seed(cfg.run.seed)
        self.model, self.tokenizer, self.parent = ft_model.build_model(cfg)
        self.param_counts = ft_model.parameter_counts(self.model)
        if self.is_main:
            log.info("%s fine-tuning: trainable %s, frozen %s", cfg.model.method,
                     f"{self.param_counts['trainable']:,}", f"{self.param_counts['frozen']:,}")

        self.encoder = ConversationEncoder(self.tokenizer, get_template(cfg.data.template), cfg.data.max_len,
                                           cfg.data.pad_to_multiple_of)
        train, train_report = encode_file(train_file, self.encoder, cfg.data.limit, cfg.data.on_bad)
        self.train_set = EncodedConversations(train)
        self.val_set, val_report = None, None
        if val_file is not None:
            val, val_report = encode_file(val_file, self.encoder, cfg.data.val_limit, cfg.data.on_bad)
            self.val_set = EncodedConversations(val)
        self.data_report = {"train": train_report.to_dict(), "val": val_report.to_dict() if val_report else None}
        if self.is_main:
            atomic_write_text(self.output_dir / "data_report.json", json.dumps(self.data_report, indent=1) + "\n")

        self.plan = BatchPlan(len(self.train_set), cfg.run.batch_size, acc.num_processes, cfg.run.grad_accum,
                              cfg.run.seed, tuple(len(s.input_ids) for s in train), cfg.run.group_by_length)
        _ = self.plan.steps_per_epoch  # fail early if the data is smaller than one global batch
        self.optimizer = build_optimizer(self.model, cfg.optim)
        o = cfg.optim
        self.scheduler = build_scheduler(self.optimizer, init_lr=o.init_lr, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
                                         warmup_steps=o.warmup_steps, total_steps=cfg.run.max_steps)
        # The scheduler stays outside accelerate (prepared, it would step once per process), as in xraygpt.train.
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.state = ckpt.TrainerState()
        self._resume()
        self.logger = MetricsLogger(self.output_dir, cfg, enabled=self.is_main, resume_step=self.state.step)

    # -------------------------------------------------------------------------------------------- setup
    def _check_total_batch(self) -> None:
        run, n = self.cfg.run, self.accelerator.num_processes
        if run.total_batch_size is not None and run.total_batch_size != run.batch_size * n * run.grad_accum:
            raise TrainingError(f"run.total_batch_size={run.total_batch_size} but batch_size {run.batch_size} x "
                                f"processes {n} x grad_accum {run.grad_accum} = {run.batch_size * n * run.grad_accum}; "
                                f"adjust run.grad_accum or run.batch_size")

    def _data_file(self, spec: str | None) -> Path | None:
        """A ShareGPT file path; `embedded:radiology[:val]` is built into <output_dir>/data/ first (main process)."""
        if not spec:
            return None
        split = parse_spec(spec)
        if split is None:
            return Path(spec).expanduser()
        path = self.output_dir / "data" / f"radiology_{split}.json"
        if self.is_main:
            src = self.cfg.data.radiology
            write_radiology_conversations(embedded_root(src.embedded_dir, src.limit), split, path, src.seed,
                                          src.kinds, src.slot)
        self.accelerator.wait_for_everyone()
        return path

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _resume(self) -> None:
        state = resume_training(self.cfg.run.resume, self.output_dir, self.accelerator, self.optimizer,
                                self.scheduler, lambda target: ft_model.load_trainable(
                                    self._unwrapped(), target / ft_model.TRAINABLE_NAME))  # fmt: skip
        if state is not None:
            self.state = state

    # -------------------------------------------------------------------------------------------- steps
    def _loader(self, start: int, end: int) -> DataLoader:
        batches = list(self.plan.iter_micro_batches(start, end, self.accelerator.process_index))
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=self.encoder.collate,
                          generator=loader_generator())

    def _forward(self, batch: dict[str, torch.Tensor], num_items: torch.Tensor):
        inputs = {k: batch[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs, num_items_in_batch=num_items)  # loss = sum over answer tokens / num_items

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """One optimizer step over this rank's micro-batches; returns the global mean answer-token loss."""
        acc = self.accelerator
        self.model.train()
        n = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        num_items = acc.reduce(torch.tensor(float(n), device=acc.device), reduction="sum")
        loss_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro):
            with acc.no_sync(self.model) if i < len(micro) - 1 else nullcontext():
                loss = self._forward(batch, num_items).loss
                acc.backward(loss * acc.num_processes)  # DDP averages over processes; undo it for a global mean
            loss_sum += loss.detach().float()
        if self.cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(loss_sum, reduction="sum"))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean loss over the validation conversations (all processes)."""
        if self.val_set is None:
            return None
        acc, bs = self.accelerator, self.cfg.run.batch_size
        self.model.eval()
        mine = list(range(acc.process_index, len(self.val_set), acc.num_processes))
        batches = [[(0, i) for i in mine[j:j + bs]] for j in range(0, len(mine), bs)]
        total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        for batch in DataLoader(self.val_set, batch_sampler=batches, collate_fn=self.encoder.collate,
                                generator=loader_generator()):
            n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(acc.device).float()
            total += self._forward(batch, n).loss.float() * n
            count += n
        total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
        return float(total / count.clamp(min=1))

    # ------------------------------------------------------------------------------------------- saving
    def save_checkpoint(self) -> None:
        acc = self.accelerator
        tmp = ckpt.checkpoints_dir(self.output_dir) / f".tmp-{ckpt.step_dir_name(self.state.step)}"
        if self.is_main:
            tmp = ckpt.begin_checkpoint(self.output_dir, self.state.step)
        acc.wait_for_everyone()
        ckpt.save_training_state(tmp, self.optimizer, self.scheduler, acc.process_index, acc.is_main_process)
        acc.wait_for_everyone()
        if self.is_main:
            ft_model.save_trainable(self._unwrapped(), tmp / ft_model.TRAINABLE_NAME)
            protect = {ckpt.step_dir_name(self.state.best_step)} if self.state.best_step is not None else set()
            ckpt.commit_checkpoint(self.output_dir, self.state, tmp, self.cfg.run.keep_last, protect)
        acc.wait_for_everyone()

    def export(self) -> dict[str, str | None]:
        """final/ from the live weights (merged); best/ rebuilt from its checkpoint when it is another step."""
        out = {"final_dir": str(self.output_dir / "final"), "best_dir": None}
        if self.is_main:
            info = ft_model.lineage(self.cfg, self.parent, self.state.step)
            best = self.state.best_step
            if best is not None and best != self.state.step:
                torch.manual_seed(self.cfg.run.seed)
                model, tokenizer, _ = ft_model.build_model(self.cfg)
                step_dir = ckpt.checkpoints_dir(self.output_dir) / ckpt.step_dir_name(best)
                ft_model.load_trainable(model, step_dir / ft_model.TRAINABLE_NAME)
                ft_model.export_merged(model, tokenizer, self.output_dir / "best", {**info, "best_step": best})
                out["best_dir"] = str(self.output_dir / "best")
            elif best is not None:
                out["best_dir"] = out["final_dir"]
            ft_model.export_merged(self._unwrapped(), self.tokenizer, self.output_dir / "final", info)
        self.accelerator.wait_for_everyone()
        return out

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        start, end = self.state.step, cfg.run.max_steps
        stop = end if cfg.run.stop_after is None else min(end, start + cfg.run.stop_after)
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        self.logger.start(self.param_counts, self.plan)
        loader = iter(self._loader(start, stop))
        t0, samples_done, last_val = time.perf_counter(), 0, None
        for step in range(start, stop):
            micro = [next(loader) for _ in range(cfg.run.grad_accum)]
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step(micro)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower optim.init_lr or check data")
            self.state.step = step + 1
            samples_done += self.plan.global_batch
            self.logger.step(self.state.step, loss=loss, lr=lr,
                             samples_per_s=samples_done / max(time.perf_counter() - t0, 1e-9), total=end)
            is_last, improved = self.state.step == end, False
            due = is_last or (cfg.run.eval_every and self.state.step % cfg.run.eval_every == 0)
            if self.val_set is not None and due:
                last_val = self.evaluate()
                self.logger.validation(self.state.step, last_val)
                if self.state.best_val_loss is None or last_val < self.state.best_val_loss:
                    self.state.best_val_loss, self.state.best_step, improved = last_val, self.state.step, True
            periodic = cfg.run.save_every and self.state.step % cfg.run.save_every == 0
            if is_last or self.state.step == stop or periodic or improved:  # the best step keeps its checkpoint
                self.save_checkpoint()
        dirs = self.export() if self.state.step == end else {"final_dir": None, "best_dir": None}
        elapsed = time.perf_counter() - t0
        summary = {"steps": self.state.step, **dirs, "best_val_loss": self.state.best_val_loss,
                   "best_step": self.state.best_step, "last_val_loss": last_val, "train_seconds": elapsed,
                   "samples_per_s": samples_done / max(elapsed, 1e-9), "params": self.param_counts,
                   "data": {k: ({"used": v["used"], "skipped": v["skipped"]} if v else None)
                            for k, v in self.data_report.items()}}
        if self.is_main:
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.logger.close(summary)
        return summary


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Entry point used by scripts/finetune_llm.py."""
    return FinetuneTrainer(cfg).fit()
