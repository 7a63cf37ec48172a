"""`feature_labels.json` at extract (issue 23, defect 7): every vindex modelql writes carries LARQL's
probe-label file (`{"L<layer>_F<feature>": relation}`, vindex-format §6; LARQL's server reads it in
crates/larql-server/src/state.rs `load_probe_labels`), checksummed at write; `--label` runs the probe
step in the staging directory, and the browse paths read what it wrote."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from modelql.errors import VindexError
from modelql.runtime.loading import default_model_dir
from modelql.vindex import Vindex, verify
from modelql.vindex.extract import extract

KEY = re.compile(r"^L\d+_F\d+$")


def test_plain_extract_writes_an_empty_label_file(tmp_path):
    out = tmp_path / "plain.vindex"
    extract(default_model_dir(), out, level="browse", dtype="f32", clusters=False)
    assert json.loads((out / "feature_labels.json").read_text()) == {}
    index = json.loads((out / "index.json").read_text())
    assert "feature_labels.json" in index["checksums"]
    assert verify(out).ok and not list(tmp_path.glob(".*"))


def test_label_at_extract_is_larqls_shape_and_browsed(tmp_path):
    from modelql import defaults
    from modelql.knowledge.cli_commands import extract_labeller
    from modelql.knowledge.feature import feature_profile
    from modelql.knowledge.labels import labels_for

    pairs = defaults.triples_json()["capital"]["pairs"][:24]
    out = tmp_path / "labelled.vindex"
    extract(default_model_dir(), out, level="inference", dtype="f32", clusters=False,
            labeller=extract_labeller({"capital": {"pairs": pairs}}))
    labels = json.loads((out / "feature_labels.json").read_text())
    assert labels and all(KEY.match(k) and isinstance(v, str) for k, v in labels.items())
    assert set(labels.values()) == {"capital"}
    checksums = json.loads((out / "index.json").read_text())["checksums"]
    assert {"feature_labels.json", "probe_meta.json"} <= set(checksums)
    assert verify(out).ok
    vx = Vindex.load(out)
    key = next(iter(labels))
    layer, feature = (int(x) for x in key[1:].split("_F"))
    assert labels_for(vx).get(layer, feature)[0] == "capital"
    profile = feature_profile(vx, layer, feature)
    assert profile.label == "capital"


def test_label_needs_inference_level(tmp_path):
    from modelql.cli import app

    with pytest.raises(VindexError, match="--level inference"):
        extract(default_model_dir(), tmp_path / "x.vindex", level="browse", labeller=lambda d: None)
    r = CliRunner().invoke(app, ["extract", str(default_model_dir()), "-o", str(tmp_path / "y.vindex"), "--label",
                                 "-q"])
    assert r.exit_code == 1 and "--level inference" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "y.vindex").exists()
