"""Every YAML in configs/ loads into its schema, starts with its launch command, and says what it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from xraygpt.config import load_config
from xraygpt.eval.generate import EvalConfig
from xraygpt.train.config import TrainConfig

CONFIGS = REPO / "configs"


def schema_for(path: Path):
    rel = path.relative_to(CONFIGS).as_posix()
    if rel.startswith("ablation/"):
        from xraygpt.ablation import AblationConfig

        return AblationConfig
    if rel.startswith("data/"):
        from data_prep.config import DataPrepConfig

        return DataPrepConfig
    if rel.split("/")[-1].startswith("stage0_encoder"):
        from xraygpt.encoders.pretrain import EncoderPretrainConfig

        return EncoderPretrainConfig
    if rel.endswith("eval.yaml"):
        return EvalConfig
    if rel == "judge.yaml":
        from xraygpt.eval.judge import JudgeConfig

        return JudgeConfig
    if rel.startswith("llm/"):
        from xraygpt.llm_finetune.config import FinetuneConfig

        return FinetuneConfig
    if rel.startswith("accelerate/"):
        return None
    return TrainConfig


ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL}
    assert {"stage1.yaml", "stage2.yaml", "eval.yaml", "demo/stage1.yaml", "demo/stage2.yaml", "demo/eval.yaml",
            "accelerate/ddp_4gpu.yaml", "accelerate/fsdp_4gpu.yaml", "accelerate/deepspeed_zero2.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_yaml_loads_and_starts_with_launch_command(path):
    first_lines = path.read_text().splitlines()[:4]
    assert any(line.startswith("#") and ("python" in line or "accelerate launch" in line) for line in first_lines)
    schema = schema_for(path)
    if schema is None:
        assert isinstance(yaml.safe_load(path.read_text()), dict)
        return
    cfg = load_config(schema, path)
    assert cfg is not None


def test_paper_scale_batch_sizes():
    s1 = load_config(TrainConfig, CONFIGS / "stage1.yaml")
    s2 = load_config(TrainConfig, CONFIGS / "stage2.yaml")
    assert s1.run.total_batch_size == s1.run.batch_size * 4 * s1.run.grad_accum == 128
    assert s2.run.total_batch_size == 32 and s2.run.init_from.endswith("stage1")
    assert (s1.optim.warmup_lr, s1.optim.init_lr, s1.optim.min_lr, s1.optim.warmup_steps) == (1e-6, 1e-4, 8e-5, 500)
    assert (s2.optim.warmup_lr, s2.optim.init_lr, s2.optim.min_lr, s2.optim.warmup_steps) == (1e-6, 3e-5, 1e-5, 200)


def test_env_vars_override_paths(monkeypatch):
    monkeypatch.setenv("XRAYGPT_MIMIC", "/scratch/mimic")
    monkeypatch.setenv("XRAYGPT_OUT", "/scratch/runs")
    cfg = load_config(TrainConfig, CONFIGS / "stage1.yaml")
    assert cfg.data.root == "/scratch/mimic" and cfg.run.output_dir == "/scratch/runs/stage1"
