"""LLM loading: GGUF -> cached HF folder on the real SmolLM2, pad token, freezing, clear errors."""

import importlib.util
import time

import pytest
import torch

from xraygpt.llm import EMBEDDED_SMOLLM2, LLMConfig, convert_gguf_to_hf, load_llm, resolve_llm_path


@pytest.mark.slow
def test_gguf_conversion_matches_gguf_logits(smollm2_dir):
    """The cached plain folder gives the same logits as transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    from xraygpt.assets import smollm2_gguf

    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model, tok = load_llm(LLMConfig(name_or_path=str(smollm2_dir)))
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    ids = tok("The heart size is normal.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_embedded_name_reuses_cache(smollm2_dir):
    t0 = time.perf_counter()
    assert resolve_llm_path(EMBEDDED_SMOLLM2) == (str(smollm2_dir), True)
    assert convert_gguf_to_hf(__import__("xraygpt.assets").assets.smollm2_gguf()) == smollm2_dir
    assert time.perf_counter() - t0 < 5  # no second conversion (that takes ~20 s)


def test_load_llm_is_frozen_with_pad_token(smollm2_dir):
    model, tok = load_llm(LLMConfig(name_or_path=str(smollm2_dir)))
    assert tok.pad_token_id is not None
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_bf16_dtype(smollm2_dir):
    model, _ = load_llm(LLMConfig(name_or_path=str(smollm2_dir), dtype="bfloat16"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_vicuna_style_tokenizer_without_pad_gets_unk(tokenizer):
    from xraygpt.llm import ensure_pad_token

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.pad_token = None
    ensure_pad_token(tok)
    assert tok.pad_token == tok.unk_token == "<|endoftext|>"


def test_missing_local_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llm(LLMConfig(name_or_path=str(tmp_path / "no-such-model")))


def test_folder_without_config_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llm(LLMConfig(name_or_path=str(tmp_path)))


def test_hub_id_offline_is_clear():
    with pytest.raises(FileNotFoundError, match="local_files_only=false"):
        load_llm(LLMConfig(name_or_path="lmsys/vicuna-7b-v1.5"))


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        convert_gguf_to_hf(f, cache_root=tmp_path)


def test_bad_dtype_and_exclusive_quantization():
    with pytest.raises(ValueError, match="llm.dtype"):
        LLMConfig(dtype="float8").validate()
    with pytest.raises(ValueError, match="exclusive"):
        LLMConfig(load_in_4bit=True, load_in_8bit=True).validate()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed")
def test_8bit_without_bitsandbytes_is_clear(smollm2_dir):
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        load_llm(LLMConfig(name_or_path=str(smollm2_dir), load_in_8bit=True))


def test_conversion_leaves_the_callers_rng_alone(tmp_path):
    """A cold cache (conversion draws random init weights) and a warm one must give a seeded run the same RNG
    stream: measured before the fix, the demo's stage 1 trained a different projection on a cold cache."""
    from xraygpt.assets import smollm2_gguf

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    convert_gguf_to_hf(smollm2_gguf(), cache_root=tmp_path)  # a real conversion into an empty cache
    assert torch.equal(torch.rand(4), expected)


def test_auto_dtype_is_bf16_only_where_fast():
    from xraygpt.llm import auto_dtype, cpu_has_fast_bf16, torch_dtype

    assert torch_dtype("auto") == auto_dtype()
    if not torch.cuda.is_available():
        assert auto_dtype() == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    LLMConfig(dtype="auto").validate()
