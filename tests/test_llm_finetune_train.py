"""LLM fine-tuning recipe on a tiny real LLaMA + the real SmolLM2 tokenizer: LoRA merge, loss, resume, chaining."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_tiny_llm
from safetensors.torch import load_file

from xraygpt.config import load_config
from xraygpt.llm import LLMConfig, load_llm
from xraygpt.llm_finetune.config import FinetuneConfig, LoraSettings
from xraygpt.llm_finetune.model import LINEAGE_NAME, IncompatibleInitError, apply_lora, export_merged
from xraygpt.llm_finetune.trainer import finetune

SYMPTOMS = ["a dry cough", "chest pain", "a fever", "shortness of breath", "a sore throat", "back pain"]
ADVICE = ["rest and drink fluids", "see a doctor today", "take paracetamol", "get a chest x-ray"]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """16 short two-turn medical conversations (ShareGPT)."""
    records = []
    for i in range(16):
        s, a = SYMPTOMS[i % len(SYMPTOMS)], ADVICE[i % len(ADVICE)]
        records.append({"id": f"m{i}", "conversations": [
            {"from": "human", "value": f"I have had {s} for {i + 2} days. What should I do?"},
            {"from": "gpt", "value": f"For {s}, {a}."},
            {"from": "human", "value": "Is it serious?"},
            {"from": "gpt", "value": "Usually not, but come back if it gets worse."}]})
    path = tmp_path_factory.mktemp("chat") / "medical.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def embedded40(tmp_path_factory):
    from xraygpt.data.embedded import build_embedded_dataset

    return build_embedded_dataset(out_dir=tmp_path_factory.mktemp("emb40"), limit=40, workers=1)


def make_cfg(llm_dir, train_file, out, *overrides) -> FinetuneConfig:
    base = [f"model.llm.name_or_path={llm_dir}", f"data.train_file={train_file}", f"run.output_dir={out}",
            "run.device=cpu", "run.batch_size=4", "run.max_steps=6", "optim.warmup_steps=1", "optim.init_lr=1e-2",
            "optim.min_lr=1e-3", "run.progress=false", "wandb.mode=disabled", "model.lora.r=4",
            "data.max_len=256"]
    return load_config(FinetuneConfig, None, base + list(overrides))


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_lora_merge_gives_adapter_logits(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)  # HF's default init scale (0.02), as in a real checkpoint; 4 layers of every linear kind
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    ids = tokenizer(["###Patient: Is my heart enlarged? ###Doctor: No.###"], return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits  # (1, L, V)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (peft starts B at zero)
        adapter_logits = peft_model.eval()(ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
    folder = export_merged(peft_model, tokenizer, tmp_path / "merged", {"base_model": "tiny"})
    assert not (folder / "adapter_config.json").exists()
    plain, tok = load_llm(LLMConfig(name_or_path=str(folder)))  # the rest of the codebase loads it as any LLM
    assert type(plain).__name__ == "LlamaForCausalLM" and tok.pad_token_id is not None
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapter_logits, atol=1e-5, rtol=0)


def test_radiology_finetune_loss_falls_and_output_is_a_plain_llm(tiny_llm_dir, embedded40, tmp_path):
    out = tmp_path / "rad"
    cfg = make_cfg(tiny_llm_dir, "embedded:radiology", out, "data.val_file=embedded:radiology:val",
                   f"data.radiology.embedded_dir={embedded40.root}", "run.max_steps=12", "data.max_len=384",
                   "run.batch_size=2", "optim.init_lr=3e-2")
    summary = finetune(cfg)
    seq = losses(out)
    assert len(seq) == 12 and sum(seq[-3:]) / 3 < sum(seq[:3]) / 3 - 1.0, seq  # > 1 nat lower
    assert summary["last_val_loss"] is not None and summary["last_val_loss"] < seq[0]
    assert (out / "data" / "radiology_train.json").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "data_report.json").read_text())["train"]["used"] > 15
    final = Path(summary["final_dir"])
    assert json.loads((final / LINEAGE_NAME).read_text())["base_model"] == str(tiny_llm_dir)
    tuned, base = load_file(final / "model.safetensors"), load_file(tiny_llm_dir / "model.safetensors")
    assert set(tuned) == set(base)
    for name, w in base.items():  # LoRA moved exactly the adapted linear layers
        adapted = any(f".{m}." in name for m in cfg.model.lora.target_modules)
        assert torch.equal(tuned[name], w) != adapted, name


@pytest.mark.parametrize("grouping", [[], ["run.group_by_length=2"]], ids=["shuffled", "length_grouped"])
def test_resume_is_bitwise_identical(tiny_llm_dir, chat_file, tmp_path, grouping):
    common = ["model.lora.dropout=0.1", *grouping]  # dropout draws random numbers: resume must restore the RNG too
    finetune(make_cfg(tiny_llm_dir, chat_file, tmp_path / "full", *common))
    first = finetune(make_cfg(tiny_llm_dir, chat_file, tmp_path / "split", *common, "run.stop_after=4",
                              "run.resume=auto"))
    assert first["steps"] == 4 and first["final_dir"] is None
    finetune(make_cfg(tiny_llm_dir, chat_file, tmp_path / "split", *common, "run.resume=auto"))
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bit for bit, as floats
    a = (tmp_path / "full" / "final" / "model.safetensors").read_bytes()
    b = (tmp_path / "split" / "final" / "model.safetensors").read_bytes()
    assert a == b


def test_full_then_lora_chain_and_base_mismatch_refused(tiny_llm_dir, chat_file, tokenizer, tmp_path):
    s1 = finetune(make_cfg(tiny_llm_dir, chat_file, tmp_path / "medical", "model.method=full", "run.max_steps=3",
                           "optim.init_lr=1e-3", "optim.min_lr=1e-4"))
    assert s1["params"]["frozen"] == 0
    w1 = load_file(Path(s1["final_dir"]) / "model.safetensors")
    w0 = load_file(tiny_llm_dir / "model.safetensors")
    assert not torch.equal(w1["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])
    tiny_lr = ["optim.init_lr=1e-9", "optim.warmup_lr=1e-9", "optim.min_lr=1e-9", "run.max_steps=1"]
    s2 = finetune(make_cfg(tiny_llm_dir, chat_file, tmp_path / "radiology", f"run.init_from={tmp_path / 'medical'}",
                           *tiny_lr))
    w2 = load_file(Path(s2["final_dir"]) / "model.safetensors")
    for name in w1:  # started from step 1's weights, not the base
        torch.testing.assert_close(w2[name], w1[name], atol=1e-6, rtol=0)
    chain = json.loads((Path(s2["final_dir"]) / LINEAGE_NAME).read_text())["chain"]
    assert [c["method"] for c in chain] == ["full", "lora"]
    other = tmp_path / "other_llm"
    make_tiny_llm(len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(IncompatibleInitError, match=r"fine-tuned from base model '.*tiny_llm.*', but this run names"):
        finetune(make_cfg(other, chat_file, tmp_path / "bad", f"run.init_from={tmp_path / 'medical'}", *tiny_lr))


def test_best_validation_step_is_kept_and_exported(tiny_llm_dir, chat_file, tmp_path):
    val = tmp_path / "val.json"  # unlike the training chats: its loss falls, then rises as training overfits
    val.write_text(json.dumps([{"id": f"v{i}", "conversations": [
        {"from": "human", "value": "Any news?"},
        {"from": "gpt", "value": f"Quantum {i} zebra xylophone orbit {7 * i}."}]} for i in range(4)]))
    out = tmp_path / "run"
    s = finetune(make_cfg(tiny_llm_dir, chat_file, out, f"data.val_file={val}", "run.eval_every=1", "model.method=full",
                          "optim.init_lr=1e-1", "optim.min_lr=1e-1", "run.keep_last=1"))
    vals = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert s["best_step"] == 1 + vals.index(min(vals)) == 3 and s["best_dir"] == str(out / "best")
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000003", "step_000006"]
    best, final = load_file(out / "best" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    kept = load_file(out / "checkpoints" / "step_000003" / "trainable.safetensors")
    assert set(kept) == set(best) and all(torch.equal(best[k], kept[k]) for k in kept)
    assert not torch.equal(best["model.embed_tokens.weight"], final["model.embed_tokens.weight"])
    assert json.loads((out / "best" / LINEAGE_NAME).read_text())["best_step"] == 3


def test_two_processes_match_one(tiny_llm_dir, chat_file, tmp_path):
    """torchrun, 2 CPU (gloo) ranks x batch 2 == 1 process x batch 4: the loss is the global answer-token mean."""
    common = [f"model.llm.name_or_path={tiny_llm_dir}", f"data.train_file={chat_file}", "run.device=cpu",
              "run.max_steps=3", "optim.warmup_steps=1", "optim.init_lr=1e-2", "run.progress=false",
              "wandb.mode=disabled", "run.threads=1", "model.lora.dropout=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
                    str(REPO / "scripts" / "finetune_llm.py"), *common, f"run.output_dir={tmp_path / 'ddp'}",
                    "run.batch_size=2"], check=True, env=env, cwd=REPO, timeout=300)
    finetune(load_config(FinetuneConfig, None, [*common, f"run.output_dir={tmp_path / 'one'}", "run.batch_size=4"]))
    assert len(losses(tmp_path / "ddp")) == 3
    torch.testing.assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-5, atol=0)
