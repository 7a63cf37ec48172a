"""COMPILE INTO VINDEX / INTO MODEL and DIFF (algorithms §13–§14)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modelql.errors import CapabilityError
from modelql.knowledge import edit
from modelql.knowledge.infer import infer
from modelql.vindex import Vindex
from modelql.vindex import patch as vlp
from modelql.vindex.compile import CompileError, compile_model, compile_vindex
from modelql.vindex.diff import diff, diff_into_patch
from modelql.vindex.overlay import PatchSession
from tests.edit.conftest import file_digests

PROMPTS = ["The capital of France is", "Hello world", "The capital of Japan is Tokyo"]


def _vec(seed, n, scale=0.3):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def edited(session, tombstone: bool = True):
    """A session with every kind of edit: COMPOSE, KNN, tombstone, metadata update, a delta."""
    H, F = session.base.hidden_size, session.base.num_features(0)
    edit.insert(session, "France", "capital", "Tokyo", mode="compose")
    edit.insert(session, "Japan", "capital", "Paris", mode="knn")
    if tombstone:
        edit.delete(session, [("layer", "=", 0), ("feature", "=", 2)])
    edit.update(session, [("layer", "=", 0), ("feature", "=", 9)], {"target": "Hello", "confidence": 3.0})
    session.record([vlp.DownDeltaOp(0, _vec(1, H).reshape(H, 1), _vec(2, F).reshape(F, 1), ("A",), ("r",), ("B",),
                                    edit_id="x", method="memit")])
    return session


def logits(model, prompt):
    return model.forward(model.tokenizer.encode(prompt), logits="last")[0]


def test_compile_vindex_bakes_everything_and_infers_the_same(session, vindex_dir, tmp_path):
    before = file_digests(vindex_dir)
    edited(session)
    out = tmp_path / "out.vindex"
    r = compile_vindex(session, out)
    assert file_digests(vindex_dir) == before  # the base is never modified
    assert r.knn_entries == 1 and r.tombstones == 1 and r.deltas_baked == 1 and r.layers_touched >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.vindex"]  # no staging left
    vx = Vindex.load(out)
    assert vx.verify().ok
    fresh = PatchSession(vx)
    for p in PROMPTS:
        a = infer(session.model(), p, top=3, knn=session.knn_entries())
        b = infer(fresh.model(), p, top=3, knn=fresh.knn_entries())
        assert [x.token_id for x in a.predictions] == [x.token_id for x in b.predictions]
        assert torch.allclose(logits(session.model(), p), logits(fresh.model(), p), atol=1e-4)
    assert (a.override is None) == (b.override is None)
    # browse files: tombstone has no metadata, the update and the COMPOSE slot have theirs
    assert vx.feature_meta(0, 2) is None
    m = vx.feature_meta(0, 9)
    assert m.c_score == 3.0
    slot = next(k for k, s in session.state.slots.items() if s.relation == "capital")
    assert json.loads((out / "feature_labels.json").read_text())[f"L{slot[0]}_F{slot[1]}"] == "capital"
    assert torch.equal(vx.gate_row(*slot), session.view.gate_row(*slot))
    # unaffected files are hard links of the base's
    assert (out / "embeddings.bin").stat().st_ino == (vindex_dir / "embeddings.bin").stat().st_ino


def test_compile_model_loads_in_transformers_with_the_edits(session, tmp_path, fast_memit):
    import transformers

    edited(session)  # a tombstone too: MEMIT's statistics are of the base weights, the dead feature is fine
    out = tmp_path / "model"
    r = compile_model(session, out, dtype="float32")
    assert r.knn_materialised == 1 and r.deltas_baked >= 2  # the delta + MEMIT for the KNN fact
    assert not (out / "knn_store.bin").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    from modelql.runtime import load_model

    mine = load_model(out)
    # the compiled weights = the overlay's FFN (+ the materialised KNN fact) everywhere else
    for p in PROMPTS[:2]:
        ids = mine.tokenizer.encode(p)
        assert tok(p).input_ids == ids
        with torch.no_grad():
            h = hf(input_ids=torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(h, logits(mine, p), atol=1e-4)
    # without the KNN fact the compiled model equals the session exactly (same FFN edits)
    out2 = tmp_path / "model2"
    compile_model(session, out2, dtype="float32", materialise_knn=False)
    m2 = load_model(out2)
    for p in PROMPTS:
        assert torch.allclose(logits(m2, p), logits(session.model(), p), atol=1e-4)


def test_compile_model_into_gguf_runs_the_edits(session, tmp_path, fast_memit):
    """FORMAT GGUF: one file, loaded by modelql's GGUF reader, answering like the compiled
    safetensors model (f32 weights → F32 tensors)."""
    from modelql.runtime import load_model

    edited(session)
    r = compile_model(session, tmp_path / "m.gguf", format="gguf", materialise_knn=False)
    assert (r.format, r.dtype) == ("gguf", "F32") and r.deltas_baked == 1 and r.tombstones == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no staging left
    assert r.size_bytes == (tmp_path / "m.gguf").stat().st_size
    g = load_model(tmp_path / "m.gguf")
    for p in PROMPTS:
        assert g.tokenizer.encode(p) == session.model().tokenizer.encode(p)
        assert torch.allclose(logits(g, p), logits(session.model(), p), atol=1e-4)


def test_compile_refuses_bad_destinations_and_writes_nothing(session, vindex_dir, browse_dir, tmp_path):
    edit.insert(session, "France", "capital", "Tokyo", mode="knn")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for fn in (compile_vindex, compile_model):
        with pytest.raises(CompileError, match="already exists and is not empty; nothing was written"):
            fn(session, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(CompileError, match="resolves to the source vindex"):
        compile_vindex(session, vindex_dir)
    (busy / "m.gguf").write_text("mine")
    with pytest.raises(CompileError, match="m.gguf already exists; nothing was written"):
        compile_model(session, busy / "m.gguf", format="gguf")
    with pytest.raises(CompileError, match="unknown model format 'onnx'"):
        compile_model(session, tmp_path / "o", format="onnx")
    (busy / "m.gguf").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    compile_vindex(session, empty)  # an empty directory is replaced
    assert (empty / "index.json").exists()
    ps = PatchSession(Vindex.load(browse_dir))
    with pytest.raises(CapabilityError, match="requires model weights"):
        compile_model(ps, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]


def test_failed_compile_leaves_nothing(session, tmp_path, monkeypatch):
    from modelql.vindex import compile as C

    edited(session)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(C, "_rewrite_down_meta", boom)
    with pytest.raises(RuntimeError):
        compile_vindex(session, tmp_path / "out.vindex")
    assert list(tmp_path.iterdir()) == []


def test_on_conflict_fail_writes_nothing(session, tmp_path):
    H = session.base.hidden_size
    m = session.base.model
    session.apply(vlp.Patch(m, [vlp.UpdateOp(0, 1, down=_vec(1, H))]), name="a")
    session.apply(vlp.Patch(m, [vlp.UpdateOp(0, 1, down=_vec(2, H))]), name="b")
    with pytest.raises(CompileError, match="L0/F1 \\(2 writes\\)"):
        compile_vindex(session, tmp_path / "o", on_conflict="fail")
    assert list(tmp_path.iterdir()) == []
    r = compile_vindex(session, tmp_path / "o", on_conflict="highest_confidence")
    assert r.conflicts == 1 and r.strategy == "HIGHEST_CONFIDENCE"


def test_diff_into_patch_reproduces_the_target(session, vindex_dir, base_model, tmp_path):
    edited(session)
    b = tmp_path / "b.vindex"
    compile_vindex(session, b)
    a_vx, b_vx = Vindex.load(vindex_dir), Vindex.load(b)
    res = diff(a_vx, b_vx, limit=5)
    statuses = {r.status for r in res.rows}
    assert "removed" in statuses and "modified" in statuses and len(res.shown) == 5 < res.total
    assert diff(b_vx, b_vx).total == 0
    # CURRENT (the overlay) against its own compilation: only f32 rounding of deltas could differ
    assert all(r.status == "modified" for r in diff(session.view, b_vx).rows)
    res = diff_into_patch(a_vx, b_vx, tmp_path / "d.vlp")
    assert res.operations == res.total and res.patch_counts.total == res.total
    ps = PatchSession(Vindex.load(vindex_dir), model=base_model)
    ps.apply(tmp_path / "d.vlp")
    assert ps.applied[0].patch.description == f"Diff: {vindex_dir} vs {b}"
    assert diff(ps.view, b_vx).total == 0  # a ⊕ patch = b (metadata and vectors)
    for p in PROMPTS:
        assert torch.allclose(logits(ps.model(), p), logits(PatchSession(b_vx).model(), p), atol=1e-5)
