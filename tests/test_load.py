"""Load: the inference CLI over 500 films and evaluation generation over the whole embedded test split (700) run with
flat memory. Each run is its own process and its peak RSS (ru_maxrss) is compared with a run over 100 films: a
per-film leak (pixels, outputs or generation state kept per batch) of even 0.1 MiB per film would show.
The measuring code is benchmarks/load_rss.py, which also writes benchmarks/results/load_rss.json by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import load_rss  # noqa: E402

MAX_GROWTH_MIB = 50


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return load_rss.measure_all(tmp_path_factory.mktemp("load"))


def lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_infer_cli_over_500_films_has_flat_memory(figures):
    small, large = figures["infer"]
    assert (small["films"], large["films"]) == (100, 500)
    for run in (small, large):
        assert run["returncode"] == 0, Path(run["log"]).read_text()[-3000:]
        records = lines(run["outputs"])
        assert len(records) == run["films"]
        assert all(r["error"] is None and isinstance(r["summary"], str) for r in records)
    assert lines(large["outputs"])[:100] == lines(small["outputs"])  # same films, same summaries
    assert figures["infer_growth_mib"] == pytest.approx(large["peak_rss_mib"] - small["peak_rss_mib"], abs=0.2)
    assert figures["infer_growth_mib"] < MAX_GROWTH_MIB, figures


@pytest.mark.slow
def test_eval_generation_over_the_whole_test_split_has_flat_memory(figures):
    small, whole = figures["eval"]
    assert (small["films"], whole["films"]) == (100, 700)
    for run in (small, whole):
        assert run["returncode"] == 0, Path(run["log"]).read_text()[-3000:]
        ids = [r["image_id"] for r in lines(run["outputs"])]
        assert len(ids) == len(set(ids)) == run["films"]
        assert (Path(run["outputs"]).parent / "table.md").is_file()
    assert figures["eval_growth_mib"] < MAX_GROWTH_MIB, figures
