"""Kill and resume with real processes: `scripts/train.py` and `scripts/eval_rouge.py` are SIGKILLed at seeded random
points (inside a training step, inside a checkpoint write, between generation batches) and rerun.

Training: the joined loss sequence equals an uninterrupted run bit for bit (CPU, one thread) and the checkpoint
`latest` names is complete at every kill. Evaluation: the predictions file holds each id exactly once, with the
same text as an uninterrupted run. (Data prep's kill/resume test is tests/test_data_prep_resume.py.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_eval_generate import model_dir  # noqa: F401  (module-scoped fixtures)
from test_train_recipe import toy_data  # noqa: F401

from xraygpt.train import checkpoint as ckpt

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
MAX_STEPS = 8
SAVE_EVERY = 3
CHECKPOINT_FILES = {"model.safetensors", "xraygpt_config.json", "training_state.pt", "rng_0.pt", ckpt.STATE_NAME}


def train_cmd(tiny_llm_dir, toy_data, out: Path) -> list[str]:  # noqa: F811
    return [sys.executable, str(REPO / "scripts" / "train.py"), f"model.llm.name_or_path={tiny_llm_dir}",
            f"data.root={toy_data}", "data.embedded=false", f"run.output_dir={out}", "run.device=cpu",
            "run.batch_size=4", f"run.max_steps={MAX_STEPS}", f"run.save_every={SAVE_EVERY}", "run.keep_last=2",
            "optim.warmup_steps=2", "optim.init_lr=1e-2", "optim.min_lr=1e-3", "run.progress=false",
            "wandb.mode=disabled", "run.threads=1", "run.resume=auto"]


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def assert_latest_is_complete(out: Path) -> Path | None:
    """`latest` (pointer or newest step dir) is a whole checkpoint whose files all load."""
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return None
    assert {p.name for p in latest.iterdir()} >= CHECKPOINT_FILES, sorted(p.name for p in latest.iterdir())
    pointer = ckpt.checkpoints_dir(out) / ckpt.LATEST
    if pointer.exists():
        assert (ckpt.checkpoints_dir(out) / pointer.read_text().strip()) == latest
    assert set(load_file(latest / "model.safetensors")) == {"llama_proj.weight", "llama_proj.bias"}
    state = torch.load(latest / "training_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler"}
    step = ckpt.read_state(latest).step
    assert step % SAVE_EVERY == 0 or step == MAX_STEPS
    return latest


@pytest.fixture(scope="module")
def reference_losses(tiny_llm_dir, toy_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(train_cmd(tiny_llm_dir, toy_data, out), check=True, env=ENV, cwd=REPO, capture_output=True,
                   timeout=300)
    seq = losses(out)
    assert len(seq) == MAX_STEPS
    return seq, (out / "final" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("where,seed", [("step", 0), ("checkpoint", 1)])
def test_train_sigkill_then_resume_is_bitwise_identical(where, seed, tiny_llm_dir, toy_data, tmp_path,  # noqa: F811
                                                        reference_losses):
    rng = random.Random(seed)
    out = tmp_path / "run"
    cmd = train_cmd(tiny_llm_dir, toy_data, out)
    env = dict(ENV)
    if where == "checkpoint":
        env["XRAYGPT_TEST_SLOW_SAVE"] = "0.4"  # the test hook in xraygpt/train/checkpoint.py
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if where == "step":
            # after step k is logged the process is inside step k+1 (k not a save step); plus a seeded delay
            k = rng.choice([s for s in range(SAVE_EVERY + 1, MAX_STEPS - 1) if s % SAVE_EVERY])
            wait_for(lambda: lines_in(out / "metrics.jsonl") >= k, proc, f"step {k}")
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            # inside the write of a step checkpoint after 0..3 of its files (a seeded random file boundary)
            step = rng.choice([*range(2 * SAVE_EVERY, MAX_STEPS, SAVE_EVERY), MAX_STEPS])  # one save done before
            tmp = ckpt.checkpoints_dir(out) / f".tmp-{ckpt.step_dir_name(step)}"
            n_files = rng.randint(0, 3)
            wait_for(lambda: tmp.is_dir() and len(list(tmp.iterdir())) >= n_files, proc, f"{n_files} files in {tmp}")
            time.sleep(0.05)
        kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if where == "checkpoint":
        assert tmp.is_dir()  # the kill did land inside the write
        assert not (ckpt.checkpoints_dir(out) / ckpt.step_dir_name(step)).exists()
    latest = assert_latest_is_complete(out)
    assert latest is not None  # killed after at least one complete save
    assert not (out / "final").exists()

    resumed = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest}" in resumed.stderr
    assert not [p for p in ckpt.checkpoints_dir(out).iterdir() if p.name.startswith(".tmp-")]  # partial one removed
    assert_latest_is_complete(out)
    ref_losses, ref_final = reference_losses
    assert losses(out) == ref_losses  # bit for bit, as floats
    assert (out / "final" / "model.safetensors").read_bytes() == ref_final


# ------------------------------------------------------------------------------------------------ evaluation
def eval_cmd(model_dir, toy_data, out: Path) -> list[str]:  # noqa: F811
    return [sys.executable, str(REPO / "scripts" / "eval_rouge.py"), f"ckpt={model_dir}", f"data.root={toy_data}",
            "data.ann_file=filter_cap.json", "data.embedded=false", f"output_dir={out}", "batch_size=1",
            "generation.max_new_tokens=16", "metrics=[rouge]", "bootstrap=20", "device=cpu", "threads=1",
            "progress=false"]


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("seed", [0])
def test_eval_sigkill_then_resume_writes_each_id_once(seed, model_dir, toy_data, tmp_path):  # noqa: F811
    full = tmp_path / "full"
    subprocess.run(eval_cmd(model_dir, toy_data, full), check=True, env=ENV, cwd=REPO, capture_output=True,
                   timeout=300)
    reference = read_predictions(full / "predictions.jsonl")
    n = len(json.loads((toy_data / "filter_cap.json").read_text())["annotations"])
    assert len(reference) == n

    out = tmp_path / "killed"
    preds = out / "predictions.jsonl"
    rng = random.Random(seed)
    k = rng.randrange(2, n - 4)  # lines written before the kill
    proc = subprocess.Popen(eval_cmd(model_dir, toy_data, out), env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: lines_in(preds) >= k, proc, f"{k} predictions")
        time.sleep(rng.uniform(0.0, 0.01))
        kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before = lines_in(preds)
    assert k <= done_before < n and not (out / "table.md").exists()

    resumed = subprocess.run(eval_cmd(model_dir, toy_data, out), env=ENV, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done_before} predictions already done" in resumed.stderr
    got = read_predictions(preds)
    ids = [r["image_id"] for r in got]
    assert len(ids) == len(set(ids)) == n  # each id exactly once
    by_id = {r["image_id"]: r["prediction"] for r in got}
    assert by_id == {r["image_id"]: r["prediction"] for r in reference}
    assert (out / "table.md").is_file()
