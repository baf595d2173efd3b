"""The paper's ablation (XrayGPT, Table 1) as one run: named rows, each a whole model trained and evaluated alike.

    python scripts/run_ablation.py --cfg configs/ablation/embedded.yaml [key=value ...]

A row is
    encoder   "random" (seeded random init of the stage-0 architecture) | "stage0" (the stage-0 output) | a file
    LLM       [] = the base LLM, or a chain of LLM fine-tunes run in order, each from the previous one
              (e.g. [radiology], or the paper's [medical, radiology]); a chain step whose data the user must
              supply (`needs_train_file`) skips its rows, with the reason in the table, while it has none
    stages    the vision stages in order (stage 1, then stage 2 from stage 1), the same for every row
    eval      one evaluation config, the same for every row
The control row is the best row (by `control.metric`) evaluated with the image/report pairing broken, on the same
samples, with the paired test. `control.rows=best` (default) runs it once, after every row is evaluated: the step
rows/<best>/control starts from the best row's own predictions (the same checkpoint and eval config, so the same
outputs) and generates only the shuffled-image run. `control.rows=all` runs each row's evaluation with its own
control instead (one more generation per row; the table then shows every row's image contribution).

Every step is an existing entry point (scripts/train_encoder.py, finetune_llm.py, train.py, eval_rouge.py) with
its YAML plus key=value overrides, run as a subprocess (memory freed between steps) or in this process
(`isolation=inprocess`). All step configs are built and checked before anything runs, so a bad key fails at
once, naming the row, the step and the key. Shared artefacts (one stage-0 encoder, one LLM per chain) are made
once; a finished artefact is reused (stage-0 meta, train final/, fine-tune final/, eval table.json) and a
rerun only does what is missing (training steps run with run.resume=auto, so a killed one continues). Each step
records what it ran in `ablation_step.json`, with a run id and the run ids of the artefacts it was made from; an
artefact made with another config, or from an input step that has been made again since, is refused (naming the
keys, or the input) rather than reused.

Outputs in output_dir: stage0/, llm/<chain>/, rows/<row>/<stage>/, rows/<row>/eval/, rows/<best>/control/,
ablation.md, ablation.json.
The metrics and their bootstrap CIs are read from each row's eval table.json, never recomputed.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from xraygpt.config import ConfigError, atomic_write_text, load_config, to_dict

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STEP_RECORD = "ablation_step.json"
ENCODER_CHOICES = ("random", "stage0")  # or a path to an encoder checkpoint
ISOLATION = ("subprocess", "inprocess")
ON_CHANGED = ("error", "redo")
EMBEDDED_DATA = "embedded data"  # identity key: the embedded dataset's version and caption rules
# Labels for the metric keys the eval tables write (xraygpt.eval.tables.MAIN_COLUMNS); others show as their key.
LABELS = {"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L", "rougeL_coco": "R-L (COCO)", "bleu4": "B-4",
          "meteor": "METEOR", "cider": "CIDEr", "ce_micro_f1_14": "CE F1 micro-14", "ce_macro_f1_14": "CE F1 macro-14",
          "ce_micro_f1_5": "CE F1 micro-5", "ce_macro_f1_5": "CE F1 macro-5"}


class AblationError(RuntimeError):
    """A step failed, or an artefact on disk does not match what this ablation would make."""


# ------------------------------------------------------------------------------------------------- config
@dataclass
class StepConfig:
    config: str = ""  # the entry point's YAML (relative to the working directory, else to the repository)
    overrides: list[str] = field(default_factory=list)  # key=value for that entry point, after its YAML


@dataclass
class StageConfig(StepConfig):
    """One vision stage (scripts/train.py); every stage after the first starts from the previous one."""

    enabled: bool = True


@dataclass
class LLMStepConfig(StepConfig):
    """One LLM fine-tune (scripts/finetune_llm.py); in a chain, each step starts from the previous step's output."""

    train_file: str | None = None  # sets data.train_file (ShareGPT JSON) when given
    needs_train_file: bool = False  # the user supplies the data: rows using this step are skipped while it is null


@dataclass
class RowConfig:
    name: str = ""  # the table's label; "" = the row's key
    encoder: str = "stage0"  # random | stage0 | path to an encoder checkpoint (same architecture as stage 0)
    llm: list[str] = field(default_factory=list)  # llm_steps keys, run in order; [] = the base LLM
    train_overrides: list[str] = field(default_factory=list)  # key=value for every vision stage of this row
    eval_overrides: list[str] = field(default_factory=list)  # key=value for this row's evaluation
    enabled: bool = True


CONTROL_ROWS = ("best", "all")


@dataclass
class ControlConfig:
    enabled: bool = True  # the best row evaluated with shuffled images: the control row
    metric: str = "ce_micro_f1_14"  # the eval table's key that picks the best row (higher is better)
    rows: str = "best"  # best: only the best row's control is generated | all: every row's (per-row image share)


@dataclass
class TargetsConfig:
    baseline_row: str | None = "baseline"  # the rows key the best row must beat
    vs_control: dict[str, float] = field(default_factory=lambda: {"ce_micro_f1_14": 0.15, "rougeL": 0.02})  # >=
    vs_baseline: dict[str, float] = field(default_factory=lambda: {"ce_micro_f1_14": 0.0, "rougeL": 0.0})  # >
    max_minutes: float | None = 45.0  # compute time of all steps (earlier runs of reused steps included)


@dataclass
class AblationConfig:
    name: str = "XrayGPT ablation"
    output_dir: str = "outputs/ablation"
    isolation: str = "subprocess"  # subprocess | inprocess
    base_llm: str | None = None  # model.llm.name_or_path for every stage and fine-tune; None = as their YAMLs say
    medical_data: str | None = None  # ShareGPT JSON of medical conversations (referenced by llm_steps in the YAML)
    stage0: StepConfig = field(default_factory=StepConfig)
    llm_steps: dict[str, LLMStepConfig] = field(default_factory=dict)
    train: dict[str, StageConfig] = field(default_factory=dict)  # vision stages, in order
    eval: StepConfig = field(default_factory=StepConfig)
    rows: dict[str, RowConfig] = field(default_factory=dict)  # in table order
    control: ControlConfig = field(default_factory=ControlConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    metrics: list[str] = field(default_factory=lambda: ["rouge1", "rouge2", "rougeL", "ce_micro_f1_14"])
    # A finished step whose config (or an input step's) changed since it ran: "error" names the keys and stops;
    # "redo" deletes that step's folder under output_dir and runs it again (and so every step after it).
    on_changed: str = "error"

    def validate(self) -> None:
        if self.isolation not in ISOLATION:
            raise ConfigError(f"isolation must be one of {list(ISOLATION)}, got '{self.isolation}'")
        if self.on_changed not in ON_CHANGED:
            raise ConfigError(f"on_changed must be one of {list(ON_CHANGED)}, got '{self.on_changed}'")
        if self.control.rows not in CONTROL_ROWS:
            raise ConfigError(f"control.rows must be one of {list(CONTROL_ROWS)}, got '{self.control.rows}'")
        if not self.rows:
            raise ConfigError("rows: no rows; give at least one (e.g. rows.baseline.encoder=random)")
        for section, names in (("rows", self.rows), ("train", self.train), ("llm_steps", self.llm_steps)):
            for key in names:  # they name output folders
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", key):
                    raise ConfigError(f"{section}.{key}: use letters, digits, '_' and '-' only (it names a folder)")
        if not any(s.enabled for s in self.train.values()):
            raise ConfigError("train: no enabled vision stage (e.g. train.stage1.config=configs/demo/stage1.yaml)")
        if not self.eval.config:
            raise ConfigError("eval.config: the evaluation YAML is required (e.g. configs/demo/eval.yaml)")
        for rid, row in self.rows.items():
            for name in row.llm:
                if name not in self.llm_steps:
                    raise ConfigError(f"rows.{rid}.llm: unknown LLM step '{name}'.{_closest(name, self.llm_steps)} "
                                      f"Defined in llm_steps: {', '.join(self.llm_steps) or 'none'}")
            if row.encoder not in ENCODER_CHOICES and not row.encoder.endswith((".safetensors", ".bin", ".pt", ".pth")):
                raise ConfigError(f"rows.{rid}.encoder must be random, stage0 or a checkpoint file, got "
                                  f"'{row.encoder}'.{_closest(row.encoder, ENCODER_CHOICES)}")
            if row.encoder == "stage0" and row.enabled and not self.stage0.config:
                raise ConfigError(f"rows.{rid}.encoder=stage0 but stage0.config is empty")
        key = self.targets.baseline_row
        if key is not None and key not in self.rows:
            raise ConfigError(f"targets.baseline_row: no row '{key}'.{_closest(key, self.rows)} "
                              f"Rows: {', '.join(self.rows)}")
        named = [*((f"train.{k}", s) for k, s in self.train.items()),
                 *((f"llm_steps.{k}", s) for k, s in self.llm_steps.items())]
        for name, step in named:
            if not step.config:
                raise ConfigError(f"{name}.config: the entry point's YAML is required")


def _closest(key: str, valid: Any) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


# -------------------------------------------------------------------------------------------- step kinds
@dataclass(frozen=True)
class Kind:
    """How to run and recognise one entry point's output."""

    script: str  # scripts/<script>
    schema: Callable[[], type]  # its config dataclass (imported lazily)
    done: Callable[[Path], bool]  # is the artefact in this output folder complete?
    ignore: tuple[str, ...]  # dotted config keys that do not change the artefact (not compared on reuse)


def _stage0_schema() -> type:
    from xraygpt.encoders.pretrain import EncoderPretrainConfig

    return EncoderPretrainConfig


def _train_schema() -> type:
    from xraygpt.train.config import TrainConfig

    return TrainConfig


def _llm_schema() -> type:
    from xraygpt.llm_finetune.config import FinetuneConfig

    return FinetuneConfig


def _eval_schema() -> type:
    from xraygpt.eval.generate import EvalConfig

    return EvalConfig


def _stage0_done(d: Path) -> bool:
    from xraygpt.encoders.pretrain import CHECKPOINT_NAME, META_NAME

    return (d / META_NAME).is_file() and (d / CHECKPOINT_NAME).is_file()


def _train_done(d: Path) -> bool:
    from xraygpt.model import CONFIG_NAME, WEIGHTS_NAME

    return (d / "final" / CONFIG_NAME).is_file() and (d / "final" / WEIGHTS_NAME).is_file()


def _llm_done(d: Path) -> bool:
    from xraygpt.llm_finetune.model import LINEAGE_NAME

    return (d / "final" / LINEAGE_NAME).is_file()  # final/ is replaced atomically, lineage inside


def _eval_done(d: Path) -> bool:
    try:
        return bool(json.loads((d / "table.json").read_text())["runs"])
    except (OSError, ValueError, KeyError):
        return False


_RUN_VOLATILE = ("run.output_dir", "run.progress", "run.threads", "run.log_every", "run.resume", "run.device",
                 "run.stop_after", "run.save_every", "run.keep_last", "run.feature_cache", "run.feature_cache_dir",
                 "wandb")
KINDS: dict[str, Kind] = {
    "stage0": Kind("train_encoder.py", _stage0_schema, _stage0_done,
                   ("run.output_dir", "run.progress", "run.threads", "run.log_every", "run.force", "run.evaluate")),
    "llm": Kind("finetune_llm.py", _llm_schema, _llm_done, _RUN_VOLATILE),
    "train": Kind("train.py", _train_schema, _train_done, _RUN_VOLATILE),
    # batch_size is part of an eval's identity: with compute_dtype=model a half-precision LLM's outputs depend on it
    "eval": Kind("eval_rouge.py", _eval_schema, _eval_done, ("output_dir", "progress", "threads", "device")),
}


# ---------------------------------------------------------------------------------------------------- plan
@dataclass
class Step:
    key: str  # unique: stage0, llm/radiology, rows/baseline/stage1, rows/baseline/eval
    kind: str
    config: Path
    overrides: list[str]
    out_dir: Path
    resolved: Any = None  # the entry point's config dataclass, built at planning time
    deps: list[Step] = field(default_factory=list)  # steps whose artefacts this one consumes

    @property
    def command(self) -> list[str]:
        return [str(SCRIPTS / KINDS[self.kind].script), "--cfg", str(self.config), *self.overrides]


@dataclass
class RowPlan:
    id: str
    name: str
    encoder: str  # description for the table
    llm: str
    steps: list[Step] = field(default_factory=list)
    eval_dir: Path | None = None
    control_step: Step | None = None  # control.rows=best: run after every row's eval, if this row is the best
    control_dir: Path | None = None  # the eval folder whose table holds this row's shuffled-image run, once run
    skipped: str | None = None  # reason, when the row does not run


@dataclass
class Plan:
    steps: list[Step]  # every step to run (shared ones once), in order
    rows: list[RowPlan]


def _find_config(p: str, where: str) -> Path:
    path = Path(p).expanduser()
    candidates = [path] if path.is_absolute() else [path, REPO / path]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{where}: config file '{p}' not found (looked in the working directory and in {REPO})")


def build_step(key: str, kind: str, where: str, config: str, overrides: list[str], out_dir: Path) -> Step:
    """One entry point's step, its YAML plus overrides resolved and checked now (a bad key fails before any run)."""
    path = _find_config(config, f"{where}.config")
    try:
        resolved = load_config(KINDS[kind].schema(), path, overrides)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{where} [step {key}]: {e}") from None
    return Step(key, kind, path, list(overrides), out_dir, resolved)


def override_value(value: Any) -> str:
    """A key=value right-hand side that reads back as this exact string (quoted when YAML would parse it)."""
    text = str(value)
    try:
        same = yaml.safe_load(text) == text
    except yaml.YAMLError:
        same = False
    return text if same else json.dumps(text)


def _llm_override(value: str | Path) -> str:
    return f"model.llm.name_or_path={override_value(value)}"


def _first_stage_feature(stages: list[tuple[str, Any]], row: Any) -> str | None:
    """encoder.feature of a row's first vision stage (its config with the stage's and the row's overrides)."""
    if not stages:
        return None
    name, stage = stages[0]
    step = build_step("probe", "train", f"train.{name}", stage.config, [*stage.overrides, *row.train_overrides],
                      Path("."))  # fmt: skip
    return step.resolved.model.encoder.feature


def plan_ablation(cfg: AblationConfig) -> Plan:
    """Every step of the ablation with its config built and checked (nothing runs)."""
    out = Path(cfg.output_dir)
    steps: dict[str, Step] = {}

    def chain_skip(chain: list[str]) -> str | None:
        for name in chain:
            s = cfg.llm_steps[name]
            if s.needs_train_file and not s.train_file:
                return (f"LLM step '{name}' needs conversation data: llm_steps.{name}.train_file is null "
                        f"(give it, e.g. medical_data=/path/to/conversations.json)")
        return None

    active = {rid: r for rid, r in cfg.rows.items() if r.enabled}
    runnable = {rid: r for rid, r in active.items() if chain_skip(r.llm) is None}

    # stage 0: once, if any runnable row uses it; its architecture is every row's encoder architecture.
    arch = None
    stage0_ckpt = out / "stage0" / "encoder.safetensors"
    stage0_init = out / "stage0" / "encoder_init.safetensors"
    if cfg.stage0.config:
        s0 = build_step("stage0", "stage0", "stage0", cfg.stage0.config,
                        [*cfg.stage0.overrides, f"run.output_dir={override_value(out / 'stage0')}"], out / "stage0")
        arch = s0.resolved.model.name
        if any(r.encoder == "stage0" for r in runnable.values()):
            steps[s0.key] = s0
    else:
        s0 = None

    # LLM chains: one output per chain prefix, shared by the rows using it.
    def llm_chain(chain: list[str], where: str) -> Step | None:
        prev, prev_step = None, None
        for i, name in enumerate(chain):
            s = cfg.llm_steps[name]
            key = "llm/" + "+".join(chain[:i + 1])
            d = out / key
            init = override_value(prev) if prev is not None else "null"
            ov = [*s.overrides, f"run.output_dir={override_value(d)}", f"run.init_from={init}", "run.resume=auto"]
            if cfg.base_llm:
                ov.append(_llm_override(cfg.base_llm))
            if s.train_file:
                ov.append(f"data.train_file={override_value(s.train_file)}")
            if key not in steps:
                steps[key] = build_step(key, "llm", f"{where} -> llm_steps.{name}", s.config, ov, d)
                steps[key].deps = [prev_step] if prev_step else []
            prev, prev_step = d, steps[key]
        return prev_step

    stages = [(k, s) for k, s in cfg.train.items() if s.enabled]
    rows: list[RowPlan] = []
    base_llm_name = None
    for rid, row in active.items():
        name = row.name or rid
        uses_s0 = row.encoder == "stage0"
        if row.encoder == "random" and s0 is not None and _first_stage_feature(stages, row) == "labels":
            # feature=labels needs a label head: the stage-0 run's seeded, untrained model and head
            enc_desc = f"random init ({arch})"
            enc_ov = [f"model.encoder.checkpoint={override_value(stage0_init)}"]
            steps.setdefault(s0.key, s0)
            uses_s0 = True
        elif row.encoder == "random":
            enc_desc = f"random init ({arch})" if arch else "random init"
            enc_ov = ["model.encoder.checkpoint=null"]
        elif row.encoder == "stage0":
            enc_desc = f"stage 0 ({arch})"
            enc_ov = [f"model.encoder.checkpoint={override_value(stage0_ckpt)}"]
        else:
            enc_desc = row.encoder
            enc_ov = [f"model.encoder.checkpoint={override_value(row.encoder)}"]
            if not Path(row.encoder).expanduser().is_file():
                raise ConfigError(f"rows.{rid}.encoder: checkpoint file {row.encoder} not found")
        if arch and row.encoder in ENCODER_CHOICES:
            enc_ov = ["model.encoder.type=open_clip", f"model.encoder.name={override_value(arch)}", *enc_ov]
        llm_desc = " -> ".join(row.llm) + " fine-tune" if row.llm else "base"
        plan = RowPlan(rid, name, enc_desc, llm_desc)
        rows.append(plan)
        plan.skipped = chain_skip(row.llm)
        if plan.skipped:
            continue
        llm_step = llm_chain(row.llm, f"rows.{rid}")
        llm_ov = [_llm_override(llm_step.out_dir / "final")] if llm_step else \
            ([_llm_override(cfg.base_llm)] if cfg.base_llm else [])
        deps = [x for x in (s0 if uses_s0 else None, llm_step) if x is not None]
        prev = None
        for sname, stage in stages:
            d = out / "rows" / rid / sname
            ov = [*stage.overrides, *row.train_overrides, f"run.output_dir={override_value(d)}", *enc_ov, *llm_ov,
                  f"run.init_from={override_value(prev) if prev is not None else 'null'}", "run.resume=auto"]
            st = build_step(f"rows/{rid}/{sname}", "train", f"rows.{rid} (train.{sname})", stage.config, ov, d)
            if not row.llm and base_llm_name is None:
                base_llm_name = st.resolved.model.llm.name_or_path
            st.deps, deps = deps, [st]
            plan.steps.append(st)
            steps[st.key] = st
            prev = d
        def eval_step(folder: str, control: bool) -> Step:
            d = out / "rows" / rid / folder
            ov = [*cfg.eval.overrides, *row.eval_overrides, f"ckpt={override_value(prev)}",
                  f"output_dir={override_value(d)}", f"name={override_value(name)}",
                  f"control={'true' if control else 'false'}", "shuffle_images=false"]
            return build_step(f"rows/{rid}/{folder}", "eval", f"rows.{rid} ({folder})", cfg.eval.config, ov, d)

        every_row = cfg.control.enabled and cfg.control.rows == "all"
        ev = eval_step("eval", control=every_row)
        ev.deps = deps
        plan.steps.append(ev)
        plan.eval_dir = eval_dir = ev.out_dir
        plan.control_dir = eval_dir if every_row else None
        steps[ev.key] = ev
        if cfg.control.enabled and not every_row:
            plan.control_step = eval_step("control", control=True)
            plan.control_step.deps = [ev]  # starts from ev's predictions: stale when ev is made again
    # Fine-tunes must start from the LLM the other rows use, or the rows do not differ in one thing only.
    if base_llm_name is not None:
        for st in steps.values():
            if st.kind == "llm" and st.resolved.run.init_from is None:
                theirs = st.resolved.model.llm.name_or_path
                if theirs != base_llm_name:
                    raise ConfigError(f"{st.key} fine-tunes '{theirs}' but the base-LLM rows use '{base_llm_name}'; "
                                      "set base_llm=... so every row starts from the same LLM")
    order = {"stage0": 0, "llm": 1}
    ordered = sorted(steps.values(), key=lambda s: order.get(s.kind, 2))  # stable: rows keep their order
    return Plan(ordered, rows)


# ---------------------------------------------------------------------------------------------------- run
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _flat_config(cfg: Any) -> dict[str, Any]:
    return _flat(json.loads(json.dumps(to_dict(cfg), default=str)))


def _defaults(step: Step) -> dict[str, Any]:
    """The flattened defaults of the step's config class (what a key means when a config does not set it)."""
    try:
        return _flat_config(type(step.resolved)())
    except (TypeError, ValueError):  # a config class without full defaults, or whose defaults do not validate
        return {}


def _without_defaults(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Keys at their default value dropped: a key added by a newer xraygpt (at its default) changes nothing."""
    return {k: v for k, v in flat.items() if k not in defaults or defaults[k] != v}


def _reads_embedded_data(flat: dict[str, Any]) -> bool:
    """Whether a step's (flattened, defaults included) config reads the embedded dataset: the vision stages,
    stage 0 and the eval through `data.embedded`, an LLM fine-tune through `embedded:radiology` conversations."""
    return flat.get("data.embedded") is True or any(
        isinstance(flat.get(k), str) and flat[k].startswith("embedded:radiology")
        for k in ("data.train_file", "data.val_file"))


def _identity(step: Step) -> dict[str, Any]:
    """The step's config minus keys that do not change its artefact and keys at their default, plus a digest of
    each input step's identity (so a stage made from a changed stage 1 counts as changed too)."""
    ignore = KINDS[step.kind].ignore
    full = _flat_config(step.resolved)
    flat = _without_defaults(full, _defaults(step))
    out = {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)}
    if _reads_embedded_data(full):
        from xraygpt.data.embedded import data_identity

        out[EMBEDDED_DATA] = data_identity()  # its version and caption rules: new captions, new artefacts
    for dep in step.deps:  # (the data's identity is left out here: each step that reads the data carries its own)
        text = json.dumps({k: v for k, v in _identity(dep).items() if k != EMBEDDED_DATA}, sort_keys=True)
        out[f"input {dep.key}"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _record(step: Step) -> dict[str, Any] | None:
    try:
        return json.loads((step.out_dir / STEP_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _changed(step: Step, record: dict[str, Any] | None) -> str | None:
    """Why the step's finished artefact does not match this config (None: it matches, or it has no record)."""
    if record is None:
        return None  # made by hand, or by an older version: trusted as it is
    # records of older versions list keys at their default too; compare like with like
    defaults = _defaults(step)  # (a key missing from one side below is at its default there)
    want, have = _identity(step), _without_defaults(record.get("identity", {}), defaults)
    if EMBEDDED_DATA not in have:  # recorded before the data's identity was (the raw captions of then, as now)
        want.pop(EMBEDDED_DATA, None)
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if not diff:
        return _remade_input(step, record)

    def value(side: dict[str, Any], k: str) -> Any:
        return side[k] if k in side else defaults.get(k)

    shown = ", ".join(f"{k} (was {value(have, k)!r}, now {value(want, k)!r})" for k in diff[:6])
    hint = ""
    if step.kind == "eval" and diff == ["control"] and value(have, "control") is True:
        hint = (" (it was evaluated with its own shuffled-image control, as before control.rows=best: "
                "control.rows=all reuses it as it is)")
    return f"{step.key}: {step.out_dir} was made with another config, differing at {shown}{hint}" + \
        (" ..." if len(diff) > 6 else "")


def _run_ids(step: Step) -> dict[str, str]:
    """The run id of each input step's finished artefact (inputs made by hand, or by an older version, have none)."""
    ids = {}
    for dep in step.deps:
        run_id = (_record(dep) or {}).get("run_id")
        if run_id:
            ids[dep.key] = run_id
    return ids


def _remade_input(step: Step, record: dict[str, Any]) -> str | None:
    """Why the artefact is stale although its config matches: an input step was made again after it (same config,
    new weights: e.g. its folder was deleted and the step rerun). Records without input ids are trusted."""
    made_from = record.get("inputs")
    if not isinstance(made_from, dict):
        return None
    for key, run_id in _run_ids(step).items():
        if key in made_from and made_from[key] != run_id:
            return (f"{step.key}: {step.out_dir} was made from an earlier {key} (that step has been made again "
                    "since, so this one would be stale)")
    return None


def _load_script(script: str):
    path = SCRIPTS / script
    spec = importlib.util.spec_from_file_location(f"_xraygpt_script_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise AblationError(f"entry point {path} not found (the ablation runs from a repository checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_step(title: str, step: Step, isolation: str = "subprocess", redo_under: Path | None = None,
             prepare: Callable[[Step], None] | None = None) -> dict[str, Any]:
    """Run one entry point unless its artefact is complete; returns {"status": "ran"|"reused", "seconds", ...}.

    A finished artefact whose recorded config differs raises AblationError, or, when `redo_under` is a folder
    holding the step's output folder, is deleted and made again. `prepare(step)` runs just before the entry point
    (not when the artefact is reused).
    """
    kind = KINDS[step.kind]
    print(f"\n=== {title}: {step.key}", flush=True)
    record = _record(step)
    why = _changed(step, record)
    if why is not None:
        if redo_under is None or not step.out_dir.resolve().is_relative_to(Path(redo_under).resolve()):
            raise AblationError(f"{why}. Delete that folder to redo it (and the steps after it), set "
                                "on_changed=redo, or choose another output_dir")
        print(f"    {why}; deleting it and running again (on_changed=redo)", flush=True)
        shutil.rmtree(step.out_dir)
    elif kind.done(step.out_dir):
        print(f"    already done ({step.out_dir}); reusing it, no retraining", flush=True)
        return {"status": "reused", "seconds": 0.0, "recorded_seconds": (record or {}).get("seconds")}
    t0 = time.perf_counter()
    if prepare is not None:
        prepare(step)
    print("    $ " + " ".join(["python", *[str(c) for c in step.command]]), flush=True)
    if isolation == "subprocess":
        rc = subprocess.run([sys.executable, *step.command], check=False).returncode
        if rc != 0:
            raise AblationError(f"{step.key} failed (exit code {rc}); command: python {' '.join(step.command)}")
    else:
        _load_script(kind.script).main(step.command[1:])
    seconds = round(time.perf_counter() - t0, 1)
    if not kind.done(step.out_dir):
        raise AblationError(f"{step.key} finished but {step.out_dir} holds no complete artefact "
                            f"(command: python {' '.join(step.command)})")
    rec = {"key": step.key, "kind": step.kind, "config": str(step.config), "overrides": step.overrides,
           "seconds": seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "identity": _identity(step), "run_id": uuid.uuid4().hex, "inputs": _run_ids(step)}
    atomic_write_text(step.out_dir / STEP_RECORD, json.dumps(rec, indent=1) + "\n")
    print(f"    done in {seconds:.0f} s", flush=True)
    return {"status": "ran", "seconds": seconds, "recorded_seconds": seconds}


def seed_control_predictions(row_eval: Step, control: Step) -> bool:
    """Start the control step from the row eval's predictions, so it generates only the shuffled-image run.

    Only when the two configs are the same but for `control` and `output_dir` (the same checkpoint, split, prompt
    and decoding: with the eval's float32 compute on the same device, regenerating would write the same file), and
    the row's eval is finished. An unfinished control folder holding other main predictions (a control step killed,
    then its row evaluated again) is emptied first: its shuffled run may be of the old model too. Returns whether it
    copied them.
    """
    from xraygpt.eval.generate import PREDICTIONS_NAME

    src, dst = row_eval.out_dir / PREDICTIONS_NAME, control.out_dir / PREDICTIONS_NAME
    same = replace(control.resolved, control=row_eval.resolved.control, output_dir=row_eval.resolved.output_dir)
    if same != row_eval.resolved or not src.is_file() or not _eval_done(row_eval.out_dir) or \
            _eval_done(control.out_dir):
        return False
    if dst.exists():
        if dst.read_bytes() == src.read_bytes():
            return False  # seeded before; its shuffled run resumes
        shutil.rmtree(control.out_dir)
    control.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)  # whole or absent: a half-copied file would pass for a resumable run
    return True


# -------------------------------------------------------------------------------------------------- tables
def _read_table(eval_dir: Path) -> dict[str, Any]:
    return json.loads((eval_dir / "table.json").read_text())


def pick_best(plan: Plan, metric: str) -> RowPlan | None:
    """The evaluated row with the highest `metric` in its eval table (ties: the first in table order)."""
    best, best_value = None, None
    for r in plan.rows:
        if r.skipped:
            continue
        value = _val(_read_table(r.eval_dir)["runs"][0]["metrics"].get(metric))
        if value is None:
            raise AblationError(f"control.metric '{metric}' is not in the eval table of row '{r.id}' "
                                f"({r.eval_dir / 'table.json'}); choose a metric key the eval writes (e.g. "
                                "ce_micro_f1_14, rougeL) or add its group to the eval config's metrics")
        if best_value is None or value > best_value:
            best, best_value = r, value
    return best


def _metrics(run: dict[str, Any], keys: list[str]) -> dict[str, dict | None]:
    return {k: run["metrics"].get(k) for k in keys}


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _val(m: dict | None) -> float | None:
    return None if not m else _num(m.get("value"))


def _fmt(m: dict | None) -> str:
    if not m or _num(m.get("value")) is None:
        return "–"
    lo, hi = _num(m.get("ci_low")), _num(m.get("ci_high"))
    return f"{m['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _fmt_delta(d: dict | None) -> str:
    if not d or d.get("delta") is None:
        return "–"
    s = f"{d['delta']:+.3f}"
    if d.get("ci_low") is not None and d.get("ci_high") is not None:
        s += f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    if d.get("p_value") is not None:
        s += f" (p={d['p_value']:.3g})"
    return s


def collect(cfg: AblationConfig, plan: Plan, timings: list[dict[str, Any]], total_seconds: float) -> dict[str, Any]:
    """The ablation report from each row's eval table.json (values and CIs as the eval wrote them)."""
    keys = list(dict.fromkeys([*cfg.metrics, cfg.control.metric, *cfg.targets.vs_control, *cfg.targets.vs_baseline]))
    best_plan = pick_best(plan, cfg.control.metric)
    rows, control_tables = [], {}
    for r in plan.rows:
        entry: dict[str, Any] = {"id": r.id, "name": r.name, "encoder": r.encoder, "llm": r.llm}
        if r.skipped:
            rows.append({**entry, "status": "skipped", "reason": r.skipped})
            continue
        main = _read_table(r.eval_dir)["runs"][0]
        entry.update(status="evaluated", table=str(r.eval_dir / "table.json"), n=main.get("n"),
                     metrics=_metrics(main, keys))
        if cfg.control.enabled and r.control_dir is not None:
            control_tables[r.id] = table = _read_table(r.control_dir)
            if len(table["runs"]) < 2:
                raise AblationError(f"{r.control_dir / 'table.json'} has no shuffled-image run (its eval ran with "
                                    "control=false); delete that folder and rerun")
            if _metrics(table["runs"][0], keys) != entry["metrics"]:  # the same predictions, scored alike
                raise AblationError(f"row '{r.id}': {r.control_dir / 'table.json'} does not hold the row's own "
                                    f"predictions (its first run differs from {entry['table']}); delete "
                                    f"{r.control_dir} and rerun")
            entry["shuffled_metrics"] = _metrics(table["runs"][1], keys)
        rows.append(entry)
    best = next((e for e in rows if best_plan is not None and e["id"] == best_plan.id), None)
    report: dict[str, Any] = {"name": cfg.name, "output_dir": cfg.output_dir, "metrics": cfg.metrics,
                              "best_by": cfg.control.metric, "best_row": best["id"] if best else None, "rows": rows}
    control = None
    if best is not None and cfg.control.enabled:
        if best["id"] not in control_tables:
            raise AblationError(f"the best row '{best['id']}' has no shuffled-image control run; collect() reads it "
                                "after run_ablation has run the row's control step (or use control.rows=all)")
        table = control_tables[best["id"]]
        control = {"name": f"{best['name']}, shuffled images (control)", "of_row": best["id"],
                   "n": table["runs"][1].get("n"), "table": str(best_plan.control_dir / "table.json"),
                   "metrics": _metrics(table["runs"][1], keys)}
        report["control"] = control
    deltas: dict[str, dict[str, Any]] = {}
    if best is not None and control is not None:
        best_runs = control_tables[best["id"]]["runs"]
        paired = next((p for p in control_tables[best["id"]].get("paired", [])
                       if p.get("run") == best_runs[1]["name"]), {})
        deltas["best_minus_control"] = {}
        for k in keys:
            a, b = _val(best["metrics"].get(k)), _val(control["metrics"].get(k))
            if a is None or b is None:
                continue
            d: dict[str, Any] = {"delta": a - b}
            pm = paired.get("metrics", {}).get(k)
            if pm and pm.get("ci_low") is not None:  # the eval's paired test is control - best: negate it
                d.update(ci_low=0.0 - pm["ci_high"], ci_high=0.0 - pm["ci_low"], p_value=pm.get("p_value"))
            deltas["best_minus_control"][k] = d
    base = next((r for r in rows if r["status"] == "evaluated" and r["id"] == cfg.targets.baseline_row), None)
    if best is not None and base is not None:
        deltas["best_minus_baseline"] = {}
        for k in keys:
            a, b = _val(best["metrics"].get(k)), _val(base["metrics"].get(k))
            if a is not None and b is not None:
                deltas["best_minus_baseline"][k] = {"delta": a - b}
    report["deltas"] = deltas
    checks = []
    for k, thr in cfg.targets.vs_control.items():
        d = deltas.get("best_minus_control", {}).get(k)
        checks.append({"target": f"best - control {k} >= {thr}", "delta": d["delta"] if d else None,
                       "holds": bool(d and d["delta"] >= thr - 1e-12)})
    for k, thr in cfg.targets.vs_baseline.items():
        d = deltas.get("best_minus_baseline", {}).get(k)
        checks.append({"target": f"best - baseline {k} > {thr}", "delta": d["delta"] if d else None,
                       "holds": bool(d and d["delta"] > thr)})
    compute = sum((t.get("recorded_seconds") or 0.0) for t in timings)
    if cfg.targets.max_minutes is not None:
        checks.append({"target": f"compute time of all steps <= {cfg.targets.max_minutes:g} min",
                       "delta": round(compute / 60, 2), "holds": compute / 60 <= cfg.targets.max_minutes,
                       "complete": all(t.get("recorded_seconds") is not None for t in timings)})
    report["targets"] = {"checks": checks, "all_hold": all(c["holds"] for c in checks)}
    report["timings"] = {"steps": timings, "this_run_s": round(total_seconds, 1), "compute_s": round(compute, 1)}
    return report


def to_markdown(report: dict[str, Any]) -> str:
    keys = report["metrics"]
    heads = [LABELS.get(k, k) for k in keys]
    out = [f"# {report['name']}", ""]
    ev = [r for r in report["rows"] if r["status"] == "evaluated"]
    if ev:
        out.append(f"Each row trained and evaluated alike; N = {ev[0].get('n')} test samples; 95% bootstrap intervals "
                   "as in each row's eval table (`table.json`). Best row by "
                   f"{LABELS.get(report['best_by'], report['best_by'])}: **{report['best_row']}**.")
        out.append("")
    out += ["| Method | encoder | LLM | " + " | ".join(heads) + " |", "|" + "---|" * (3 + len(keys))]
    for r in report["rows"]:
        if r["status"] == "skipped":
            out.append(f"| {r['name']} | {r['encoder']} | {r['llm']} | " +
                       " | ".join(["–"] * len(keys)) + " |")
            continue
        bold = "**" if r["id"] == report["best_row"] else ""
        out.append(f"| {bold}{r['name']}{bold} | {r['encoder']} | {r['llm']} | " +
                   " | ".join(_fmt(r["metrics"].get(k)) for k in keys) + " |")
    c = report.get("control")
    if c:
        best = next(r for r in ev if r["id"] == c["of_row"])
        out.append(f"| {c['name']} | {best['encoder']} | {best['llm']} | " +
                   " | ".join(_fmt(c["metrics"].get(k)) for k in keys) + " |")
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    if skipped:
        out += [""] + [f"- {r['name']} not run: {r['reason']}." for r in skipped]
    deltas = report["deltas"]
    if deltas:
        out += ["", "Differences (best row minus the other; best − control with the eval's paired bootstrap "
                    "interval and p):", ""]
        out += ["| | " + " | ".join(heads) + " |", "|" + "---|" * (1 + len(keys))]
        for name, label in (("best_minus_control", "best − control"), ("best_minus_baseline", "best − baseline")):
            if name in deltas:
                out.append(f"| {label} | " + " | ".join(_fmt_delta(deltas[name].get(k)) for k in keys) + " |")
    shuffled = [r for r in ev if r.get("shuffled_metrics")]
    if shuffled:
        out += ["", "Image contribution per row (row minus its own shuffled-image control):", ""]
        out += ["| Method | " + " | ".join(heads) + " |", "|" + "---|" * (1 + len(keys))]
        for r in shuffled:
            cells = []
            for k in keys:
                a, b = _val(r["metrics"].get(k)), _val(r["shuffled_metrics"].get(k))
                cells.append("–" if a is None or b is None else f"{a - b:+.3f}")
            out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    t = report["targets"]
    out += ["", f"Targets ({'all hold' if t['all_hold'] else 'NOT all hold'}):", "", "| target | value | holds |",
            "|---|---|---|"]
    for chk in t["checks"]:
        v = "–" if chk["delta"] is None else (f"{chk['delta']:.2f} min" if "min" in chk["target"]
                                              else f"{chk['delta']:+.3f}")
        out.append(f"| {chk['target']} | {v} | {'yes' if chk['holds'] else 'no'} |")
    tm = report["timings"]
    out += ["", f"Steps (this run {tm['this_run_s']:.0f} s; compute of all steps incl. earlier runs "
                f"{tm['compute_s']:.0f} s):", "", "| step | status | seconds | recorded seconds |", "|---|---|---|---|"]
    for s in tm["steps"]:
        rec = s.get("recorded_seconds")
        out.append(f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {'–' if rec is None else f'{rec:.0f}'} |")
    return "\n".join(out) + "\n"


def run_ablation(cfg: AblationConfig) -> dict[str, Any]:
    """Plan (every config checked), run what is missing, then write ablation.md / ablation.json."""
    t0 = time.perf_counter()
    plan = plan_ablation(cfg)
    out = Path(cfg.output_dir)
    print(f"Ablation '{cfg.name}': {len(plan.rows)} rows, {len(plan.steps)} steps -> {out}", flush=True)
    for r in plan.rows:
        print(f"  {r.name}: encoder {r.encoder}, LLM {r.llm}" + (f"  [skipped: {r.skipped}]" if r.skipped else ""))
    timings = []
    redo_under = out if cfg.on_changed == "redo" else None
    control_later = any(r.control_step is not None for r in plan.rows)
    n = len(plan.steps) + control_later
    for i, step in enumerate(plan.steps, 1):
        res = run_step(f"[{i}/{n}]", step, cfg.isolation, redo_under=redo_under)
        timings.append({"step": step.key, **res})
    best = pick_best(plan, cfg.control.metric) if control_later else None
    if best is not None:  # control.rows=best (every runnable row has a control step): only now is the best known
        def seed(step: Step) -> None:
            if seed_control_predictions(step.deps[0], step):
                print(f"    best row '{best.id}': starting from the predictions in {step.deps[0].out_dir}; only the "
                      "shuffled-image run is generated", flush=True)

        # wholly derived from the row's eval and checkpoint: a stale control is made again, whatever on_changed says
        res = run_step(f"[{n}/{n}]", best.control_step, cfg.isolation, redo_under=out, prepare=seed)
        timings.append({"step": best.control_step.key, **res})
        best.control_dir = best.control_step.out_dir
    report = collect(cfg, plan, timings, time.perf_counter() - t0)
    md = to_markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "ablation.md", md)
    report["files"] = {"md": str(out / "ablation.md"), "json": str(out / "ablation.json")}
    report["markdown"] = md
    return report


def load_ablation_config(path: str | Path | None, overrides: list[str] = ()) -> AblationConfig:
    return load_config(AblationConfig, path, list(overrides))
