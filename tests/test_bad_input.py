"""Bad-input matrix: one row per broken input, across every entry point (train, eval, infer, data prep, demo,
from_pretrained). Each row asserts what the user sees:

* the message names the file, line or key at fault and says what to do (the row's regexes);
* it fails: a non-zero exit status and no traceback for a command-line entry point run as a subprocess, an
  exception for a library entry point; rows marked `works` (16-bit / palette PNG, non-UTF-8 XML, a report
  without sections) must instead succeed;
* nothing already written is corrupted: every file the row guards (an earlier run's checkpoints, a predictions
  file, a --json output) is byte-identical afterwards.

Command-line rows fail before or right after loading the tiny model, so the whole matrix runs in about a minute.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from test_eval_generate import model_dir  # noqa: F401  (module-scoped fixtures)
from test_train_recipe import make_cfg, toy_data  # noqa: F401

from xraygpt.assets import pediatric_cxr_jpegs

PY = sys.executable


# ------------------------------------------------------------------------------------------------ plumbing
@dataclass
class Result:
    failed: bool
    code: int | None  # exit status of a command-line run; None for a library call
    message: str


@dataclass
class Ctx:
    tmp: Path
    tiny_llm_dir: Path
    model_dir: Path
    trained_run: Path
    toy_data: Path
    guarded: dict[Path, bytes]

    def guard(self, *paths: Path) -> None:
        """Files (or every file under folders) that must be byte-identical after the failed run."""
        for p in paths:
            for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
                self.guarded[f] = f.read_bytes()

    def run_copy(self) -> Path:
        """A copy of a finished 2-step training run, its checkpoints guarded."""
        out = self.tmp / "run"
        shutil.copytree(self.trained_run, out)
        self.guard(out / "checkpoints", out / "final", out / "metrics.jsonl")
        return out


def cli(ctx: Ctx, *args: str, env: dict | None = None, preexec: Callable | None = None) -> Result:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                **(env or {})}
    proc = subprocess.run([PY, *args], cwd=ctx.tmp, env=full_env, capture_output=True, text=True, timeout=180,
                          preexec_fn=preexec)
    return Result(proc.returncode != 0, proc.returncode, proc.stderr + proc.stdout)


def lib(fn: Callable) -> Result:
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001  (the message is what the row checks)
        return Result(True, None, f"{type(e).__name__}: {e}")
    return Result(False, None, str(value))


def script(name: str) -> str:
    return str(REPO / "scripts" / name)


def train_args(ctx: Ctx, root: Path, out: Path, *extra: str) -> list[str]:
    return [script("train.py"), f"model.llm.name_or_path={ctx.tiny_llm_dir}", f"data.root={root}",
            "data.embedded=false", f"run.output_dir={out}", "run.device=cpu", "run.batch_size=2", "run.max_steps=4",
            "run.progress=false", "wandb.mode=disabled", "run.resume=auto", *extra]


def eval_args(ctx: Ctx, root: Path, out: Path, *extra: str) -> list[str]:
    return [script("eval_rouge.py"), f"ckpt={ctx.model_dir}", f"data.root={root}", "data.ann_file=filter_cap.json",
            "data.embedded=false", f"output_dir={out}", "batch_size=2", "generation.max_new_tokens=4",
            "metrics=[rouge]", "bootstrap=10", "device=cpu", "progress=false", *extra]


# ------------------------------------------------------------------------------------------------- inputs
def gray(seed: int, size=(48, 40)) -> np.ndarray:
    arr = (np.random.default_rng(seed).random(size[::-1]) * 255).astype(np.uint8)
    arr[0, 0], arr[-1, -1] = 0, 255  # full range, so 8-bit and 16-bit versions scale identically
    return arr


def dataset(ctx: Ctx, images: dict[str, Callable[[Path], None]], anns=None, name="data") -> Path:
    """<root>/image/<file> written by the given writers, and filter_cap.json (default: one entry per image)."""
    root = ctx.tmp / name
    (root / "image").mkdir(parents=True)
    for file, write in images.items():
        write(root / "image" / file)
    if anns is None:
        anns = [{"image_id": Path(f).stem, "caption": f"The lungs are clear in film {i}."}
                for i, f in enumerate(images)]
    (root / "filter_cap.json").write_text(anns if isinstance(anns, str) else json.dumps({"annotations": anns}))
    return root


def png8(seed: int) -> Callable[[Path], None]:
    return lambda p: Image.fromarray(gray(seed), "L").save(p)


def png16(seed: int) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        Image.fromarray(gray(seed).astype(np.uint16) * 257).save(p)
        assert Image.open(p).mode == "I;16"
    return write


def palette(seed: int) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        Image.fromarray(gray(seed), "L").convert("P").save(p)
        assert Image.open(p).mode == "P"
    return write


def zero_bytes(p: Path) -> None:
    p.write_bytes(b"")


def truncated_jpeg(p: Path) -> None:
    p.write_bytes(pediatric_cxr_jpegs()[0].read_bytes()[:3000])


def partial_predictions(out: Path, ids: list[str]) -> Path:
    """A predictions file an earlier (interrupted) run wrote."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.jsonl"
    path.write_text("".join(json.dumps({"image_id": i, "reference": "r", "prediction": f"earlier {i}"}) + "\n"
                            for i in ids))
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def report_xml(uid: str, findings: str | None, impression: str | None, image: str) -> str:
    parts = [f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in (("FINDINGS", findings),
                                                                            ("IMPRESSION", impression)) if v]
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="{uid}"/><MedlineCitation><Article>'
            f'<Abstract>{"".join(parts)}</Abstract></Article></MedlineCitation>'
            f'<parentImage id="{image}"/></eCitation>')


# ---------------------------------------------------------------------------------------------------- rows
def train_missing_image(ctx: Ctx) -> Result:
    anns = [{"image_id": "a", "caption": "x y"}, {"image_id": "ghost", "caption": "z"}]
    root = dataset(ctx, {"a.png": png8(0)}, anns)
    return cli(ctx, *train_args(ctx, root, ctx.run_copy()))


def train_zero_byte_image(ctx: Ctx) -> Result:
    from xraygpt.train.trainer import train

    root = dataset(ctx, {"a.png": png8(0), "b.png": png8(1), "empty.jpg": zero_bytes, "c.png": png8(2)})
    cfg = make_cfg(ctx.tiny_llm_dir, root, ctx.run_copy(), "run.resume=auto", "run.max_steps=4")
    cfg.data.val_ann_file = None
    return lib(lambda: train(cfg))


def train_resume_from_damaged_checkpoint(ctx: Ctx) -> Result:
    from xraygpt.train.trainer import train

    out = ctx.tmp / "run"
    shutil.copytree(ctx.trained_run, out)
    state = out / "checkpoints" / "step_000002" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a disk error after the checkpoint was committed
    ctx.guard(out / "final", out / "checkpoints" / "step_000002" / "model.safetensors")
    cfg = make_cfg(ctx.tiny_llm_dir, ctx.toy_data, out, "run.resume=auto", "run.max_steps=4")
    return lib(lambda: train(cfg))


def eval_truncated_jpeg(ctx: Ctx) -> Result:
    root = dataset(ctx, {"a.png": png8(0), "b.png": png8(1), "cut.jpg": truncated_jpeg, "d.png": png8(3)})
    out = ctx.tmp / "eval"
    ctx.guard(partial_predictions(out, ["a", "b"]))
    return cli(ctx, *eval_args(ctx, root, out))


def eval_16bit_png_works(ctx: Ctx) -> Result:
    from xraygpt.data.dataset import CaptionDataset
    from xraygpt.eval.generate import EvalConfig, EvalDataConfig, generate_predictions
    from xraygpt.model import GenerationConfig

    root = dataset(ctx, {"film8.png": png8(5), "film16.png": png16(5)})
    ds = CaptionDataset(root, root / "filter_cap.json")
    assert np.array_equal(np.asarray(ds[0]["image"]), np.asarray(ds[1]["image"]))  # read like its 8-bit twin
    cfg = EvalConfig(ckpt=str(ctx.model_dir), data=EvalDataConfig(root=str(root), ann_file="filter_cap.json",
                                                                   embedded=False),
                     generation=GenerationConfig(max_new_tokens=4), output_dir=str(ctx.tmp / "eval"), progress=False)
    result = lib(lambda: generate_predictions(cfg).read_text())
    a, b = (json.loads(line) for line in result.message.splitlines())
    assert a["prediction"] and a["prediction"] == b["prediction"]
    return result


def infer_palette_png_works(ctx: Ctx) -> Result:
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_script", script("infer.py"))
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    root = dataset(ctx, {"film8.png": png8(6), "filmP.png": palette(6)})
    out = ctx.tmp / "summaries.jsonl"
    result = lib(lambda: infer.main(["--ckpt", str(ctx.model_dir), str(root / "image" / "film8.png"),
                                     str(root / "image" / "filmP.png"), "--json", str(out), "--max-new-tokens", "4",
                                     "--no-progress", "--device", "cpu"]))
    assert result.message == "0"
    a, b = (json.loads(line) for line in out.read_text().splitlines())
    assert a["error"] is None and b["error"] is None and a["summary"] == b["summary"]
    return Result(False, 0, out.read_text())


def train_empty_caption(ctx: Ctx) -> Result:
    from xraygpt.train.trainer import train

    anns = [{"image_id": "a", "caption": "Clear lungs."}, {"image_id": "b", "caption": "   "}]
    root = dataset(ctx, {"a.png": png8(0), "b.png": png8(1)}, anns)
    cfg = make_cfg(ctx.tiny_llm_dir, root, ctx.run_copy(), "run.resume=auto", "run.max_steps=4")
    cfg.data.val_ann_file = None
    return lib(lambda: train(cfg))


def eval_annotation_missing_key(ctx: Ctx) -> Result:
    from xraygpt.eval.generate import EvalConfig, EvalDataConfig, generate_predictions

    root = dataset(ctx, {"a.png": png8(0), "b.png": png8(1)},
                   [{"image_id": "a", "caption": "Clear."}, {"image_id": "b", "report": "Clear."}])
    out = ctx.tmp / "eval"
    ctx.guard(partial_predictions(out, ["a"]))
    cfg = EvalConfig(ckpt=str(ctx.model_dir), data=EvalDataConfig(root=str(root), ann_file="filter_cap.json",
                                                                   embedded=False), output_dir=str(out), progress=False)
    return lib(lambda: generate_predictions(cfg))


def train_annotation_wrong_type(ctx: Ctx) -> Result:
    root = dataset(ctx, {"7.png": png8(0)}, [{"image_id": 7, "caption": "Clear."}])
    return cli(ctx, *train_args(ctx, root, ctx.run_copy()))


def eval_annotation_not_json(ctx: Ctx) -> Result:
    from xraygpt.eval.generate import EvalConfig, EvalDataConfig, generate_predictions

    root = dataset(ctx, {"a.png": png8(0)}, '{"annotations": [\n  {"image_id": "a", "caption": "x"},\n]}\n')
    cfg = EvalConfig(ckpt=str(ctx.model_dir), data=EvalDataConfig(root=str(root), ann_file="filter_cap.json",
                                                                   embedded=False),
                     output_dir=str(ctx.tmp / "eval"), progress=False)
    return lib(lambda: generate_predictions(cfg))


def train_yaml_unknown_key(ctx: Ctx) -> Result:
    cfg = write(ctx.tmp / "stage1.yaml", "run:\n  max_step: 3\n")
    return cli(ctx, script("train.py"), "--cfg", str(cfg))


def eval_yaml_misspelt_section(ctx: Ctx) -> Result:
    cfg = write(ctx.tmp / "eval.yaml", "generaton:\n  max_new_tokens: 5\n")
    return cli(ctx, script("eval_rouge.py"), "--cfg", str(cfg))


def train_yaml_wrong_type(ctx: Ctx) -> Result:
    cfg = write(ctx.tmp / "stage1.yaml", "run:\n  max_steps: ten\n")
    return cli(ctx, script("train.py"), "--cfg", str(cfg))


def data_prep_yaml_syntax_error(ctx: Ctx) -> Result:
    cfg = write(ctx.tmp / "openi.yaml", "dataset: openi\ncleaner: rules\nopeni:\n  reports: [a, b\n")
    return cli(ctx, "-m", "data_prep", "openi", "--cfg", str(cfg))


def eval_override_without_equals(ctx: Ctx) -> Result:
    return cli(ctx, script("eval_rouge.py"), "batch_size", "4")


def train_prompt_file_without_placeholder(ctx: Ctx) -> Result:
    prompts = write(ctx.tmp / "prompts.txt", "Describe the film.\nWhat do you see?\n")
    return cli(ctx, *train_args(ctx, ctx.tmp, ctx.run_copy(), f"data.prompt_file={prompts}"))


def infer_checkpoint_for_other_llm_width(ctx: Ctx) -> Result:
    pth = ctx.tmp / "xraygpt_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 256), "llama_proj.bias": torch.zeros(4096)}}, pth)
    cfg = write(ctx.tmp / "model.yaml", f"model:\n  llm:\n    name_or_path: {ctx.tiny_llm_dir}\n")
    earlier = write(ctx.tmp / "summaries.jsonl", '{"image": "old.png", "summary": "kept"}\n')
    ctx.guard(earlier)
    return cli(ctx, script("infer.py"), "--ckpt", str(pth), "--cfg", str(cfg), str(pediatric_cxr_jpegs()[0]),
               "--json", str(earlier), "--device", "cpu")


def infer_truncated_pth(ctx: Ctx) -> Result:
    from xraygpt.inference import load_model

    good = ctx.tmp / "good.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(64, 256), "llama_proj.bias": torch.zeros(64)}}, good)
    cut = write(ctx.tmp / "cut.pth", good.read_bytes()[:700])
    cfg = write(ctx.tmp / "model.yaml", f"model:\n  llm:\n    name_or_path: {ctx.tiny_llm_dir}\n")
    return lib(lambda: load_model(cut, cfg, device="cpu"))


def from_pretrained_truncated_weights(ctx: Ctx) -> Result:
    from xraygpt.model import XrayGPT

    folder = ctx.tmp / "model"
    shutil.copytree(ctx.model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return lib(lambda: XrayGPT.from_pretrained(folder))


def from_pretrained_broken_config(ctx: Ctx) -> Result:
    from xraygpt.model import XrayGPT

    folder = ctx.tmp / "model"
    shutil.copytree(ctx.model_dir, folder)
    config = folder / "xraygpt_config.json"
    config.write_text(config.read_text()[:-40])
    return lib(lambda: XrayGPT.from_pretrained(folder))


def demo_folder_without_config(ctx: Ctx) -> Result:
    (ctx.tmp / "empty_run").mkdir()
    return cli(ctx, script("demo.py"), "--ckpt", str(ctx.tmp / "empty_run"), "--device", "cpu")


def demo_cuda_without_gpu(ctx: Ctx) -> Result:
    return cli(ctx, script("demo.py"), "--ckpt", str(ctx.model_dir), "--device", "cuda")


def train_cuda_without_gpu(ctx: Ctx) -> Result:
    out = ctx.run_copy()
    args = [a for a in train_args(ctx, ctx.tmp, out) if a != "run.device=cpu"]
    return cli(ctx, *args, "run.device=cuda")


def train_output_dir_not_writable(ctx: Ctx) -> Result:
    blocker = write(ctx.tmp / "results.txt", "a file where a folder should be\n")
    ctx.guard(blocker)
    return cli(ctx, *train_args(ctx, ctx.tmp, blocker / "run"))


def data_prep_output_dir_not_writable(ctx: Ctx) -> Result:
    blocker = write(ctx.tmp / "data.txt", "a file\n")
    ctx.guard(blocker)
    return cli(ctx, "-m", "data_prep", "iu_embedded", "--cfg", str(REPO / "configs/data/iu_embedded.yaml"),
               f"output_dir={blocker / 'iu'}")


def infer_json_not_writable(ctx: Ctx) -> Result:
    blocker = write(ctx.tmp / "out", "a file\n")
    ctx.guard(blocker)
    return cli(ctx, script("infer.py"), "--ckpt", str(ctx.model_dir), "x.png", "--json", str(blocker / "s.jsonl"))


def _openi(ctx: Ctx, reports: dict[str, bytes]) -> tuple[Result, Path]:
    folder = ctx.tmp / "reports"
    for name, data in reports.items():
        write(folder / name, data)
    out = ctx.tmp / "openi"
    return cli(ctx, "-m", "data_prep", "openi", "--cfg", str(REPO / "configs/data/openi.yaml"), "cleaner=rules",
               f"openi.reports={folder}", f"output_dir={out}"), out


FINDINGS = "The heart size is normal. The lungs are clear without focal consolidation, effusion or pneumothorax."


def data_prep_non_utf8_xml_works(ctx: Ctx) -> Result:
    xml = report_xml("CXR1", FINDINGS.replace("normal", "normal (café-au-lait spot)"), "No acute disease.",
                     "CXR1_IM-0001-1001").replace('encoding="utf-8"', 'encoding="windows-1252"')
    result, out = _openi(ctx, {"1.xml": xml.encode("cp1252")})
    caps = json.loads((out / "filter_cap.json").read_text(encoding="utf-8"))["annotations"]
    assert len(caps) == 1 and "café-au-lait" in caps[0]["caption"]
    return result


def data_prep_report_without_sections(ctx: Ctx) -> Result:
    good = report_xml("CXR1", FINDINGS, "No acute disease.", "CXR1_IM-0001-1001")
    empty = report_xml("CXR2", None, None, "CXR2_IM-0002-1001")
    result, out = _openi(ctx, {"1.xml": good.encode(), "2.xml": empty.encode()})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["filter"]["no_findings"] == 1 and manifest["counts"]["filter"]["kept"] == 1
    return result


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child: a write past `limit` bytes fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def eval_disk_full(ctx: Ctx) -> Result:
    root = dataset(ctx, {f"{c}.png": png8(i) for i, c in enumerate("abcdef")})
    out = ctx.tmp / "eval"
    preds = partial_predictions(out, ["a", "b"])
    ctx.guard(preds)
    return cli(ctx, *eval_args(ctx, root, out), preexec=_file_size_limit(preds.stat().st_size + 50))


@dataclass
class Case:
    name: str
    entry: str
    run: Callable[[Ctx], Result]
    expect: tuple[str, ...]  # regexes the message must match: what is at fault, and what to do
    works: bool = False


CASES = [
    # name                          entry            how                                   message: the fault, the fix
    Case("missing image", "train", train_missing_image,
         (r"filter_cap.json: annotations\[1\] image_id 'ghost' has no image", r"data.on_missing=skip")),
    Case("zero-byte image", "train", train_zero_byte_image,
         (r"annotations\[2\] image_id 'empty'", r"empty.jpg is empty \(0 bytes\)", r"re-export")),
    Case("damaged checkpoint on resume", "train", train_resume_from_damaged_checkpoint,
         (r"step_000002/training_state.pt: cannot read it", r"delete .*step_000002 and resume from an earlier")),
    Case("truncated JPEG", "eval", eval_truncated_jpeg,
         (r"cut.jpg", r"annotations\[2\], image_id 'cut'", r"truncated", r"re-export")),
    Case("16-bit PNG", "eval", eval_16bit_png_works, (r'"image_id": "film16"',), works=True),
    Case("palette PNG", "infer", infer_palette_png_works, (r'filmP.png", .*"error": null',), works=True),
    Case("empty caption", "train", train_empty_caption,
         (r"filter_cap.json: annotations\[1\]\['caption'\] is empty \(image_id 'b'\)", r"fix or remove this entry")),
    Case("annotation missing key", "eval", eval_annotation_missing_key,
         (r"filter_cap.json: annotations\[1\] has no 'caption' \(keys: \['image_id', 'report'\]\)",
          r"fix or remove this entry")),
    Case("annotation wrong type", "train", train_annotation_wrong_type,
         (r"annotations\[0\]\['image_id'\] must be a string, found int: 7", r"fix or remove this entry")),
    Case("annotation not JSON", "eval", eval_annotation_not_json,
         (r"filter_cap.json:3:1: not valid JSON", r"fix the syntax there")),
    Case("YAML unknown key", "train", train_yaml_unknown_key,
         (r"stage1.yaml: unknown key 'run.max_step'", r"Did you mean 'max_steps'\?")),
    Case("YAML misspelt section", "eval", eval_yaml_misspelt_section,
         (r"eval.yaml: unknown key 'generaton'", r"Did you mean 'generation'\?")),
    Case("YAML wrong type", "train", train_yaml_wrong_type,
         (r"stage1.yaml: run.max_steps: expected an integer, got 'ten'",)),
    Case("YAML syntax error", "data-prep", data_prep_yaml_syntax_error,
         (r"openi.yaml: cannot parse YAML", r"line 4")),
    Case("override without '='", "eval", eval_override_without_equals,
         (r"override 'batch_size' must look like key=value",)),
    Case("prompt file without <ImageHere>", "train", train_prompt_file_without_placeholder,
         (r"prompts.txt: no line contains '<ImageHere>'", r"Each instruction line must hold one")),
    Case("checkpoint for another LLM width", "infer", infer_checkpoint_for_other_llm_width,
         (r"xraygpt_7b.pth: 'llama_proj.weight' has shape \(4096, 256\) but this model expects \(64, 256\)",
          r"trained for another encoder/LLM pair")),
    Case("truncated .pth", "infer", infer_truncated_pth,
         (r"cut.pth: not a readable torch checkpoint", r"download or export it again")),
    Case("truncated model.safetensors", "from_pretrained", from_pretrained_truncated_weights,
         (r"model.safetensors: cannot read the trained weights", r"copy it again")),
    Case("broken xraygpt_config.json", "from_pretrained", from_pretrained_broken_config,
         (r"xraygpt_config.json: not a valid JSON model config", r"re-save the model")),
    Case("model folder without config", "demo", demo_folder_without_config,
         (r"empty_run holds no xraygpt_config.json", r"--cfg <model yaml>")),
    Case("CUDA without a GPU", "demo", demo_cuda_without_gpu, (r"device=cuda but no CUDA", r"use --device cpu")),
    Case("CUDA without a GPU", "train", train_cuda_without_gpu,
         (r"run.device=cuda but no CUDA", r"use run.device=cpu")),
    Case("output dir not writable", "train", train_output_dir_not_writable,
         (r"run.output_dir .*results.txt/run is not writable \(Not a directory\)", r"choose another")),
    Case("output dir not writable", "data-prep", data_prep_output_dir_not_writable,
         (r"output_dir .*data.txt/iu is not writable", r"set output_dir=")),
    Case("--json not writable", "infer", infer_json_not_writable,
         (r"--json .*out/s.jsonl cannot be written", r"choose a file in a folder you can write")),
    Case("disk full", "eval", eval_disk_full,
         (r"cannot write predictions to .*predictions.jsonl \(File too large\)", r"free disk space",
          r"resumes after them")),
    Case("non-UTF-8 report XML", "data-prep", data_prep_non_utf8_xml_works, (r"kept 1",), works=True),
    Case("report with no sections", "data-prep", data_prep_report_without_sections,
         (r"2 reports: kept 1; dropped no_findings 1",), works=True),
]


@pytest.fixture(scope="module")
def trained_run(tiny_llm_dir, toy_data, tmp_path_factory):  # noqa: F811
    from xraygpt.train.trainer import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(make_cfg(tiny_llm_dir, toy_data, out, "run.max_steps=2"))
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry}: {c.name}" for c in CASES])
def test_bad_input(case, tmp_path, tiny_llm_dir, model_dir, trained_run, toy_data):  # noqa: F811
    ctx = Ctx(tmp_path, Path(tiny_llm_dir), Path(model_dir), trained_run, Path(toy_data), {})
    result = case.run(ctx)
    if case.works:
        assert not result.failed, result.message
    else:
        assert result.failed, f"expected a failure, got: {result.message[-2000:]}"
        if result.code is not None:  # a command: non-zero exit, one clear line, no traceback
            assert result.code not in (0, None) and "Traceback" not in result.message, result.message[-3000:]
    for pattern in case.expect:
        assert re.search(pattern, result.message), f"{pattern!r} not in:\n{result.message[-3000:]}"
    for path, data in ctx.guarded.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was changed by the failed run"


def test_matrix_covers_every_entry_point():
    assert len(CASES) >= 20
    assert {c.entry for c in CASES} >= {"train", "eval", "infer", "data-prep", "demo", "from_pretrained"}
