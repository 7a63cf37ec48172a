"""modelql.fsutil: whole files or nothing, no temporary left behind, the usual permissions."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from modelql.fsutil import (atomic_directory, atomic_open, atomic_path, atomic_write_bytes, atomic_write_json,
                            atomic_write_text, replace_directory, staging_directory)


class Boom(Exception):
    pass


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_writes_replace_the_file_whole(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_text(p, "old")
    assert atomic_write_json(p, {"ville": "Zürich", "n": [1, 2]}, indent=2) == p
    assert p.read_text(encoding="utf-8") == '{\n  "ville": "Zürich",\n  "n": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_bytes(p, b"\x00\xff")
    assert p.read_bytes() == b"\x00\xff"
    assert _names(tmp_path) == ["f.json"]


def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_open(p, "wb") as fh:
            fh.write(b"half of the new")
            raise Boom
    assert p.read_bytes() == b"old"
    with pytest.raises(TypeError):  # json.dumps fails before anything is written
        atomic_write_json(p, {"x": object()})
    assert p.read_bytes() == b"old"
    assert _names(tmp_path) == ["f.bin"]


def test_files_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644


def test_concurrent_writers_of_one_file_never_mix(tmp_path):
    p = tmp_path / "shared.txt"
    texts = [str(i) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_text, args=(p, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.read_text() in texts
    assert _names(tmp_path) == ["shared.txt"]


def test_atomic_path_for_writers_that_open_the_file_themselves(tmp_path):
    p = tmp_path / "model.gguf"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"GGUF")
        assert not p.exists()
    assert p.read_bytes() == b"GGUF"
    with pytest.raises(Boom):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"partial")
            raise Boom
    assert p.read_bytes() == b"GGUF" and _names(tmp_path) == ["model.gguf"]


def test_atomic_directory_replaces_or_leaves_nothing(tmp_path):
    out = tmp_path / "sub" / "x.vindex"
    with atomic_directory(out) as d:
        (d / "index.json").write_text("{}")
        assert not out.exists()
    assert _names(out) == ["index.json"]
    with atomic_directory(out) as d:  # an existing directory is replaced
        (d / "other").write_text("2")
    assert _names(out) == ["other"]
    with pytest.raises(Boom):
        with atomic_directory(out) as d:
            (d / "half").write_text("?")
            raise Boom
    assert _names(out) == ["other"] and _names(out.parent) == ["x.vindex"]


def test_replace_directory_over_a_file(tmp_path):
    out = tmp_path / "x"
    out.write_text("a file")
    staging = staging_directory(out)
    (staging / "k").write_text(json.dumps(1))
    replace_directory(staging, out)
    assert out.is_dir() and _names(tmp_path) == ["x"]
