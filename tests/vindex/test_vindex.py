"""`Vindex`: gate KNN against brute force, walk, caching, bad inputs, verify, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from modelql.errors import VindexError
from modelql.vindex import Vindex, topk_abs, verify
from tests.vindex.helpers import reference_knn


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gate_knn_matches_brute_force(dtype, extracted):
    vx = Vindex.load(extracted("gemma3", dtype=dtype))
    rng = np.random.default_rng(0)
    for layer in vx.layers():
        G = vx.gate_array(layer).astype(np.float32)
        for _ in range(5):
            q = rng.standard_normal(vx.hidden_size).astype(np.float32)
            hits = vx.gate_knn(layer, q, 12)
            ref = reference_knn(G, q, 12)
            assert [(h.layer, h.feature) for h in hits] == [(layer, f) for f, _ in ref]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in ref], rtol=1e-5, atol=1e-6)
            assert any(h.score < 0 for h in hits)  # signed scores, ranked by magnitude
            assert all(abs(a.score) >= abs(b.score) for a, b in zip(hits, hits[1:]))


def test_gate_knn_batch_equals_single(extracted):
    vx = Vindex.load(extracted("llama", dtype="f16"))
    Q = torch.randn(7, vx.hidden_size)
    batch = vx.gate_knn_batch(1, Q, 9)
    for q, hits in zip(Q, batch):
        single = vx.gate_knn(1, q, 9)
        assert [h.feature for h in hits] == [h.feature for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], rtol=1e-5, atol=1e-6)


def test_topk_abs_ties_and_sign():
    s = torch.tensor([1.0, -3.0, 3.0, 0.5, -3.0, 2.0, 3.0])
    assert topk_abs(s, 3).tolist() == [1, 2, 4]  # |3| four times: lowest indices first
    assert topk_abs(s, 5).tolist() == [1, 2, 4, 6, 5]
    assert topk_abs(s, 100).tolist() == [1, 2, 4, 6, 5, 0, 3]
    assert topk_abs(s, 0).tolist() == []
    b = torch.stack([s, -s.flip(0)])
    assert topk_abs(b, 2).tolist() == [[1, 2], [0, 2]]
    z = torch.zeros(50)
    assert topk_abs(z, 4).tolist() == [0, 1, 2, 3]


def test_walk_attaches_meta_and_drops_empty(extracted, tmp_path):
    out = _copy(extracted("llama"), tmp_path / "w.vindex")
    vx = Vindex.load(out)
    q = vx.embedding(50)
    hits = vx.walk(q, k=5)
    assert [h.layer for h in hits] == sorted(h.layer for h in hits)
    assert {h.layer for h in hits} == {0, 1, 2}
    for h in hits:
        assert h.meta == vx.feature_meta(h.layer, h.feature)
    # blank the metadata record of the layer-0 top hit: the walk must drop it
    top = vx.gate_knn(0, q, 1)[0].feature
    rec = vx._down.records(0)
    off = rec.ctypes.data - np.frombuffer(vx._down._buf, dtype=np.uint8).ctypes.data + top * rec.dtype.itemsize
    raw = bytearray((out / "down_meta.bin").read_bytes())
    raw[off : off + rec.dtype.itemsize] = bytes(rec.dtype.itemsize)
    (out / "down_meta.bin").write_bytes(bytes(raw))
    vx2 = Vindex.load(out)
    assert vx2.feature_meta(0, top) is None
    hits2 = vx2.walk(q, layers=[0], k=5)
    assert [h.feature for h in hits2] == [h.feature for h in hits if h.layer == 0 and h.feature != top]
    assert vx2.meta_arrays(0)[2].sum() == vx2.num_features(0) - 1


def test_f16_cache_is_bounded(extracted):
    path = extracted("llama", dtype="f16")
    layer_bytes = 96 * 64 * 4
    vx = Vindex.load(path, cache_bytes=2 * layer_bytes)
    for layer in (0, 1, 2):
        vx.gate(layer)
    assert vx.cached_layers() == [1, 2]
    vx.gate(1)
    vx.gate(0)
    assert vx.cached_layers() == [1, 0]
    assert vx._cache.bytes <= 2 * layer_bytes
    none = Vindex.load(path, cache_bytes=0)
    none.gate(0)
    assert none.cached_layers() == []
    assert torch.equal(none.gate(2), vx.gate(2))


def test_f32_gates_are_zero_copy(extracted):
    vx = Vindex.load(extracted("llama"))
    g = vx.gate(0)
    assert g.dtype == torch.float32 and vx.cached_layers() == []
    assert not g.is_contiguous() or g.data_ptr() == vx.gate(0).data_ptr()


def test_descriptors(extracted):
    vx = Vindex.load(extracted("gpt2", dtype="f16"))
    assert (vx.num_layers, vx.hidden_size, vx.vocab_size) == (3, 64, 211)
    assert vx.family == "gpt2" and vx.embed_scale == 1.0 and vx.down_top_k == 10
    assert vx.bands.knowledge == (0, 2) and vx.bands.source == "index"  # written resolved
    assert vx.layers() == [0, 1, 2] and vx.num_features(2) == 256
    assert vx.embedding(9, scaled=False).shape == (64,)
    assert vx.token_text(9) == "w9" and vx.token_text(1) == ""
    assert vx.vocab_texts()[:6] == ["", "", "", "", "", "w5"]
    assert vx.tokenizer.encode("w7 w8", add_special_tokens=False) == [7, 8]
    with pytest.raises(VindexError, match="not loaded"):
        vx.gate_knn(5, torch.zeros(64), 3)
    with pytest.raises(VindexError, match="expected"):
        vx.gate_knn(0, torch.zeros(65), 3)
    with pytest.raises(VindexError, match="outside the vocabulary"):
        vx.embedding(10_000)
    assert vx.feature_meta(0, 10_000) is None and vx.feature_meta(9, 0) is None


# -- bad input -------------------------------------------------------------------------------


def test_not_a_vindex(tmp_path):
    with pytest.raises(VindexError, match="does not exist"):
        Vindex.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VindexError, match=r"is not a vindex \(no index.json\)"):
        Vindex.load(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VindexError, match="not a vindex directory"):
        Vindex.load(tmp_path / "file")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    with pytest.raises(VindexError, match="not valid JSON"):
        Vindex.load(tmp_path / "bad")


def test_truncated_gate_file(extracted, tmp_path):
    out = _copy(extracted("llama"), tmp_path / "t.vindex")
    gate = out / "gate_vectors.bin"
    data = gate.read_bytes()
    gate.write_bytes(data[: len(data) - 100])
    with pytest.raises(VindexError, match=r"gate_vectors.bin is truncated: layer 2 needs"):
        Vindex.load(out)
    report = verify(out)
    assert not report.ok and "truncated" in report.problems[0]
    assert "gate_vectors.bin" in report.failures


def test_unknown_version(extracted, tmp_path):
    out = _copy(extracted("llama"), tmp_path / "v.vindex")
    idx = json.loads((out / "index.json").read_text())
    idx["version"] = 7
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(VindexError, match="format version 7; this modelql reads versions 1, 2"):
        Vindex.load(out)
    del idx["version"]
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(VindexError, match="no integer 'version'"):
        Vindex.load(out)
    idx["version"] = 2
    del idx["hidden_size"]
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(VindexError, match="missing required field.*hidden_size"):
        Vindex.load(out)


def test_checksum_mismatch(extracted, tmp_path):
    out = _copy(extracted("llama"), tmp_path / "c.vindex")
    assert Vindex.load(out).verify().ok
    dm = out / "down_meta.bin"
    raw = bytearray(dm.read_bytes())
    raw[-3] ^= 0x40  # flip a bit inside the last record's logit
    dm.write_bytes(bytes(raw))
    vx = Vindex.load(out)  # structurally still fine
    report = vx.verify()
    assert not report.ok and list(report.failures) == ["down_meta.bin"]
    assert report.failures["down_meta.bin"].startswith("checksum mismatch")
    (out / "embeddings.bin").unlink()
    report = verify(out)
    assert report.failures["embeddings.bin"] == "missing"


def test_truncated_down_meta_and_embeddings(extracted, tmp_path):
    out = _copy(extracted("llama"), tmp_path / "d.vindex")
    dm = out / "down_meta.bin"
    data = dm.read_bytes()
    dm.write_bytes(data[:-10])
    with pytest.raises(VindexError, match="down_meta.bin is truncated in layer 2"):
        Vindex.load(out)
    dm.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(VindexError, match="bad magic"):
        Vindex.load(out)
    dm.write_bytes(data)
    emb = out / "embeddings.bin"
    emb.write_bytes(emb.read_bytes()[:-4])
    with pytest.raises(VindexError, match="embeddings.bin size mismatch"):
        Vindex.load(out)


def test_gate_length_inconsistent(extracted, tmp_path):
    out = _copy(extracted("llama"), tmp_path / "g.vindex")
    idx = json.loads((out / "index.json").read_text())
    idx["layers"][1]["length"] += 4
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(VindexError, match="layer 1 length"):
        Vindex.load(out)


def test_layers_not_contiguous_or_sorted(extracted, tmp_path):
    """Readers use recorded offsets: reorder layers in the file and index.json."""
    src = Vindex.load(extracted("llama"))
    out = _copy(src.path, tmp_path / "r.vindex")
    idx = json.loads((out / "index.json").read_text())
    blobs = {x["layer"]: src.gate_array(x["layer"]).tobytes() for x in idx["layers"]}
    pad = b"\0" * 64
    order = [2, 0, 1]
    data, layers, pos = b"", [], 0
    for l in order:
        data += pad
        pos += len(pad)
        layers.append({**idx["layers"][l], "offset": pos})
        data += blobs[l]
        pos += len(blobs[l])
    (out / "gate_vectors.bin").write_bytes(data)
    idx["layers"] = layers
    (out / "index.json").write_text(json.dumps(idx))
    vx = Vindex.load(out)
    assert vx.layers() == [0, 1, 2]
    for l in range(3):
        assert torch.equal(vx.gate(l), src.gate(l))


def test_cli_extract_and_verify(tiny, tmp_path):
    import typer
    from typer.testing import CliRunner

    from modelql.vindex.cli_commands import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "cli.vindex"
    r = runner.invoke(app, ["extract", str(tiny["llama"][0]), "-o", str(out), "--level", "browse",
                            "--dtype", "f32", "--down-top-k", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert Vindex.load(out).down_top_k == 5
    r = runner.invoke(app, ["verify", str(out)])
    n = len([p for p in out.iterdir() if p.name != "index.json"])
    assert r.exit_code == 0 and f"{n} files verified" in r.output
    g = out / "gate_vectors.bin"
    raw = bytearray(g.read_bytes())
    raw[0] ^= 1
    g.write_bytes(bytes(raw))
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 1 and "FAILED" in r.output and "gate_vectors.bin" in r.output


def test_fused_f16_scores_equal_decoded(extracted):
    from modelql.vindex import vindex as vmod

    vx = Vindex.load(extracted("llama", dtype="f16"), cache_bytes=0)
    q = torch.randn(vx.hidden_size)
    Q = torch.randn(5, vx.hidden_size)
    old = vmod._CHUNK_ROWS
    try:
        vmod._CHUNK_ROWS = 7  # several chunks and a ragged tail
        for layer in vx.layers():
            G = vx.gate(layer)
            torch.testing.assert_close(vx.gate_scores(layer, q), G @ q, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(vx.gate_scores(layer, Q), Q @ G.t(), rtol=1e-6, atol=1e-6)
    finally:
        vmod._CHUNK_ROWS = old
    assert vx.cached_layers() == []
    small = Vindex.load(vx.path, cache_bytes=96 * 64 * 4 * 2)  # 2 of 3 layers: score by fused decode
    for layer in (0, 1, 2):
        small.gate_knn(layer, q, 3)
    assert small.cached_layers() == []
    big = Vindex.load(vx.path)  # everything fits: fused on first use, decoded into the cache on the second
    big.gate_knn(1, q, 3)
    assert big.cached_layers() == []
    big.gate_knn_batch(1, Q, 3)
    assert big.cached_layers() == [1]
    warm = Vindex.load(vx.path)
    assert warm.warm() == [0, 1, 2] and warm.cached_layers() == [0, 1, 2]
    assert [h.feature for h in warm.gate_knn(2, q, 8)] == [h.feature for h in vx.gate_knn(2, q, 8)]
