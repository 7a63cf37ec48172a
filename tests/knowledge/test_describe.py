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
    # decoded claims first, then the per-feature edges, each part by gate
    assert res.edges == tuple(sorted(res.edges, key=lambda e: (not e.decoded, -e.gate)))
    best = res.edges[0]
    assert best.layer in best.layers and best.count >= 1 and best.layer_min <= best.layer <= best.layer_max
    assert res.signal in ("clean", "moderate", "diffuse") and res.max_gate == max(e.gate for e in res.edges)
    assert res.contexts and res.latency_ms > 0


def test_residual_mode_capital_precision_and_recall(vx):
    """The acceptance bar of issue 4: residual mode ≥ 80 % precision and recall for capital.
    (bench/describe.py on the 80-epoch model: 94.9 % / 94.9 % on its 60-country sample, 98.8 % /
    98.4 % on all 244; on the 54-epoch model 89.8 / 89.8 and 92.1 / 90.9 %.)"""
    score = score_describe(lambda e: describe(vx, e), SAMPLE, facts_by_entity(D.facts()), D.RELATIONS)
    cap = score.relations["capital"]
    assert cap.recall >= 0.8, (cap.found, cap.facts)
    assert cap.precision >= 0.8, (cap.correct, cap.claims)
    # the other relations (60-country sample, 80-epoch model: continent 100 / 100, subregion 100 / 100,
    # currency 97 / 98, demonym 97 / 100, language 97 / 79, borders 67 / 55 % precision / recall;
    # 54-epoch model: 100 / 100, 93 / 93, 86 / 86, 95 / 98, 86 / 78, 60 / 60)
    assert score.relations["continent"].recall >= 0.9 and score.relations["continent"].precision >= 0.9
    assert score.relations["demonym"].recall >= 0.8 and score.relations["currency"].recall >= 0.7
    assert score.total.recall >= 0.7 and score.total.precision >= 0.7, score.total


def test_residual_mode_beats_the_reference(vx):
    truth = facts_by_entity(D.facts())
    ref = score_describe(lambda e: describe(vx, e, mode="embedding", threshold=5.0), SAMPLE[:10], truth, D.RELATIONS)
    res = score_describe(lambda e: describe(vx, e, mode="residual"), SAMPLE[:10], truth, D.RELATIONS)
    assert res.total.found > ref.total.found


def test_reference_threshold_finds_nothing_on_small_scores_but_adaptive_does(vx):
    """§15.1: the embedded model's |g·q| never reaches 5.0; z-scores are scale-free."""
    ref = describe(vx, "France", mode="embedding", threshold=5.0)
    assert ref.found and ref.edges == () and ref.unit == "score" and ref.signal == "diffuse"
    ada = describe(vx, "France", mode="embedding", min_z=3.0)  # embedding mode is weak on this model
    assert ada.unit == "z" and len(ada.edges) > 0
    assert all(abs(e.score) < 5.0 for e in ada.edges)
    # a scaled copy of the query gives the same adaptive edges (scale invariance)
    low = describe(vx, "France", mode="embedding", threshold=min(e.score for e in ada.edges), min_z=3.0)
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


def test_claims_are_the_decode_of_their_probe_and_attributed_to_features(vx):
    """A labelled claim of a single-valued probed relation is the model's own answer to the probe
    template — a prefix of its greedy continuation, computed here independently with `generate`
    ("Mexico City", "Sub-Saharan Africa") — and its edge names the feature contributing most to
    the first token's logit."""
    from modelql.knowledge.decode import MULTI_VALUED_MIN, attribute
    from modelql.knowledge.labels import probe_templates, relation_cardinality
    from modelql.knowledge.queries import model_for, residual_query
    from modelql.runtime.generate import generate

    m = model_for(vx)
    tmpl = probe_templates(vx)
    card = relation_cardinality(vx)
    assert "capital" in tmpl
    multi_word = 0
    for ent in ("France", "Mexico", "Mali", "Peru"):
        res = describe(vx, ent)
        claims = [e for e in res.edges if e.decoded]
        assert claims and {e.relation for e in claims} <= set(tmpl)
        # no per-feature edge keeps the label of a decoded relation
        assert all(e.relation not in tmpl for e in res.edges if not e.decoded)
        for e in claims:
            if card.get(e.relation, 1.0) >= MULTI_VALUED_MIN:
                continue
            prompt = tmpl[e.relation][0].replace("{X}", ent)
            out = generate(m, prompt, max_tokens=8, temperature=0.0)
            assert out.token_ids[0] == e.target_id
            assert out.text.strip().startswith(e.target), (out.text, e.target)
            multi_word += " " in e.target or "-" in e.target
            rq = residual_query(vx, ent, contexts=[tmpl[e.relation][0]], with_logits=True)
            contrib = attribute(m, rq.per_context_act, rq.final, e.target_id)
            flat = [(float(v), L, f) for L, c in contrib.items() for f, v in enumerate(c.tolist())]
            assert max(flat)[1:] == (e.layer, e.feature)
    assert multi_word > 0, "some answers are phrases (Western Europe, Mexico City, Sub-Saharan Africa)"


def test_logit_attribution_is_exact(vx):
    """The token direction at the final norm splits the answer's logit (minus the mean logit)
    exactly into what the embedding, every attention and every FFN wrote."""
    import torch

    from modelql.knowledge.decode import token_direction
    from modelql.knowledge.queries import model_for

    m = model_for(vx)
    n = m.spec.num_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.{h}" for i in range(n)
                                           for h in ("hook_attn_out", "hook_mlp_out")]
    cache = {}

    def grab(t, name):
        cache[name] = t[0, -1].double().clone()

    ids = m.tokenizer.encode("The capital of Kenya is", add_special_tokens=True)
    logits = m.forward(torch.tensor([ids]), hooks={k: grab for k in names + [f"blocks.{n - 1}.hook_resid_post"]},
                       logits="last")[0].double()
    for tid in (int(logits.argmax()), 7, 1234):
        v = token_direction(m, cache[f"blocks.{n - 1}.hook_resid_post"], tid).double()
        parts = sum(float(v @ cache[k]) for k in names)
        assert parts == pytest.approx(float(logits[tid] - logits.mean()), rel=1e-4, abs=1e-4)


def test_relation_cardinality_is_recorded(vx):
    from modelql.knowledge.labels import relation_cardinality

    card = relation_cardinality(vx)
    assert card["capital"] == pytest.approx(1.0) and card["borders"] > 2
    res = describe(vx, "Germany")
    assert len([e for e in res.edges if e.relation == "capital"]) <= 1  # single-valued: one claim


def test_phrase_claims_score_as_prefixes():
    from modelql.knowledge.accuracy import matches

    assert matches("saint kitts", forms("Saint Kitts and Nevis"))
    assert matches("mexico city", forms("Mexico City")) and matches("mexico", forms("Mexico City"))
    assert not matches("new", forms("New Zealand Dollar")) and not matches("kitts saint", forms("Saint Kitts"))


def test_server_variant_options(vx):
    res = describe(vx, "France", token_filter="light", probe_only=True)
    assert all(e.source in (None, "probe") for e in res.edges)
    assert any(e.decoded and e.relation == "capital" for e in res.edges)
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
