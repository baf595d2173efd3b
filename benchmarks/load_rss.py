"""By hand (and by tests/test_load.py): peak memory of inference and evaluation does not grow with the number of films.

    XRAYGPT_CACHE=.cache/xraygpt nice -n 10 python benchmarks/load_rss.py [--out benchmarks/results/load_rss.json]

Each run is its own process, so its peak resident memory is exact: `ru_maxrss` from `wait4` on the child.
* `scripts/infer.py` over the first 100 and the first 500 films of the embedded test split (one --json line each);
* `scripts/eval_rouge.py` (generation + ROUGE table) over the first 100 and all 700 samples of that split.
Both stream: films are decoded one batch at a time and each batch's output is written before the next, so the
larger run may only differ from the smaller one by noise, not by a per-film amount.

Model: the shipped tiny ViT (`xray-vit-tiny`, seeded random) + a tiny random LLaMA (hidden 64, 2 layers, the
SmolLM2 tokenizer), saved with `save_pretrained`: the model is small so the runs are short and any per-film
growth would stand out against it. Greedy, 8 new tokens, batch 16, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "load_rss.json"
INFER_SIZES = (100, 500)
EVAL_SIZES = (100, None)  # None: the whole test split
BATCH_SIZE = 16
MAX_NEW_TOKENS = 8


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A saved XrayGPT: the shipped tiny ViT + a random 2-layer LLaMA (hidden 64) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from xraygpt.assets import smollm2_gguf
    from xraygpt.llm import LLMConfig, convert_gguf_to_hf, ensure_pad_token
    from xraygpt.model import ModelConfig, XrayGPT

    folder = Path(folder)
    llm_dir = folder / "tiny_llm"
    tok = AutoTokenizer.from_pretrained(convert_gguf_to_hf(smollm2_gguf()))
    ensure_pad_token(tok)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    model = XrayGPT(ModelConfig(llm=LLMConfig(name_or_path=str(llm_dir))))
    torch.nn.init.normal_(model.llama_proj.weight, std=0.5)
    return model.save_pretrained(folder / "model")


def test_split() -> tuple[Path, list[Path]]:
    """The embedded dataset's root and the image files of its test split, in split order."""
    from xraygpt.data.dataset import CaptionDataset
    from xraygpt.data.embedded import build_embedded_dataset

    root = Path(build_embedded_dataset().root)
    ds = CaptionDataset(root, root / "splits" / "test.json")
    return root, [ds.image_path(i) for i in range(len(ds))]


def run_measured(cmd: list[str], log: Path, threads: int = 1) -> dict:
    """Run a command as a child process; its exit code, wall time and peak RSS (MiB, from wait4)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "log": str(log)}  # ru_maxrss is in KiB on Linux


def measure_infer(model_dir: Path, films: list[Path], n: int, work: Path) -> dict:
    out = work / f"infer_{n}.jsonl"
    cmd = [sys.executable, str(REPO / "scripts" / "infer.py"), "--ckpt", str(model_dir), *map(str, films[:n]),
           "--json", str(out), "--batch-size", str(BATCH_SIZE), "--max-new-tokens", str(MAX_NEW_TOKENS),
           "--no-progress", "--device", "cpu"]
    result = run_measured(cmd, work / f"infer_{n}.log")
    result.update(entry="scripts/infer.py", films=n, outputs=str(out))
    return result


def measure_eval(model_dir: Path, n: int | None, work: Path) -> dict:
    name = f"eval_{n or 'all'}"
    cmd = [sys.executable, str(REPO / "scripts" / "eval_rouge.py"), f"ckpt={model_dir}", "data.embedded=true",
           "data.ann_file=splits/test.json", f"data.limit={'null' if n is None else n}", f"output_dir={work / name}",
           f"batch_size={BATCH_SIZE}", f"generation.max_new_tokens={MAX_NEW_TOKENS}", "metrics=[rouge]",
           "bootstrap=10", "device=cpu", "progress=false"]
    result = run_measured(cmd, work / f"{name}.log")
    result.update(entry="scripts/eval_rouge.py", films=n, outputs=str(work / name / "predictions.jsonl"))
    return result


def measure_all(work: Path) -> dict:
    """Build the tiny model, run the four measured processes, return the figures (growth = large - small)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_model(work)
    _, films = test_split()
    infer = [measure_infer(model_dir, films, n, work) for n in INFER_SIZES]
    evals = [measure_eval(model_dir, n, work) for n in EVAL_SIZES]
    evals[-1]["films"] = len(films)
    return {
        "infer": infer, "eval": evals,
        "infer_growth_mib": round(infer[-1]["peak_rss_mib"] - infer[0]["peak_rss_mib"], 1),
        "eval_growth_mib": round(evals[-1]["peak_rss_mib"] - evals[0]["peak_rss_mib"], 1),
        "settings": {"batch_size": BATCH_SIZE, "max_new_tokens": MAX_NEW_TOKENS, "device": "cpu", "threads": 1,
                     "model": "xray-vit-tiny (random) + LLaMA hidden 64, 2 layers (random)"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "load_rss")
    args = parser.parse_args()
    result = measure_all(args.work)
    for r in result["infer"] + result["eval"]:
        print(f"{r['entry']:24s} {r['films']:4d} films: peak RSS {r['peak_rss_mib']:7.1f} MiB, {r['seconds']:6.1f} s, "
              f"exit {r['returncode']}")
    print(f"growth: infer {result['infer_growth_mib']} MiB, eval {result['eval_growth_mib']} MiB")
    for r in result["infer"] + result["eval"]:
        r.pop("log"), r.pop("outputs")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    result.update(machine=machine,
                  date=time.strftime("%Y-%m-%d"), command="XRAYGPT_CACHE=.cache/xraygpt python benchmarks/load_rss.py")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
