"""scripts/infer.py on a saved tiny model: mixed good and bad files, 16-bit PNG, JSONL, exit codes, checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from xraygpt.assets import pediatric_cxr_jpegs
from xraygpt.config import ConfigError
from xraygpt.inference import load_model
from xraygpt.llm import LLMConfig
from xraygpt.model import ModelConfig, XrayGPT

SCRIPT = REPO / "scripts" / "infer.py"
FAST = ["--max-new-tokens", "5", "--no-progress"]


def _load_script():
    spec = importlib.util.spec_from_file_location("infer_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infer = _load_script()


@pytest.fixture(scope="module")
def model_dir(tiny_llm_dir, tmp_path_factory):
    torch.manual_seed(0)
    m = XrayGPT(ModelConfig(llm=LLMConfig(name_or_path=str(tiny_llm_dir))))
    torch.nn.init.normal_(m.llama_proj.weight, std=0.5)
    return m.save_pretrained(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two readable films (a real JPEG, a 16-bit PNG) and three bad files, in a mixed order."""
    d = tmp_path_factory.mktemp("films")
    jpeg = pediatric_cxr_jpegs()[0]
    gray = np.asarray(Image.open(jpeg).convert("L").resize((96, 80)))
    gray = ((gray.astype(np.float64) - gray.min()) * 255 / (gray.max() - gray.min())).round().astype(np.uint8)
    Image.fromarray(gray, "L").save(d / "film8.png")
    Image.fromarray(gray.astype(np.uint16) * 16 + 64).save(d / "film16.png")  # 12-bit values in a 16-bit PNG
    assert Image.open(d / "film16.png").mode == "I;16"
    (d / "report.png").write_text("this is a text file, not an image")
    (d / "cut.jpg").write_bytes(jpeg.read_bytes()[:2000])
    return {"jpeg": jpeg, "film8": d / "film8.png", "film16": d / "film16.png", "text": d / "report.png",
            "cut": d / "cut.jpg", "missing": d / "missing.png"}


def test_mixed_good_and_bad_files(model_dir, files, tmp_path, capsys):
    order = [files["text"], files["jpeg"], files["missing"], files["film16"], files["cut"]]
    out = tmp_path / "out" / "summaries.jsonl"
    code = infer.main(["--ckpt", str(model_dir), *map(str, order), "--json", str(out), "--batch-size", "2", *FAST])
    assert code == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in order]  # one line per file, in order
    ok = {r["image"]: r for r in records if r["error"] is None}
    assert sorted(ok) == sorted([str(files["jpeg"]), str(files["film16"])])
    assert all(r["summary"] and r["question"] == "Describe the given chest x-ray image in detail."
               for r in ok.values())
    bad = [r for r in records if r["error"] is not None]
    for r in bad:
        assert r["summary"] is None and Path(r["image"]).name in r["error"]
    # the same summaries as the Python API on the same model
    model = load_model(model_dir, device="cpu")
    assert model.summarize([files["jpeg"], files["film16"]], max_new_tokens=5) == \
        [ok[str(files["jpeg"])]["summary"], ok[str(files["film16"])]["summary"]]
    captured = capsys.readouterr()
    assert f"{files['jpeg']}: {ok[str(files['jpeg'])]['summary']}" in captured.out
    for name in ("report.png", "missing.png", "cut.jpg"):
        assert name in captured.err
    assert "3 of 5 file(s) could not be read" in captured.err


def test_sixteen_bit_png_reads_like_its_eight_bit_twin(model_dir, files, tmp_path):
    out = tmp_path / "o.jsonl"
    code = infer.main(["--ckpt", str(model_dir), str(files["film8"]), str(files["film16"]), "--json", str(out),
                       "--question", "Is the heart enlarged?", *FAST])
    assert code == 0
    a, b = [json.loads(line) for line in out.read_text().splitlines()]
    assert a["summary"] and a["summary"] == b["summary"] and a["question"] == "Is the heart enlarged?"


def test_original_pth_with_model_yaml(model_dir, tiny_llm_dir, files, tmp_path, capsys):
    model = load_model(model_dir, device="cpu")
    pth = model.export_original_checkpoint(tmp_path / "xraygpt.pth")
    cfg = tmp_path / "stage2.yaml"
    cfg.write_text(f"model:\n  llm:\n    name_or_path: {tiny_llm_dir}\n  template: xraygpt\nrun:\n  seed: 1\n")
    code = infer.main(["--ckpt", str(pth), "--cfg", str(cfg), str(files["jpeg"]), *FAST])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"{files['jpeg']}: {model.summarize(files['jpeg'], max_new_tokens=5)}"
    cfg.write_text(f"model:\n  llm:\n    name_or_path: {tiny_llm_dir}\n  tempalte: xraygpt\n")
    with pytest.raises(ConfigError, match="tempalte.*template"):  # names the unknown key and the closest valid one
        infer.main(["--ckpt", str(pth), "--cfg", str(cfg), str(files["jpeg"]), *FAST])


def test_checkpoint_folder_without_config_is_named(tmp_path):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_run holds no xraygpt_config.json .* --cfg <model yaml>"):
        infer.main(["--ckpt", str(tmp_path / "empty_run"), "x.png", *FAST])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=240)


def test_exit_codes_and_progress_bar_in_a_real_process(model_dir, files, tmp_path):
    proc = run_cli("--ckpt", str(model_dir), str(files["jpeg"]), str(files["text"]), "--max-new-tokens", "3")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith(f"{files['jpeg']}: ")
    assert "report.png" in proc.stderr and "summarise: 100%" in proc.stderr  # tqdm bar on stderr
    proc = run_cli("--ckpt", str(tmp_path), str(files["jpeg"]))
    assert proc.returncode == 2
    assert f"error: FileNotFoundError: {tmp_path} holds no xraygpt_config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
