"""The embedded dataset builder: layout, splits, labels, reuse, bad output dirs; its output loads as a dataset."""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from data_prep.cleaners import RulesCleaner, has_blank, rules_summary
from xraygpt.data.dataset import CaptionDataset
from xraygpt.data.embedded import (
    DATA_VERSION,
    SPLITS,
    EmbeddedDataError,
    build_embedded_dataset,
    caption_identity,
    default_out_dir,
    split_of,
)
from xraygpt.data.mesh import CHEXPERT_CLASSES, parse_tag
from xraygpt.data.render import render_png_bytes
from xraygpt.data.reports import read_reports

LIMIT = 60


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_embedded_dataset(tmp_path_factory.mktemp("emb") / "out", limit=LIMIT)


def ann_ids(path) -> list[str]:
    return [a["image_id"] for a in json.loads(path.read_text())["annotations"]]


def test_layout_and_manifest(built):
    m = built.manifest
    assert not built.reused
    assert m["version"] == DATA_VERSION and m["limit"] == LIMIT and m["size"] == 256
    assert m["reports_read"] == 3955
    assert m["filter"] == {"kept": 3398, "dropped": {"no_findings": 530, "no_impression": 6,
                                                     "findings_too_short": 13, "impression_too_short": 8}}  # fmt: skip
    assert m["n_images"] == LIMIT and sum(m["splits"].values()) == LIMIT
    assert sorted(p.name for p in built.image_dir.iterdir()) == sorted(f"{i}.png" for i in ann_ids(built.ann_file))
    for split, counts in m["class_counts"].items():
        assert list(counts) == list(CHEXPERT_CLASSES) and split in SPLITS
    assert set(m["tags"]["status"]) <= {"normal", "sign", "unrendered", "unknown", "no_indexing"}
    with Image.open(built.contact_sheet) as sheet:
        assert sheet.size[0] == 4 * 256
    assert not list(built.root.glob(".*tmp*"))  # atomic writes left no temp files


def test_splits_are_disjoint_and_cover_everything(built):
    all_ids = ann_ids(built.ann_file)
    parts = {s: ann_ids(built.split_file(s)) for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(all_ids) == len(set(all_ids))
    assert set().union(*map(set, parts.values())) == set(all_ids)
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not set(parts[a]) & set(parts[b])
    labels = json.loads(built.labels_file.read_text())["images"]
    for s, ids in parts.items():
        assert all(labels[i]["split"] == s == split_of(labels[i]["report_id"]) for i in ids)


def test_split_fractions_are_about_70_10_20():
    ids = [f"CXR{k}" for k in range(20000)]
    frac = {s: sum(split_of(i) == s for i in ids) / len(ids) for s in SPLITS}
    assert abs(frac["train"] - 0.7) < 0.015 and abs(frac["val"] - 0.1) < 0.01 and abs(frac["test"] - 0.2) < 0.015
    assert [split_of("CXR1"), split_of("CXR1")] == [split_of("CXR1")] * 2


def test_labels_and_captions(built):
    meta = json.loads(built.labels_file.read_text())
    assert meta["classes"] == list(CHEXPERT_CLASSES)
    captions = {a["image_id"]: a["caption"] for a in json.loads(built.ann_file.read_text())["annotations"]}
    assert set(meta["images"]) == set(captions)
    for iid, rec in meta["images"].items():
        assert len(rec["labels"]) == 14 and set(rec["labels"]) <= {0, 1}
        assert rec["labelled"] == any(t != "No Indexing" for t in rec["tags"])
        cap = captions[iid]
        assert cap == cap.strip() and "  " not in cap and cap


def test_default_captions_are_findings_and_impression_as_written(built):
    reports = {r.report_id: r for r in read_reports()}
    meta = json.loads(built.labels_file.read_text())["images"]
    for a in json.loads(built.ann_file.read_text())["annotations"]:
        assert a["caption"] == reports[meta[a["image_id"]]["report_id"]].caption
    assert built.manifest["captions"] == {"kind": "raw"} and built.manifest["empty_after_cleaning"] == 0


def test_rules_captions_are_the_rules_cleaners_summaries(tmp_path, monkeypatch):
    """captions="rules": each caption is data_prep's `rules` summary of its report (the paper's clean summaries),
    in a cache folder of its own; a build made with other rules (cleaners.py edited since) is redone."""
    monkeypatch.setenv("XRAYGPT_CACHE", str(tmp_path / "cache"))
    ds = build_embedded_dataset(limit=LIMIT, captions="rules")
    assert ds.root == tmp_path / "cache" / "embedded_data" / f"{DATA_VERSION}-limit{LIMIT}-rules"
    reports = {r.report_id: r for r in read_reports()}
    meta = json.loads(ds.labels_file.read_text())["images"]
    anns = json.loads(ds.ann_file.read_text())["annotations"]
    changed = 0
    for a in anns:
        r = reports[meta[a["image_id"]]["report_id"]]
        assert a["caption"] == rules_summary(r.findings, r.impression)
        assert not has_blank(a["caption"]) and "XXXX" not in a["caption"]
        changed += a["caption"] != r.caption
    raw_blanks = sum(has_blank(reports[meta[a["image_id"]]["report_id"]].caption) for a in anns)
    assert raw_blanks > 10 and changed >= raw_blanks  # the cleaning did something on these 60 reports
    assert ds.manifest["captions"] == caption_identity("rules")
    assert ds.manifest["captions"]["rules_sha256"] == RulesCleaner().describe()["rules_sha256"]
    assert ds.manifest["empty_after_cleaning"] == 0
    assert build_embedded_dataset(limit=LIMIT, captions="rules").reused
    other = json.loads(ds.manifest_file.read_text())
    other["captions"]["rules_sha256"] = "0" * 64
    ds.manifest_file.write_text(json.dumps(other))
    rebuilt = build_embedded_dataset(limit=LIMIT, captions="rules")
    assert not rebuilt.reused and rebuilt.manifest["captions"] == caption_identity("rules")
    with pytest.raises(ValueError, match="captions must be one of"):
        build_embedded_dataset(tmp_path / "x", limit=2, captions="clean")


def test_images_are_the_renderer_output(built):
    meta = json.loads(built.labels_file.read_text())["images"]
    for iid in list(meta)[:3]:
        rec = meta[iid]
        assert (built.image_dir / f"{iid}.png").read_bytes() == render_png_bytes(
            rec["report_id"], [parse_tag(t) for t in rec["tags"]]
        )


def test_output_loads_with_caption_dataset(built):
    full = CaptionDataset(built.root, built.ann_file)
    assert len(full) == LIMIT and full.num_skipped == 0
    item = full[0]
    assert item["image"].mode == "L" and item["image"].size == (256, 256)
    assert item["caption"] == json.loads(built.ann_file.read_text())["annotations"][0]["caption"]
    for s in SPLITS:
        ds = CaptionDataset(built.root, built.split_file(s), transform=lambda im: im.size)
        assert len(ds) == built.manifest["splits"][s]
        if len(ds):
            assert ds[0]["image"] == (256, 256)


def test_rerun_reuses_and_force_rebuilds(built):
    t = time.perf_counter()
    again = build_embedded_dataset(built.root, limit=LIMIT)
    assert again.reused and time.perf_counter() - t < 1.0
    assert again.manifest == built.manifest
    # a build of another version in the folder is replaced
    other = json.loads(built.manifest_file.read_text())
    other["version"] = "0-old"
    built.manifest_file.write_text(json.dumps(other))
    rebuilt = build_embedded_dataset(built.root, limit=LIMIT)
    assert not rebuilt.reused and rebuilt.manifest["version"] == DATA_VERSION


def test_force_rebuild_gives_identical_files(tmp_path):
    a = build_embedded_dataset(tmp_path / "a", limit=5)
    first = {p.name: p.read_bytes() for p in a.image_dir.iterdir()}
    b = build_embedded_dataset(tmp_path / "a", limit=5, force=True)
    assert not b.reused
    assert {p.name: p.read_bytes() for p in b.image_dir.iterdir()} == first
    assert a.ann_file.read_bytes() == b.ann_file.read_bytes()


def test_unwritable_out_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # the missing report source proves the check runs first: reading would raise ReportSourceError
    with pytest.raises(EmbeddedDataError, match=r"Cannot write the embedded dataset to .*a_file/out"):
        build_embedded_dataset(blocker / "out", reports_source=tmp_path / "missing.tgz")


def test_default_out_dir_is_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAYGPT_CACHE", str(tmp_path / "cache"))
    assert default_out_dir() == tmp_path / "cache" / "embedded_data" / DATA_VERSION
    ds = build_embedded_dataset(limit=3)
    assert ds.root == tmp_path / "cache" / "embedded_data" / f"{DATA_VERSION}-limit3"
    assert ds.manifest["n_images"] == 3


def _xml(uid: str, findings: str, impression: str, majors: list[str]) -> str:
    mesh = "".join(f"<major>{m}</major>" for m in majors)
    return (f'<eCitation><uId id="{uid}"/><Abstract><AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText></Abstract><MeSH>{mesh}</MeSH>'
            f'<parentImage id="{uid}_IM-1"/></eCitation>')  # fmt: skip


def test_report_without_tags_renders_as_unlabelled_normal(tmp_path):
    src = tmp_path / "xml"
    src.mkdir()
    long = "one two three four five six seven eight nine ten eleven"  # made-up words, not report text
    (src / "1.xml").write_text(_xml("CXR1", long, "all fine", []))
    (src / "2.xml").write_text(_xml("CXR2", long, "big heart", ["Cardiomegaly/mild", "Sarcoidosis"]))
    (src / "3.xml").write_text(_xml("CXR3", "too short", "all fine", ["normal"]))
    # passes the filters, but every sentence only compares with an earlier study: nothing left after cleaning
    (src / "4.xml").write_text(_xml("CXR4", "The heart is unchanged in size since the prior exam of last week.",
                                    "No change.", ["normal"]))  # fmt: skip
    ds = build_embedded_dataset(tmp_path / "out", reports_source=src)
    m = ds.manifest
    assert m["filter"] == {"kept": 3, "dropped": {"no_findings": 0, "no_impression": 0, "findings_too_short": 1,
                                                  "impression_too_short": 0}}  # fmt: skip
    assert m["empty_after_cleaning"] == 0 and m["n_images"] == 3  # raw captions: CXR4 is kept as written
    cleaned = build_embedded_dataset(tmp_path / "rules", reports_source=src, captions="rules").manifest
    assert cleaned["empty_after_cleaning"] == 1 and cleaned["n_images"] == 2  # dropped, and counted
    assert m["reports_without_tags"] == 1 and m["reports_without_label"] == 1
    assert m["tags"]["unknown_terms"] == {"sarcoidosis": 1}
    labels = json.loads(ds.labels_file.read_text())["images"]
    assert labels["CXR1_IM-1"] == {"report_id": "CXR1", "split": split_of("CXR1"), "labels": [0] * 14, "tags": [],
                                   "labelled": False}  # fmt: skip
    assert (ds.image_dir / "CXR1_IM-1.png").read_bytes() == render_png_bytes("CXR1", [])
    assert labels["CXR2_IM-1"]["labels"][CHEXPERT_CLASSES.index("Cardiomegaly")] == 1
    assert ann_ids(ds.ann_file) == ["CXR1_IM-1", "CXR2_IM-1", "CXR4_IM-1"]


def test_worker_processes_write_the_same_bytes(tmp_path):
    """More than two chunks of 32 go to a spawn pool; its files match in-process rendering."""
    ds = build_embedded_dataset(tmp_path / "pool", limit=70, workers=2)
    meta = json.loads(ds.labels_file.read_text())["images"]
    assert len(list(ds.image_dir.glob("*.png"))) == 70
    for iid in list(meta)[-3:]:
        rec = meta[iid]
        expected = render_png_bytes(rec["report_id"], [parse_tag(t) for t in rec["tags"]])
        assert (ds.image_dir / f"{iid}.png").read_bytes() == expected
