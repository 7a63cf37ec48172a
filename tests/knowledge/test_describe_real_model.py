"""DESCRIBE on the real pretrained model (SmolLM2-135M-Instruct): a known capital is a confident
claim, a made-up name gets none, and a MEMIT insert shows (its patch as source, the model's own
answer changed) and its deletion removes it."""

from __future__ import annotations

import torch

from modelql.knowledge import describe, edit
from modelql.knowledge.queries import model_for


def _capitals(res):
    return [e for e in res.edges if e.relation == "capital"]


def _top(model, prompt: str) -> str:
    ids = model.tokenizer.encode(prompt)
    return model.tokenizer.decode([int(model.forward(torch.tensor([ids]), logits="last")[0].argmax())]).strip()


def test_known_and_made_up_entities(real_vindex):
    caps = _capitals(describe(real_vindex, "France"))
    assert caps and caps[0].decoded and caps[0].target == "Paris" and caps[0].confident
    res = describe(real_vindex, "Zhoubravia")
    assert not any(e.relation and e.confident for e in res.edges) and res.note


def test_a_memit_insert_shows_in_describe_and_its_deletion_removes_it(real_vindex, fast_memit):
    from modelql.vindex.overlay import PatchSession

    ps = PatchSession(real_vindex, model_for(real_vindex))
    probe = "The capital of France is"
    assert _top(ps.model(), probe) == "Paris"  # measured first: the model knows it
    edit.insert(ps, "France", "capital", "Lima", mode="memit")  # the default fluency guard lets it through
    assert _top(ps.model(), probe) == "Lima"  # a weight edit: the model itself now answers Lima
    res = describe(ps.view, "France")
    caps = _capitals(res)
    assert caps and caps[0].target == "Lima" and caps[0].source == "patch" and "memit" in caps[0].patch
    assert not any(e.target == "Paris" and e.relation == "capital" for e in res.edges)
    edit.delete(ps, [("entity", "=", "France"), ("relation", "=", "capital")])
    res = describe(ps.view, "France")
    assert not any(e.source == "patch" for e in res.edges)
    caps = _capitals(res)
    assert caps and caps[0].decoded and caps[0].target == "Paris"
    assert _top(ps.model(), probe) == "Paris"
