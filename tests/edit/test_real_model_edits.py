"""Weight-level edits of the real pretrained model (SmolLM2-135M-Instruct): the measured edit site,
a small counterfactual batch, locality on facts the model knows (measured first), and the fluency
guard. One module-scoped batch keeps this to one solve; the full figures are bench/edit.py --model."""

from __future__ import annotations

import pytest

from modelql.knowledge import memit as M
from modelql.knowledge.generic_text import greedy

COUNTRIES = (("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Italy", "Rome"),
             ("Spain", "Madrid"), ("Russia", "Moscow"))


def _first(model, prompts):
    return [t[0] for t in greedy(model, prompts, 1)]


def _tid(model, text):
    return model.tokenizer.encode(" " + text, add_special_tokens=False)[0]


@pytest.fixture(scope="module")
def edited(real_model, tmp_path_factory):
    import os

    old = os.environ.get("MODELQL_CACHE")
    os.environ["MODELQL_CACHE"] = str(tmp_path_factory.mktemp("memit-real"))
    try:
        m = real_model
        known = [(c, t) for (c, t), g in zip(COUNTRIES, _first(m, [f"The capital of {c} is" for c, _ in COUNTRIES]))
                 if g == _tid(m, t)]
        assert len(known) >= 4, "the real model should know these capitals"
        edits = [(known[0][0], known[1][1]), (known[1][0], known[0][1])]
        reqs = [M.EditRequest(e, "capital", t) for e, t in edits]
        # the guard is checked on its own below (today's solver changes some of its prompts'
        # continuations: bench/edit.py --model has the figures)
        deltas = M.memit_edit(m, reqs, params=M.MemitParams(fluency_bound=1.0))
        yield m, known, edits, deltas
    finally:
        for k in ("_memit_state", "_memit_gcov"):
            real_model.__dict__.pop(k, None)
        if old is None:
            os.environ.pop("MODELQL_CACHE", None)
        else:
            os.environ["MODELQL_CACHE"] = old


def test_edit_site_is_measured_mid_layers_at_the_subject(edited):
    m, _, _, deltas = edited
    site = m.__dict__["_memit_state"]["site"]
    assert site.key == "subject"
    assert 0 < min(site.layers) and max(site.layers) < m.spec.num_layers - 1
    assert sorted(d.layer for d in deltas) == list(site.layers)


def test_batch_states_the_new_capitals_and_leaves_the_others(edited):
    m, known, edits, deltas = edited
    saved = m.ffn
    m.ffn = M.DeltaFfn(saved, deltas)
    try:
        got = _first(m, [f"The capital of {e} is" for e, _ in edits])
        assert got == [_tid(m, t) for _, t in edits]
        chat = _first(m, [f"Q: What is the capital of {e}?\nA: The capital is" for e, _ in edits])
        assert chat == [_tid(m, t) for _, t in edits]  # a phrasing the solve never saw
        others = known[2:]
        assert _first(m, [f"The capital of {c} is" for c, _ in others]) == [_tid(m, t) for _, t in others]
    finally:
        m.ffn = saved


def test_fluency_guard_reports_a_batch_that_breaks_generic_text(edited):
    m, _, _, deltas = edited
    saved = m.ffn
    assert M.fluency_guard(m, deltas, 1.0) is deltas
    loud = [M.DownDelta(d.layer, d.u * 200, d.v, d.facts) for d in deltas]
    with pytest.raises(M.FluencyGuardError, match="generic prompts"):
        M.fluency_guard(m, loud, 0.0)
    assert m.ffn is saved  # reported, not applied
