"""The overlay (format §12.3) and the overlay-aware FFN (algorithms §7.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelql.vindex import patch as vlp
from modelql.vindex.overlay import PatchSession

IDS = [1, 5, 9, 14, 2, 7, 30, 11]


def _vec(seed: int, n: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def family_vindexes(tmp_path_factory):
    from modelql.vindex import extract
    from tests.vindex.helpers import make_model

    out = {}
    for name in ("llama", "gemma2", "gpt2"):
        d = tmp_path_factory.mktemp(f"ov-{name}")
        make_model(name, d / "model")
        extract(d / "model", d / "v.vindex", level="inference", dtype="f32", clusters=False)
        out[name] = d / "v.vindex"
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_empty_overlay_is_bit_identical_to_dense(family, family_vindexes):
    from modelql.vindex import Vindex

    ps = PatchSession(Vindex.load(family_vindexes[family]))
    base = ps.base_runtime_model()
    patched = ps.model()
    assert patched is not base and patched.weights is base.weights  # shared, not copied
    a = base.forward(IDS)
    b = patched.forward(IDS)
    assert torch.equal(a, b)
    # an overlay with only KNN entries does not touch the FFN either
    ps.record([vlp.InsertKnnOp(0, "e", "r", "t", 3, _vec(0, ps.base.hidden_size))])
    assert torch.equal(patched.forward(IDS), a)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_patched_ffn_equals_dense_with_edited_weights(family, family_vindexes):
    """Overrides, tombstones and deltas give the logits of the correspondingly edited weights."""
    from modelql.runtime import load_model
    from modelql.vindex import Vindex

    path = family_vindexes[family]
    ps = PatchSession(Vindex.load(path))
    spec = ps.base_runtime_model().spec
    H, F = spec.hidden_size, spec.intermediate_size
    g, u, d = _vec(1, H, 0.3), _vec(2, H, 0.3), _vec(3, H, 0.3)
    U, V = _vec(4, H * 2, 0.2).reshape(H, 2), _vec(5, F * 2, 0.2).reshape(F, 2)
    ops = [vlp.InsertOp(1, 3, entity="e", target="t", gate=g, up=u, down=d),
           vlp.UpdateOp(0, 7, down=d * 2), vlp.DeleteOp(2, 5), vlp.UpdateOp(1, 9, gate=g * -1),
           vlp.DownDeltaOp(1, U, V, ("e",), ("r",), ("t",))]
    ps.record(ops)
    got = ps.model().forward(IDS)

    ref = load_model(path)  # an independent copy whose weights we edit by hand
    W = ref.weights
    gate_key = "gate.weight" if spec.gated_ffn else "up.weight"
    with torch.no_grad():
        W[f"layers.1.{gate_key}"][3] = torch.from_numpy(g)
        if spec.gated_ffn:
            W["layers.1.up.weight"][3] = torch.from_numpy(u)
        W["layers.1.down.weight"][:, 3] = torch.from_numpy(d)
        W["layers.0.down.weight"][:, 7] = torch.from_numpy(d * 2)
        W["layers.2.down.weight"][:, 5] = 0
        W[f"layers.1.{gate_key}"][9] = torch.from_numpy(-g)
        W["layers.1.down.weight"] += torch.from_numpy(U @ V.T)
    want = ref.forward(IDS)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    assert not torch.allclose(got, ps.base_runtime_model().forward(IDS), atol=1e-4)


def test_hooks_see_the_patched_activations(session):
    from modelql.runtime import interp

    session.record([vlp.DeleteOp(0, 4)])
    _, cache = interp.run_with_cache(session.model(), [1, 2, 3], ["blocks.0.mlp.hook_post"])
    assert torch.all(cache["blocks.0.mlp.hook_post"][:, 4] == 0)


def test_stacking_is_last_wins_per_component(session):
    H = session.base.hidden_size
    a, b, c = _vec(1, H), _vec(2, H), _vec(3, H)
    p1 = vlp.Patch("m", [vlp.InsertOp(0, 1, entity="e", target="A", gate=a, up=a, down=a,
                                      down_meta=vlp.DownMeta("A", 5, 0.5))])
    p2 = vlp.Patch("m", [vlp.UpdateOp(0, 1, down=b)])
    session.base.index.model = "m"  # the patches' base model (this session only)
    session.apply(p1, name="p1")
    session.apply(p2, name="p2")
    s = session.state.slots[(0, 1)]
    assert np.array_equal(s.gate, a) and np.array_equal(s.up, a) and np.array_equal(s.down, b)
    assert s.meta.top_token == "A"
    session.record([vlp.DeleteOp(0, 1)])
    s = session.state.slots[(0, 1)]
    assert s.tombstone and s.gate is None and s.down is None and session.view.feature_meta(0, 1) is None
    session.record([vlp.InsertOp(0, 1, entity="e", target="C", gate=c)])
    s = session.state.slots[(0, 1)]
    assert not s.tombstone and np.array_equal(s.gate, c) and s.up is None and s.meta.top_token == "C"
    assert session.state.collisions() == {(0, 1): 3}
    # removing a patch recomputes from the base: exactly undone
    session.remove("p1")
    s = session.state.slots[(0, 1)]
    assert np.array_equal(s.gate, c) and s.down is None and s.meta.top_token == "C"
    session.discard_recording()
    s = session.state.slots[(0, 1)]
    assert s.gate is None and np.array_equal(s.down, b) and s.meta is None
    session.remove("p2")
    assert session.state.empty and session.empty


def test_removing_every_patch_restores_bit_identical_logits(session):
    H = session.base.hidden_size
    base = session.model().forward(IDS).clone()
    session.record([vlp.InsertOp(1, 2, entity="e", target="t", gate=_vec(1, H), up=_vec(2, H), down=_vec(3, H)),
                    vlp.DeleteOp(0, 0),
                    vlp.DownDeltaOp(0, _vec(4, H).reshape(H, 1), _vec(5, 64).reshape(64, 1))])
    assert not torch.equal(session.model().forward(IDS), base)
    session.clear()
    assert torch.equal(session.model().forward(IDS), base)


def test_knn_stack_and_base_store(tmp_path, vindex_dir, base_model):
    """Base knn_store.bin entries are part of the base: they survive patch removal; delete_knn
    removes entries case-insensitively (base ones too, while the patch is applied)."""
    import shutil

    from modelql.vindex import Vindex
    from modelql.vindex.format import KnnEntry, write_knn_store

    d = tmp_path / "k.vindex"
    shutil.copytree(vindex_dir, d)
    vx = Vindex.load(d)
    H = vx.hidden_size
    write_knn_store(d / "knn_store.bin", [KnnEntry(1, _vec(1, H), 7, "Paris", "France", "capital")], H)
    ps = PatchSession(vx, model=base_model)
    assert [e.entity for e in ps.knn_entries()] == ["France"]
    p = vlp.Patch(vx.model, [vlp.InsertKnnOp(1, "Spain", "capital", "Rome", 9, _vec(2, H) * 50),
                             vlp.DeleteKnnOp("FRANCE")])
    ps.apply(p, name="p")
    entries = ps.knn_entries()
    assert [e.entity for e in entries] == ["Spain"]
    assert abs(np.linalg.norm(entries[0].key) - 1) < 1e-5  # keys normalised on load
    ps.remove("p")
    assert [e.entity for e in ps.knn_entries()] == ["France"]


def test_view_gate_knn_is_exact_with_overrides_and_tombstones(session):
    from modelql.vindex.vindex import topk_abs

    H = session.base.hidden_size
    q = torch.from_numpy(_vec(9, H))
    g = _vec(10, H, 10.0)
    session.record([vlp.InsertOp(1, 6, entity="e", target="t", gate=g), vlp.DeleteOp(1, 0), vlp.DeleteOp(1, 1)])
    view = session.view
    G = session.base.gate(1).clone()
    G[6] = torch.from_numpy(g)
    scores = G @ q
    scores[[0, 1]] = 0
    a = scores.abs()
    a[[0, 1]] = -1
    want = topk_abs(torch.where(a < 0, torch.zeros_like(a), a), G.shape[0])
    want = [int(f) for f in want if f not in (0, 1)][:10]
    hits = view.gate_knn(1, q, 10)
    assert [h.feature for h in hits] == want
    assert all(h.feature not in (0, 1) for h in view.gate_knn(1, q, G.shape[0]))
    assert len(view.gate_knn(1, q, G.shape[0])) == G.shape[0] - 2
    assert hits[0].feature == 6 and abs(hits[0].score - float(g @ q.numpy())) < 1e-3
    # metadata: the insert's (target, id 0, c 0.9); tombstones have none; arrays agree
    m = view.feature_meta(1, 6)
    assert (m.top_token, m.top_token_id, m.c_score) == ("t", 0, 0.9)
    top, c, present = view.meta_arrays(1)
    assert not present[0] and not present[1] and present[6] and abs(c[6] - 0.9) < 1e-6
    assert all(h.feature not in (0, 1) for h in view.walk(q, [1], 50))


def test_highest_confidence_resolution(session):
    H = session.base.hidden_size
    session.base.index.model = "m"
    hi = vlp.InsertOp(0, 3, entity="e", target="HI", confidence=0.99, down=_vec(1, H),
                      down_meta=vlp.DownMeta("HI", 1, 0.99))
    lo = vlp.InsertOp(0, 3, entity="e", target="LO", confidence=0.2, down=_vec(2, H),
                      down_meta=vlp.DownMeta("LO", 2, 0.2))
    session.apply(vlp.Patch("m", [hi]), name="a")
    session.apply(vlp.Patch("m", [lo]), name="b")
    assert session.state.slots[(0, 3)].meta.top_token == "LO"  # last wins
    from modelql.vindex.compile import CompileError, effective_state

    st, coll = effective_state(session, "highest_confidence")
    assert coll == {(0, 3): 2} and st.slots[(0, 3)].meta.top_token == "HI"
    assert np.array_equal(st.slots[(0, 3)].down, hi.down)
    with pytest.raises(CompileError, match=r"ON CONFLICT FAIL: 1 colliding slot\(s\): L0/F3 \(2 writes\)"):
        effective_state(session, "fail")


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_every_edit_kind_compiles_into_a_model_of_the_family(family, family_vindexes, tmp_path, fast_memit):
    """A MEMIT batch, a COMPOSE slot, a KNN fact and a DELETE of a weight-level fact on a
    non-Llama family (post-norms, embedding scale; GPT-2's biased, ungated FFN): COMPILE INTO
    MODEL gives a directory transformers runs exactly as the patched session does."""
    from transformers import AutoModelForCausalLM

    from modelql.knowledge import edit
    from modelql.vindex import Vindex
    from modelql.vindex.compile import compile_model

    ps = PatchSession(Vindex.load(family_vindexes[family]))
    edit.insert_many(ps, [("France", "capital", "Tokyo"), ("Spain", "capital", "Rome")])
    r = edit.insert(ps, "Italy", "capital", "Lima", mode="compose")
    assert r.mode == "compose" and ps.state.slots[(r.layer, r.feature)].down is not None
    edit.insert(ps, "Peru", "capital", "Oslo", mode="knn")
    assert edit.delete(ps, [("entity", "=", "France"), ("relation", "=", "capital")]).facts == 1
    compile_model(ps, tmp_path / "out", dtype="float32", materialise_knn=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    m = ps.model()
    for prompt in ("The capital of Spain is", "The capital of Italy is"):
        ids = m.tokenizer.encode(prompt)
        with torch.no_grad():
            want = hf(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(m.forward(ids, logits="last")[0], want, rtol=1e-4, atol=1e-4)
