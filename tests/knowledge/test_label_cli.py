"""`modelql label VINDEX --triples FILE`: probe labels written atomically, merged, and used."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from modelql.cli import app
from modelql.knowledge import describe
from modelql.knowledge.labels import LABELS_FILE, PROBE_META_FILE, label_vindex, read_probe_labels


@pytest.fixture()
def fresh(unlabelled_path, tmp_path):
    out = tmp_path / "v.vindex"
    shutil.copytree(unlabelled_path, out)
    return out


def test_label_command_with_a_triples_file(fresh, tmp_path):
    from modelql import defaults as D

    tsv = tmp_path / "capitals.tsv"
    tsv.write_text("entity\trelation\ttarget\n" + "".join(
        f"{f.entity}\t{f.relation}\t{f.target}\n" for f in D.facts() if f.relation == "capital"))
    result = CliRunner().invoke(app, ["label", str(fresh), "--triples", str(tsv)])
    assert result.exit_code == 0, result.output
    assert "labelled" in result.output and "capital" in result.output
    labels = read_probe_labels(fresh)
    assert labels and set(labels.values()) == {"capital"}
    meta = json.loads((fresh / PROBE_META_FILE).read_text())
    assert meta["templates"] == {"capital": ["The capital of {X} is"]} and meta["capture"] == "ffn_input"
    assert not [p for p in fresh.iterdir() if p.name.endswith(".tmp")]
    # the labels are what DESCRIBE shows
    from modelql.vindex import Vindex

    res = describe(Vindex.load(fresh), "France", min_z=2.0)
    assert "The capital of {X} is" in res.contexts
    # the probed relation's claims are decoded from its template; static edges keep no capital label
    claims = [e for e in res.edges if e.relation == "capital"]
    assert claims and all(e.decoded and e.source == "probe" for e in claims)
    assert all(e.relation is None or e.relation != "capital" for e in res.edges if not e.decoded)
    # neutral contexts only: per-feature edges, labelled by their probe labels
    static = describe(Vindex.load(fresh), "France", min_z=2.0, contexts=["{X}", "about {X}"])
    assert all(not e.decoded for e in static.edges)
    assert all(labels[(e.layer, e.feature)] == "capital" for e in static.edges if e.source == "probe")


def test_label_merges_and_replaces(fresh):
    (fresh / LABELS_FILE).write_text(json.dumps({"L0_F1023": "motto"}))
    rep = label_vindex(fresh, {"capital": {"pairs": [["France", "Paris"], ["Japan", "Tokyo"], ["Peru", "Lima"]]}},
                       clusters=False)
    labels = read_probe_labels(fresh)
    assert labels[(0, 1023)] == "motto" or (0, 1023) in {k for k, v in labels.items() if v == "capital"}
    assert rep.total_labels == len(labels)
    label_vindex(fresh, {"capital": {"pairs": [["France", "Paris"]]}}, replace=True, clusters=False)
    assert "motto" not in read_probe_labels(fresh).values()


def test_label_command_errors(fresh, tmp_path, browse_vx):
    r = CliRunner().invoke(app, ["label", str(fresh), "--triples", str(tmp_path / "nope.tsv")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["label", str(browse_vx.path)])
    assert r.exit_code == 1 and "weights" in r.output
    r = CliRunner().invoke(app, ["label", str(tmp_path / "missing.vindex")])
    assert r.exit_code == 1 and "does not exist" in r.output
