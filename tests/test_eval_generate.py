"""Batched generation over a split: batch-size invariance, resume of a partial file, control, tables."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_recipe import toy_data  # noqa: F401  (module-scoped fixture)

from xraygpt.eval.generate import EvalConfig, EvalDataConfig, derangement, generate_predictions
from xraygpt.eval.run import evaluate
from xraygpt.llm import LLMConfig
from xraygpt.model import GenerationConfig, ModelConfig, XrayGPT


@pytest.fixture(scope="module")
def model_dir(tiny_llm_dir, tmp_path_factory):  # noqa: F811
    import torch

    torch.manual_seed(0)
    m = XrayGPT(ModelConfig(llm=LLMConfig(name_or_path=str(tiny_llm_dir))))
    torch.nn.init.normal_(m.llama_proj.weight, std=0.5)
    return m.save_pretrained(tmp_path_factory.mktemp("model"))


def cfg(model_dir, toy_data, out, **kw):  # noqa: F811
    base = dict(ckpt=str(model_dir), data=EvalDataConfig(root=str(toy_data), ann_file="filter_cap.json", embedded=False,
                                                          limit=6),
                generation=GenerationConfig(max_new_tokens=8), output_dir=str(out), batch_size=4, progress=False,
                metrics=["rouge"], bootstrap=50)
    base.update(kw)
    return EvalConfig(**base)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_do_not_depend_on_batch_size(model_dir, toy_data, tmp_path):  # noqa: F811
    a = read(generate_predictions(cfg(model_dir, toy_data, tmp_path / "a", batch_size=4)))
    b = read(generate_predictions(cfg(model_dir, toy_data, tmp_path / "b", batch_size=1)))
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert len(a) == 6 and {r["image_id"] for r in a} == {f"img{i}" for i in range(6)}
    assert a[0]["instruction"] == "Describe the given chest x-ray image in detail."
    assert a[0]["generation"]["max_new_tokens"] == 8


def test_resume_skips_done_ids_and_repairs_cut_line(model_dir, toy_data, tmp_path):  # noqa: F811
    full = read(generate_predictions(cfg(model_dir, toy_data, tmp_path / "full")))
    part = tmp_path / "part"
    path = generate_predictions(cfg(model_dir, toy_data, part, data=EvalDataConfig(
        root=str(toy_data), ann_file="filter_cap.json", embedded=False, limit=4)))
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:25])  # a kill in the middle of a write
    generate_predictions(cfg(model_dir, toy_data, part))
    resumed = read(path)
    assert [r["image_id"] for r in resumed] == [r["image_id"] for r in full]
    assert [r["prediction"] for r in resumed] == [r["prediction"] for r in full]


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10):
        perm = derangement(n, seed=1)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    assert derangement(10, 1) == derangement(10, 1)


def test_evaluate_writes_tables_with_control(model_dir, toy_data, tmp_path):  # noqa: F811
    report = evaluate(cfg(model_dir, toy_data, tmp_path / "ev", control=True))
    names = [r["name"] for r in report["runs"]]
    assert names == ["XrayGPT", "XrayGPT (shuffled images)"]
    control = read(tmp_path / "ev" / "control" / "predictions.jsonl")
    assert all(r["image_source"] != r["image_id"] for r in control)
    md = (tmp_path / "ev" / "table.md").read_text()
    assert "R-1" in md and "shuffled images" in md
    assert 0.0 <= report["runs"][0]["metrics"]["rouge1"]["value"] <= 1.0


def test_evaluate_uses_a_given_model_instead_of_loading_ckpt(model_dir, toy_data, tmp_path):  # noqa: F811
    from xraygpt.eval.generate import load_model

    loaded = read(generate_predictions(cfg(model_dir, toy_data, tmp_path / "from_ckpt")))
    model = load_model(model_dir)
    evaluate(cfg(model_dir, toy_data, tmp_path / "same"), model=model)
    assert [r["prediction"] for r in read(tmp_path / "same" / "predictions.jsonl")] == \
        [r["prediction"] for r in loaded]
    with torch.no_grad():
        model.llama_proj.weight.mul_(-3.0)  # an in-memory change that the folder does not have
    evaluate(cfg(tmp_path / "no_such_ckpt", toy_data, tmp_path / "changed"), model=model)
    changed = [r["prediction"] for r in read(tmp_path / "changed" / "predictions.jsonl")]
    assert changed != [r["prediction"] for r in loaded]


def test_checkpoint_for_another_llm_width_names_both(toy_data, tmp_path, tiny_llm_dir):  # noqa: F811
    import torch

    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 256), "llama_proj.bias": torch.zeros(4096)}},
               tmp_path / "x.pth")
    model_cfg = ModelConfig(llm=LLMConfig(name_or_path=str(tiny_llm_dir)))
    c = cfg(tmp_path / "x.pth", toy_data, tmp_path / "o", model=model_cfg)
    with pytest.raises(ValueError, match=r"\(4096, 256\) but this model expects \(64, 256\)"):
        generate_predictions(c)


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_llm_dir, tmp_path_factory):  # noqa: F811
    torch.manual_seed(0)
    m = XrayGPT(ModelConfig(llm=LLMConfig(name_or_path=str(tiny_llm_dir), dtype="bfloat16")))
    torch.nn.init.normal_(m.llama_proj.weight, std=0.5)
    return m.save_pretrained(tmp_path_factory.mktemp("model_bf16"))


def test_half_precision_llm_is_evaluated_in_float32_by_default(bf16_model_dir, toy_data, tmp_path):  # noqa: F811
    model = XrayGPT.from_pretrained(bf16_model_dir)
    weight = next(model.llm.parameters()).detach().clone()
    assert weight.dtype == torch.bfloat16
    a = read(generate_predictions(cfg(bf16_model_dir, toy_data, tmp_path / "a", batch_size=4), model))
    assert next(model.llm.parameters()).dtype == torch.float32
    assert torch.equal(next(model.llm.parameters()).detach(), weight.float())  # upcast exactly, not reloaded
    b = read(generate_predictions(cfg(bf16_model_dir, toy_data, tmp_path / "b", batch_size=1)))
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert a[0]["model"]["llm_dtype"] == "float32"
    kept = read(generate_predictions(cfg(bf16_model_dir, toy_data, tmp_path / "c", compute_dtype="model")))
    assert kept[0]["model"]["llm_dtype"] == "bfloat16"


def test_unknown_compute_dtype_is_refused(model_dir, toy_data, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="compute_dtype must be float32 or model, got 'fp16'"):
        cfg(model_dir, toy_data, tmp_path, compute_dtype="fp16").validate()
