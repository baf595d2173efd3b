"""MeSH tag parsing: qualifiers, signs, CheXpert labels, unknown tags; vocabulary coverage on the real tags."""

from __future__ import annotations

import pytest

from xraygpt.data.mesh import CHEXPERT_CLASSES, SIGNS, parse_report_tags, parse_tag, tag_stats
from xraygpt.data.reports import apply_rule_filters, read_reports


def labels_of(tags) -> set[str]:
    rf = parse_report_tags(tags)
    return {c for c, v in zip(CHEXPERT_CLASSES, rf.labels) if v}


def test_qualifiers_are_split_by_kind():
    f = parse_tag("Opacity/lung/base/left/mild")
    assert (f.term, f.anatomy, f.zones, f.laterality, f.severity) == ("opacity", ("lung",), ("base",), "left", 1)
    assert f.signs == (("opacity", ""),) and f.chexpert == ("Lung Opacity",) and f.status == "sign"
    g = parse_tag("Fractures, Bone/ribs/left/multiple/healed")
    assert g.signs == (("fracture", "ribs"),) and g.descriptors == ("multiple", "healed")
    assert parse_tag("Pleural Effusion/bilateral/small").severity == 1
    assert parse_tag("Pleural Effusion/right/large").severity == 3
    assert parse_tag("Cardiomegaly/borderline").severity == 0
    # case and spacing variants found in the real tags
    assert parse_tag("Thoracic vertebrae/degenerative").signs == parse_tag("Thoracic Vertebrae/degenerative").signs
    assert parse_tag("Subcutaneous  Emphysema").term == "subcutaneous emphysema"


def test_right_plus_left_is_bilateral():
    assert parse_tag("Nodule/lung/right/left").laterality == "bilateral"


@pytest.mark.parametrize(
    "tag, signs, chexpert",
    [
        ("Pleural Effusion/right", (("effusion", ""),), ("Pleural Effusion",)),
        ("Costophrenic Angle/bilateral/blunted", (("effusion", "blunted"),), ("Pleural Effusion",)),
        ("Hydropneumothorax", (("effusion", ""), ("pneumothorax", "")), ("Pleural Effusion", "Pneumothorax")),
        ("Cardiac Shadow/enlarged/mild", (("cardiomegaly", ""),), ("Cardiomegaly",)),
        ("Cardiac Shadow/borderline", (), ()),
        (
            "Mediastinum/right/paratracheal/prominent",
            (("mediastinum", "paratracheal"),),
            ("Enlarged Cardiomediastinum",),
        ),
        ("Catheters, Indwelling/right", (("device", "line"),), ("Support Devices",)),
        ("Implanted Medical Device/left", (("device", "pacemaker"),), ("Support Devices",)),
        ("Surgical Instruments/mediastinum", (("device", "sternotomy"),), ("Support Devices",)),
        ("Tube, Inserted/trachea", (("device", "et_tube"),), ("Support Devices",)),
        ("Calcified Granuloma/lung/upper lobe/left", (("nodule", "calcified"),), ("Lung Lesion",)),
        ("Calcinosis/lung/hilum/lymph nodes/right", (("nodule", "calcified"),), ("Lung Lesion",)),
        ("Calcinosis/aorta", (("aorta", "calcified"),), ()),
        ("Mass/lung/base/right/large", (("nodule", "mass"),), ("Lung Lesion",)),
        ("Markings/lung/interstitial", (("interstitial", ""),), ("Lung Opacity",)),
        ("Infiltrate/lung/base/bilateral/interstitial", (("interstitial", ""),), ("Lung Opacity",)),
        ("Pneumonia/lower lobe/right", (("consolidation", "pneumonia"),), ("Pneumonia",)),
        ("Pulmonary Congestion/mild", (("edema", "congestion"),), ("Edema",)),
        ("Pulmonary Atelectasis/base/left", (("atelectasis", ""),), ("Atelectasis",)),
        ("Thickening/pleura/apex/bilateral", (("pleural_thickening", ""),), ("Pleural Other",)),
        ("Lung/hyperdistention/mild", (("hyperinflation", ""),), ()),
        ("Diaphragm/bilateral/flattened", (("hyperinflation", "flattened"),), ()),
        ("Lung/hypoinflation", (("hypoinflation", ""),), ()),
        ("Diaphragm/right/elevated", (("diaphragm", ""),), ()),
        ("Scoliosis/thoracic vertebrae/right/mild", (("scoliosis", ""),), ()),
        ("Spine/degenerative", (("spine", ""),), ()),
        ("Osteophyte/thoracic vertebrae/multiple", (("spine", ""),), ()),
        ("Aorta/tortuous", (("aorta", "tortuous"),), ()),
        ("Hernia, Hiatal/large", (("hiatal_hernia", ""),), ()),
    ],
)
def test_term_mapping(tag, signs, chexpert):
    f = parse_tag(tag)
    assert f.signs == signs and f.chexpert == chexpert
    assert all(s in SIGNS for s, _ in f.signs) and all(c in CHEXPERT_CLASSES for c in f.chexpert)


def test_unknown_and_unrendered_are_not_fatal():
    u = parse_tag("Sarcoidosis/purple")
    assert u.status == "unknown" and u.signs == () and u.unknown_qualifiers == ("purple",)
    k = parse_tag("Kyphosis/thoracic vertebrae")  # a lateral-view sign: known, nothing to draw
    assert k.status == "unrendered" and k.signs == ()


def test_report_labels_follow_chexpert_no_finding_rule():
    assert labels_of(["normal"]) == {"No Finding"}
    assert labels_of(["Aorta/tortuous"]) == {"No Finding"}  # no CheXpert pathology
    assert labels_of(["Catheters, Indwelling", "normal"]) == {"No Finding", "Support Devices"}
    assert labels_of(["Cardiomegaly", "Pleural Effusion/left"]) == {"Cardiomegaly", "Pleural Effusion"}
    assert labels_of(["Sarcoidosis"]) == set()  # not understood: not claimed normal
    for tags in ([], ["No Indexing"], ["  "]):
        rf = parse_report_tags(tags)
        assert not rf.labelled and rf.labels == [0] * 14


def test_stats_count_statuses_and_unknowns():
    st = tag_stats([["normal"], ["Sarcoidosis", "Kyphosis"], ["No Indexing"], ["Blister", "Sarcoidosis/left"]])
    assert st.n_tags == 6 and st.reports_without_label == 1
    assert st.status == {"normal": 1, "unknown": 3, "unrendered": 1, "no_indexing": 1}
    assert st.unknown_terms == {"sarcoidosis": 2, "blister": 1}


def test_vocabulary_coverage_on_real_tags():
    kept = apply_rule_filters(read_reports()).kept
    st = tag_stats(r.mesh_major for r in kept)
    assert st.n_tags == 7136
    assert st.status == {"sign": 5106, "normal": 1191, "unrendered": 694, "no_indexing": 90, "unknown": 55}
    assert sum(st.unknown_qualifiers.values()) == 0
    assert st.reports_without_label == 90
    counts = dict.fromkeys(CHEXPERT_CLASSES, 0)
    for r in kept:
        for c, v in zip(CHEXPERT_CLASSES, parse_report_tags(r.mesh_major).labels):
            counts[c] += v
    assert counts["No Finding"] == 1934 and counts["Lung Opacity"] == 672 and counts["Cardiomegaly"] == 323


def test_mesh_label_set_adds_drawn_terms_sides_and_zones_seen_in_train():
    from xraygpt.data.mesh_labels import finding_keys, mesh_label_set

    assert finding_keys(parse_tag("Opacity/lung/base/left/mild")) == ["opacity", "opacity|left", "opacity|base"]
    assert finding_keys(parse_tag("Technical Quality of Image Unsatisfactory")) == []  # not drawn
    assert finding_keys(parse_tag("normal")) == []
    images = {"a": {"labels": [0, 1], "tags": ["Opacity/lung/base/left"], "split": "train"},
              "b": {"labels": [0, 1], "tags": ["Opacity/lung/right"], "split": "train"},
              "c": {"labels": [1, 0], "tags": ["normal"], "split": "train"},
              "t": {"labels": [0, 1], "tags": ["Opacity/lung/base/left", "Nodule/lung/right"], "split": "test"}}
    labels = {"classes": ["No Finding", "Lung Opacity"], "images": images}
    out = mesh_label_set(labels, ["a", "b", "c"], min_films=1)
    # classes from the train films only: the test film's nodule does not become a class
    assert out["classes"] == ["No Finding", "Lung Opacity", "opacity", "opacity|base", "opacity|left", "opacity|right"]
    assert [out["images"][i]["labels"] for i in "abct"] == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 1],
                                                             [1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]]
    assert mesh_label_set(labels, ["a", "b", "c"], min_films=2)["classes"] == ["No Finding", "Lung Opacity", "opacity"]
    assert out["images"]["t"]["tags"] == images["t"]["tags"] and labels["images"]["a"]["labels"] == [0, 1]
