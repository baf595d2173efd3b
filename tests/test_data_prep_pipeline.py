"""`python -m data_prep` end to end: outputs, manifest, LLM cleaning against the local server, dry run, the
MIMIC data-use guard, and an API key that never reaches any output."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import FakeOpenAIServer, last_user_message
from test_data_prep_mimic import FIXTURE_STUDIES, write_mimic_tree

from data_prep.__main__ import main
from data_prep.cleaners import has_blank, rules_summary
from data_prep.guard import DataUseError, check_data_use
from xraygpt.openai_client import ChatEndpointConfig

REPO = Path(__file__).resolve().parents[1]
CANARY = "sk-canary-5f1e0c9a2b7d4e3f8a6b1c0d9e8f7a6b"


def fake_llm(body: dict) -> str:
    """A stand-in model that cleans with the rules, reading the report back out of our prompt."""
    text = last_user_message(body)
    findings = re.search(r"^Findings: (.*)$", text, re.MULTILINE).group(1)
    impression = re.search(r"^Impression: (.*)$", text, re.MULTILINE).group(1)
    return rules_summary(findings, impression) or "No acute cardiopulmonary process."


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def mimic_yaml(tmp_path: Path, cfg) -> Path:
    """A mimic config file for the fixture tree."""
    lines = ["dataset: mimic", f"output_dir: {tmp_path / 'out'}", "mimic:", f"  reports: {cfg.reports}",
             f"  split_csv: {cfg.split_csv}", f"  metadata_csv: {cfg.metadata_csv}",
             f"  images_dir: {cfg.images_dir}"]
    path = tmp_path / "mimic.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def llm_overrides(server: FakeOpenAIServer, tmp_path: Path, **kw) -> list[str]:
    values = {"cleaner": "llm", "llm.endpoint.base_url": server.base_url, "llm.endpoint.timeout_s": 3,
              "llm.endpoint.max_attempts": 3, "llm.endpoint.backoff_base_s": 0.01,
              "llm.endpoint.backoff_max_s": 0.02, "llm.endpoint.concurrency": 2,
              "llm.endpoint.cache_dir": str(tmp_path / "cache")}
    values.update(kw)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture()
def server():
    with FakeOpenAIServer(responder=fake_llm, hang_s=1.0) as s:
        yield s


def test_iu_embedded_rules_outputs_and_manifest(tmp_path, capsys):
    out = tmp_path / "iu"
    rc = main(["iu_embedded", "--cfg", str(REPO / "configs/data/iu_embedded.yaml"), f"output_dir={out}"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "[filter] 3955 reports: kept 3398; dropped no_findings 530, no_impression 6" in stdout
    m = read_json(out / "manifest.json")
    assert m["counts"]["filter"] == {"input": 3955, "kept": 3398, "no_findings": 530, "no_impression": 6,
                                     "findings_too_short": 13, "impression_too_short": 8}
    assert m["counts"]["kept_without_images"] == 86 and m["counts"]["cleaned"] == 3312
    assert m["counts"]["outcome"]["ok"] == 3312 and m["counts"]["pairs"] == {"train": 5183, "val": 625,
                                                                             "test": 618}
    assert m["cleaner"]["name"] == "rules" and m["versions"]["openai"] and m["data_use"] == "not applicable"
    train = read_json(out / "train.json")["annotations"]
    original = read_json(out / "filter_cap.json")["annotations"]
    assert len(original) == len(train) == 5183
    assert set(original[0]) == {"image_id", "caption"}  # the original XrayGPT format
    assert set(train[0]) == {"image_id", "caption", "report_id", "image"}
    assert train[0]["image_id"] == "1_1" and train[0]["image"] == "CXR1_1_IM-0001-3001.png"
    captions = [a["caption"] for split in ("train", "val", "test") for a in read_json(out / f"{split}.json")[
        "annotations"]]
    assert not [c for c in captions if has_blank(c) or "XXXX" in c]
    ids = [a["image_id"] for split in ("train", "val", "test") for a in read_json(out / f"{split}.json")[
        "annotations"]]
    assert len(ids) == len(set(ids))  # one pair per image
    reports = {a["report_id"]: s for s in ("train", "val", "test") for a in read_json(out / f"{s}.json")[
        "annotations"]}
    assert len(reports) == 3312  # every report lives in exactly one split


def test_openi_stem_ids_and_limit(tmp_path):
    out = tmp_path / "iu"
    rc = main(["iu_embedded", "--cfg", str(REPO / "configs/data/iu_embedded.yaml"), "--limit", "3",
               f"output_dir={out}", "openi.image_id_style=stem", "openi.val_fraction=0", "openi.test_fraction=0"])
    assert rc == 0
    ann = read_json(out / "filter_cap.json")["annotations"]
    assert [a["image_id"] for a in ann] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001",
                                           "CXR2_IM-0652-2001", "CXR4_IM-2050-1001", "CXR4_IM-2050-2001"]


def test_mimic_rules_with_image_links(tmp_path):
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES)
    links = tmp_path / "flat"
    rc = main(["mimic", "--cfg", str(mimic_yaml(tmp_path, cfg)), "cleaner=rules", f"link_images_dir={links}"])
    assert rc == 0
    out = tmp_path / "out"
    assert [a["image_id"] for a in read_json(out / "filter_cap.json")["annotations"]] == ["aaaa-0001"]
    assert [a["image_id"] for a in read_json(out / "val.json")["annotations"]] == ["bbbb-0001"]
    assert [a["image_id"] for a in read_json(out / "test.json")["annotations"]] == ["dddd-0001", "dddd-0002"]
    assert sorted(p.name for p in links.iterdir()) == ["aaaa-0001.jpg", "bbbb-0001.jpg", "dddd-0001.jpg",
                                                      "dddd-0002.jpg"]
    assert (links / "aaaa-0001.jpg").resolve() == (Path(cfg.images_dir) / "files/p10/p10000001/s50000001/"
                                                   "aaaa-0001.jpg").resolve()
    m = read_json(out / "manifest.json")
    assert m["counts"]["reader"]["reports_missing"] == 1 and m["counts"]["filter"]["no_impression"] == 1


def test_mimic_llm_faults_cache_and_canary_key(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES)
    yaml_path = mimic_yaml(tmp_path, cfg)
    # s50000002's findings fail three times (recorded failure), s50000004's answer is empty once (retried)
    server.fault_for("The aorta is mildly tortuous", ["500", "500", "500"])
    server.fault_for("Endotracheal tube terminates", ["empty"])
    rc = main(["mimic", "--cfg", str(yaml_path)] + llm_overrides(server, tmp_path))
    captured = capsys.readouterr()
    assert rc == 0
    assert server.calls == 1 + 3 + 2
    assert {r["key"] for r in server.requests} == {CANARY}  # the key was sent, from the environment
    out = tmp_path / "out"
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"report_id": "s50000002", "reason": "http_500 (after 3 attempts)"}]
    assert [a["image_id"] for a in read_json(out / "filter_cap.json")["annotations"]] == ["aaaa-0001"]
    assert read_json(out / "val.json")["annotations"] == []
    assert len(read_json(out / "test.json")["annotations"]) == 2
    m = read_json(out / "manifest.json")
    assert m["model"] == "gpt-3.5-turbo" and m["endpoint"] == server.base_url
    assert m["prompt_sha256"] == m["cleaner"]["prompt_sha256"] and len(m["prompt_sha256"]) == 64
    assert m["counts"]["outcome"] == {"ok": 2, "failed": 1, "by_source": {"api": 3},
                                      "failure_reasons": {"http_500": 1}}
    assert m["cleaner"]["usage"]["requests"] == 6 and m["cleaner"]["usage"]["retries"] == 3
    assert m["data_use"] == "local endpoint"
    assert "[data-use] MIMIC-CXR text goes to a local endpoint" in captured.out
    assert re.search(r"\[usage\] 6 requests \(3 retries\).*estimated cost \$\d", captured.out)

    # same output folder: the journal answers everything, failures included -> 0 calls
    assert main(["mimic", "--cfg", str(yaml_path)] + llm_overrides(server, tmp_path)) == 0
    assert server.calls == 6
    # a fresh folder with the same cache: only the report that failed is asked again
    rc = main(["mimic", "--cfg", str(yaml_path), f"output_dir={tmp_path / 'out2'}"]
              + llm_overrides(server, tmp_path))
    assert rc == 0 and server.calls == 7
    assert read_json(tmp_path / "out2" / "manifest.json")["counts"]["outcome"]["by_source"] == {"cache": 2,
                                                                                               "api": 1}
    captured = capsys.readouterr()

    # the key appears nowhere: outputs, cache, journal, console
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert leaked == []
    assert CANARY not in captured.out + captured.err
    assert "OPENAI_API_KEY" in (out / "manifest.json").read_text()  # the variable's name is recorded, not its value


def test_dry_run_prints_requests_and_sends_nothing(tmp_path, server, capsys):
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES)
    rc = main(["mimic", "--cfg", str(mimic_yaml(tmp_path, cfg)), "--dry-run"] + llm_overrides(server, tmp_path))
    assert rc == 0
    out = capsys.readouterr().out
    assert server.calls == 0 and not (tmp_path / "out").exists()
    assert out.count(f"[dry-run] POST {server.base_url}/chat/completions") == 2  # dry_run_show
    first = json.loads(out.split("(report s50000001)\n", 1)[1].split("\n[dry-run]", 1)[0])
    assert first["model"] == "gpt-3.5-turbo" and first["messages"][0]["role"] == "system"
    assert "Findings: The heart size is top normal." in first["messages"][1]["content"]
    assert re.search(r"\[dry-run\] 3 requests to .* about \d+ prompt \+ \d+ completion tokens, about \$", out)


def test_guard_refuses_remote_mimic_before_anything(tmp_path, capsys):
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES)
    rc = main(["mimic", "--cfg", str(mimic_yaml(tmp_path, cfg)), "cleaner=llm",
               "llm.endpoint.base_url=https://api.openai.com/v1"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "Refusing to send MIMIC-CXR report text to the non-local endpoint https://api.openai.com/v1" in err
    assert "PhysioNet Credentialed Health Data Use Agreement" in err and "llm.allow_remote_mimic=true" in err
    assert not (tmp_path / "out").exists()


def test_guard_approved_remote_explains_before_sending(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    cfg = write_mimic_tree(tmp_path, FIXTURE_STUDIES)
    # 192.0.2.1 is TEST-NET-1: never routed, so the one request fails and is recorded; the run goes on
    rc = main(["mimic", "--cfg", str(mimic_yaml(tmp_path, cfg)), "cleaner=llm", "--limit", "1",
               "llm.endpoint.base_url=http://192.0.2.1:9/v1", "llm.allow_remote_mimic=true",
               "llm.endpoint.max_attempts=1", "llm.endpoint.timeout_s=0.3", f"llm.endpoint.cache_dir={tmp_path}/c"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.index("[data-use] Sending MIMIC-CXR report text to http://192.0.2.1:9/v1 because "
                     "llm.allow_remote_mimic=true") < out.index("[filter]")
    m = read_json(tmp_path / "out" / "manifest.json")
    assert m["data_use"] == "remote endpoint approved by llm.allow_remote_mimic"
    assert m["counts"]["outcome"]["failed"] == 1


def test_check_data_use_verdicts():
    local = ChatEndpointConfig(base_url="http://localhost:8000/v1")
    remote = ChatEndpointConfig(base_url="https://user:secret@llm.example.org/v1")
    azure = ChatEndpointConfig(provider="azure", azure_endpoint="https://res.openai.azure.com",
                               azure_deployment="d", api_version="2024-06-01")
    sink = io.StringIO()
    assert check_data_use("openi", "llm", remote, False, out=sink) == "not applicable"
    assert check_data_use("mimic", "rules", remote, False, out=sink) == "not applicable"
    assert check_data_use("mimic", "llm", local, False, out=sink) == "local endpoint"
    assert check_data_use("mimic", "llm", remote, False, dry_run=True, out=sink) == "dry run"
    for endpoint, url in ((remote, "https://llm.example.org/v1"),
                          (azure, "https://res.openai.azure.com/openai/deployments/d")):
        with pytest.raises(DataUseError, match=re.escape(url)):
            check_data_use("mimic", "llm", endpoint, False, out=sink)
    assert "secret" not in sink.getvalue()  # credentials in a URL are never printed


@pytest.mark.parametrize("args,message", [
    (["cleanr=llm"], "unknown key 'cleanr'. Did you mean 'cleaner'?"),
    (["llm.endpoint.concurency=4"], "Did you mean 'concurrency'?"),
    (["limit=0"], "limit must be >= 1"),
    (["llm.endpoint.api_key_env=sk-abc-123"], "must be the NAME of an environment variable"),
])
def test_bad_config_is_refused_clearly(tmp_path, capsys, args, message):
    rc = main(["iu_embedded", "--cfg", str(REPO / "configs/data/iu_embedded.yaml"), f"output_dir={tmp_path}/o"]
              + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert "sk-abc-123" not in err


def test_dataset_mismatch_is_refused(capsys):
    assert main(["openi", "--cfg", str(REPO / "configs/data/iu_embedded.yaml")]) == 2
    assert "is for dataset 'iu_embedded' but the command asks for 'openi'" in capsys.readouterr().err


def test_every_data_config_loads():
    from data_prep.config import DataPrepConfig
    from xraygpt.config import load_config

    for name in ("mimic", "openi", "iu_embedded"):
        path = REPO / "configs/data" / f"{name}.yaml"
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# python -m data_prep {name} --cfg configs/data/{name}.yaml")
        cfg = load_config(DataPrepConfig, path)
        assert cfg.dataset == name
