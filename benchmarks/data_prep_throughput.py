"""LLM-cleaning throughput against the local fake OpenAI server (by hand: python benchmarks/data_prep_throughput.py).

500 invented reports, 200 ms server latency per request, concurrency 16. Target (issue 6):
>= 0.8 x 16 / 0.2 s = 64 reports/s, and a second run (fresh output folder, same response cache) makes 0 calls.
Also measured: a resumed run in the same output folder with the cache off (the journal alone) makes 0 calls.
Writes benchmarks/results/data_prep_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from openai_server import FakeOpenAIServer  # noqa: E402

from data_prep.cleaners import LLMCleaner  # noqa: E402
from xraygpt.data.reports import Report  # noqa: E402
from xraygpt.openai_client import ChatEndpointConfig  # noqa: E402


def reports(n: int) -> list[Report]:
    return [Report(report_id=f"s{50000000 + i}",
                   findings=f"The lungs are clear without focal consolidation in case {i}. No pleural effusion or "
                            "pneumothorax. The cardiomediastinal silhouette is within normal limits.",
                   impression=f"No acute cardiopulmonary process in case {i}.") for i in range(n)]


def clean_all(endpoint: ChatEndpointConfig, items: list[Report], journal: Path) -> tuple[float, dict]:
    cleaner = LLMCleaner(endpoint, "xraygpt/prompts/clean_report_v1.txt", journal_path=journal)
    t0 = time.perf_counter()
    outcomes = list(cleaner.clean(items))
    seconds = time.perf_counter() - t0
    usage = cleaner.client.stats.as_dict(endpoint)
    cleaner.close()
    assert len(outcomes) == len(items) and all(o.ok for o in outcomes), "some reports failed"
    return seconds, usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/data_prep_throughput.json"))
    args = parser.parse_args()
    os.chdir(REPO)
    items = reports(args.reports)
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(
            responder=lambda body: "The lungs are clear. No effusion or pneumothorax. Normal heart size.",
            latency_s=args.latency) as server:
        tmp = Path(tmp)
        endpoint = ChatEndpointConfig(base_url=server.base_url, concurrency=args.concurrency, timeout_s=10,
                                      cache_dir=str(tmp / "cache"))
        first_s, first_usage = clean_all(endpoint, items, tmp / "run1" / "progress.jsonl")
        calls_first = server.calls
        max_inflight = server.max_inflight
        second_s, second_usage = clean_all(endpoint, items, tmp / "run2" / "progress.jsonl")
        calls_second = server.calls - calls_first
        no_cache = ChatEndpointConfig(**{**endpoint.__dict__, "cache": False})
        resume_s, _ = clean_all(no_cache, items, tmp / "run1" / "progress.jsonl")
        calls_resume = server.calls - calls_first - calls_second

    ideal = args.concurrency / args.latency
    result = {
        "benchmark": "data_prep LLM cleaning throughput (local fake OpenAI server)",
        "reports": args.reports, "server_latency_s": args.latency, "concurrency": args.concurrency,
        "first_run": {"seconds": round(first_s, 3), "reports_per_s": round(args.reports / first_s, 1),
                      "calls": calls_first, "max_requests_in_flight": max_inflight, "usage": first_usage},
        "ideal_reports_per_s": ideal,
        "target_reports_per_s": 0.8 * ideal,
        "meets_target": args.reports / first_s >= 0.8 * ideal,
        "second_run_same_cache": {"seconds": round(second_s, 3), "calls": calls_second,
                                  "cache_hits": second_usage["cache_hits"]},
        "resume_same_folder_cache_off": {"seconds": round(resume_s, 3), "calls": calls_resume},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
