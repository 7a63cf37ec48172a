"""INSERT (KNN, COMPOSE, MEMIT), DELETE, UPDATE, MERGE into the overlay (algorithms §10–§11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelql.errors import CapabilityError
from modelql.knowledge import edit, edit_compose
from modelql.knowledge.infer import infer
from modelql.vindex import patch as vlp

PROMPT = "The capital of France is"


def test_canonical_prompt_and_layer(session):
    assert edit.canonical_prompt("capital", "France") == PROMPT
    assert edit.canonical_prompt("located_in", "Rome") == "The located in of Rome is"
    assert edit.install_layer(session.view, None) == max(session.base.bands.knowledge[1] - 1, 0)
    assert edit.install_layer(session.view, 99) == session.base.num_layers - 1
    assert edit.resolve_mode(None) == edit.DEFAULT_MODE
    with pytest.raises(edit.EditError, match="unknown insert mode"):
        edit.resolve_mode("magic")


def test_knn_insert_overrides_infer_on_the_prompt(session):
    r = edit.insert(session, "France", "capital", "Tokyo", mode="knn")
    assert r.mode == "knn" and r.key_source == "residual" and r.auto_patch and r.knn_total == 1
    assert r.target_id == session.base.tokenizer.encode(" Tokyo", add_special_tokens=False)[0]
    [op] = session.recording.ops
    assert isinstance(op, vlp.InsertKnnOp) and op.layer == r.layer and op.confidence == 1.0
    # the key is the FFN input x_l of the canonical prompt (overlay-aware, before the insert)
    from modelql.runtime import interp

    _, cache = interp.run_with_cache(session.model(), PROMPT, [f"blocks.{r.layer}.ln2.hook_normalized"])
    x = cache[f"blocks.{r.layer}.ln2.hook_normalized"][-1]
    assert np.allclose(op.key, x.numpy(), atol=1e-5)
    res = infer(session.model(), PROMPT, top=3, knn=session.knn_entries())
    assert res.override is not None and res.predictions[0].token_id == r.target_id
    assert res.override.cosine > 0.99
    # keyed on the entity: another country's prompt of the same relation does not fire it
    other = infer(session.model(), PROMPT.replace("France", "Germany"), top=3, knn=session.knn_entries())
    assert other.override is None


def test_knn_insert_without_weights_uses_the_entity_embedding(browse_dir):
    from modelql.vindex import Vindex
    from modelql.vindex.overlay import PatchSession

    ps = PatchSession(Vindex.load(browse_dir))
    r = edit.insert(ps, "France", "capital", "Tokyo", mode="knn")
    assert r.key_source == "embedding" and len(ps.knn_entries()) == 1


def test_weight_level_insert_on_browse_only_vindex_is_refused(browse_dir):
    from modelql.vindex import Vindex
    from modelql.vindex.overlay import PatchSession

    ps = PatchSession(Vindex.load(browse_dir))
    with pytest.raises(CapabilityError, match="browse-only"):
        edit.insert(ps, "France", "capital", "Tokyo", mode="memit")
    assert ps.recording is None and ps.state.empty


def test_compose_insert_installs_a_balanced_slot(session):
    base_logits = session.model().forward(session.base.tokenizer.encode(PROMPT), logits="last").clone()
    r = edit.insert(session, "France", "capital", "Tokyo", mode="compose")
    assert r.mode == "compose" and r.feature is not None and r.alpha == edit.COMPOSE_DEFAULT_ALPHA
    ops = session.recording.ops
    assert len(ops) == 1 and isinstance(ops[0], vlp.InsertOp)  # balancing folded into one op
    op = ops[0]
    assert op.layer == r.layer and op.feature == r.feature
    assert op.gate is not None and op.up is not None and op.down is not None
    assert op.down_meta == vlp.DownMeta("Tokyo", r.target_id, 0.9)
    # the key reads ≈ +1 on the fact's phrasings and ≈ -1 elsewhere; the gate is it times GATE_ON
    assert np.allclose(op.gate, edit.GATE_ON * op.up)
    x = edit_compose._residuals(session.model(), [PROMPT, "Once upon a time", "The capital of Spain is"], r.layer).numpy()
    read = x @ op.up
    assert read[0] > 0.5 and read[1] < -0.5 and read[2] < 0, read
    meta = session.view.feature_meta(r.layer, r.feature)
    assert meta.top_token == "Tokyo"
    p = edit.target_probability(session.model(), PROMPT, "Tokyo")
    assert abs(p - r.probability) < 1e-9
    logits = session.model().forward(session.base.tokenizer.encode(PROMPT), logits="last")
    assert not torch.equal(logits, base_logits)
    # a second install takes another slot and re-shapes the first (update op for it)
    r2 = edit.insert(session, "Spain", "capital", "Rome", mode="compose")
    assert r2.feature != r.feature
    assert any(isinstance(o, vlp.UpdateOp) and o.feature == r.feature and o.gate is not None
               for o in session.recording.ops)


def test_memit_insert_records_down_deltas(session, fast_memit):
    ids = session.base.tokenizer.encode(PROMPT)
    before = session.model().forward(ids, logits="last").clone()
    rs = edit.insert_many(session, [("France", "capital", "Tokyo"), ("Spain", "capital", "Rome")], mode="memit",
                          key="last")  # the last-token solver (the tiny model's trace may pick either)
    assert [r.mode for r in rs] == ["memit", "memit"] and rs[0].auto_patch and not rs[1].auto_patch
    ops = session.recording.ops
    assert ops and all(isinstance(o, vlp.DownDeltaOp) for o in ops)
    from modelql.knowledge.memit import relation_templates

    # one key per (fact, target token, phrasing): the relation's training phrasings × both
    # targets' tokens, once per round a fact took (the tiny random model needs more than one)
    from modelql.knowledge.memit import MemitParams

    k = len(relation_templates("capital"))
    tokens = sum(len(session.base.tokenizer.encode(" " + t, add_special_tokens=False)) for t in ("Tokyo", "Rome"))
    assert {o.edit_id for o in ops} == {ops[0].edit_id} and ops[0].rank % k == 0
    assert k * tokens <= ops[0].rank <= k * tokens * MemitParams().resolved("last").rounds
    assert ops[0].entity == ("France", "Spain") and ops[0].target == ("Tokyo", "Rome")
    assert session.recording.counts.inserts == 2
    after = session.model().forward(ids, logits="last")
    tid = rs[0].target_id
    assert after[0, tid] > before[0, tid]  # the edit pushes the new target
    # the overlay computes exactly W + U Vᵀ
    from modelql.runtime import load_model

    ref = load_model(session.base.path)
    with torch.no_grad():
        for o in ops:
            ref.weights[f"layers.{o.layer}.down.weight"] += torch.from_numpy(o.u @ o.v.T)
    assert torch.allclose(ref.forward(ids, logits="last"), after, atol=1e-4)


def test_delete_and_update_with_where_filters(session):
    vx = session.view
    L = vx.layers()[0]
    meta = vx.feature_meta(L, 3)
    assert meta is not None
    r = edit.delete(session, [("layer", "=", L), ("feature", "=", 3)])
    assert r.features == 1 and r.slots == ((L, 3),) and r.auto_patch
    assert vx.feature_meta(L, 3) is None
    # layer AND feature target the slot itself (spec §11); out-of-range slots match nothing
    assert edit.delete(session, [("layer", "=", L), ("feature", "=", 10**6)]).features == 0
    assert edit.delete(session, [("layer", "=", 99), ("feature", "=", 0)]).features == 0
    # entity = substring of the top token, restricted by layer
    tok = vx.feature_meta(L, 5).top_token
    want = [(L, f) for f in range(vx.num_features(L))
            if vx.feature_meta(L, f) is not None and tok.lower() in vx.feature_meta(L, f).top_token.lower()]
    r = edit.update(session, [("entity", "=", tok), ("layer", "=", L)], {"target": "Paris", "confidence": 0.5})
    assert list(r.slots) == want
    m = vx.feature_meta(L, 5)
    assert (m.top_token, m.c_score) == ("Paris", 0.5)
    assert m.top_token_id == session.base.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    with pytest.raises(edit.EditError, match="relation filters require relation labels"):
        edit.delete(session, [("relation", "=", "capital")])
    with pytest.raises(edit.EditError, match="unknown field"):
        edit.delete(session, [("colour", "=", "red")])
    with pytest.raises(edit.EditError, match="cannot SET"):
        edit.update(session, [("layer", "=", L)], {"layer": 3})


def test_delete_entity_also_drops_its_knn_facts_and_update_retargets_them(session):
    edit.insert(session, "France", "capital", "Tokyo", mode="knn")
    r = edit.update(session, [("entity", "=", "France")], {"target": "Lyon"})
    assert r.knn == 1 and [e.target_token for e in session.knn_entries()] == ["Lyon"]
    r = edit.delete(session, [("entity", "=", "France")])
    assert r.knn == 1 and session.knn_entries() == []


def test_delete_and_update_reach_weight_level_facts(session, fast_memit):
    """A MEMIT fact is addressed by entity / relation / target: DELETE drops its edit and
    re-solves the batch's other facts; deleting a one-fact edit restores bit-identical logits."""
    ids = session.base.tokenizer.encode(PROMPT)
    base = session.model().forward(ids, logits="last").clone()
    edit.insert_many(session, [("France", "capital", "Tokyo"), ("Spain", "capital", "Rome")])
    first = session.recording.ops[0].edit_id
    m = edit.match(session, [("entity", "=", "france"), ("relation", "=", "capital")])
    assert [(e.edit_id, e.matched) for e in m.edits] == [(first, (0,))]
    assert not edit.match(session, [("entity", "=", "France"), ("feature", "=", 1)]).edits  # facts have no slot
    assert not edit.match(session, [("layer", "=", m.edits[0].layers[0])]).edits  # slots only
    assert edit.match(session, [("target", "LIKE", "rom%")]).edits[0].matched == (1,)

    r = edit.delete(session, [("entity", "=", "France"), ("relation", "=", "capital")])
    assert r.facts == 1
    ops = session.recording.ops
    assert [o.op for o in ops] == ["down_delta", "delete_edit", "down_delta"] and ops[1].edit_id == first
    left = {o.edit_id: o for d in session.state.deltas.values() for o in [x.op for x in d]}
    assert first not in left and [o.facts() for o in left.values()][0] == [("Spain", "capital", "Rome")]

    r = edit.update(session, [("entity", "=", "Spain")], {"target": "Paris"})
    assert r.facts == 1
    facts = [x.op.facts() for d in session.state.deltas.values() for x in d]
    assert facts and all(f == [("Spain", "capital", "Paris")] for f in facts)
    assert edit.delete(session, [("entity", "=", "Spain"), ("relation", "=", "capital")]).facts == 1
    assert not any(session.state.deltas.values())
    assert torch.equal(session.model().forward(ids, logits="last"), base)


def test_merge_copies_metadata(session, vindex_dir, tmp_path):
    from modelql.vindex import Vindex
    from modelql.vindex.compile import compile_vindex

    # a source that differs in one slot
    other = edit.update(session, [("layer", "=", 0), ("feature", "=", 1)], {"target": "Paris", "confidence": 9.0})
    assert other.features == 1
    src = tmp_path / "src.vindex"
    compile_vindex(session, src)
    from modelql.vindex.overlay import PatchSession

    fresh = PatchSession(Vindex.load(vindex_dir), model=session._base_model)
    r = edit.merge(fresh, src)
    assert (r.merged, r.skipped, r.strategy) == (1, 0, "KEEP_SOURCE")
    got = fresh.view.feature_meta(0, 1)  # down_meta.bin stores ids: the text is the id's decoding
    assert (got.top_token_id, got.c_score) == (edit.target_id(session.view, "Paris"), 9.0)
    fresh2 = PatchSession(Vindex.load(vindex_dir), model=session._base_model)
    r = edit.merge(fresh2, src, "keep_target")
    assert (r.merged, r.skipped) == (0, 1)


def test_memit_statistics_are_cached_on_disk(session, fast_memit, monkeypatch):
    """The covariance and preservation statistics are computed once per base model: a freshly
    loaded model reads them from $MODELQL_CACHE/memit instead of recomputing them."""
    import os
    from pathlib import Path

    from modelql.knowledge import memit
    from modelql.runtime import load_model

    warm = session.base_runtime_model()
    for k in [k for k in warm.__dict__ if k.startswith("_memit_")]:  # the base model is shared with other tests
        warm.__dict__.pop(k, None)
    edit.insert(session, "France", "capital", "Tokyo", mode="memit")
    stored = sorted(p.name for p in (Path(os.environ["MODELQL_CACHE"]) / "memit").glob("*.pt"))
    assert any("-cov-" in n for n in stored) and any("-preserve-" in n for n in stored)

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(memit, "_covariance", boom)
    monkeypatch.setattr(memit, "_keys_of", boom)
    fresh = load_model(session.base.path)
    layer = memit.default_layers(fresh)[0]
    assert torch.equal(memit.covariance(fresh, layer, 120), memit.covariance(warm, layer, 120))
    assert torch.equal(memit.preservation_moment(fresh, layer)[0], memit.preservation_moment(warm, layer)[0])
