"""WALK, SELECT, SHOW RELATIONS and STATS on the embedded default model's vindex."""

from __future__ import annotations

import json

import pytest

from modelql.errors import ModelqlError
from modelql.knowledge import Condition, SelectError, relations, select, stats, walk
from modelql.knowledge.browse import entities, features
from modelql.knowledge.queries import entity_vector


def test_walk_is_the_last_token_embedding_knn(vx):
    res = walk(vx, "The capital of France is", top=4)
    tid = vx.tokenizer.encode("The capital of France is", add_special_tokens=True)[-1]
    assert res.token_id == tid and res.token == vx.token_text(tid)
    assert res.layers == tuple(vx.layers()) and res.top == 4
    by = res.by_layer()
    q = vx.embedding(tid)
    for L, rows in by.items():
        assert len(rows) <= 4
        brute = vx.gate_scores(L, q)
        for r in rows:
            assert r.gate_score == pytest.approx(float(brute[r.feature]), rel=1e-5, abs=1e-6)
            assert r.target == vx.feature_meta(L, r.feature).top_token
        assert [abs(r.gate_score) for r in rows] == sorted((abs(r.gate_score) for r in rows), reverse=True)
    assert walk(vx, "France", layers=[1, 2, 77]).layers == (1, 2)
    json.dumps(res.to_json())
    with pytest.raises(ModelqlError, match="empty prompt"):
        walk(vx, "   ")


def test_select_features_metadata_scan(vx):
    res = select(vx, "features", [Condition("layer", "=", 2)], limit=5)
    assert res.total == vx.num_features(2) and len(res.rows) == 5
    assert all(r.layer == 2 and r.score_kind == "c_score" and r.score == r.c_score for r in res.rows)
    full = select(vx, "features", [("layer", "=", 2)])
    assert len(full.rows) == vx.num_features(2)  # LIMIT defaults to the whole layer
    one = select(vx, "features", [("feature", "=", 7)])
    assert [r.layer for r in one.rows] == vx.layers() and all(r.feature == 7 for r in one.rows)
    assert len(select(vx, "features").rows) == 34


def test_select_edges_filters_and_order(vx):
    tok = relations(vx).tokens[0].name.lower()  # the most common content top token
    res = select(vx, "edges", [("entity", "=", tok)], order_by="confidence", descending=True)
    assert res.rows and all(tok in r.token.lower() for r in res.rows)
    assert [r.c_score for r in res.rows] == sorted((r.c_score for r in res.rows), reverse=True)
    assert res.total >= len(res.rows)
    asc = select(vx, "edges", [("layer", "<=", 1)], order_by="layer", limit=50)
    assert [r.layer for r in asc.rows] == sorted(r.layer for r in asc.rows) and max(r.layer for r in asc.rows) <= 1
    hi = select(vx, "edges", [("confidence", ">", 1.0)], limit=1000)
    assert all(r.c_score > 1.0 for r in hi.rows)
    like = select(vx, "edges", [("relation", "LIKE", "cap%")], limit=1000)
    assert like.rows and all(r.relation.startswith("cap") for r in like.rows)
    ne = select(vx, "edges", [("relation", "!=", "capital")], limit=1000)
    assert all(r.relation and r.relation != "capital" for r in ne.rows)
    with pytest.raises(SelectError, match="unknown field"):
        select(vx, "edges", [("colour", "=", "red")])
    with pytest.raises(SelectError, match="ORDER BY"):
        select(vx, "edges", order_by="colour")
    with pytest.raises(SelectError, match="unsupported operator"):
        select(vx, "edges", [("layer", "~", 1)])
    with pytest.raises(SelectError, match="unknown SELECT source"):
        select(vx, "tables")


def test_select_edges_entity_and_relation_walks(vx):
    res = select(vx, "edges", [("entity", "=", "France"), ("relation", "=", "capital")], mode="residual")
    assert res.walked and res.mode == "residual"
    assert res.rows and all("capital" in r.relation and r.score_kind == "gate" for r in res.rows)
    assert [r.score for r in res.rows] == sorted((r.score for r in res.rows), reverse=True)
    emb = select(vx, "edges", [("entity", "=", "France"), ("relation", "=", "capital")])
    assert emb.mode == "embedding" and emb.walked


def test_select_nearest(vx):
    res = select(vx, "edges", nearest=("France", 1), limit=7)
    assert len(res.rows) == 7 and all(r.layer == 1 and r.score_kind == "gate" for r in res.rows)
    ref = vx.gate_knn(1, entity_vector(vx, "France"), 7)
    assert [r.feature for r in res.rows] == [h.feature for h in ref]


def test_select_entities(vx):
    res = select(vx, "entities", limit=10)
    assert res.rows and len(res.rows) <= 10
    assert [r.features for r in res.rows] == sorted((r.features for r in res.rows), reverse=True)
    assert all(r.entity[0].isupper() and r.entity.isalpha() and len(r.entity) >= 3 for r in res.rows)
    assert all(r.entity not in ("The", "Which") for r in res.rows)
    one = entities(vx, layer=3, limit=5)
    assert all(r.layers == (3,) for r in one.rows)
    with pytest.raises(SelectError, match="no features at layer"):
        features(vx, 42)
    assert len(features(vx, 0).rows) == len(vx.layers())


def test_relations(vx):
    res = relations(vx)
    assert res.probe_count > 0 and res.probe_relations
    names = {r.name for r in res.probe_relations}
    assert "capital" in names
    assert [r.count for r in res.probe_relations] == sorted((r.count for r in res.probe_relations), reverse=True)
    assert sum(r.count for r in res.probe_relations) == res.probe_count
    assert 0 < len(res.tokens) <= 30 and res.total >= len(res.tokens)
    assert all(r.max_score >= 0.2 for r in res.tokens)
    assert [r.count for r in res.tokens] == sorted((r.count for r in res.tokens), reverse=True)
    assert len(relations(vx, verbose=True).tokens) == min(50, res.total)
    assert relations(vx, layer=2).layer_range == (2, 2)
    json.dumps(res.to_json())


def test_stats(vx, browse_vx):
    s = stats(vx)
    assert s.layers == 4 and s.features == 4 * vx.num_features(0) and s.features_per_layer == vx.num_features(0)
    assert s.has_weights and s.extract_level == "inference" and s.probe_labels > 0 and s.probe_relations >= 5
    assert s.clusters > 0
    assert s.layer_bands["knowledge"] == tuple(vx.bands.knowledge)
    ks = next(b for b in s.band_stats if b.name == "knowledge")
    lo, hi = vx.bands.knowledge
    assert ks.features == sum(vx.num_features(L) for L in range(lo, hi + 1))
    assert s.index_bytes > 0
    b = stats(browse_vx)
    assert not b.has_weights and b.extract_level == "browse" and b.index_bytes < s.index_bytes
    json.dumps(s.to_json())
