"""The ablation runner end to end on a tiny two-row ablation, its reuse of finished steps, and its config errors.

Real steps, tiny sizes: the embedded dataset built from the first 48 IU reports, xray-vit-tiny pretrained for one
step (stage 0), a random 2-layer LLaMA with the real SmolLM2 tokenizer fine-tuned for three steps on the
radiology conversations, three projection steps per row, an 8-sample evaluation per row, and the best row's
shuffled-image control.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO

from xraygpt.ablation import (
    STEP_RECORD,
    AblationError,
    build_step,
    load_ablation_config,
    plan_ablation,
    run_ablation,
    seed_control_predictions,
)
from xraygpt.config import ConfigError
from xraygpt.data.embedded import data_identity

EMBEDDED_YAML = REPO / "configs" / "ablation" / "embedded.yaml"


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    from xraygpt.data.embedded import build_embedded_dataset

    return Path(build_embedded_dataset(out_dir=tmp_path_factory.mktemp("emb48"), limit=48, workers=1).root)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The tiny steps run on one thread (two contend badly on a busy 2-core machine); give the rest of the session
    back its own setting, since in-process steps set torch's thread count."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def step_yamls(tmp_path_factory, emb):
    """Tiny versions of the four entry points' YAMLs (the ablation overrides their outputs, encoder and LLM)."""
    d = tmp_path_factory.mktemp("step_yamls")
    stage0 = _write(d / "stage0.yaml", f"""# python scripts/train_encoder.py --cfg stage0.yaml
data: {{embedded: true, root: {emb}, limit: 48}}
model: {{name: xray-vit-tiny}}
run: {{epochs: 1, max_steps: 1, batch_size: 4, threads: 1, progress: false}}
""")
    llm = _write(d / "llm.yaml", f"""# python scripts/finetune_llm.py --cfg llm.yaml
model: {{method: lora, lora: {{r: 4, alpha: 8}}}}
data: {{train_file: "embedded:radiology", val_file: null, max_len: 256, radiology: {{embedded_dir: {emb}}}}}
optim: {{init_lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 1}}
run: {{max_steps: 3, batch_size: 2, device: cpu, threads: 1, progress: false, save_every: 0, resume: auto}}
wandb: {{mode: disabled}}
""")
    stage1 = _write(d / "stage1.yaml", f"""# python scripts/train.py --cfg stage1.yaml
model: {{max_txt_len: 32}}
data: {{embedded: false, root: {emb}, ann_file: splits/train.json}}
optim: {{init_lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 1}}
run: {{max_steps: 3, batch_size: 4, device: cpu, threads: 1, progress: false, feature_cache: false,
      resume: auto}}
wandb: {{mode: disabled}}
""")
    ev = _write(d / "eval.yaml", f"""# python scripts/eval_rouge.py --cfg eval.yaml
data: {{embedded: false, root: {emb}, ann_file: splits/test.json, limit: 8}}
generation: {{max_new_tokens: 8}}
batch_size: 8
metrics: [rouge, clinical]
bootstrap: 50
device: cpu
threads: 1
progress: false
""")
    return {"stage0": stage0, "llm": llm, "stage1": stage1, "eval": ev}


@pytest.fixture(scope="module")
def ablation_yaml(tmp_path_factory, step_yamls, tiny_llm_dir):
    d = tmp_path_factory.mktemp("ablation")
    return _write(d / "tiny.yaml", f"""# python scripts/run_ablation.py --cfg tiny.yaml
name: tiny ablation
output_dir: {d / "out"}
isolation: inprocess
base_llm: {tiny_llm_dir}
medical_data: null
stage0: {{config: {step_yamls["stage0"]}}}
llm_steps:
  medical: {{config: {step_yamls["llm"]}, train_file: "${{medical_data}}", needs_train_file: true}}
  radiology: {{config: {step_yamls["llm"]}}}
train:
  stage1: {{config: {step_yamls["stage1"]}}}
eval: {{config: {step_yamls["eval"]}}}
rows:
  baseline: {{name: Baseline, encoder: random, llm: []}}
  medvicuna: {{name: +MedVicuna, encoder: stage0, llm: [medical]}}
  radllm: {{name: +RadLLM, encoder: stage0, llm: [radiology]}}
control: {{metric: ce_micro_f1_14}}
targets: {{baseline_row: baseline, max_minutes: 5}}
""")


def _run_script(argv: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("run_ablation_script", REPO / "scripts" / "run_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _ran(report: dict) -> list[str]:
    return [t["step"] for t in report["timings"]["steps"] if t["status"] == "ran"]


def test_tiny_ablation_end_to_end_then_rerun_reuses_everything(ablation_yaml, capsys):
    cfg = load_ablation_config(ablation_yaml)
    out = Path(cfg.output_dir)
    report = run_ablation(cfg)
    first_log = capsys.readouterr().out

    # files: both trained rows, the skipped medical row with its reason, the control row
    assert (out / "ablation.md").is_file() and (out / "ablation.json").is_file()
    saved = json.loads((out / "ablation.json").read_text())
    assert report["files"]["json"] == str(out / "ablation.json") and report["rows"] == saved["rows"]
    rows = {r["id"]: r for r in saved["rows"]}
    assert list(rows) == ["baseline", "medvicuna", "radllm"]
    assert rows["baseline"]["status"] == rows["radllm"]["status"] == "evaluated"
    assert rows["medvicuna"]["status"] == "skipped" and "medical_data" in rows["medvicuna"]["reason"]
    assert not (out / "llm" / "medical").exists() and not (out / "rows" / "medvicuna").exists()
    md = (out / "ablation.md").read_text()
    assert "| Baseline |" in md and "+RadLLM" in md and "shuffled images (control)" in md and "+MedVicuna" in md

    # every number is the eval's own: row = its table's first run, control = the best row's shuffled run
    for rid in ("baseline", "radllm"):
        table = json.loads((out / "rows" / rid / "eval" / "table.json").read_text())
        assert rows[rid]["n"] == table["runs"][0]["n"] == 8
        for k in ("rouge1", "rouge2", "rougeL", "ce_micro_f1_14"):
            assert rows[rid]["metrics"][k] == table["runs"][0]["metrics"][k]
            assert set(rows[rid]["metrics"][k]) == {"value", "ci_low", "ci_high"}
    best = saved["best_row"]
    assert best == max(("baseline", "radllm"), key=lambda r: rows[r]["metrics"]["ce_micro_f1_14"]["value"])
    other = "baseline" if best == "radllm" else "radllm"
    # control.rows=best: only the best row's shuffled-image run was generated, after both rows' evals, starting
    # from that row's own predictions (copied, not generated again), and scored with them in one table
    assert [len(json.loads((out / "rows" / r / "eval" / "table.json").read_text())["runs"]) for r in rows
            if r != "medvicuna"] == [1, 1]
    assert not (out / "rows" / other / "control").exists()
    assert f"best row '{best}': starting from the predictions in" in first_log
    assert (out / "rows" / best / "control" / "predictions.jsonl").read_bytes() == \
        (out / "rows" / best / "eval" / "predictions.jsonl").read_bytes()
    best_table = json.loads((out / "rows" / best / "control" / "table.json").read_text())
    assert best_table["runs"][1]["name"].endswith("(shuffled images)")
    assert best_table["runs"][0]["metrics"] == \
        json.loads((out / "rows" / best / "eval" / "table.json").read_text())["runs"][0]["metrics"]
    assert saved["control"]["of_row"] == best and saved["control"]["table"].endswith(f"rows/{best}/control/table.json")
    assert saved["control"]["metrics"]["rougeL"] == best_table["runs"][1]["metrics"]["rougeL"]
    d = saved["deltas"]["best_minus_control"]["rougeL"]
    assert d["delta"] == pytest.approx(best_table["runs"][0]["metrics"]["rougeL"]["value"]
                                       - best_table["runs"][1]["metrics"]["rougeL"]["value"])
    assert d["ci_low"] <= d["delta"] + 1e-12 and d["delta"] <= d["ci_high"] + 1e-12
    if best == "radllm":
        assert saved["deltas"]["best_minus_baseline"]["ce_micro_f1_14"]["delta"] == pytest.approx(
            rows["radllm"]["metrics"]["ce_micro_f1_14"]["value"] - rows[other]["metrics"]["ce_micro_f1_14"]["value"])
    checks = {c["target"]: c["holds"] for c in saved["targets"]["checks"]}
    assert any(t.startswith("best - control ce_micro_f1_14 >= 0.15") for t in checks)
    assert saved["targets"]["all_hold"] == all(checks.values())

    # the steps ran once each, in dependency order; the stage-0 encoder and the LLM are the rows' own
    steps = [t["step"] for t in saved["timings"]["steps"]]
    assert steps == ["stage0", "llm/radiology", "rows/baseline/stage1", "rows/baseline/eval", "rows/radllm/stage1",
                     "rows/radllm/eval", f"rows/{best}/control"]
    assert all(t["status"] == "ran" and t["seconds"] > 0 for t in saved["timings"]["steps"])
    model_cfg = json.loads((out / "rows" / "radllm" / "stage1" / "final" / "xraygpt_config.json").read_text())["model"]
    assert model_cfg["llm"]["name_or_path"] == str(out / "llm" / "radiology" / "final")
    assert model_cfg["encoder"]["checkpoint"] == str(out / "stage0" / "encoder.safetensors")
    base_cfg = json.loads((out / "rows" / "baseline" / "stage1" / "final" / "xraygpt_config.json").read_text())["model"]
    assert base_cfg["encoder"]["checkpoint"] is None and base_cfg["encoder"]["name"] == "xray-vit-tiny"
    assert "$ python" in first_log

    # rerun through the script: nothing retrained, same table
    weights = out / "rows" / "radllm" / "stage1" / "final" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = _run_script(["--cfg", str(ablation_yaml)])
    log = capsys.readouterr().out
    assert "$ python" not in log and log.count("reusing it, no retraining") == 7
    assert all(t["status"] == "reused" and t["seconds"] == 0 for t in again["timings"]["steps"])
    assert [t["recorded_seconds"] for t in again["timings"]["steps"]] == \
        [t["seconds"] for t in saved["timings"]["steps"]]
    assert weights.stat().st_mtime_ns == mtime
    assert again["rows"] == saved["rows"] and again["control"] == saved["control"]

    # the best row changes (here: the best row is left out): the new best row gets its own control, from its own
    # predictions; back to both rows, the first best row's control is reused as it was
    alone = run_ablation(load_ablation_config(ablation_yaml, [f"rows.{best}.enabled=false"]))
    assert alone["best_row"] == other and _ran(alone) == [f"rows/{other}/control"]
    assert (out / "rows" / other / "control" / "predictions.jsonl").read_bytes() == \
        (out / "rows" / other / "eval" / "predictions.jsonl").read_bytes()
    assert alone["control"]["table"].endswith(f"rows/{other}/control/table.json")
    both = run_ablation(load_ablation_config(ablation_yaml))
    assert _ran(both) == [] and both["control"] == saved["control"] and both["deltas"] == saved["deltas"]

    # a control table whose first run is not the row's own predictions is refused, naming both tables
    control_table = out / "rows" / best / "control" / "table.json"
    control_text = control_table.read_text()
    tampered = json.loads(control_text)
    tampered["runs"][0]["metrics"]["rougeL"]["value"] += 0.01
    control_table.write_text(json.dumps(tampered))
    with pytest.raises(AblationError, match=rf"row '{best}': .*rows/{best}/control/table.json does not hold the row's "
                                            rf"own predictions .*rows/{best}/eval/table.json"):
        run_ablation(load_ablation_config(ablation_yaml))
    control_table.write_text(control_text)

    # a record that lists keys at their default (as older versions wrote it, or before a key existed) still matches
    record_file = out / "rows" / "radllm" / "stage1" / STEP_RECORD
    record = json.loads(record_file.read_text())
    assert "run.proj_init" not in record["identity"]  # at its default: not part of the identity
    record["identity"]["run.proj_init"] = "default"
    record_file.write_text(json.dumps(record))
    assert all(t["status"] == "reused" for t in run_ablation(load_ablation_config(ablation_yaml))["timings"]["steps"])

    # steps that read the embedded dataset (here stage 0 and the LLM's conversations; the tiny stages read it as a
    # plain folder) record its version and caption rules: made from other captions, they are stale
    stage0_file = out / "stage0" / STEP_RECORD
    stage0_text = stage0_file.read_text()
    assert json.loads(stage0_text)["identity"]["embedded data"] == data_identity()
    assert json.loads((out / "llm" / "radiology" / STEP_RECORD).read_text())["identity"]["embedded data"] == \
        data_identity()
    assert "embedded data" not in record["identity"]
    older = json.loads(stage0_text)
    older["identity"]["embedded data"] = "1-render2 raw"
    stage0_file.write_text(json.dumps(older))
    with pytest.raises(AblationError, match=r"stage0: .*embedded data \(was '1-render2 raw', now '2-render"):
        run_ablation(load_ablation_config(ablation_yaml))
    del older["identity"]["embedded data"]  # recorded before session 11 (raw captions then, raw by default now)
    stage0_file.write_text(json.dumps(older))
    assert all(t["status"] == "reused" for t in run_ablation(load_ablation_config(ablation_yaml))["timings"]["steps"])
    stage0_file.write_text(stage0_text)

    # a finished step whose config changed is refused (named), not silently reused; on_changed=redo redoes it
    # and the steps made from it (the row's eval), and nothing else
    changed = ["rows.baseline.train_overrides=[run.seed=7]"]
    with pytest.raises(AblationError, match=r"rows/baseline/stage1.*run\.seed.*on_changed=redo"):
        run_ablation(load_ablation_config(ablation_yaml, changed))
    redone = run_ablation(load_ablation_config(ablation_yaml, [*changed, "on_changed=redo"]))
    # (the best row's control is made again when it is a remade row's, or when the best row changed)
    remade_control = [f"rows/{redone['best_row']}/control"] if best != redone["best_row"] or best == "baseline" else []
    assert _ran(redone) == ["rows/baseline/stage1", "rows/baseline/eval", *remade_control]
    assert weights.stat().st_mtime_ns == mtime
    best = redone["best_row"]

    # an input step made again (same config, new weights: its folder deleted and rerun) makes the steps made from
    # it stale, however alike their configs: refused, naming the input; redone with on_changed=redo
    rad1_record = json.loads((out / "rows" / "radllm" / "stage1" / STEP_RECORD).read_text())
    llm_record = json.loads((out / "llm" / "radiology" / STEP_RECORD).read_text())
    assert rad1_record["inputs"] == {"stage0": json.loads((out / "stage0" / STEP_RECORD).read_text())["run_id"],
                                     "llm/radiology": llm_record["run_id"]}
    shutil.rmtree(out / "llm" / "radiology")
    with pytest.raises(AblationError, match=r"rows/radllm/stage1: .* made from an earlier llm/radiology.*on_changed"):
        run_ablation(load_ablation_config(ablation_yaml, changed))
    assert json.loads((out / "llm" / "radiology" / STEP_RECORD).read_text())["run_id"] != llm_record["run_id"]
    assert weights.stat().st_mtime_ns == mtime  # refused: the stale row is left as it was
    redone = run_ablation(load_ablation_config(ablation_yaml, [*changed, "on_changed=redo"]))
    remade_control = [f"rows/{redone['best_row']}/control"] if best != redone["best_row"] or best == "radllm" else []
    assert _ran(redone) == ["rows/radllm/stage1", "rows/radllm/eval", *remade_control]
    assert weights.stat().st_mtime_ns != mtime
    again = run_ablation(load_ablation_config(ablation_yaml, changed))  # and then it is current again
    assert all(t["status"] == "reused" for t in again["timings"]["steps"])

    # control.rows=all: every row's eval generates its own shuffled run (the evals are redone, nothing else); the
    # best row's control is the same as the best-only control's, to the last digit
    every = run_ablation(load_ablation_config(ablation_yaml, [*changed, "control.rows=all", "on_changed=redo"]))
    assert _ran(every) == ["rows/baseline/eval", "rows/radllm/eval"]
    assert every["best_row"] == again["best_row"]
    assert [r.get("metrics") for r in every["rows"]] == [r.get("metrics") for r in again["rows"]]
    assert every["control"]["metrics"] == again["control"]["metrics"]
    assert every["deltas"] == again["deltas"]
    assert all("shuffled_metrics" in r for r in every["rows"] if r["status"] == "evaluated")
    assert "Image contribution per row" in every["markdown"] and "| Baseline | " in every["markdown"].split(
        "Image contribution per row")[1]
    # back to control.rows=best, those evals are refused (they hold more than a best-only eval) with the way out
    with pytest.raises(AblationError, match=r"rows/baseline/eval: .*control \(was True, now False\).*"
                                            r"control\.rows=all reuses it"):
        run_ablation(load_ablation_config(ablation_yaml, changed))


def test_control_starts_from_the_row_predictions_only_when_the_configs_match(step_yamls, tmp_path):
    def eval_step(folder: str, *overrides: str):
        d = tmp_path / folder
        return build_step(f"rows/r/{folder}", "eval", "rows.r", str(step_yamls["eval"]),
                          ["ckpt=run/stage2", f"output_dir={d}", "name=r", *overrides], d)

    row_eval, control = eval_step("eval", "control=false"), eval_step("control", "control=true")
    row_eval.out_dir.mkdir()
    (row_eval.out_dir / "predictions.jsonl").write_text('{"image_id": "a", "prediction": "clear lungs"}\n')
    assert not seed_control_predictions(row_eval, control)  # the row's eval is not finished: no table yet
    (row_eval.out_dir / "table.json").write_text(json.dumps({"runs": [{"name": "r"}]}))
    other = eval_step("other", "control=true", "generation.max_new_tokens=9")
    assert not seed_control_predictions(row_eval, other) and not other.out_dir.exists()  # other decoding
    assert seed_control_predictions(row_eval, control)
    assert (control.out_dir / "predictions.jsonl").read_text() == (row_eval.out_dir / "predictions.jsonl").read_text()
    # seeded before and killed during its shuffled run: resumed as it is
    (control.out_dir / "control").mkdir()
    (control.out_dir / "control" / "predictions.jsonl").write_text('{"image_id": "a", "prediction": "x"}\n')
    assert not seed_control_predictions(row_eval, control)
    assert (control.out_dir / "control" / "predictions.jsonl").is_file()
    # its main predictions are not the row's (the row was evaluated again since): emptied, then seeded anew
    (row_eval.out_dir / "predictions.jsonl").write_text('{"image_id": "a", "prediction": "no effusion"}\n')
    assert seed_control_predictions(row_eval, control)
    assert (control.out_dir / "predictions.jsonl").read_text() == (row_eval.out_dir / "predictions.jsonl").read_text()
    assert sorted(p.name for p in control.out_dir.iterdir()) == ["predictions.jsonl"]
    # a finished control is never touched
    (control.out_dir / "table.json").write_text(json.dumps({"runs": [{"name": "r"}, {"name": "r (shuffled)"}]}))
    (row_eval.out_dir / "predictions.jsonl").write_text('{"image_id": "a", "prediction": "cardiomegaly"}\n')
    assert not seed_control_predictions(row_eval, control)
    assert "no effusion" in (control.out_dir / "predictions.jsonl").read_text()


def test_bad_row_config_names_the_key(ablation_yaml):
    with pytest.raises(ConfigError, match=r"unknown key 'rows\.radllm\.encodr'.*Did you mean 'encoder'"):
        load_ablation_config(ablation_yaml, ["rows.radllm.encodr=stage0"])
    with pytest.raises(ConfigError, match=r"rows\.radllm\.llm: unknown LLM step 'radiolgy'.*'radiology'"):
        load_ablation_config(ablation_yaml, ["rows.radllm.llm=[radiolgy]"])
    with pytest.raises(ConfigError, match=r"rows\.baseline\.encoder must be random, stage0.*'random'"):
        load_ablation_config(ablation_yaml, ["rows.baseline.encoder=randon"])
    with pytest.raises(ConfigError, match=r"control\.rows must be one of \['best', 'all'\], got 'every'"):
        load_ablation_config(ablation_yaml, ["control.rows=every"])
    # a bad key inside a row's overrides fails at planning, before anything runs, naming row, stage and key
    cfg = load_ablation_config(ablation_yaml, ["rows.radllm.train_overrides=[model.encoder.chekpoint=x]",
                                               "output_dir=" + str(ablation_yaml.parent / "never")])
    with pytest.raises(ConfigError, match=r"rows\.radllm \(train\.stage1\).*model\.encoder\.chekpoint.*'checkpoint'"):
        run_ablation(cfg)
    assert not (ablation_yaml.parent / "never").exists()


def test_embedded_ablation_plan():
    """The shipped ablation builds every step's config from the demo YAMLs; the medical rows wait for data."""
    plan = plan_ablation(load_ablation_config(EMBEDDED_YAML))
    rows = {r.id: r for r in plan.rows}
    assert [r.name for r in plan.rows[:2]] == ["Baseline", "+MedCLIP"]
    assert rows["medvicuna"].skipped and rows["medvicuna_radllm"].skipped
    assert not rows["radllm"].skipped and not rows["baseline"].skipped
    keys = [s.key for s in plan.steps]
    assert keys[:2] == ["stage0", "llm/radiology"] and "llm/medical" not in keys
    base1 = next(s for s in plan.steps if s.key == "rows/baseline/stage1").resolved
    rad2 = next(s for s in plan.steps if s.key == "rows/radllm/stage2").resolved
    stage0 = plan.steps[0].resolved
    # feature=labels needs a head: Baseline reads stage 0's seeded, untrained twin (and so waits for stage 0)
    assert base1.model.encoder.feature == "labels" and base1.run.init_from is None
    assert base1.model.encoder.checkpoint.endswith("stage0/encoder_init.safetensors")
    base_step = next(s for s in plan.steps if s.key == "rows/baseline/stage1")
    assert [d.key for d in base_step.deps] == ["stage0"]
    assert base1.model.encoder.name == rad2.model.encoder.name == stage0.model.name  # same architecture
    assert rad2.model.encoder.checkpoint.endswith("stage0/encoder.safetensors")
    assert rad2.model.llm.name_or_path.endswith("llm/radiology/final") and rad2.run.init_from.endswith("radllm/stage1")
    ev = next(s for s in plan.steps if s.key == "rows/radllm/eval").resolved
    assert not ev.control and ev.ckpt.endswith("rows/radllm/stage2") and ev.name == "+RadLLM"
    ctrl = rows["radllm"].control_step  # run after the evals, for the best row only
    assert ctrl.key not in keys and ctrl.resolved.control and ctrl.out_dir.parts[-2:] == ("radllm", "control")
    assert ctrl.resolved.generation == ev.generation and ctrl.resolved.ckpt == ev.ckpt
    no_control = plan_ablation(load_ablation_config(EMBEDDED_YAML, ["control.enabled=false"]))
    assert all(r.control_step is None and r.control_dir is None for r in no_control.rows)
    assert not any(s.resolved.control for s in no_control.steps if s.kind == "eval")
    every_row = plan_ablation(load_ablation_config(EMBEDDED_YAML, ["control.rows=all"]))
    assert all(r.control_step is None and r.control_dir == r.eval_dir for r in every_row.rows if not r.skipped)
    assert all(s.resolved.control for s in every_row.steps if s.kind == "eval")

    patch = plan_ablation(load_ablation_config(EMBEDDED_YAML, ["train.stage1.overrides=[model.encoder.feature=patch]",
                                                               "train.stage2.overrides=[model.encoder.feature=patch]"]))
    patch_base = next(s for s in patch.steps if s.key == "rows/baseline/stage1")
    assert patch_base.resolved.model.encoder.checkpoint is None and patch_base.deps == []  # plain seeded init

    with_medical = plan_ablation(load_ablation_config(EMBEDDED_YAML, ["medical_data=/data/medical.json"]))
    assert not any(r.skipped for r in with_medical.rows)
    med = {s.key: s.resolved for s in with_medical.steps}
    assert med["llm/medical"].data.train_file == "/data/medical.json"
    assert med["llm/medical+radiology"].run.init_from.endswith("llm/medical")
