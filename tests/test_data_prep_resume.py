"""Kill-then-resume: a real `python -m data_prep` subprocess, SIGKILLed at a seeded random point while it cleans
with the LLM cleaner against the local server, then resumed. Every report must be processed exactly once and no
request repeated for a report already done. The response cache is off, so the journal alone must do it."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import FakeOpenAIServer, last_user_message
from test_data_prep_mimic import write_mimic_tree

REPO = Path(__file__).resolve().parents[1]
N_REPORTS = 40
CANARY = "sk-canary-resume-0c4f9e2d7b1a"


def synthetic_studies(n: int) -> list[dict]:
    """Invented MIMIC-style reports, each carrying a unique "case N" marker the server can see."""
    studies = []
    for i in range(n):
        text = (f"EXAMINATION: CHEST (PA AND LAT)\nINDICATION: Cough.\n\nFINDINGS:\nThe lungs are clear without "
                f"focal consolidation\nin case {i}. No pleural effusion or pneumothorax. Heart size is normal.\n\n"
                f"IMPRESSION:\nNo acute cardiopulmonary process in case {i}.\n")
        studies.append({"subject": f"1{i:07d}", "study": f"5{i:07d}", "text": text,
                        "split": ("train", "validate", "test")[i % 3], "images": [(f"img-{i:04d}", "PA")]})
    return studies


def case_of(message: str) -> int | None:
    """The report a request was for; None for a request cut off by the kill (the server answered 400)."""
    m = re.search(r"in case (\d+)\.", message)
    return int(m.group(1)) if m else None


def answer(body: dict) -> str:
    return f"The lungs are clear and the heart is normal in case {case_of(last_user_message(body))}."


def journal_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    ids = []
    for line in path.read_bytes().split(b"\n"):
        try:
            ids.append(json.loads(line)["id"])
        except ValueError:  # empty or partial last line
            pass
    return ids


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_then_resume_processes_each_report_once(tmp_path, seed):
    cfg = write_mimic_tree(tmp_path, synthetic_studies(N_REPORTS), images=False)
    out = tmp_path / "out"
    journal = out / "progress.jsonl"
    kill_after = random.Random(seed).randint(5, 25)  # journal records before the kill
    with FakeOpenAIServer(responder=answer, latency_s=0.05) as server:
        cmd = [sys.executable, "-m", "data_prep", "mimic", "--cfg", str(REPO / "configs/data/mimic.yaml"),
               f"output_dir={out}", f"mimic.reports={cfg.reports}", f"mimic.split_csv={cfg.split_csv}",
               f"mimic.metadata_csv={cfg.metadata_csv}", f"llm.endpoint.base_url={server.base_url}",
               "llm.endpoint.concurrency=2", "llm.endpoint.cache=false", "llm.endpoint.timeout_s=5"]
        env = {**os.environ, "OPENAI_API_KEY": CANARY, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while len(journal_ids(journal)) < kill_after:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.1)  # requests in flight at the kill reach the server
        done_before = journal_ids(journal)
        calls_before = server.calls
        assert kill_after <= len(done_before) < N_REPORTS
        assert not (out / "manifest.json").exists() and not (out / "filter_cap.json").exists()

        resumed = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        messages = server.user_messages()
        later = [case_of(m) for m in messages[calls_before:]]
        first = [c for c in (case_of(m) for m in messages[:calls_before]) if c is not None]

    done_cases = {int(i[1:]) - 50000000 for i in done_before}
    assert not done_cases & set(later), "a report already done was requested again"
    assert len(later) == len(set(later)) == N_REPORTS - len(done_before)
    assert set(first) | set(later) == set(range(N_REPORTS))  # every report was asked for
    final = journal_ids(journal)
    assert sorted(final) == sorted(f"s5{i:07d}" for i in range(N_REPORTS))  # each exactly once
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["outcome"]["ok"] == N_REPORTS
    assert m["counts"]["outcome"]["by_source"] == {"journal": len(done_before), "api": N_REPORTS - len(done_before)}
    pairs = [a for s in ("train", "val", "test") for a in json.loads((out / f"{s}.json").read_text())["annotations"]]
    assert sorted(a["image_id"] for a in pairs) == [f"img-{i:04d}" for i in range(N_REPORTS)]
    for a in pairs:
        assert a["caption"] == f"The lungs are clear and the heart is normal in case {int(a['image_id'][4:])}."
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert leaked == [] and CANARY not in resumed.stdout + resumed.stderr
