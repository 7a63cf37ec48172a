"""`modelql slice`: the client, server and browse presets carve the right files, verify, and load in
the command each is for — a server slice serves walk-ffn, a client slice generates through it
token-identically to the full model, a browse slice answers gate KNN like its source."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from modelql.errors import VindexError
from modelql.remote.client import load_remote_model
from modelql.vindex import Vindex
from modelql.vindex.slice import slice_vindex

from .conftest import greedy, shard_inprocess


@pytest.fixture(scope="module")
def slices(inference_vindex, tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    return {p: slice_vindex(inference_vindex, root / f"{p}.vindex", p).path for p in ("client", "server", "browse")}


def names(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_presets_carve_the_right_files(slices):
    client, server, browse = (names(slices[p]) for p in ("client", "server", "browse"))
    assert {"model-embed.safetensors", "model-attn-L000-L003.safetensors", "tokenizer.json", "config.json",
            "index.json", "embeddings.bin"} <= client
    assert not any(n.startswith(("model-ffn", "gate_vectors", "down_meta")) for n in client)
    assert {"model-ffn-L000-L003.safetensors", "gate_vectors.bin", "down_meta.bin", "config.json"} <= server
    assert not any(n.startswith("model-attn") for n in server)
    assert {"gate_vectors.bin", "down_meta.bin", "embeddings.bin", "tokenizer.json", "index.json"} <= browse
    assert not any(n.endswith(".safetensors") and n != "model-embed.safetensors" for n in browse)
    assert not any(n.startswith(".") for n in client | server | browse)  # no staging leftovers


def test_index_rewritten_and_slices_verify(slices):
    levels = {}
    for preset, path in slices.items():
        idx = json.loads((path / "index.json").read_text())
        levels[preset] = (idx["extract_level"], idx["has_model_weights"])
        assert set(idx["checksums"]) <= names(path)
        assert Vindex.load(path).verify().ok
        wi = path / "model.safetensors.index.json"
        if wi.exists():
            shards = set(json.loads(wi.read_text())["weight_map"].values())
            assert shards <= names(path)
    assert levels == {"client": ("attention", True), "server": ("browse", True), "browse": ("browse", False)}


def test_server_and_client_slices_generate_like_the_full_model(slices, local_tokens):
    with shard_inprocess(str(slices["server"]), layers="0-3") as url:
        model = load_remote_model(str(slices["client"]), url)
        try:
            assert greedy(model, n=20) == local_tokens[:20]
        finally:
            model.ffn.close()


def test_client_slice_without_ffn_says_so(slices):
    from modelql.runtime.loading import load_model

    with pytest.raises(Exception, match="has no FFN weights .a client slice.*--ffn URL"):
        load_model(slices["client"])


def test_browse_slice_answers_like_its_source(slices, inference_vindex):
    src, sl = Vindex.load(inference_vindex), Vindex.load(slices["browse"])
    q = np.random.default_rng(0).standard_normal(src.hidden_size).astype(np.float32)
    for layer in range(src.num_layers):
        assert [(h.feature, h.score) for h in src.gate_knn(layer, q, 10)] == \
               [(h.feature, h.score) for h in sl.gate_knn(layer, q, 10)]
    assert src.feature_meta(1, 5) == sl.feature_meta(1, 5)


def test_slice_errors_and_atomicity(inference_vindex, slices, tmp_path):
    with pytest.raises(VindexError, match="unknown preset 'router'.*MoE"):
        slice_vindex(inference_vindex, tmp_path / "x", "router")
    with pytest.raises(VindexError, match="already exists"):
        slice_vindex(inference_vindex, slices["client"], "client")
    with pytest.raises(VindexError, match="has no FFN weights"):
        slice_vindex(slices["client"], tmp_path / "y", "server")
    with pytest.raises(VindexError, match="not a vindex"):
        slice_vindex(tmp_path, tmp_path / "z", "browse")
    # a corrupt source file is caught by the checksum check and leaves nothing behind
    broken = tmp_path / "broken.vindex"
    slice_vindex(inference_vindex, broken, "all")
    with open(broken / "down_meta.bin", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xfe")
    with pytest.raises(VindexError, match="down_meta.bin does not match"):
        slice_vindex(broken, tmp_path / "out.vindex", "browse")
    assert not (tmp_path / "out.vindex").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.vindex")]


def test_slice_cli(inference_vindex, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "srv.vindex"
    r = subprocess.run([sys.executable, "-m", "modelql.cli", "slice", str(inference_vindex), "--preset", "server",
                        "-o", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "server slice, level browse" in r.stdout and "modelql serve" in r.stdout and "MiB" in r.stdout
    r = subprocess.run([sys.executable, "-m", "modelql.cli", "slice", str(inference_vindex), "--preset", "nope",
                        "-o", str(tmp_path / "n")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: unknown preset 'nope'") and "Traceback" not in r.stderr
