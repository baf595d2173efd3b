"""Security: no pickled code is ever run, API keys stay in the environment, image ids stay inside the image
folder, the web demo stays on this machine, and MIMIC-CXR text does not leave it without the user's statement."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from openai_server import FakeOpenAIServer
from test_data_prep_mimic import FIXTURE_STUDIES, write_mimic_tree
from test_eval_generate import model_dir  # noqa: F401  (module-scoped fixtures)
from test_train_recipe import make_cfg, toy_data  # noqa: F401

from xraygpt.config import ConfigError, load_config
from xraygpt.data.dataset import AnnotationError, CaptionDataset

SOURCE_DIRS = ("xraygpt", "scripts", "data_prep", "benchmarks")
OPENAI_CANARY = "sk-canary-security-7d3b9e1f0a2c4e6b8d0f"
WANDB_CANARY = "wandbcanary" + "5e8c1a7f3d9b2e4a6c0f8d1b3e5a7c9f0b2d"  # 40+ characters, like a real wandb key


# ------------------------------------------------------------------------------------- pickles never run
def torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for every torch.load(...) call in a source file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_the_source_uses_weights_only():
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    found, unsafe = 0, []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for line, safe in torch_load_calls(path):
            found += 1
            if not safe:
                unsafe.append(f"{path.relative_to(REPO)}:{line}")
        # no other way in for pickled code either
        for pattern in (r"\bpickle\.loads?\(", r"\bdill\.", r"\bcloudpickle\.", r"\byaml\.load\(",
                        r"\byaml\.unsafe_load"):
            assert not re.search(pattern, text), f"{path.relative_to(REPO)} uses {pattern}"
    assert found >= 4  # the .pth import, the encoder loader, the training state, the clinical model
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


class WritesMarker:
    """Unpickling this calls open(marker, 'w'): the file appears if and only if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def evil(tmp_path):
    """A .pth whose unpickling would create `marker`; checked to be live with a plain (unsafe) torch.load."""
    marker = tmp_path / "PWNED"
    probe = tmp_path / "probe.pth"
    torch.save({"model": {"x": WritesMarker(tmp_path / "probe_ran")}}, probe)
    torch.load(probe, weights_only=False)  # the payload does run when code is allowed...
    assert (tmp_path / "probe_ran").exists()
    path = tmp_path / "xraygpt.pth"
    torch.save({"model": {"llama_proj.weight": WritesMarker(marker), "llama_proj.bias": torch.zeros(64)}}, path)
    yield path, marker
    assert not marker.exists(), "a pickled payload was executed"  # ...and never from our loaders


def test_pth_import_refuses_pickled_code(evil, tiny_llm_dir):  # noqa: F811
    from xraygpt.inference import load_model

    path, marker = evil
    cfg = path.parent / "model.yaml"
    cfg.write_text(f"model:\n  llm:\n    name_or_path: {tiny_llm_dir}\n")
    with pytest.raises(ValueError, match=r"xraygpt.pth: refusing to load .*weights_only=True.*it would call "
                                         r"(io|builtins)\.open.* from code you trust") as err:
        load_model(path, cfg, device="cpu")
    assert "weights_only` set to `False`" not in str(err.value)  # torch's advice to turn the check off is dropped


def test_encoder_checkpoint_refuses_pickled_code(evil):
    from xraygpt.encoders import EncoderConfig, build_encoder

    path, marker = evil
    with pytest.raises(ValueError,
                       match=r"Could not read checkpoint .*xraygpt.pth with torch.load\(weights_only=True\)"):
        build_encoder(EncoderConfig(type="open_clip", name="xray-vit-tiny", checkpoint=str(path)))


@pytest.fixture(scope="module")
def trained_run(tiny_llm_dir, toy_data, tmp_path_factory):  # noqa: F811
    from xraygpt.train.trainer import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(make_cfg(tiny_llm_dir, toy_data, out, "run.max_steps=2"))
    return out


@pytest.mark.parametrize("victim", ["training_state.pt", "rng_0.pt"])
def test_training_resume_refuses_pickled_code(victim, evil, trained_run, tiny_llm_dir, toy_data, tmp_path):  # noqa: F811
    from xraygpt.train.trainer import train

    path, marker = evil
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    step = out / "checkpoints" / "step_000002"
    shutil.copy(path, step / victim)
    with pytest.raises(ValueError, match=rf"{victim}: refusing to load it .*it would call (io|builtins)\.open.*"
                                         r"delete .*step_000002"):
        train(make_cfg(tiny_llm_dir, toy_data, out, "run.max_steps=4", "run.resume=auto"))


# ------------------------------------------------------------------------------------ keys from env only
def leaks(root: Path, *texts: str, canaries=(OPENAI_CANARY, WANDB_CANARY)) -> list[str]:
    """Every file under root (and each text) that holds a canary, byte for byte."""
    found = [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
             and any(c.encode() in p.read_bytes() for c in canaries)]
    return found + [f"<output {i}>" for i, t in enumerate(texts) if any(c in t for c in canaries)]


def canary_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": OPENAI_CANARY, "WANDB_API_KEY": WANDB_CANARY,
            "XRAYGPT_CACHE": str(tmp_path / "xraygpt_cache"), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("key_in_url", [False, True])
def test_data_prep_llm_run_keeps_the_key_in_the_environment(key_in_url, tmp_path):
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES)
    out = tmp_path / "out"
    with FakeOpenAIServer(responder=lambda body: "The lungs are clear. No acute disease.") as server:
        url = server.base_url
        if key_in_url:  # credentials pasted into the URL's user-info part must not be persisted either
            url = url.replace("http://", f"http://user:{OPENAI_CANARY}@")
        cmd = [sys.executable, "-m", "data_prep", "mimic", "--cfg", str(REPO / "configs/data/mimic.yaml"),
               f"output_dir={out}", f"mimic.reports={cfg.reports}", f"mimic.split_csv={cfg.split_csv}",
               f"mimic.metadata_csv={cfg.metadata_csv}", f"llm.endpoint.base_url={url}",
               "llm.endpoint.concurrency=2", f"llm.endpoint.cache_dir={tmp_path / 'cache'}"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=canary_env(tmp_path), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert server.calls >= 3
        if not key_in_url:
            assert {r["key"] for r in server.requests} == {OPENAI_CANARY}  # sent, from the environment
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["llm"]["endpoint"]["api_key_env"] == "OPENAI_API_KEY"  # the name, not the value
    assert (tmp_path / "cache").is_dir() and (out / "progress.jsonl").is_file()
    assert leaks(tmp_path, proc.stdout, proc.stderr) == []


def test_training_run_keeps_keys_out_of_config_logs_wandb_and_checkpoints(tiny_llm_dir, toy_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"model.llm.name_or_path={tiny_llm_dir}",
           f"data.root={toy_data}", "data.embedded=false", "data.val_ann_file=val.json", f"run.output_dir={out}",
           "run.device=cpu", "run.batch_size=4", "run.max_steps=2", "run.progress=false", "wandb.mode=offline",
           "run.threads=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=canary_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"max_steps" in runs[0].read_bytes()  # wandb did record the config
    assert (out / "config.yaml").is_file() and list((out / "checkpoints").glob("step_*/training_state.pt"))
    assert leaks(tmp_path, proc.stdout, proc.stderr) == []


@pytest.mark.parametrize("where,yaml_text,schema", [
    ("data prep", "llm:\n  endpoint:\n    api_key: {key}\n", "data_prep"),
    ("data prep", "llm:\n  endpoint:\n    api_key_env: {key}\n", "data_prep"),
    ("training", "wandb:\n  api_key: {key}\n", "train"),
    ("GPT judge", "endpoint:\n  openai_api_key: {key}\n", "judge"),
])
def test_a_key_written_into_a_config_is_refused_and_never_echoed(where, yaml_text, schema, tmp_path):
    from data_prep.config import DataPrepConfig
    from xraygpt.eval.judge import JudgeConfig
    from xraygpt.train.config import TrainConfig

    cls = {"data_prep": DataPrepConfig, "train": TrainConfig, "judge": JudgeConfig}[schema]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text.format(key=OPENAI_CANARY))
    with pytest.raises(ValueError) as err:  # ConfigError / ChatConfigError
        load_config(cls, path)
    message = str(err.value)
    assert OPENAI_CANARY not in message
    assert re.search(r"unknown key '.*(api_key|openai_api_key)'|must be the NAME of an environment variable", message)


# ------------------------------------------------------------------------------ ids stay in the image root
ESCAPES = ["../x", "../../etc/passwd", "/etc/passwd", "..\\..\\x", "C:\\Windows\\win", "a/../../x",
           "\\\\server\\share\\x"]


@pytest.mark.parametrize("image_id", ESCAPES)
def test_image_id_outside_the_image_folder_is_refused(image_id, tmp_path):
    root = tmp_path / "data"
    (root / "image").mkdir(parents=True)
    (tmp_path / "x.png").write_bytes(b"not read")  # what ../x would reach
    (root / "ann.json").write_text(json.dumps({"annotations": [{"image_id": image_id, "caption": "c"}]}))
    with pytest.raises(AnnotationError, match=r"ann.json: annotations\[0\]\['image_id'\] .* points outside the image "
                                              r"folder; ids must be relative names"):
        CaptionDataset(root, root / "ann.json")


def test_symlink_out_of_the_image_folder_is_refused_in_eval(model_dir, tmp_path):  # noqa: F811
    from xraygpt.eval.generate import EvalConfig, EvalDataConfig, generate_predictions

    root = tmp_path / "data"
    (root / "image").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    (root / "image" / "film.png").symlink_to(secret)
    (root / "test.json").write_text(json.dumps({"annotations": [{"image_id": "film", "caption": "c"}]}))
    cfg = EvalConfig(ckpt=str(model_dir), data=EvalDataConfig(root=str(root), ann_file="test.json", embedded=False),
                     output_dir=str(tmp_path / "eval"), progress=False, device="cpu")
    with pytest.raises(AnnotationError, match=r"test.json: image .*film.png resolves outside"):
        generate_predictions(cfg)
    assert not (tmp_path / "eval" / "predictions.jsonl").exists()


def test_image_id_escape_is_refused_by_training_before_any_step(tiny_llm_dir, tmp_path):  # noqa: F811
    from xraygpt.train.trainer import train

    root = tmp_path / "data"
    (root / "image").mkdir(parents=True)
    (root / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "../../etc/passwd",
                                                                       "caption": "c"}]}))
    cfg = make_cfg(tiny_llm_dir, root, tmp_path / "run")
    cfg.data.val_ann_file = None
    with pytest.raises(AnnotationError, match=r"'\.\./\.\./etc/passwd' points outside the image folder"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------- web demo: loopback
def test_web_demo_binds_loopback_unless_told_otherwise(capsys):
    import importlib.util

    from xraygpt import web

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    args = demo.parse_args(["--ckpt", "run"])
    assert args.host == "127.0.0.1" and args.share is False
    assert inspect.signature(web.launch).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(web.launch).parameters["share"].default is False
    opts = web.launch_options(args.host, args.port, args.share)
    assert opts["server_name"] == "127.0.0.1" and opts["share"] is False
    assert capsys.readouterr().err == ""  # no warning on the safe default
    opts = web.launch_options(**{k: v for k, v in vars(demo.parse_args(["--ckpt", "r", "--host", "0.0.0.0"])).items()
                                 if k in ("host", "port", "share")})
    assert opts["server_name"] == "0.0.0.0" and "reachable from other machines" in capsys.readouterr().err
    web.launch_options(share=True)
    assert "public gradio.live link" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- MIMIC data-use guard
@pytest.mark.parametrize("url,local", [
    ("http://127.0.0.1:8000/v1", True), ("http://127.8.9.10/v1", True), ("http://[::1]:8000/v1", True),
    ("http://LOCALHOST:8000/v1", True),
    ("http://localhost.attacker.example/v1", False), ("http://127.0.0.1.nip.io/v1", False),
    ("http://0.0.0.0:8000/v1", False), ("http://10.0.0.5:8000/v1", False), ("https://api.openai.com/v1", False),
    ("http://user:pw@evil.example/@127.0.0.1/v1", False),
])
def test_guard_treats_only_loopback_as_local(url, local):
    import io

    from data_prep.guard import DataUseError, check_data_use
    from xraygpt.openai_client import ChatEndpointConfig

    endpoint = ChatEndpointConfig(base_url=url)
    sink = io.StringIO()
    if local:
        assert check_data_use("mimic", "llm", endpoint, False, out=sink) == "local endpoint"
    else:
        with pytest.raises(DataUseError, match="Refusing to send MIMIC-CXR report text"):
            check_data_use("mimic", "llm", endpoint, False, out=sink)
        assert check_data_use("mimic", "llm", endpoint, True, out=sink).startswith("remote endpoint approved")
    assert "pw@" not in sink.getvalue()


def test_guard_refuses_before_reading_or_sending_in_a_real_process(tmp_path):
    """Remote endpoint, no approval: exit 3 before the reports are even read (their folder does not exist)."""
    with FakeOpenAIServer() as server:
        proc = subprocess.run(
            [sys.executable, "-m", "data_prep", "mimic", "--cfg", str(REPO / "configs/data/mimic.yaml"),
             f"output_dir={tmp_path / 'out'}", f"mimic.reports={tmp_path / 'nowhere'}", "mimic.split_csv=s.csv",
             "mimic.metadata_csv=m.csv", "llm.endpoint.base_url=http://192.0.2.1:9/v1"],
            cwd=tmp_path, env=canary_env(tmp_path), capture_output=True, text=True, timeout=60)
        assert server.calls == 0
    assert proc.returncode == 3, proc.stderr
    assert "data-use guard: Refusing to send MIMIC-CXR report text to the non-local endpoint" in proc.stderr
    assert "llm.allow_remote_mimic=true" in proc.stderr and "nowhere" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_judge_guard_refuses_remote_mimic_references():
    import io

    from xraygpt.eval.judge import JudgeConfig, check_data_use
    from xraygpt.openai_client import ChatEndpointConfig

    cfg = JudgeConfig(endpoint=ChatEndpointConfig(base_url="https://api.openai.com/v1"))
    assert cfg.dataset == "mimic" and cfg.allow_remote_mimic is False  # safe defaults
    with pytest.raises(Exception, match="Refusing to send MIMIC-CXR reference text"):
        check_data_use(cfg, io.StringIO())
    local = JudgeConfig(endpoint=ChatEndpointConfig(base_url="http://127.0.0.1:9/v1"))
    check_data_use(local, io.StringIO())


def test_config_errors_do_not_echo_secret_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  output_dir_secret: {OPENAI_CANARY}\n")
    from xraygpt.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    assert OPENAI_CANARY not in str(err.value)
