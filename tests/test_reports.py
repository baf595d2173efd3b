"""IU/OpenI report XML reader and the paper's rule filters (synthetic XML; counts on the real tgz)."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from xraygpt.data.reports import (
    FILTER_RULES,
    Report,
    ReportSourceError,
    apply_rule_filters,
    iter_report_files,
    parse_report_xml,
    read_reports,
    rule_failed,
)


def make_xml(uid: str = "CXR7", findings: str | None = "Lungs look clear here and the heart is not big today okay.",
             impression: str | None = "No acute disease.", majors=("normal",), images=("CXR7_IM-0001-1001",),
             indication: str | None = "Cough.") -> str:  # fmt: skip
    """A made-up report in the OpenI XML shape (never real report text)."""
    sections = ""
    for label, text in (("INDICATION", indication), ("FINDINGS", findings), ("IMPRESSION", impression)):
        if text is not None:
            sections += f'<AbstractText Label="{label}">{text}</AbstractText>'
    mesh = "".join(f"<major>{m}</major>" for m in majors)
    imgs = "".join(f'<parentImage id="{i}"><caption>x</caption></parentImage>' for i in images)
    return (
        f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="{uid}"/><MedlineCitation><Article>'
        f"<Abstract>{sections}</Abstract></Article></MedlineCitation><MeSH>{mesh}</MeSH>{imgs}</eCitation>"
    )


def test_parse_sections_tags_and_images():
    r = parse_report_xml(make_xml(majors=("Opacity/lung/base/left/mild", "Cardiomegaly"),
                                  images=("CXR7_IM-0001-1001", "CXR7_IM-0001-2001")), "7.xml")  # fmt: skip
    assert r.report_id == "CXR7"
    assert r.findings.startswith("Lungs look clear") and r.impression == "No acute disease."
    assert r.indication == "Cough." and r.comparison == ""
    assert r.mesh_major == ["Opacity/lung/base/left/mild", "Cardiomegaly"]
    assert r.image_ids == ["CXR7_IM-0001-1001", "CXR7_IM-0001-2001"]
    assert r.source == "7.xml"


def test_missing_sections_whitespace_and_caption():
    r = parse_report_xml(make_xml(findings=None, impression="  Two   words \n", majors=(), images=()))
    assert r.findings == "" and r.impression == "Two words"
    assert r.mesh_major == [] and r.image_ids == []
    assert Report("x", " a  b ", "c\n d").caption == "a b c d"


def test_non_utf8_bytes_are_tolerated():
    data = make_xml(findings="The patient\u2019s heart is fine and lungs are clear of any focal airspace disease.")
    raw = data.encode("cp1252")
    assert b"\x92" in raw  # not valid UTF-8
    r = parse_report_xml(raw, "cp.xml")
    assert "patient\u2019s heart" in r.findings


def test_report_id_falls_back_to_file_stem():
    data = make_xml().replace('<uId id="CXR7"/>', "")
    assert parse_report_xml(data, "ecgen-radiology/123.xml").report_id == "123"


def test_malformed_xml_names_the_source():
    with pytest.raises(ReportSourceError, match=r"broken\.xml: not well-formed"):
        parse_report_xml(b"<eCitation><MeSH></eCitation>", "broken.xml")


def test_folder_source_is_read_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.xml").write_text(make_xml(uid="CXR2"))
    (tmp_path / "sub" / "a.xml").write_text(make_xml(uid="CXR1"))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.report_id for r in read_reports(tmp_path)] == ["CXR2", "CXR1"]  # "b.xml" < "sub/a.xml"
    assert [name for name, _ in iter_report_files(tmp_path)] == ["b.xml", "sub/a.xml"]


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(ReportSourceError, match="does not exist"):
        read_reports(tmp_path / "nope.tgz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportSourceError, match="No .xml report files"):
        read_reports(tmp_path / "empty")


def _tgz(path, n: int) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for k in range(n):
            data = make_xml(uid=f"CXR{k}").encode() + f"<!-- {os.urandom(3000).hex()} -->".encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{k}.xml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tgz_roundtrip_and_truncation_names_the_member(tmp_path):
    good = tmp_path / "good.tgz"
    _tgz(good, 12)
    assert [r.report_id for r in read_reports(good)] == [f"CXR{k}" for k in range(12)]
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 6 // 10])
    with pytest.raises(
        ReportSourceError, match=r"cut\.tgz is corrupt or truncated at member .*ecgen-radiology/\d+\.xml"
    ):
        read_reports(cut)
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not a tar archive at all" * 10)
    with pytest.raises(ReportSourceError, match=r"junk\.tgz is corrupt or truncated at member <archive header>"):
        read_reports(junk)


def test_rule_filters_boundaries():
    ten = " ".join(["w"] * 10)
    cases = {
        "kept": Report("a", ten, "two words"),
        "no_findings": Report("b", "", "two words"),
        "no_impression": Report("c", ten, ""),
        "findings_too_short": Report("d", " ".join(["w"] * 9), "two words"),
        "impression_too_short": Report("e", ten, "one"),
    }
    for expected, r in cases.items():
        assert rule_failed(r) == (None if expected == "kept" else expected)
    res = apply_rule_filters(cases.values())
    assert [r.report_id for r in res.kept] == ["a"]
    assert res.dropped == dict.fromkeys(FILTER_RULES, 1) and res.total == 5
    # a report failing several rules is counted once, under the first
    assert apply_rule_filters([Report("f", "", "")]).dropped["no_findings"] == 1


def test_real_iu_reports_counts():
    """The embedded IU tgz: 3,955 reports, 3,398 kept by the paper's rules (the paper reports 3,403)."""
    reports = read_reports()
    assert len(reports) == 3955
    assert len({r.report_id for r in reports}) == 3955
    res = apply_rule_filters(reports)
    assert len(res.kept) == 3398
    assert res.dropped == {"no_findings": 530, "no_impression": 6, "findings_too_short": 13,
                           "impression_too_short": 8}  # fmt: skip
    assert sum(1 for r in res.kept if not r.image_ids) == 86
    assert all(r.mesh_major for r in reports)
