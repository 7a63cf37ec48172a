"""Byte layouts: index.json round trip, down_meta (incl. legacy magic / jsonl), knn_store, bands."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from modelql.errors import VindexError
from modelql.vindex import format as fmt
from modelql.vindex.bands import resolve_bands


def _index(**kw):
    base = dict(model="m", family="llama", num_layers=2, hidden_size=4, intermediate_size=3, vocab_size=5,
                embed_scale=1.0, layers=[fmt.LayerInfo(0, 3, 0, 48), fmt.LayerInfo(1, 3, 48, 48)])
    base.update(kw)
    return fmt.IndexJson(**base)


def test_index_round_trip_preserves_unknown_fields(tmp_path):
    idx = _index()
    d = idx.to_json()
    d["fp4"] = {"x": 1}
    d["ffn_layout"] = "per_layer"
    d["future_field"] = [1, 2]
    d["layers"][0]["future_layer_field"] = True
    (tmp_path / "index.json").write_text(json.dumps(d))
    back = fmt.IndexJson.read(tmp_path)
    assert back.extra == {"fp4": {"x": 1}, "ffn_layout": "per_layer", "future_field": [1, 2]}
    assert back.layers[0].extra == {"future_layer_field": True}
    back.write(tmp_path)
    again = json.loads((tmp_path / "index.json").read_text())
    assert again == d
    # defaults on read
    for k in ("source", "checksums", "extract_level", "dtype", "quant", "layer_bands", "has_model_weights",
              "model_config"):
        d.pop(k)
    (tmp_path / "index.json").write_text(json.dumps(d))
    r = fmt.IndexJson.read(tmp_path)
    assert (r.extract_level, r.dtype, r.quant, r.has_model_weights, r.checksums) == ("browse", "f32", "none", False, None)


def test_moe_layer_fields_round_trip():
    info = fmt.LayerInfo.from_json({"layer": 3, "num_features": 64, "offset": 0, "length": 512,
                                    "num_experts": 8, "num_features_per_expert": 8})
    assert info.to_json() == {"layer": 3, "num_features": 64, "offset": 0, "length": 512,
                              "num_experts": 8, "num_features_per_expert": 8}
    assert "num_experts" not in fmt.LayerInfo(0, 1, 0, 4).to_json()


def test_index_rejections(tmp_path):
    d = _index().to_json()
    for patch, msg in [({"dtype": "bf16"}, "unsupported dtype"), ({"quant": "q9_9"}, "unsupported quant"),
                       ({"extract_level": "max"}, "extract_level"), ({"version": 3}, "format version 3"),
                       ({"num_layers": "x"}, "wrong type")]:
        (tmp_path / "index.json").write_text(json.dumps({**d, **patch}))
        with pytest.raises(VindexError, match=msg):
            fmt.IndexJson.read(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({**d, "layers": [{"layer": 0}]}))
    with pytest.raises(VindexError, match="missing 'num_features'"):
        fmt.IndexJson.read(tmp_path)
    assert fmt.IndexJson.from_json({**d, "version": 1}).version == 1
    assert fmt.IndexJson.from_json({**d, "extract_level": "all"}).extract_level == "all"


def _independent_down_meta(layers: dict[int, list[tuple[int, float, list[tuple[int, float]]]]], n: int, k: int,
                           magic: int = 0x444D4554) -> bytes:
    out = struct.pack("<IIII", magic, 1, n, k)
    for l in range(n):
        recs = layers.get(l, [])
        out += struct.pack("<I", len(recs))
        for top, c, pairs in recs:
            out += struct.pack("<If", top, c)
            for i in range(k):
                tid, v = pairs[i] if i < len(pairs) else (0, 0.0)
                out += struct.pack("<If", tid, v)
    return out


def test_down_meta_bytes_and_reader(tmp_path):
    k = 3
    recs = {0: [(7, 2.5, [(7, 2.5), (9, 1.25)]), (0, 0.0, []), (4, -0.5, [(4, -0.5), (0, 0.75), (6, -1.0)])],
            2: [(11, 3.0, [(11, 3.0), (12, 2.0), (13, 1.0)])]}
    path = tmp_path / "down_meta.bin"
    with fmt.DownMetaWriter(path, 3, k) as w:
        for layer, rs in recs.items():
            ids = np.zeros((len(rs), k), np.uint32)
            vals = np.zeros((len(rs), k), np.float32)
            for r, (_, _, pairs) in enumerate(rs):
                for j, (i, v) in enumerate(pairs):
                    ids[r, j], vals[r, j] = i, v
            w.write_layer(layer, fmt.make_records(np.array([r[0] for r in rs]), np.array([r[1] for r in rs]),
                                                  ids, vals, k))
    expected = _independent_down_meta(recs, 3, k)
    assert path.read_bytes() == expected
    assert path.read_bytes()[:4] == b"TEMD"
    assert len(expected) == 16 + 4 * 3 + 4 * (8 + 8 * k)
    dm = fmt.DownMetaFile(path)
    assert dm.layers() == [0, 2] and dm.num_features(1) == 0 and dm.num_features(0) == 3
    assert dm.get(0, 0) == fmt.RawMeta(7, 2.5, ((7, 2.5), (9, 1.25)))
    assert dm.get(0, 1) is None  # empty record
    assert dm.get(0, 2).top_k == ((4, -0.5), (0, 0.75), (6, -1.0))  # id 0 with a non-zero logit is kept
    assert dm.get(1, 0) is None and dm.get(0, 3) is None
    # legacy magic accepted
    path.write_bytes(_independent_down_meta(recs, 3, k, magic=0x54454D44))
    assert fmt.DownMetaFile(path).get(2, 0).top_token_id == 11
    # version / truncation errors
    path.write_bytes(struct.pack("<IIII", 0x444D4554, 2, 1, 3) + b"\0" * 4)
    with pytest.raises(VindexError, match="version 2"):
        fmt.DownMetaFile(path)
    path.write_bytes(expected[:10])
    with pytest.raises(VindexError, match="header"):
        fmt.DownMetaFile(path)
    path.write_bytes(expected[:20])
    with pytest.raises(VindexError, match="truncated in layer 0"):
        fmt.DownMetaFile(path)


def test_down_meta_jsonl_fallback(tmp_path, extracted):
    import shutil

    from modelql.vindex import Vindex

    src = Vindex.load(extracted("llama"))
    out = tmp_path / "legacy.vindex"
    shutil.copytree(src.path, out)
    (out / "down_meta.bin").unlink()
    lines = []
    for l in src.layers():
        for f in range(src.num_features(l)):
            m = src.feature_meta(l, f)
            if m is not None:
                lines.append(json.dumps({"l": l, "f": f, "t": " " + m.top_token, "i": m.top_token_id, "c": m.c_score,
                                         "k": [{"t": t, "i": i, "s": s} for t, i, s in m.top_k]}))
    (out / "down_meta.jsonl").write_text("\n".join(lines) + "\n")
    vx = Vindex.load(out)
    for l in src.layers():
        for f in (0, 5, 50):
            assert vx.feature_meta(l, f) == src.feature_meta(l, f)
    q = src.embedding(33)
    assert [(h.layer, h.feature) for h in vx.walk(q, k=4)] == [(h.layer, h.feature) for h in src.walk(q, k=4)]
    top, c, present = vx.meta_arrays(1)
    top2, c2, present2 = src.meta_arrays(1)
    assert np.array_equal(top, top2) and np.array_equal(present, present2)
    (out / "down_meta.jsonl").write_text('{"l": 0}\n')
    with pytest.raises(VindexError, match="line 1"):
        Vindex.load(out)


def test_knn_store_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    entries = [fmt.KnnEntry(layer=l, key=rng.standard_normal(16).astype(np.float32) * 7, target_id=t,
                            target_token=f"tok{t}", entity=f"E{t}", relation="capital", confidence=c)
               for l, t, c in [(5, 10, 0.5), (2, 11, 1.0), (5, 12, 0.25)]]
    path = tmp_path / "knn_store.bin"
    fmt.write_knn_store(path, entries, 16)
    raw = path.read_bytes()
    assert raw[:4] == b"LKNN" and struct.unpack_from("<III", raw, 4) == (1, 16, 2)
    assert struct.unpack_from("<II", raw, 16) == (2, 1)  # layers ascending
    dim, back = fmt.read_knn_store(path)
    assert dim == 16 and [(e.layer, e.target_id) for e in back] == [(2, 11), (5, 10), (5, 12)]
    for e in back:
        orig = next(o for o in entries if o.target_id == e.target_id)
        want = (orig.key / np.linalg.norm(orig.key)).astype(np.float16).astype(np.float32)
        assert e.key.tobytes() == want.tobytes()
        assert (e.entity, e.relation, e.target_token, e.confidence) == (orig.entity, "capital", orig.target_token,
                                                                        orig.confidence)
    # bit-exact rewrite
    fmt.write_knn_store(tmp_path / "again.bin", back, 16)
    assert (tmp_path / "again.bin").read_bytes() == raw
    assert fmt.write_knn_store(tmp_path / "empty.bin", [], 16) is None and not (tmp_path / "empty.bin").exists()
    # missing confidence defaults to 1.0; truncation is an error
    blob = json.dumps({"target_token": "x", "entity": "e", "relation": "r"}).encode()
    one = b"LKNN" + struct.pack("<III", 1, 2, 1) + struct.pack("<II", 0, 1) + np.ones(2, "<f2").tobytes() \
        + struct.pack("<I", 3) + struct.pack("<I", len(blob)) + blob
    (tmp_path / "one.bin").write_bytes(one)
    assert fmt.read_knn_store(tmp_path / "one.bin")[1][0].confidence == 1.0
    (tmp_path / "one.bin").write_bytes(one[:-5])
    with pytest.raises(VindexError, match="truncated"):
        fmt.read_knn_store(tmp_path / "one.bin")
    (tmp_path / "one.bin").write_bytes(b"NOPE" + one[4:])
    with pytest.raises(VindexError, match="bad magic"):
        fmt.read_knn_store(tmp_path / "one.bin")


def test_embeddings_dtype_by_size():
    assert fmt.embeddings_dtype(5 * 4 * 4, 5, 4) == "f32"
    assert fmt.embeddings_dtype(5 * 4 * 2, 5, 4) == "f16"
    with pytest.raises(VindexError, match="embeddings.bin size mismatch"):
        fmt.embeddings_dtype(7, 5, 4)


@pytest.mark.parametrize("family,n,expect", [
    ("gemma3", 34, ((0, 13), (14, 27), (28, 33))),
    ("gemma3_text", 34, ((0, 13), (14, 27), (28, 33))),
    ("gemma2", 26, ((0, 10), (11, 20), (21, 25))),
    ("gemma4", 60, ((0, 23), (24, 47), (48, 59))),
    ("llama", 32, ((0, 12), (13, 25), (26, 31))),
    ("phi3", 32, ((0, 12), (13, 25), (26, 31))),
    ("qwen2", 28, ((0, 10), (11, 22), (23, 27))),
    ("gpt2", 12, ((0, 4), (5, 9), (10, 11))),
    ("gpt2", 48, ((0, 19), (20, 38), (39, 47))),
    ("llama", 16, ((0, 5), (6, 11), (12, 15))),  # proportional: s = 6, k = 12
    ("mystery", 10, ((0, 3), (4, 7), (8, 9))),
    ("llama", 7, ((0, 6), (0, 6), (0, 6))),
])
def test_bands(family, n, expect):
    b = resolve_bands(family, n)
    assert (b.syntax, b.knowledge, b.output) == expect


def test_bands_from_index_win():
    b = resolve_bands("gemma3", 34, {"syntax": [0, 1], "knowledge": [2, 30], "output": [31, 33]})
    assert b.knowledge == (2, 30) and b.source == "index"
    assert b.band_of(31) == "output" and list(b.layers("syntax")) == [0, 1]
    assert b.to_json() == {"syntax": [0, 1], "knowledge": [2, 30], "output": [31, 33]}
    assert resolve_bands("gemma3", 34, {"syntax": "bad"}).source == "family"
