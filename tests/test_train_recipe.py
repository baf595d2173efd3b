"""The training recipe end to end on a tiny real LLaMA + the shipped tiny encoder + a toy PNG dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_llm
from PIL import Image

from xraygpt.config import load_config
from xraygpt.train.config import TrainConfig
from xraygpt.train.trainer import TrainingError, train

CAPTIONS = ["The lungs are clear. No acute disease.", "Small right pleural effusion.",
            "Heart size is enlarged. Mild edema.", "Left lower lobe opacity, likely pneumonia."]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    (root / "image").mkdir()
    rng = np.random.default_rng(0)
    anns = []
    for i in range(24):
        arr = (rng.random((64, 64)) * 255).astype(np.uint8)
        arr[:, : 8 * (i % 4 + 1)] = 255  # class-dependent bright band
        Image.fromarray(arr, "L").save(root / "image" / f"img{i}.png")
        anns.append({"image_id": f"img{i}", "caption": CAPTIONS[i % 4]})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": anns[:16]}))
    (root / "val.json").write_text(json.dumps({"annotations": anns[16:]}))
    return root


def make_cfg(tiny_llm_dir, toy_data, out, *overrides):
    base = [f"model.llm.name_or_path={tiny_llm_dir}", f"data.root={toy_data}", "data.val_ann_file=val.json",
            f"run.output_dir={out}", "run.device=cpu", "run.batch_size=4", "run.max_steps=6",
            "optim.warmup_steps=2", "optim.init_lr=1e-2", "optim.min_lr=1e-3", "run.progress=false",
            "wandb.mode=disabled", f"run.feature_cache_dir={out}/../features", "data.embedded=false"]
    return load_config(TrainConfig, None, base + list(overrides))


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_train_changes_only_projection_and_loss_falls(tiny_llm_dir, toy_data, tmp_path):
    from xraygpt.model import XrayGPT

    cfg = make_cfg(tiny_llm_dir, toy_data, tmp_path / "run", "run.max_steps=12")
    summary = train(cfg)
    seq = losses(tmp_path / "run")
    assert len(seq) == 12 and seq[-1] < seq[0]
    trained = XrayGPT.from_pretrained(summary["final_dir"])
    fresh = XrayGPT(cfg.model)
    for name, tensor in trained.state_dict().items():
        same = torch.equal(tensor, fresh.state_dict()[name])
        assert same != name.startswith("llama_proj"), name  # projection changed, everything else identical
    assert summary["params"]["trainable"] == 256 * 64 + 64
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "best").is_dir()


def test_resume_is_bitwise_identical(tiny_llm_dir, toy_data, tmp_path):
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "full"))
    part = make_cfg(tiny_llm_dir, toy_data, tmp_path / "split", "run.stop_after=4", "run.resume=auto")
    first = train(part)
    assert first["final_dir"] is None and first["steps"] == 4
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "split", "run.resume=auto"))
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bit for bit, as floats
    a = (tmp_path / "full" / "final" / "model.safetensors").read_bytes()
    b = (tmp_path / "split" / "final" / "model.safetensors").read_bytes()
    assert a == b


def test_feature_cache_gives_same_losses(tiny_llm_dir, toy_data, tmp_path):
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "live"))
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "cached", "run.feature_cache=true"))
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "live"), rtol=1e-5)
    cache = list((tmp_path / "features").glob("*/COMPLETE"))
    assert len(cache) == 2  # train + val
    # a second run reuses it; touching an image invalidates it
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "cached2", "run.feature_cache=true"))
    assert len(list((tmp_path / "features").glob("*/COMPLETE"))) == 2


def test_grad_accum_matches_bigger_batch(tiny_llm_dir, toy_data, tmp_path):
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "b8", "run.batch_size=8", "run.max_steps=3"))
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "b4x2", "run.batch_size=4", "run.grad_accum=2",
                   "run.max_steps=3"))
    np.testing.assert_allclose(losses(tmp_path / "b4x2"), losses(tmp_path / "b8"), rtol=1e-5)


def test_two_processes_match_single_process(tiny_llm_dir, toy_data, tmp_path):
    """torchrun with 2 CPU (gloo) ranks x batch 4 == 1 process x batch 8, same global batch."""
    common = [f"model.llm.name_or_path={tiny_llm_dir}", f"data.root={toy_data}", "run.device=cpu",
              "run.max_steps=3", "optim.warmup_steps=1", "optim.init_lr=1e-2", "run.progress=false",
              "wandb.mode=disabled", "data.embedded=false", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    str(REPO / "scripts" / "train.py"), *common, f"run.output_dir={tmp_path / 'ddp'}",
                    "run.batch_size=4"], check=True, env=env, cwd=REPO, timeout=300)
    train(load_config(TrainConfig, None, common + [f"run.output_dir={tmp_path / 'single'}", "run.batch_size=8"]))
    np.testing.assert_allclose(losses(tmp_path / "ddp"), losses(tmp_path / "single"), rtol=1e-5)


def test_refuses_output_dir_with_other_run(tiny_llm_dir, toy_data, tmp_path):
    train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "run", "run.max_steps=2"))
    with pytest.raises(TrainingError, match="already holds checkpoints.*run.resume=auto"):
        train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "run", "run.max_steps=2"))


def test_cuda_or_bf16_without_gpu_fails_before_any_step(tiny_llm_dir, toy_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="run.device=cuda but no CUDA"):
        train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "a", "run.device=cuda"))
    with pytest.raises(TrainingError, match="needs a GPU"):
        train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "b", "run.mixed_precision=bf16"))
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_stage2_init_from_stage1_and_mismatch_refused(tiny_llm_dir, toy_data, tmp_path, tokenizer):
    from safetensors.torch import load_file

    s1 = train(make_cfg(tiny_llm_dir, toy_data, tmp_path / "s1", "run.max_steps=2"))
    s2 = make_cfg(tiny_llm_dir, toy_data, tmp_path / "s2", f"run.init_from={tmp_path / 's1'}", "run.max_steps=1",
                  "optim.init_lr=1e-9", "optim.warmup_lr=1e-9", "optim.min_lr=1e-9", "optim.max_grad_norm=0")
    train(s2)
    w1 = load_file(Path(s1["final_dir"]) / "model.safetensors")["llama_proj.weight"]
    w2 = load_file(tmp_path / "s2" / "final" / "model.safetensors")["llama_proj.weight"]
    torch.testing.assert_close(w2, w1, atol=1e-6, rtol=0)  # started from stage 1 (tiny lr barely moves it)
    other = tmp_path / "other_llm"
    make_tiny_llm(len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    bad = make_cfg(other, toy_data, tmp_path / "s2b", f"run.init_from={tmp_path / 's1'}", "run.max_steps=1")
    with pytest.raises(ValueError,
                       match=r"trained with encoder open_clip:xray-vit-tiny and LLM .*tiny_llm.*this run uses"):
        train(bad)


def test_missing_image_named(tiny_llm_dir, toy_data, tmp_path):
    root = tmp_path / "data"
    (root / "image").mkdir(parents=True)
    Image.new("L", (32, 32)).save(root / "image" / "a.png")
    (root / "filter_cap.json").write_text(json.dumps({"annotations": [
        {"image_id": "a", "caption": "x y"}, {"image_id": "ghost", "caption": "z"}]}))
    cfg = make_cfg(tiny_llm_dir, root, tmp_path / "run")
    cfg.data.val_ann_file = None
    with pytest.raises(FileNotFoundError, match="ghost"):
        train(cfg)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_proj_init_embedding_scale_starts_image_embeds_at_the_word_norm(tiny_llm_dir, toy_data, tmp_path, cache):
    from xraygpt.train.init import feature_sample
    from xraygpt.train.trainer import Trainer

    default = Trainer(make_cfg(tiny_llm_dir, toy_data, tmp_path / "a", f"run.feature_cache={cache}"))
    scaled = Trainer(make_cfg(tiny_llm_dir, toy_data, tmp_path / "b", f"run.feature_cache={cache}",
                              "run.proj_init=embedding_scale"))
    m = scaled._unwrapped()
    features = feature_sample(m, scaled.data.train, scaled.data.train_features)  # (16, T, D_img)
    words = m.llm.get_input_embeddings().weight.norm(dim=-1).mean()
    with torch.no_grad():
        start = m.project(features).norm(dim=-1).mean()
        factor = scaled.model.llama_proj.weight / default.model.llama_proj.weight  # same seed: one factor
    torch.testing.assert_close(start, words, rtol=1e-4, atol=0)
    assert torch.allclose(factor, factor.flatten()[0]) and float(factor.flatten()[0]) != 1.0
    with pytest.raises(ValueError, match=r"run\.proj_init must be default\|embedding_scale, got"):
        make_cfg(tiny_llm_dir, toy_data, tmp_path / "c", "run.proj_init=xavier")
