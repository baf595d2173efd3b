"""Stage 1 -> stage 2 on the embedded default, through the shipped demo configs and the real SmolLM2.

What `make demo` runs, cut down: the first 60 IU reports rendered into a temp folder, the stage-0 architecture
at its seeded initial weights with an untrained label head (what stage 0 writes as encoder_init.safetensors; no
stage-0 training needed), two optimizer steps per stage on batches of 2. It checks the
configs chain as shipped (stage 2 starts from stage 1's projection, same encoder and LLM) and that the result
loads and summarises a film.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded60(tmp_path_factory):
    from xraygpt.data.embedded import build_embedded_dataset

    return build_embedded_dataset(out_dir=tmp_path_factory.mktemp("embedded60"), limit=60)


@pytest.fixture(scope="module")
def untrained_encoder(embedded60, tmp_path_factory) -> Path:
    from xraygpt.config import load_config
    from xraygpt.encoders.pretrain import EncoderPretrainConfig, save_initial_encoder

    cfg = load_config(EncoderPretrainConfig, REPO / "configs" / "demo" / "stage0_encoder.yaml")
    classes = json.loads(embedded60.labels_file.read_text())["classes"]
    return save_initial_encoder(cfg, tmp_path_factory.mktemp("stage0") / "encoder_init.safetensors", classes)


def _train(stage: str, out: Path, data_root: Path, encoder: Path, *extra: str) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main(["--cfg", str(REPO / "configs" / "demo" / f"{stage}.yaml"), f"run.output_dir={out}",
                        f"model.encoder.checkpoint={encoder}", "data.embedded=false", f"data.root={data_root}",
                        "run.max_steps=2", "run.batch_size=2", "data.val_limit=2", "run.save_every=0",
                        "run.progress=false", "wandb.mode=disabled", "run.threads=2",
                        f"run.feature_cache_dir={out.parent / 'features'}", *extra])  # fmt: skip


def test_stage1_then_stage2_on_embedded_demo_configs(embedded60, untrained_encoder, tmp_path, smollm2_dir):
    from xraygpt.model import XrayGPT

    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _train("stage1", s1, embedded60.root, untrained_encoder)
    # stage 2 with a learning rate of ~0 must end where stage 1 ended: it really started from stage 1
    _train("stage2", s2, embedded60.root, untrained_encoder, f"run.init_from={s1}", "optim.init_lr=1e-12",
           "optim.warmup_lr=1e-12", "optim.min_lr=1e-12", "optim.max_grad_norm=0")  # fmt: skip
    w1 = load_file(s1 / "final" / "model.safetensors")
    w2 = load_file(s2 / "final" / "model.safetensors")
    assert set(w1) == {"llama_proj.weight", "llama_proj.bias"}
    assert w1["llama_proj.weight"].shape == (576, 128)  # SmolLM2 width x xray-vgg-tiny channels
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0)
    losses = [json.loads(line) for line in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and r["loss"] > 0 for r in losses)

    model = XrayGPT.from_pretrained(s2 / "final")
    cfg = json.loads((s2 / "final" / "xraygpt_config.json").read_text())["model"]
    assert cfg["encoder"]["name"] == "xray-vgg-tiny" and cfg["encoder"]["feature"] == "patch"
    assert cfg["llm"]["name_or_path"] == "embedded:smollm2"
    film = next((embedded60.root / "image").iterdir())
    text = model.summarize(film, max_new_tokens=8)
    assert isinstance(text, str) and text.strip()
