"""Shared fixtures: the real SmolLM2 tokenizer/model (converted once into a persistent cache) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The converted SmolLM2 folder is reused across test runs (a second `make test` skips the ~18 s conversion).
os.environ.setdefault("XRAYGPT_CACHE", str(REPO / ".cache" / "xraygpt"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from xraygpt.assets import smollm2_gguf
    from xraygpt.llm import convert_gguf_to_hf

    return convert_gguf_to_hf(smollm2_gguf())


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    from xraygpt.llm import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ensure_pad_token(tok)
    return tok


def make_tiny_llm(vocab_size: int, seed: int = 0, hidden: int = 64):
    """A randomly initialised LLaMA of the real class: 2 layers, hidden 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_tiny_xraygpt(tokenizer):
    """The embedded encoder (seeded random) + a tiny LLaMA, with a projection large enough (std 0.5) that the
    image visibly changes what is generated: the model the inference, chat and web-demo tests share."""
    from xraygpt.encoders import EncoderConfig, build_encoder
    from xraygpt.model import ModelConfig, XrayGPT

    torch.manual_seed(0)
    m = XrayGPT(ModelConfig(), encoder=build_encoder(EncoderConfig()), llm=make_tiny_llm(len(tokenizer)),
                tokenizer=tokenizer)
    torch.manual_seed(1)
    torch.nn.init.normal_(m.llama_proj.weight, std=0.5)
    return m


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory, tokenizer):
    """The tiny LLaMA saved as an HF folder with the real SmolLM2 tokenizer: what configs point model.llm at."""
    d = tmp_path_factory.mktemp("tiny_llm")
    make_tiny_llm(len(tokenizer), seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def tiny_llm(tokenizer):
    return make_tiny_llm(len(tokenizer))
