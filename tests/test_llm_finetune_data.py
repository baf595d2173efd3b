"""LLM fine-tuning data: exact loss masks, bad-input counting, radiology conversations without val/test leaks."""

from __future__ import annotations

import importlib.util
import json
import logging
import re

import pytest
from conftest import REPO

from xraygpt.config import ConfigError, load_config
from xraygpt.conversation import default_prompt_file, get_template, read_prompt_file
from xraygpt.llm_finetune import radiology_conversations as rc
from xraygpt.llm_finetune.config import FinetuneConfig, RadiologySource
from xraygpt.llm_finetune.conversations import Conversation, read_sharegpt
from xraygpt.llm_finetune.encode import ConversationEncoder, encode_file
from xraygpt.processing import IGNORE_INDEX

TWO_TURNS = Conversation("c", 0, (("Is my heart enlarged?", "No, the heart size is normal."),
                                  ("And the lungs?", "The lungs are clear.")))


def test_loss_mask_covers_exactly_the_doctor_answers(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("xraygpt"), max_len=128)
    s = enc.encode(TWO_TURNS)
    assert len(s.input_ids) == 39
    # [bos] "###Patient: Is my heart enlarged? ###Doctor: " = 0..12, answer 1 = 13..21 (ends with "###"),
    # "###Patient: And the lungs? ###Doctor: " = 22..32, answer 2 = 33..38.
    labelled = [i for i, lab in enumerate(s.labels) if lab != IGNORE_INDEX]
    assert labelled == [*range(13, 22), *range(33, 39)]
    assert all(s.labels[i] == s.input_ids[i] for i in labelled)
    assert s.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(s.input_ids[13:22]) == "No, the heart size is normal.###"
    assert tokenizer.decode(s.input_ids[33:39]) == "The lungs are clear.###"
    assert tokenizer.decode(s.input_ids[1:13]) == "###Patient: Is my heart enlarged? ###Doctor: "
    assert tokenizer.decode(s.input_ids[22:33]) == "###Patient: And the lungs? ###Doctor: "
    # right padding in a batch: pad id, attention 0, label -100
    short = enc.encode(Conversation("d", 1, (("Hi?", "Hello."),)))
    batch = enc.collate([short, s])
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, 39)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (39 - n)
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all() and batch["labels"][1].tolist() == s.labels
    assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()


def _msg(role, value):
    return {"from": role, "value": value}


BAD_FILE = [
    {"id": "ok0", "conversations": [_msg("human", "Cough for a week?"), _msg("gpt", "Likely viral; rest.")]},
    {"id": "r1", "conversations": [_msg("system", "be nice"), _msg("human", "Hi"), _msg("gpt", "Hello")]},
    {"id": "r2", "conversations": [_msg("human", "Fever?"), _msg("gpt", "   ")]},
    {"id": "r3", "conversations": [_msg("gpt", "Hello, how can I help?"), _msg("human", "Chest pain.")]},
    {"id": "r4", "conversations": [_msg("human", "a"), _msg("human", "b"), _msg("gpt", "c")]},
    {"id": "r5", "messages": []},
    {"id": "ok6", "conversations": [_msg("human", "Rash?"), _msg("gpt", "Use a cream."), _msg("human", "Thanks")]},
    {"id": "r7", "conversations": [_msg("human", "Long?"), _msg("gpt", "very " * 200)]},
    {"id": "ok8", "conversations": [_msg("human", "Headache?"), _msg("gpt", "Drink water."),
                                    _msg("human", "Still?"), _msg("gpt", "See a doctor.")]},
]


def test_bad_conversations_are_counted_named_and_skipped(tokenizer, tmp_path, caplog):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(BAD_FILE))
    enc = ConversationEncoder(tokenizer, get_template("xraygpt"), max_len=64)
    with caplog.at_level(logging.WARNING):
        samples, report = encode_file(path, enc)
    assert report.total == 9 and report.used == len(samples) == 3
    assert report.counts() == {"unknown_role": 1, "empty_turn": 1, "starts_with_doctor": 1, "not_alternating": 1,
                               "malformed": 1, "too_long": 1}
    assert {p.reason: p.index for p in report.skipped} == {"unknown_role": 1, "empty_turn": 2,
                                                            "starts_with_doctor": 3, "not_alternating": 4,
                                                            "malformed": 5, "too_long": 7}
    assert [p.index for p in report.notes] == [6]  # kept, trailing patient turn dropped
    assert str(path) in caplog.text and "index 1 (id r1)" in caplog.text and "'system'" in caplog.text
    assert "index 7 (id r7)" in caplog.text and "> data.max_len 64" in caplog.text
    convs, _ = read_sharegpt(path)
    assert [c.id for c in convs] == ["ok0", "ok6", "r7", "ok8"] and len(convs[3].turns) == 2
    with pytest.raises(ValueError, match=r"mixed\.json: index 1 \(id r1\): unknown_role"):
        encode_file(path, enc, on_bad="error")


def test_nothing_usable_is_a_clear_error(tokenizer, tmp_path):
    enc = ConversationEncoder(tokenizer, get_template("xraygpt"), max_len=64)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(BAD_FILE[1:6]))
    with pytest.raises(ValueError, match=r"no usable conversation left in .*bad\.json(.|\n)*unknown_role x1"):
        encode_file(bad, enc)
    wrong = tmp_path / "dict.json"
    wrong.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match=r"dict\.json: the top level is a dict; expected ShareGPT JSON"):
        encode_file(wrong, enc)


# ------------------------------------------------------------------------------------- radiology
@pytest.fixture(scope="module")
def embedded80(tmp_path_factory):
    from xraygpt.data.embedded import build_embedded_dataset

    return build_embedded_dataset(out_dir=tmp_path_factory.mktemp("emb80"), limit=80)


def _captions(ds, split):
    return {a["image_id"]: a["caption"] for a in json.loads(ds.split_file(split).read_text())["annotations"]}


def test_radiology_conversations_use_train_reports_only(embedded80, tmp_path):
    out = tmp_path / "train.json"
    stats = rc.write_radiology_conversations(embedded80.root, "train", out, seed=0)
    convs = json.loads(out.read_text())
    train = _captions(embedded80, "train")
    held_out = {**_captions(embedded80, "val"), **_captions(embedded80, "test")}
    assert stats["reports"] == len(train) and len(convs) == stats["conversations"] > 30
    qa = [c for c in convs if not c["id"].endswith(rc.WRITE_SUFFIX)]
    write_ups = [c for c in convs if c["id"].endswith(rc.WRITE_SUFFIX)]
    assert {c["id"] for c in qa} <= set(train) and len(write_ups) == stats["write_ups"] > 30
    assert {c["id"].removesuffix(rc.WRITE_SUFFIX) for c in write_ups} <= set(train)
    train_sentences = {s for cap in train.values() for s in rc.sentences(cap)}
    held_only = {s for cap in held_out.values() for s in rc.sentences(cap)} - train_sentences
    assert len(held_only) > 50  # the check below has something to catch
    text = out.read_text()
    leaked = [s for s in held_only if len(s) > 25 and json.dumps(s)[1:-1] in text]
    assert leaked == []
    labels = json.loads((embedded80.root / "labels.json").read_text())
    for conv in write_ups:  # the film's labelled findings in, its own report summary out
        image_id = conv["id"].removesuffix(rc.WRITE_SUFFIX)
        (ask, answer), meta = conv["conversations"], labels["images"][image_id]
        assert meta["labelled"] and answer == {"from": "gpt", "value": train[image_id]}
        named = [c.lower() for c, v in zip(labels["classes"], meta["labels"]) if v and c != "No Finding"]
        slot = re.fullmatch(r"<Img>(.*)</Img> (.*)", ask["value"])  # the vision prompt, findings in the image slot
        assert ask["from"] == "human" and slot and all(c in slot.group(1) for c in named)
        assert named or slot.group(1) == "no abnormality"
        assert f"<Img><ImageHere></Img> {slot.group(2)}" in read_prompt_file(default_prompt_file())
        assert train[image_id] not in ask["value"]
    for conv in qa:
        caption, turns = train[conv["id"]], conv["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 2 <= len(turns) <= 8
        assert re.search(r'"(.*)"', turns[0]["value"]).group(1) == caption  # the patient hands over their report
        for t in turns[1::2]:  # every answer: the report's own sentences, or the label verdict
            if not re.match(r"(Yes|No)\. The report describes", t["value"]):
                assert all(s in caption for s in rc.sentences(t["value"])), (conv["id"], t["value"])
    kinds = {q for conv in convs for t in conv["conversations"][::2] for k, qs in rc.QUESTIONS.items()
             for q in qs if t["value"].endswith(q)}
    assert {"What does it say about my lungs?", "Is my chest X-ray normal?"} & kinds


def test_radiology_conversations_are_deterministic_and_refuse_test(embedded80, tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    rc.main(["--embedded-dir", str(embedded80.root), "--out", str(a), "--seed", "3"])
    rc.write_radiology_conversations(embedded80.root, "train", b, seed=3)
    rc.write_radiology_conversations(embedded80.root, "train", c, seed=4)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    with pytest.raises(ValueError, match="test split stays held out"):
        rc.write_radiology_conversations(embedded80.root, "test", tmp_path / "t.json")
    with pytest.raises(SystemExit):
        rc.main(["--embedded-dir", str(embedded80.root), "--out", str(a), "--split", "test"])


def test_radiology_conversation_kinds_select_what_is_built(embedded80, tmp_path):
    stats = {k: rc.write_radiology_conversations(embedded80.root, "train", tmp_path / f"{k}.json", kinds=kinds)
             for k, kinds in {"both": rc.KINDS, "write": ["write_up"], "qa": ["qa"]}.items()}
    ids = {k: [c["id"] for c in json.loads((tmp_path / f"{k}.json").read_text())] for k in stats}
    assert all(i.endswith(rc.WRITE_SUFFIX) for i in ids["write"]) and ids["write"]
    assert not any(i.endswith(rc.WRITE_SUFFIX) for i in ids["qa"]) and ids["qa"]
    assert sorted(ids["both"]) == sorted(ids["write"] + ids["qa"])
    assert stats["write"]["kinds"] == ["write_up"] and stats["write"]["write_ups"] == len(ids["write"])
    with pytest.raises(ValueError, match=r"kinds \['chat'\]: choose one or more of \['qa', 'write_up'\]"):
        rc.write_radiology_conversations(embedded80.root, "train", tmp_path / "x.json", kinds=["chat"])
    with pytest.raises(ValueError, match="choose one or more"):
        RadiologySource(kinds=[]).validate()


def test_mesh_slot_names_each_drawn_finding_with_side_and_zone(embedded80, tmp_path):
    granuloma = "Calcified Granuloma/lung/upper lobe/right"
    rec = rc.ReportRecord("x", "A report.", ("Lung Lesion", "Pleural Effusion"), True,
                          tags=(granuloma, "Pleural Effusion/left/small", "Technical Quality of Image Unsatisfactory",
                                granuloma))
    assert rc.findings_phrase(rec) == "lung lesion and pleural effusion"
    # each drawn tag once, in order; image quality is not drawn (the image cannot show it); severity is left out
    assert rc.findings_phrase(rec, "mesh") == \
        "calcified granuloma in the right upper lobe and pleural effusion in the left"
    normal = rc.ReportRecord("y", "Clear.", ("No Finding",), True, tags=("normal",))
    assert rc.findings_phrase(normal, "mesh") == rc.findings_phrase(normal) == "no abnormality"
    out = tmp_path / "mesh.json"
    stats = rc.write_radiology_conversations(embedded80.root, "train", out, kinds=["write_up"], slot="mesh")
    labels = json.loads((embedded80.root / "labels.json").read_text())
    convs = json.loads(out.read_text())
    assert stats["slot"] == "mesh" and len(convs) == stats["write_ups"] > 30
    sided = 0
    for conv in convs:
        tags = labels["images"][conv["id"].removesuffix(rc.WRITE_SUFFIX)]["tags"]
        slot = re.fullmatch(r"<Img>(.*)</Img> .*", conv["conversations"][0]["value"]).group(1)
        assert slot == rc.findings_phrase(rc.ReportRecord("", "", ("x",), True, tags=tuple(tags)), "mesh")
        sided += " in the right" in slot or " in the left" in slot
    assert sided > 5  # sides reach the slot
    with pytest.raises(ValueError, match=r"slot 'words': choose one of \['chexpert', 'mesh'\]"):
        RadiologySource(slot="words").validate()


# --------------------------------------------------------------------------------------- configs
LLM_CONFIGS = sorted((REPO / "configs" / "llm").glob("*.yaml"))


@pytest.mark.parametrize("path", LLM_CONFIGS, ids=lambda p: p.name)
def test_llm_configs_load_and_start_with_launch_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Launch: python scripts/finetune_llm.py --cfg configs/llm/" + path.name)
    cfg = load_config(FinetuneConfig, path)
    assert cfg.data.template == "xraygpt" and cfg.model.method in ("lora", "full")


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_llm", REPO / "scripts" / "finetune_llm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_errors_name_the_key(monkeypatch, tmp_path):
    from xraygpt.train.trainer import TrainingError

    main = load_script().main

    assert {p.name for p in LLM_CONFIGS} >= {"radiology_embedded.yaml", "medical.yaml"}
    with pytest.raises(ConfigError, match="unknown key 'model.lora.alhpa'. Did you mean 'alpha'"):
        load_config(FinetuneConfig, None, ["model.lora.alhpa=4"])
    with pytest.raises(ValueError, match="model.method must be one of"):
        load_config(FinetuneConfig, None, ["model.method=qlora"])
    monkeypatch.delenv("XRAYGPT_MEDICAL_CONVERSATIONS", raising=False)
    out = tmp_path / "medical"
    with pytest.raises(TrainingError, match=r"data.train_file is not set(.|\n)*ShareGPT JSON(.|\n)*ChatDoctor"):
        main(["--cfg", str(REPO / "configs/llm/medical.yaml"), f"run.output_dir={out}"])
    assert not out.exists()  # refused before anything was created
