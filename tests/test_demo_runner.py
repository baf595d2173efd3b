"""`make demo`'s plan (scripts/run_demo.py): the shipped demo YAMLs chained into steps 3-6, each step wired to the
steps it is made from. Skipping and redoing (a changed config, an input made again) is the ablation's own
`run_step`, tested end to end in test_ablation.py; what the demo adds is this wiring and the config-free steps."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def _runner():
    spec = importlib.util.spec_from_file_location("run_demo_script", REPO / "scripts" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_chains_the_shipped_configs_under_the_output_folder(tmp_path):
    out = tmp_path / "my demo: run #1"  # a path YAML would misread unquoted
    steps = dict(_runner().plan_demo(out))
    assert list(steps) == ["3/6 stage 0 encoder", "4/6 stage 1", "5/6 stage 2", "6/6 evaluation"]
    s0, s1, s2, ev = steps.values()
    assert [s.kind for s in (s0, s1, s2, ev)] == ["stage0", "train", "train", "eval"]
    assert [[d.key for d in s.deps] for s in (s0, s1, s2, ev)] == [[], ["stage0"], ["stage0", "stage1"], ["stage2"]]
    assert [s.config.name for s in (s0, s1, s2, ev)] == ["stage0_encoder.yaml", "stage1.yaml", "stage2.yaml",
                                                         "eval.yaml"]
    encoder = str(out / "stage0" / "encoder.safetensors")
    assert s0.resolved.run.output_dir == str(out / "stage0") and s0.out_dir == out / "stage0"
    assert s1.resolved.run.output_dir == str(out / "stage1") and s1.resolved.model.encoder.checkpoint == encoder
    assert s2.resolved.model.encoder.checkpoint == encoder and s2.resolved.run.init_from == str(out / "stage1")
    assert ev.resolved.ckpt == str(out / "stage2") and ev.resolved.output_dir == str(out / "eval")
    assert ev.resolved.control  # the shipped eval scores the shuffled-image control too


def test_config_free_steps_run_once_then_are_skipped(tmp_path, capsys):
    module = _runner()
    counter = tmp_path / "runs.txt"
    cmd = ["-c", f"import pathlib; p = pathlib.Path({str(counter)!r}); p.write_text(p.read_text() + 'x' "
                 "if p.exists() else 'x')"]
    marker = tmp_path / "marks" / ".done"
    module._once("data", marker, cmd)
    assert marker.is_file() and counter.read_text() == "x"
    assert module._once("data", marker, cmd) == 0.0 and counter.read_text() == "x"
    assert "already done" in capsys.readouterr().out
    with pytest.raises(subprocess.CalledProcessError):  # a failing step stops the demo and leaves no marker
        module._once("broken", tmp_path / ".broken", ["-c", "import sys; sys.exit(3)"])
    assert not (tmp_path / ".broken").exists()


def test_demo_help_runs_from_a_checkout():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "run_demo.py"), "--help"], capture_output=True,
                         text=True, cwd=Path("/"))
    assert res.returncode == 0 and "--fresh" in res.stdout, res.stderr
