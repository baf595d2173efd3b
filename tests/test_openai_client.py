"""The shared OpenAI-compatible client against a real local HTTP server with scripted faults."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import FakeOpenAIServer

from xraygpt.openai_client import (
    ChatClient,
    ChatConfigError,
    ChatEndpointConfig,
    ChatJob,
    Journal,
    is_local_endpoint,
    resolve_api_key,
)


@pytest.fixture()
def server():
    with FakeOpenAIServer(retry_after_s=0.3, hang_s=2.0) as s:
        yield s


def cfg_for(server: FakeOpenAIServer, tmp_path: Path, **kw) -> ChatEndpointConfig:
    base = {"base_url": server.base_url, "model": "gpt-test", "concurrency": 1, "timeout_s": 3.0,
            "max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "cache_dir": str(tmp_path / "cache"),
            "max_tokens": 64}
    base.update(kw)
    return ChatEndpointConfig(**base)


def jobs(n: int, tag: str = "report") -> list[ChatJob]:
    return [ChatJob(f"{tag}{i}", [{"role": "user", "content": f"clean {tag} number {i} please"}]) for i in range(n)]


def run_all(client: ChatClient, js, validate=None) -> dict:
    return {r.id: r for r in client.run(js, validate=validate)}


def test_success_usage_and_cost(server, tmp_path):
    cfg = cfg_for(server, tmp_path, price_prompt_per_1k=1.0, price_completion_per_1k=2.0)
    client = ChatClient(cfg, prompt_version="v1")
    res = run_all(client, jobs(3))
    assert all(r.ok and r.source == "api" and r.attempts == 1 for r in res.values())
    assert res["report1"].text == "Echo of 5 words: clean report number 1 please"
    assert server.calls == 3
    body = server.requests[0]["body"]
    assert body["model"] == "gpt-test" and body["temperature"] == 0.0 and body["max_tokens"] == 64
    # fake usage: prompt = words of the user message (5), completion = words of the answer (9)
    assert (client.stats.prompt_tokens, client.stats.completion_tokens) == (15, 27)
    assert client.stats.cost_usd(cfg) == pytest.approx((15 * 1.0 + 27 * 2.0) / 1000)
    assert "3 requests (0 retries), 3 answered" in client.stats.summary(cfg)


def test_azure_path_api_version_and_key_header(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AZ_TEST_KEY", "azure-secret-1")
    cfg = cfg_for(server, tmp_path, provider="azure", base_url=None, azure_endpoint=server.root_url,
                  azure_deployment="gpt35-dep", api_version="2024-06-01", api_key_env="AZ_TEST_KEY")
    res = run_all(ChatClient(cfg), jobs(1))
    assert res["report0"].ok
    req = server.requests[0]
    assert req["path"] == "/openai/deployments/gpt35-dep/chat/completions"
    assert req["query"] == {"api-version": "2024-06-01"}
    assert req["key"] == "azure-secret-1"


def test_429_honours_retry_after(server, tmp_path):
    server.push_faults("429:0.3")
    client = ChatClient(cfg_for(server, tmp_path))
    t0 = time.monotonic()
    res = run_all(client, jobs(1))
    assert res["report0"].ok and res["report0"].attempts == 2
    gap = server.requests[1]["time"] - server.requests[0]["time"]
    assert gap >= 0.3  # the header said 0.3 s; our own backoff would have been <= 0.05 s
    assert time.monotonic() - t0 < 2.0
    assert client.stats.retries == 1


def test_5xx_retried_then_recorded_as_failure_and_run_goes_on(server, tmp_path):
    server.fault_for("report number 1 ", ["500", "503", "500"])  # all 3 attempts fail
    server.fault_for("report number 2 ", ["502"])  # one failure, then fine
    client = ChatClient(cfg_for(server, tmp_path, concurrency=3))
    res = run_all(client, jobs(4))
    assert not res["report1"].ok and res["report1"].reason == "http_500 (after 3 attempts)"
    assert res["report2"].ok and res["report2"].attempts == 2
    assert res["report0"].ok and res["report3"].ok
    assert server.calls == 1 + 3 + 2 + 1
    assert client.stats.failure_reasons == {"http_500": 1}


def test_timeout_retried(server, tmp_path):
    server.push_faults("hang")  # the server sleeps 2 s, the client gives up after 0.3 s
    res = run_all(ChatClient(cfg_for(server, tmp_path, timeout_s=0.3)), jobs(1))
    assert res["report0"].ok and res["report0"].attempts == 2
    server.push_faults("hang", "hang")
    res = run_all(ChatClient(cfg_for(server, tmp_path, max_attempts=2, timeout_s=0.3)), jobs(1, "other"))
    assert not res["other0"].ok and res["other0"].reason == "timeout (after 2 attempts)"


def test_malformed_json_and_empty_content(server, tmp_path):
    server.push_faults("malformed", "empty", "empty")
    res = run_all(ChatClient(cfg_for(server, tmp_path, max_attempts=5, invalid_retries=1)), jobs(1))
    # malformed -> retry; empty -> invalid (1 extra try allowed); empty again -> failure, no more attempts
    assert not res["report0"].ok
    assert res["report0"].reason == "invalid: empty response"
    assert res["report0"].attempts == 3


def test_validation_hook_rejects_and_retries(server, tmp_path):
    server.responder = lambda body: "has a ___ blank" if server.calls < 2 else "clean text"
    seen = []

    def validate(job, text):
        seen.append(text)
        return "blank left" if "___" in text else None

    res = run_all(ChatClient(cfg_for(server, tmp_path)), jobs(1), validate=validate)
    assert res["report0"].ok and res["report0"].text == "clean text" and seen == ["has a ___ blank", "clean text"]


def test_client_error_is_not_retried(server, tmp_path, monkeypatch):
    server.expected_key = "right-key"
    monkeypatch.setenv("WRONG_KEY_VAR", "wrong-key")
    res = run_all(ChatClient(cfg_for(server, tmp_path, api_key_env="WRONG_KEY_VAR")), jobs(1))
    assert not res["report0"].ok and res["report0"].reason.startswith("http_401")
    assert server.calls == 1


def test_cache_makes_rerun_free_and_prompt_version_invalidates(server, tmp_path):
    cfg = cfg_for(server, tmp_path, concurrency=4)
    first = run_all(ChatClient(cfg, prompt_version="v1"), jobs(6))
    assert server.calls == 6
    client = ChatClient(cfg, prompt_version="v1")
    again = run_all(client, jobs(6))
    assert server.calls == 6 and client.stats.requests == 0 and client.stats.cache_hits == 6
    assert {k: r.text for k, r in again.items()} == {k: r.text for k, r in first.items()}
    assert all(r.source == "cache" for r in again.values())
    run_all(ChatClient(cfg, prompt_version="v2"), jobs(6))
    assert server.calls == 12  # a new prompt version never reuses old answers
    run_all(ChatClient(cfg_for(server, tmp_path, model="other-model"), prompt_version="v1"), jobs(1))
    assert server.calls == 13  # nor does another model


def test_concurrency_is_bounded_and_used(tmp_path):
    with FakeOpenAIServer(latency_s=0.3) as server:
        cfg = cfg_for(server, tmp_path, concurrency=4, cache=False, timeout_s=5)
        t0 = time.monotonic()
        res = run_all(ChatClient(cfg), jobs(12))
        elapsed = time.monotonic() - t0
    assert len(res) == 12 and all(r.ok for r in res.values())
    assert server.max_inflight == 4
    assert elapsed < 12 * 0.3 * 2 / 3  # well below the serial 3.6 s (ideal 0.9 s)


def test_journal_resume_skips_done_jobs(server, tmp_path):
    cfg = cfg_for(server, tmp_path, cache=False)
    journal = tmp_path / "progress.jsonl"
    run_all(ChatClient(cfg, journal_path=journal), jobs(3))
    assert server.calls == 3
    # a killed writer leaves half a line: it is cut off and the run goes on appending clean records
    with open(journal, "a") as f:
        f.write('{"id": "report3", "key": "abc", "ok": tr')
    client = ChatClient(cfg, journal_path=journal)
    res = run_all(client, jobs(5))
    assert server.calls == 5  # only report3 and report4 were sent
    assert client.stats.journal_hits == 3
    assert [r.source for r in sorted(res.values(), key=lambda r: r.id)] == ["journal"] * 3 + ["api"] * 2
    lines = journal.read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]  # records land in completion order (concurrent requests)
    assert sorted(ids[:3]) == ["report0", "report1", "report2"]
    assert sorted(ids[3:]) == ["report3", "report4"]


def test_journal_failed_jobs_kept_unless_retry_failed(server, tmp_path):
    cfg = cfg_for(server, tmp_path, cache=False, max_attempts=1)
    journal = tmp_path / "progress.jsonl"
    server.push_faults("500")
    assert not run_all(ChatClient(cfg, journal_path=journal), jobs(1))["report0"].ok
    res = run_all(ChatClient(cfg, journal_path=journal), jobs(1))
    assert not res["report0"].ok and res["report0"].source == "journal" and server.calls == 1
    res = run_all(ChatClient(cfg, journal_path=journal, retry_failed=True), jobs(1))
    assert res["report0"].ok and server.calls == 2
    assert Journal(journal).load()["report0"]["ok"] is True  # the last record wins


def test_duplicate_job_ids_refused(server, tmp_path):
    with pytest.raises(ValueError, match="duplicate job id 'report0'"):
        run_all(ChatClient(cfg_for(server, tmp_path)), jobs(1) + jobs(1))


def test_key_handling(monkeypatch):
    monkeypatch.delenv("SOME_UNSET_KEY_VAR", raising=False)
    remote = ChatEndpointConfig(base_url="https://api.example.com/v1", api_key_env="SOME_UNSET_KEY_VAR")
    with pytest.raises(ChatConfigError, match="SOME_UNSET_KEY_VAR is not set"):
        resolve_api_key(remote)
    local = ChatEndpointConfig(base_url="http://127.0.0.1:8000/v1", api_key_env="SOME_UNSET_KEY_VAR")
    assert resolve_api_key(local)  # a local vLLM needs no key
    pasted = ChatEndpointConfig(api_key_env="sk-proj-abcdef123456")
    with pytest.raises(ChatConfigError) as e:
        pasted.validate()
    assert "sk-proj" not in str(e.value) and "NAME of an environment variable" in str(e.value)


@pytest.mark.parametrize("url,local", [("http://127.0.0.1:8000/v1", True), ("http://localhost:1/v1", True),
                                       ("http://[::1]:8000/v1", True), ("http://127.8.0.1/v1", True),
                                       ("https://api.openai.com/v1", False), ("http://10.0.0.5:8000/v1", False),
                                       (None, False)])
def test_is_local_endpoint(url, local):
    assert is_local_endpoint(ChatEndpointConfig(base_url=url)) is local


def test_backoff_is_exponential_jittered_and_capped():
    client = ChatClient(ChatEndpointConfig(backoff_base_s=1.0, backoff_max_s=8.0, cache=False), rng_seed=0)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)]:
        values = [client._backoff(attempt) for _ in range(50)]
        assert all(0.5 * cap <= v <= cap for v in values)
        assert len(set(values)) > 1
