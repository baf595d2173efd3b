"""The pairwise GPT judge against a real local HTTP server: A/B order, position bias, resume, cache, bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import FakeOpenAIServer, last_user_message

from xraygpt.eval.judge import (
    JudgeConfig,
    JudgePrompt,
    JudgeRunConfig,
    binomial_two_sided_p,
    judge_runs,
    parse_verdict,
    run1_position,
)
from xraygpt.eval.predictions import PredictionsError, append_predictions
from xraygpt.openai_client import ChatEndpointConfig

REPO = Path(__file__).resolve().parents[1]
N = 40


def reference(i: int) -> str:
    return f"Small left pleural effusion in case {i}."


def write_runs(tmp_path: Path, n: int = N, good=None, bad=None) -> tuple[Path, Path]:
    """Run 1 says GOOD, run 2 says BAD, for the same ids and references (override per index with good/bad)."""
    good = good or (lambda i: f"GOOD summary of case {i}.")
    bad = bad or (lambda i: f"BAD summary of case {i}.")
    p1, p2 = tmp_path / "good" / "predictions.jsonl", tmp_path / "bad" / "predictions.jsonl"
    append_predictions(p1, [{"image_id": f"s{i:03d}", "reference": reference(i), "prediction": good(i)}
                            for i in range(n)])
    append_predictions(p2, [{"image_id": f"s{i:03d}", "reference": reference(i), "prediction": bad(i)}
                            for i in range(n)])
    return p1, p2


def responses(body: dict) -> tuple[str, str]:
    m = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\n", last_user_message(body), re.S)
    assert m, "the judge prompt lost its Response A / Response B layout"
    return m.group(1), m.group(2)


def case_of(body: dict) -> int:
    return int(re.search(r"in case (\d+)\.", last_user_message(body)).group(1))


def fair(body: dict) -> str:
    """A judge that prefers the GOOD response wherever it stands."""
    a, _ = responses(body)
    return f"Response {'A' if 'GOOD' in a else 'B'} matches the effusion.\nAnswer: {'A' if 'GOOD' in a else 'B'}"


def always_a(body: dict) -> str:
    return "Both mention the case.\n**Answer: A**"


def cfg_for(server: FakeOpenAIServer, tmp_path: Path, p1: Path, p2: Path, out: str = "out", **kw) -> JudgeConfig:
    endpoint = ChatEndpointConfig(base_url=server.base_url, model="judge-test", concurrency=4, timeout_s=5.0,
                                  max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, max_tokens=64,
                                  cache=kw.pop("cache", True), cache_dir=str(tmp_path / "cache"))
    base = dict(run1=JudgeRunConfig(str(p1), "good"), run2=JudgeRunConfig(str(p2), "bad"),
                output_dir=str(tmp_path / out), endpoint=endpoint, dataset="other", bootstrap=200)
    base.update(kw)
    cfg = JudgeConfig(**base)
    cfg.validate()
    return cfg


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- pure pieces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "verdict"), [
    ("Both fine.\nAnswer: A", "A"), ("answer: b", "B"), ("x\n\n**Answer:** Tie\n\n", "tie"), ("Answer: (B).", "B"),
    ("Final answer: Response A", "A"), ("Answer: A\nbecause it is shorter", None), ("I prefer A.", None),
    ("Answer: A or B", None), ("", None), (None, None), ("Answer: C", None)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_position_is_seeded_and_balanced():
    ids = [f"img{i}" for i in range(2000)]
    first = [run1_position(0, i) for i in ids]
    assert first == [run1_position(0, i) for i in ids]  # same seed, same order
    assert 0.46 < first.count("A") / len(ids) < 0.54
    other = [run1_position(1, i) for i in ids]
    assert 0.4 < sum(a != b for a, b in zip(first, other)) / len(ids) < 0.6  # another seed reshuffles


def test_binomial_p():
    assert binomial_two_sided_p(5, 10) == pytest.approx(1.0)
    assert binomial_two_sided_p(10, 10) == pytest.approx(2 / 1024)
    assert binomial_two_sided_p(0, 0) == 1.0


def test_prompt_file_needs_its_placeholders(tmp_path):
    bad = tmp_path / "judge_bad.txt"
    bad.write_text("### user\nCompare {response_a} with {response_b}.\n")
    with pytest.raises(ValueError, match=r"judge_bad.txt.*\{reference\}"):
        JudgePrompt.load(bad)
    prompt = JudgePrompt.load("xraygpt/prompts/judge_v1.txt")
    msgs = prompt.messages("ref {response_b}", "first", "second")
    assert msgs[0]["role"] == "system" and "ref {response_b}" in msgs[1]["content"]  # filled once, not twice
    assert prompt.version.startswith("judge_v1:")


# ---- against the server --------------------------------------------------------------------------------------


def test_order_recorded_and_fair_judge_gives_run1_every_win(tmp_path):
    p1, p2 = write_runs(tmp_path)
    with FakeOpenAIServer(responder=fair) as server:
        report = judge_runs(cfg_for(server, tmp_path, p1, p2), out=io.StringIO())
        sent = {case_of(r["body"]): responses(r["body"]) for r in server.requests}
    records = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    assert [r["image_id"] for r in records] == [f"s{i:03d}" for i in range(N)]
    for i, r in enumerate(records):
        assert r["run1_position"] == run1_position(0, r["image_id"])
        a, b = sent[i]
        assert ("GOOD" in a) == (r["run1_position"] == "A") and ("GOOD" in b) == (r["run1_position"] == "B")
        assert (r["position_a"], r["position_b"]) == (("good", "bad") if r["run1_position"] == "A" else ("bad", "good"))
    at_a = sum(r["run1_position"] == "A" for r in records)
    assert 12 <= at_a <= 28  # roughly balanced on 40 ids
    s = report["summary"]
    assert s["counts"] == {"win": N, "tie": 0, "loss": 0, "invalid": 0}
    assert s["rates"]["win"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert s["position"]["picked_A"] == at_a and s["position"]["picked_B"] == N - at_a
    saved = json.loads((tmp_path / "out" / "judge.json").read_text())
    assert saved["summary"]["counts"]["win"] == N and saved["settings"]["prompt_version"].startswith("judge_v1:")
    md = (tmp_path / "out" / "judge.md").read_text()
    assert "| win (good closer) | 40 | 100.0% [100.0, 100.0] |" in md


def test_always_a_judge_measures_position_bias(tmp_path):
    p1, p2 = write_runs(tmp_path)
    with FakeOpenAIServer(responder=always_a) as server:
        report = judge_runs(cfg_for(server, tmp_path, p1, p2), out=io.StringIO())
    records = read_jsonl(tmp_path / "out" / "judgments.jsonl")
    at_a = sum(r["run1_position"] == "A" for r in records)
    pos, s = report["summary"]["position"], report["summary"]
    assert (pos["picked_A"], pos["picked_B"], pos["picked_tie"]) == (N, 0, 0)
    assert pos["share_A_of_A_or_B"]["value"] == 1.0 and pos["binomial_p_A_vs_B"] < 1e-9
    # A judge that only ever says "A" makes run 1 win exactly where the shuffle put it at A.
    assert s["counts"] == {"win": at_a, "tie": 0, "loss": N - at_a, "invalid": 0}
    assert all(r["outcome"] == ("win" if r["run1_position"] == "A" else "loss") for r in records)
    win = s["rates"]["win"]
    assert win["value"] == pytest.approx(at_a / N) and win["ci_low"] < win["value"] < win["ci_high"]
    assert s["rates"]["net"]["value"] == pytest.approx((2 * at_a - N) / N)
    assert f"picked position A {N} times, B 0" in (tmp_path / "out" / "judge.md").read_text()


def test_resume_after_partial_run_makes_no_repeat_calls(tmp_path):
    p1, p2 = write_runs(tmp_path)
    with FakeOpenAIServer(responder=fair) as server:
        judge_runs(cfg_for(server, tmp_path, p1, p2, cache=False, limit=15), out=io.StringIO())
        first = sorted(case_of(r["body"]) for r in server.requests)
        assert first == list(range(15))
        server.reset()
        report = judge_runs(cfg_for(server, tmp_path, p1, p2, cache=False), out=io.StringIO())
        second = sorted(case_of(r["body"]) for r in server.requests)
        assert second == list(range(15, N))  # only what the partial run had not done
        server.reset()
        again = judge_runs(cfg_for(server, tmp_path, p1, p2, cache=False), out=io.StringIO())
        assert server.calls == 0
    assert report["summary"]["counts"]["win"] == again["summary"]["counts"]["win"] == N
    assert Counter(r["source"] for r in read_jsonl(tmp_path / "out" / "judgments.jsonl")) == {"journal": N}
    assert again["usage"]["journal_hits"] == N and again["usage"]["requests"] == 0


def test_cache_saves_calls_and_keys_on_the_order(tmp_path):
    p1, p2 = write_runs(tmp_path)
    with FakeOpenAIServer(responder=fair) as server:
        judge_runs(cfg_for(server, tmp_path, p1, p2, out="a"), out=io.StringIO())
        assert server.calls == N
        server.reset()
        report = judge_runs(cfg_for(server, tmp_path, p1, p2, out="b"), out=io.StringIO())  # fresh journal
        assert server.calls == 0 and report["usage"]["cache_hits"] == N
        server.reset()
        judge_runs(cfg_for(server, tmp_path, p1, p2, out="c", seed=7), out=io.StringIO())
        moved = sum(run1_position(0, f"s{i:03d}") != run1_position(7, f"s{i:03d}") for i in range(N))
        assert 0 < moved < N and server.calls == moved  # a swapped pair is a new request; the rest are cached
    assert read_jsonl(tmp_path / "b" / "judgments.jsonl") != []


def test_unparseable_answers_are_retried_then_counted_invalid(tmp_path):
    p1, p2 = write_runs(tmp_path, n=20)
    seen: Counter = Counter()
    lock = threading.Lock()

    def flaky(body: dict) -> str:
        i = case_of(body)
        with lock:
            seen[i] += 1
            tries = seen[i]
        if i % 4 == 0 or (i % 4 == 1 and tries == 1):
            return "Response A is better, I think."  # no verdict line
        return fair(body)

    with FakeOpenAIServer(responder=flaky) as server:
        report = judge_runs(cfg_for(server, tmp_path, p1, p2), out=io.StringIO())
        assert server.calls == 20 + 5 + 5  # the 5 hopeless ones asked twice (invalid_retries=1), 5 fixed on retry
    s = report["summary"]
    assert s["counts"] == {"win": 15, "tie": 0, "loss": 0, "invalid": 5} and s["n_valid"] == 15
    assert s["rates"]["win"]["value"] == 1.0  # invalid samples are reported, not scored
    invalid = [r for r in read_jsonl(tmp_path / "out" / "judgments.jsonl") if r["outcome"] == "invalid"]
    assert sorted(int(r["image_id"][1:]) for r in invalid) == [0, 4, 8, 12, 16]
    assert all(r["reason"].startswith("invalid: no final line") and r["verdict"] is None for r in invalid)
    assert "Invalid (no parsable verdict after retries, or the request failed): 5" in report["markdown"]


def test_empty_and_identical_predictions_need_no_call(tmp_path):
    def good(i: int) -> str:
        return {0: "", 1: "", 2: "Same words.", 3: "GOOD summary of case 3."}.get(i, f"GOOD summary of case {i}.")

    def bad(i: int) -> str:
        return {0: "", 1: "BAD summary of case 1.", 2: " Same  words.", 3: ""}.get(i, f"BAD summary of case {i}.")

    p1, p2 = write_runs(tmp_path, n=8, good=good, bad=bad)
    with FakeOpenAIServer(responder=fair) as server:
        report = judge_runs(cfg_for(server, tmp_path, p1, p2), out=io.StringIO())
        assert sorted(case_of(r["body"]) for r in server.requests) == [4, 5, 6, 7]
    by_id = {r["image_id"]: r for r in read_jsonl(tmp_path / "out" / "judgments.jsonl")}
    assert [(by_id[f"s00{i}"]["decided_by"], by_id[f"s00{i}"]["outcome"]) for i in range(4)] == [
        ("both_empty", "tie"), ("one_empty", "loss"), ("identical", "tie"), ("one_empty", "win")]
    assert report["run1"]["n_empty_predictions"] == 2 and report["run2"]["n_empty_predictions"] == 2
    assert report["summary"]["counts"] == {"win": 5, "tie": 2, "loss": 1, "invalid": 0}
    assert report["summary"]["position"]["judged"] == 4


def test_mismatched_ids_name_counts_and_examples(tmp_path):
    p1, _ = write_runs(tmp_path, n=6)
    p2 = tmp_path / "other.jsonl"
    append_predictions(p2, [{"image_id": f"s{i:03d}", "reference": reference(i), "prediction": "x"}
                            for i in (0, 1, 2, 3, 9)])
    cfg = JudgeConfig(run1=JudgeRunConfig(str(p1)), run2=JudgeRunConfig(str(p2)), output_dir=str(tmp_path / "o"),
                      dataset="other", endpoint=ChatEndpointConfig(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(PredictionsError, match=r"has 6 ids.*has 5; 2 only in the first \(e\.g\. \['s004', 's005'\]\)"
                                               r", 1 only in the second \(e\.g\. \['s009'\]\)"):
        judge_runs(cfg, out=io.StringIO())
    p3 = tmp_path / "otherref.jsonl"
    append_predictions(p3, [{"image_id": f"s{i:03d}", "reference": "Another test set.", "prediction": "x"}
                            for i in range(6)])
    cfg.run2 = JudgeRunConfig(str(p3))
    with pytest.raises(PredictionsError, match="6 id.*different references"):
        judge_runs(cfg, out=io.StringIO())
    p4 = tmp_path / "noref.jsonl"
    p4.write_text(json.dumps({"image_id": "s000", "reference": "", "prediction": "x"}) + "\n")
    cfg.run2 = JudgeRunConfig(str(p4))
    with pytest.raises(PredictionsError, match=r"noref.jsonl:1: reference for image_id 's000' is missing"):
        judge_runs(cfg, out=io.StringIO())


def _script():
    spec = importlib.util.spec_from_file_location("eval_gpt_judge", REPO / "scripts" / "eval_gpt_judge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_yaml_dry_run_and_mimic_guard(tmp_path, capsys):
    p1, p2 = write_runs(tmp_path, n=6)
    main = _script().main
    args = ["--cfg", str(REPO / "configs/judge.yaml"), f"run1.predictions={p1}", f"run2.predictions={p2}",
            f"output_dir={tmp_path / 'out'}", f"endpoint.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(PermissionError, match="Refusing to send MIMIC-CXR reference text.*api.openai.com"):
        main(args)  # the YAML's default: MIMIC references, the OpenAI endpoint, no approval
    report = main([*args, "dataset=iu_embedded", "dry_run=true"])
    assert report["requests"] == 6 and not (tmp_path / "out" / "judge.json").exists()
    assert '"model": "gpt-4o-mini"' in capsys.readouterr().out
    with FakeOpenAIServer(responder=fair) as server:  # a local endpoint may receive MIMIC text
        report = main([*args, f"endpoint.base_url={server.base_url}", "bootstrap=0"])
        assert server.calls == 6
    assert report["summary"]["rates"]["win"]["ci_low"] != report["summary"]["rates"]["win"]["ci_low"]  # NaN
    assert json.loads((tmp_path / "out" / "judge.json").read_text())["summary"]["rates"]["win"]["ci_low"] is None
    assert "# GPT judge: XrayGPT (demo) vs shuffled images" in capsys.readouterr().out
