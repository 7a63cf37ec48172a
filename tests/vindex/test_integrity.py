"""Issue 23, defect 5: `verify` covers every file of a vindex (checksummed at write), a damaged vindex
is refused where it would be used (LQL USE, the server), and killed writers' staging is removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from modelql.errors import VindexError


@pytest.fixture()
def vindex_copy(extracted, tmp_path):
    """A private copy of an extracted vindex (with clusters), to damage."""
    src = extracted("llama", "browse", "f32")
    dst = tmp_path / "copy.vindex"
    shutil.copytree(src, dst)
    return dst


def test_every_file_is_checksummed_at_extract(extracted):
    from modelql.vindex.checksums import files_to_hash

    src = extracted("llama", "browse", "f32")
    sums = json.loads((src / "index.json").read_text())["checksums"]
    assert set(sums) == set(files_to_hash(src)) and "index.json" not in sums
    assert {"gate_vectors.bin", "relation_clusters.json", "feature_clusters.jsonl", "tokenizer.json"} <= set(sums)


@pytest.mark.parametrize("name,garbage", [
    ("relation_clusters.json", b"\x00garbage"),
    ("feature_clusters.jsonl", b'{"l": 0, "f": 1, "c": 2}\nnot json\n'),
    ("tokenizer.json", b"{}"),
])
def test_verify_catches_garbage_in_any_file(vindex_copy, name, garbage):
    from modelql.vindex import verify

    assert verify(vindex_copy).ok
    (vindex_copy / name).write_bytes(garbage)
    report = verify(vindex_copy)
    assert not report.ok and name in report.failures


def test_verify_parses_files_without_a_checksum(vindex_copy):
    """feature_labels.json dropped in by hand (no checksum: a vindex written before extract wrote
    one): parsed, garbage reported."""
    import json

    from modelql.vindex import verify

    index = json.loads((vindex_copy / "index.json").read_text())
    index["checksums"].pop("feature_labels.json")
    (vindex_copy / "index.json").write_text(json.dumps(index, indent=2))
    (vindex_copy / "feature_labels.json").write_text('{"L0_F1": "capital"}')
    report = verify(vindex_copy)
    assert report.ok and report.unlisted == ["feature_labels.json"]
    (vindex_copy / "feature_labels.json").write_text("[1, 2")
    report = verify(vindex_copy)
    assert not report.ok and any(p.startswith("feature_labels.json: not valid") for p in report.problems)


def test_files_written_later_are_recorded(vindex_copy):
    from modelql.vindex import Vindex, verify
    from modelql.vindex.clusters import read_clusters, write_clusters

    cl = read_clusters(vindex_copy)
    write_clusters(vindex_copy, cl)  # e.g. `modelql label` relabelling clusters
    assert verify(vindex_copy).ok
    Vindex.load(vindex_copy).check_integrity()


def test_corrupted_gate_vectors_refused_by_lql_use(vindex_copy, monkeypatch, tmp_path):
    from modelql.lql.session import Session

    monkeypatch.setenv("MODELQL_CACHE", str(tmp_path / "cache"))
    Session(default_vindex=False).use_vindex(vindex_copy)  # intact: accepted (and remembered)
    gates = vindex_copy / "gate_vectors.bin"
    data = bytearray(gates.read_bytes())
    data[100:104] = b"\x7f\x7f\x7f\x7f"
    gates.write_bytes(bytes(data))
    with pytest.raises(VindexError, match="gate_vectors.bin: checksum mismatch.*modelql verify"):
        Session(default_vindex=False).use_vindex(vindex_copy)


def test_corrupted_vindex_refused_by_the_server(vindex_copy, monkeypatch, tmp_path):
    from modelql.server.knowledge_routes import VindexSource

    monkeypatch.setenv("MODELQL_CACHE", str(tmp_path / "cache"))
    (vindex_copy / "down_meta.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(VindexError, match="down_meta.bin"):
        VindexSource.open_path(vindex_copy)


def test_killed_extract_staging_is_removed_by_the_next_run(tiny, tmp_path):
    """A writer killed mid-extract leaves `.out.<pid>.<rand>.tmp`; the next extract of the same
    output removes it (its process is gone) and leaves a live writer's staging alone."""
    from modelql.vindex import extract

    out = tmp_path / "m.vindex"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".m.vindex.{dead_pid}.deadbeef.tmp"
    stale.mkdir()
    (stale / "gate_vectors.bin").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".m.vindex.{dead_pid}.cafe0001.old"
    stale_file.write_bytes(b"x")
    live = tmp_path / f".m.vindex.{os.getppid()}.0badf00d.tmp"  # a live process's staging
    live.mkdir()
    extract(tiny["llama"][0], out, level="browse", dtype="f32", clusters=False, progress=False)
    assert out.is_dir() and not stale.exists() and not stale_file.exists() and live.exists()
