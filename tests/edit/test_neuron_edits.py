"""Neuron edits (weight-level INSERT on subject keys adds gated FFN neurons): the FFN algebra,
the patch format, the overlay, DELETE, and COMPILE INTO MODEL loaded by transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modelql.knowledge.delta_ffn import DeltaFfn, DownDelta
from modelql.vindex import patch as vlp
from modelql.vindex.compile import compile_model, compile_vindex

PROMPTS = ["The capital of France is", "Hello world", "The capital of Japan is Tokyo"]


def _neurons(H: int, r: int, seed: int, scale: float = 0.5):
    g = np.random.default_rng(seed)
    return tuple((g.standard_normal(shape) * scale).astype(np.float32) for shape in ((H, r), (r, H), (r, H)))


def _op(layer: int, H: int, r: int = 3, seed: int = 0, edit_id: str = "n1") -> vlp.DownDeltaOp:
    u, gate, up = _neurons(H, r, seed)
    return vlp.DownDeltaOp(layer, u, None, ("France",) * r, ("capital",) * r, ("Lima",) * r, edit_id=edit_id,
                           method="memit-neurons", gate=gate, up=up)


def _logits(model, prompt):
    return model.forward(model.tokenizer.encode(prompt), logits="last")[0]


def test_a_neuron_delta_adds_act_gate_times_up_through_its_down_columns(base_model):
    H = base_model.spec.hidden_size
    u, gate, up = (torch.from_numpy(a) for a in _neurons(H, 4, 1))
    d = DownDelta(1, u, None, gate=gate, up=up)
    x = torch.randn(2, 5, H)
    want = base_model.ffn.forward(1, x) + (F.silu(x @ gate.T) * (x @ up.T)) @ u.T
    got = DeltaFfn(base_model.ffn, [d]).forward(1, x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(DeltaFfn(base_model.ffn, [d]).forward(0, x), base_model.ffn.forward(0, x))
    with pytest.raises(ValueError, match="no dense down_proj form"):
        d.dense()


def test_patch_round_trip_of_a_neuron_edit(session):
    op = _op(1, session.base.hidden_size)
    d = vlp.op_to_json(op)
    assert "v_b64" not in d and {"gate_b64", "up_b64", "u_b64"} <= set(d) and d["rank"] == 3
    for shape in (vlp.PatchShape.of(session.base), None):
        back = vlp.op_from_json(json.loads(json.dumps(d)), 1, shape)
        assert back.v is None and np.array_equal(back.u, op.u)
        assert np.array_equal(back.gate, op.gate) and np.array_equal(back.up, op.up)
    with pytest.raises(vlp.PatchError, match="either 'v_b64' or 'gate_b64'"):
        vlp.op_from_json({**d, "v_b64": d["u_b64"]}, 1, None)
    with pytest.raises(vlp.PatchError, match="invalid vector in operation #2"):
        vlp.op_from_json({**d, "gate_b64": vlp.encode_vector(op.gate[:2])}, 2, vlp.PatchShape.of(session.base))


def test_overlay_applies_neurons_and_delete_restores_bit_identical(session, base_model):
    H = session.base.hidden_size
    before = {p: _logits(session.model(), p) for p in PROMPTS}
    op = _op(1, H)
    session.record([op])
    ref = DeltaFfn(base_model.ffn, [DownDelta(1, torch.from_numpy(op.u), None, gate=torch.from_numpy(op.gate),
                                              up=torch.from_numpy(op.up))])
    saved = base_model.ffn
    base_model.ffn = ref
    try:
        want = {p: _logits(base_model, p) for p in PROMPTS}
    finally:
        base_model.ffn = saved
    for p in PROMPTS:
        got = _logits(session.model(), p)
        assert torch.allclose(got, want[p], atol=1e-5)
        assert not torch.allclose(got, before[p], atol=1e-3)
    session.record([vlp.DeleteEditOp("n1")])
    for p in PROMPTS:
        assert torch.equal(_logits(session.model(), p), before[p])


def test_compile_model_grows_the_ffn_and_transformers_agrees(session, tmp_path):
    import transformers

    from modelql.runtime import load_model

    H, F_ = session.base.hidden_size, session.base.num_features(0)
    session.record([_op(1, H, r=3, seed=2), _op(1, H, r=2, seed=3, edit_id="n2"), _op(0, H, r=1, seed=4, edit_id="n3")])
    r = compile_model(session, tmp_path / "m", dtype="float32", materialise_knn=False)
    assert r.deltas_baked == 3
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["intermediate_size"] == F_ + 5  # the most any layer adds; the others' new rows are zero
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    mine = load_model(tmp_path / "m")
    for p in PROMPTS:
        ids = session.model().tokenizer.encode(p)
        with torch.no_grad():
            h = hf(input_ids=torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(h, _logits(session.model(), p), atol=1e-4)
        assert torch.allclose(_logits(mine, p), _logits(session.model(), p), atol=1e-4)
    g = compile_model(session, tmp_path / "m.gguf", format="gguf", materialise_knn=False)
    assert g.deltas_baked == 3
    gm = load_model(tmp_path / "m.gguf")
    for p in PROMPTS:
        assert torch.allclose(_logits(gm, p), _logits(session.model(), p), atol=1e-4)


def test_compile_vindex_re_extracts_with_the_neurons(session, vindex_dir, tmp_path):
    """The FFN grows, so the vindex is extracted again from the compiled weights: same answers,
    the base's features keep their indices (gate rows equal) and its labels are carried over."""
    from modelql.vindex import Vindex
    from modelql.vindex.overlay import PatchSession

    from tests.edit.conftest import file_digests

    before = file_digests(vindex_dir)
    session.record([_op(1, session.base.hidden_size)])
    r = compile_vindex(session, tmp_path / "out.vindex")
    assert file_digests(vindex_dir) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.vindex"] and r.deltas_baked == 1
    vx = Vindex.load(tmp_path / "out.vindex")
    assert vx.verify().ok
    F_ = session.base.num_features(1)
    assert vx.num_features(1) == F_ + 3 and vx.num_features(0) == session.base.num_features(0) + 3
    assert torch.allclose(vx.gate_row(1, 5), session.base.gate_row(1, 5))
    assert (tmp_path / "out.vindex" / "feature_labels.json").read_text() == (vindex_dir / "feature_labels.json").read_text()
    fresh = PatchSession(vx)
    for p in PROMPTS:
        assert torch.allclose(_logits(fresh.model(), p), _logits(session.model(), p), atol=1e-4)


def test_moe_neurons_ride_every_routed_expert_and_transformers_agrees(tmp_path):
    """A mixture of experts carries a neuron edit in every routed expert (not the shared one), so
    the layer adds the neurons' output times the chosen experts' summed weight: Qwen2-MoE does not
    renormalise its top-k weights and has a shared expert, the case where that sum is not 1. The
    overlay's fast and hooked paths, the edit solver's `DeltaFfn`, and transformers loading the
    compiled checkpoint (every expert grown, padded to 8 zero neurons) all agree."""
    import transformers

    from modelql.runtime import load_model
    from modelql.vindex import Vindex, extract
    from modelql.vindex.overlay import PatchSession
    from tests.gguf.helpers import make_tiny_with_tokenizer

    make_tiny_with_tokenizer("qwen2", tmp_path / "src", family="qwen2_moe")  # a BPE vocabulary: GGUF can hold it
    extract(tmp_path / "src", tmp_path / "v.vindex", level="inference", dtype="f32", clusters=False)
    base = load_model(tmp_path / "v.vindex")
    ps = PatchSession(Vindex.load(tmp_path / "v.vindex"), model=base)
    H = base.spec.hidden_size
    u, gate, up = _neurons(H, 3, 7, scale=1.0)
    ps.record([vlp.DownDeltaOp(1, u, None, ("x",) * 3, ("r",) * 3, ("y",) * 3, edit_id="m1", method="memit-neurons",
                               gate=gate, up=up)])
    ids = torch.tensor([[5, 17, 42, 7, 99, 3], [8, 8, 120, 64, 1, 30]])
    before = base.forward(ids, logits="all")
    got = ps.model().forward(ids, logits="all")
    assert not torch.allclose(got, before, atol=1e-3)
    hooked = ps.model().forward(ids, logits="all", hooks={"blocks.1.mlp.hook_post": lambda t, _n: t})
    assert torch.allclose(hooked, got, atol=1e-5)
    saved = base.ffn
    base.ffn = DeltaFfn(saved, [DownDelta(1, torch.from_numpy(u), None, gate=torch.from_numpy(gate),
                                          up=torch.from_numpy(up))])
    try:
        assert torch.allclose(base.forward(ids, logits="all"), got, atol=1e-5)
    finally:
        base.ffn = saved
    r = compile_model(ps, tmp_path / "m", dtype="float32", materialise_knn=False)
    assert r.deltas_baked == 1
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["moe_intermediate_size"] == 32 + 8 and cfg["shared_expert_intermediate_size"] == 48
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, got, atol=1e-4)
    compile_model(ps, tmp_path / "m.gguf", format="gguf", materialise_knn=False)  # experts stacked, grown alike
    assert torch.allclose(load_model(tmp_path / "m.gguf").forward(ids, logits="all"), got, atol=1e-4)
