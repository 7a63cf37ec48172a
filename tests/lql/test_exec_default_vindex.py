"""The default-vindex cache: keyed by the model files' checksum, reused, rebuilt when broken,
safe when processes race (temp dir + rename, lock), progress on stderr only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import pytest

from modelql.errors import ModelNotFoundError
from modelql.lql import default_vindex as dv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MODELQL_CACHE", str(root))
    return root


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


class FakeExtract:
    """Stands in for `modelql.vindex.extract`: copies a prepared vindex (fast), counts calls."""

    def __init__(self, source: Path, delay: float = 0.0):
        self.source, self.delay, self.calls = source, delay, []
        self.lock = threading.Lock()

    def __call__(self, model, out, **kw):
        with self.lock:
            self.calls.append((Path(model), Path(out), kw))
        time.sleep(self.delay)
        shutil.copytree(self.source, out)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELQL_CACHE", str(tmp_path / "c"))
    assert dv.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MODELQL_CACHE")
    assert dv.cache_dir() == Path.home() / ".cache" / "modelql"


def test_fingerprint_follows_model_files(model_dir):
    a = dv.fingerprint(model_dir)
    assert dv.fingerprint(model_dir) == a
    cfg = model_dir / "config.json"
    data = json.loads(cfg.read_text())
    data["rms_norm_eps"] = 1e-6
    cfg.write_text(json.dumps(data))
    b = dv.fingerprint(model_dir)
    assert b != a
    weights = model_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # same size, one bit of the weights
    weights.write_bytes(bytes(raw))
    assert dv.fingerprint(model_dir) not in (a, b)
    assert dv.fingerprint(model_dir, label=True) != dv.fingerprint(model_dir) or dv._labeller() is None


def test_extract_once_then_reuse(cache, model_dir, tiny_vindex, capsys):
    fake = FakeExtract(tiny_vindex)
    p1 = dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake)
    assert p1.parent == cache / "vindex" and p1.name == f"m-{dv.fingerprint(model_dir)}.vindex"
    assert (p1 / "index.json").is_file()
    assert len(fake.calls) == 1
    _model, out, kw = fake.calls[0]
    assert out.parent != p1.parent and out.parent.parent == p1.parent  # a private staging dir
    assert kw["level"] == "inference" and kw["progress"] is False
    p2 = dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake)
    assert p2 == p1 and len(fake.calls) == 1
    assert [p.name for p in p1.parent.iterdir() if not p.name.endswith(".lock")] == [p1.name]  # no staging left
    err = capsys.readouterr()
    assert "Extracting" in err.err and err.out == ""


def test_retrained_model_extracts_again(cache, model_dir, tiny_vindex):
    fake = FakeExtract(tiny_vindex)
    p1 = dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake)
    (model_dir / "generation_config.json").write_text('{"temperature": 0.5}')
    p2 = dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake)
    assert p2 != p1 and len(fake.calls) == 2 and p1.exists() and p2.exists()


def test_broken_cache_is_rebuilt(cache, model_dir, tiny_vindex):
    fake = FakeExtract(tiny_vindex)
    p = dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake)
    (p / "index.json").write_text("{ truncated")
    assert dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake) == p
    assert len(fake.calls) == 2
    json.loads((p / "index.json").read_text())


def test_failed_extraction_leaves_nothing(cache, model_dir):
    def failing(model, out, **kw):
        Path(out).mkdir(parents=True)
        (Path(out) / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=failing)
    left = [p.name for p in (cache / "vindex").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_threads_racing_extract_once(cache, model_dir, tiny_vindex):
    fake = FakeExtract(tiny_vindex, delay=0.3)
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(
        dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and len(set(got)) == 1 and len(fake.calls) == 1


def test_rename_race_without_lock(cache, model_dir, tiny_vindex, monkeypatch):
    """Where locking is unavailable both racers extract; the loser's rename fails and it uses the
    winner's directory."""
    monkeypatch.setattr(dv, "_lock", lambda path: nullcontext())
    fake = FakeExtract(tiny_vindex, delay=0.3)
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(
        dv.ensure_vindex(model_dir, name="m", progress=False, extract_fn=fake))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] == got[1] and len(fake.calls) == 2
    assert [p.name for p in got[0].parent.iterdir()] == [got[0].name]
    json.loads((got[0] / "index.json").read_text())


RACER = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    from modelql.lql import default_vindex as dv

    def fake(model, out, **kw):
        with open(sys.argv[3], "a") as fh:
            fh.write("extract\\n")
        time.sleep(0.5)
        shutil.copytree(sys.argv[2], out)

    print(dv.ensure_vindex(sys.argv[1], name="m", progress=False, extract_fn=fake))
""")


def test_processes_racing_extract_once(cache, model_dir, tiny_vindex, tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    log = tmp_path / "calls.log"
    env = dict(os.environ, MODELQL_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, str(script), str(model_dir), str(tiny_vindex), str(log)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    assert log.read_text().count("extract") == 1
    assert (Path(paths.pop()) / "index.json").is_file()


def test_not_a_model(cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        dv.ensure_vindex(tmp_path, name="m", progress=False)


def test_default_model_missing(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(dv, "default_model_dir", lambda: tmp_path / "absent")
    assert not dv.default_model_installed()
    with pytest.raises(ModelNotFoundError, match="not installed"):
        dv.default_vindex_path(progress=False)
    from modelql.lql.executor import run_batch
    from modelql.lql.session import Session

    (o,) = run_batch("STATS", Session())
    assert str(o.error).startswith("No backend loaded and the embedded default model is not installed")


def test_real_extraction_into_cache(cache, model_dir):
    """One real extraction (the tiny model) through the cache: a loadable inference vindex."""
    from modelql.vindex import Vindex

    p = dv.ensure_vindex(model_dir, progress=False)
    vx = Vindex.load(p)
    assert vx.extract_level == "inference" and vx.has_weights and vx.num_layers == 2
