"""`modelql serve --patch FILE` as a user runs it: the patches go into the server's patch session (the
path `POST /v1/patches/apply` takes), so generation, `GET /v1/patches`, DESCRIBE and the LQL console
agree on them, and a client can remove them again. Two patches: a weight-level edit (France → capital
→ Rome; the embedded model answers Paris, its training fact) that generation must follow, and a KNN
fact about a made-up entity (Atlantis → Zorbu) that DESCRIBE lists as the patch's."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.server.test_serve_cli import start

from .conftest import PATCH

QUESTION = "What is the capital of France?"


@pytest.fixture
def rome_patch(kvindex, fast_memit, tmp_path):
    from modelql.lql.executor import run_batch
    from modelql.lql.session import Session

    path = tmp_path / "rome.vlp"
    script = (f'USE "{kvindex.path}"; BEGIN PATCH "{path}"; INSERT INTO EDGES (entity, relation, target) '
              'VALUES ("France", "capital", "Rome") MODE MEMIT; SAVE PATCH;')
    for o in run_batch(script, Session(default_vindex=False, progress=False)):
        assert o.ok, o.error
    return path


def ask(c: httpx.Client) -> str:
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
                                             "temperature": 0})
    return r.json()["choices"][0]["message"]["content"]


def test_serve_patch_is_listed_described_and_generated(patch_dir, rome_patch, monkeypatch, kvindex):
    monkeypatch.setenv("MODELQL_CACHE", str(kvindex.path.parent.parent))  # the embedded model's cached vindex
    proc, url, out = start(["--port", "0", "--patch", str(rome_patch), "--patch", str(patch_dir / PATCH)])
    try:
        assert f"rome.vlp, {PATCH} applied" in out
        c = httpx.Client(base_url=url, timeout=120)
        rows = c.get("/v1/patches").json()["patches"]
        assert [r["name"] for r in rows] == ["rome.vlp", PATCH]
        assert "Rome" in ask(c) and "Paris" not in ask(c)
        edges = c.get("/v1/describe", params={"entity": "Atlantis", "variant": "lql"}).json()["edges"]
        assert [e["target"] for e in edges if e.get("patch")] == ["Zorbu"]
        lql = c.post("/v1/lql", json={"statement": 'DESCRIBE "Atlantis"'}).json()["results"][0]["output"]
        assert "Zorbu" in lql and PATCH in lql
        # the patches are the served session's: removing them restores the base model everywhere
        assert c.delete("/v1/patches/rome.vlp").json()["active_patches"] == 1
        assert "Paris" in ask(c)
        assert c.delete(f"/v1/patches/{PATCH}").json()["active_patches"] == 0
        assert c.get("/v1/patches").json()["patches"] == []
        edges = c.get("/v1/describe", params={"entity": "Atlantis", "variant": "lql"}).json()["edges"]
        assert not any(e["target"] == "Zorbu" for e in edges)
    finally:
        proc.kill()
        proc.wait()


def test_serve_patch_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "modelql.cli", "serve", "--port", "0", "--patch",
                        str(tmp_path / "missing.vlp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "patch file not found" in r.stderr and "Traceback" not in r.stderr
