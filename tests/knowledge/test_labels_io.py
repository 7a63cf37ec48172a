"""Label files and inputs: triples/templates parsing, feature_labels.json reading and merging."""

from __future__ import annotations

import json

import pytest

from modelql.knowledge.labels import (LABELS_FILE, PROBE_META_FILE, REFERENCE_TEMPLATES, LabelError, ProbeResult,
                                      default_templates, default_triples, load_templates, load_triples, match_index,
                                      read_labels, read_probe_labels, write_probe_labels)


def test_load_triples_tsv_and_json(tmp_path):
    tsv = tmp_path / "facts.tsv"
    tsv.write_text("entity\trelation\ttarget\nFrance\tcapital\tParis\nSpain\tcapital\tMadrid\n\n")
    assert load_triples(tsv) == {"capital": {"pairs": [["France", "Paris"], ["Spain", "Madrid"]]}}
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"capital": {"pairs": [["France", "Paris"]]}, "language": [["France", "French"]]}))
    assert load_triples(js) == {"capital": {"pairs": [["France", "Paris"]]},
                                "language": {"pairs": [["France", "French"]]}}


@pytest.mark.parametrize("text, msg", [
    ("France\tcapital\n", "expected 3 columns"),
    ("{bad json", "not valid JSON"),
    ('["a"]', "expected an object"),
    ('{"capital": {"pairs": [["France"]]}}', "[subject, object]"),
    ('{"capital": 3}', "no pairs list"),
])
def test_bad_triples_files(tmp_path, text, msg):
    p = tmp_path / ("x.json" if text.lstrip().startswith(("{", "[")) else "x.tsv")
    p.write_text(text)
    with pytest.raises(LabelError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        load_triples(p)
    with pytest.raises(LabelError, match="does not exist"):
        load_triples(tmp_path / "missing.tsv")


def test_templates(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"capital": "Capital of {X}:", "language": ["{X} speaks", "In {X} they speak"]}))
    assert load_templates(p) == {"capital": ["Capital of {X}:"], "language": ["{X} speaks", "In {X} they speak"]}
    p.write_text(json.dumps({"capital": "no placeholder"}))
    with pytest.raises(LabelError, match=r"\{X\}"):
        load_templates(p)
    d = default_templates(["capital", "subregion", "founded_by"])
    assert d["capital"] == [REFERENCE_TEMPLATES["capital"]] == ["The capital of {X} is"]
    assert d["subregion"] == ["{X} is in the region of"]  # the embedded model's canonical template
    assert d["founded_by"] == ["The founded by of {X} is"]  # the canonical INSERT phrasing


def test_default_triples_are_the_embedded_facts():
    from modelql import defaults as D

    tri = default_triples()
    assert set(tri) == set(D.RELATIONS)
    assert ["France", "Paris"] in tri["capital"]["pairs"]
    assert sum(len(b["pairs"]) for b in tri.values()) == len(D.facts())


def test_match_index_first_relation_wins():
    idx = match_index({"language": {"pairs": [["France", "French"]]},
                       "demonym": {"pairs": [["France", "French"]]},
                       "subregion": {"pairs": [["India", "Southern Asia"]]}})
    assert idx[("france", "french")] == "language"
    assert idx[("india", "asia")] == idx[("india", "southern")] == idx[("india", "southern asia")] == "subregion"


def test_feature_labels_read_merge_and_meta(tmp_path):
    (tmp_path / LABELS_FILE).write_text(json.dumps({"L1_F2": "capital", "L3_F4": "language", "bad": "x",
                                                    "L5_F6": 7, "L7_F8": ""}))
    assert read_probe_labels(tmp_path) == {(1, 2): "capital", (3, 4): "language"}
    res = ProbeResult(labels={(3, 4): "currency", (0, 9): "borders"}, hits={}, prompts=10, layers=(0, 1),
                      seconds=0.5, per_relation={"currency": 1, "borders": 1})
    write_probe_labels(tmp_path, res, {"capital": ["The capital of {X} is"]}, "m")
    data = json.loads((tmp_path / LABELS_FILE).read_text())
    assert data == {"L0_F9": "borders", "L1_F2": "capital", "L3_F4": "currency"}  # new keys overwrite, merged
    meta = json.loads((tmp_path / PROBE_META_FILE).read_text())
    assert meta["capture"] == "ffn_input" and meta["probes"] == 10 and meta["model"] == "m"
    assert meta["templates"] == {"capital": ["The capital of {X} is"]}
    write_probe_labels(tmp_path, res, {}, "m", replace=True)
    assert read_probe_labels(tmp_path) == {(0, 9): "borders", (3, 4): "currency"}
    assert not list(tmp_path.glob(".*tmp"))
    labs = read_labels(tmp_path)
    assert labs.get(3, 4) == ("currency", "probe") and labs.get(1, 2) is None
    (tmp_path / LABELS_FILE).write_text("{oops")
    with pytest.raises(Exception, match="not valid JSON"):
        read_probe_labels(tmp_path)
