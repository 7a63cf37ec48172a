"""Weight-level edits of the real pretrained model (SmolLM2-135M-Instruct): the measured edit site,
a small counterfactual batch, locality on facts the model knows (measured first), and the fluency
guard. One module-scoped batch keeps this to one solve; the full figures are bench/edit.py --model."""

from __future__ import annotations

import dataclasses

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
        deltas = M.memit_edit(m, reqs)  # the default fluency guard is on: it must let the batch through
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
    # the default solver adds one neuron per fact at the top traced layer
    assert [(d.layer, d.neurons, d.u.shape[1]) for d in deltas] == [(max(site.layers), True, 2)]


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


def test_batch_keeps_generic_text(edited):
    """Every guard prompt's greedy continuation is unchanged (the neurons stay off on generic text)."""
    from modelql.knowledge.generic_text import GUARD_PROMPTS

    m, _, _, deltas = edited
    prompts = list(GUARD_PROMPTS) + ["Once upon a time, a young fox", "def fibonacci(n):"]
    before = greedy(m, prompts, 10)
    saved = m.ffn
    m.ffn = M.DeltaFfn(saved, deltas)
    try:
        assert greedy(m, prompts, 10) == before
    finally:
        m.ffn = saved


def test_fluency_guard_reports_a_batch_that_breaks_generic_text(edited):
    m, _, _, deltas = edited
    saved = m.ffn
    assert M.fluency_guard(m, deltas, 1.0) is deltas
    loud = [dataclasses.replace(d, u=d.u * 200, gate=d.gate / 30) for d in deltas]
    with pytest.raises(M.FluencyGuardError, match="generic prompts"):
        M.fluency_guard(m, loud, 0.0)
    assert m.ffn is saved  # reported, not applied


def test_neighbours_are_other_names_of_the_edited_kind(real_model):
    """The preservation set of a capital edit of France and Chile: the model's own nearest names
    are other countries (checked against a list of country names), never an edited entity."""
    from modelql.knowledge.neighbours import neighbour_entities

    names = neighbour_entities(real_model, ["France", "Chile"], 30)
    assert len(names) == 30 and len(set(names)) == 30
    assert not {"France", "Chile"} & set(names)
    countries = {"Germany", "Italy", "Spain", "Portugal", "Belgium", "Switzerland", "Austria", "Netherlands",
                 "Argentina", "Peru", "Bolivia", "Uruguay", "Paraguay", "Colombia", "Ecuador", "Venezuela",
                 "Brazil", "Mexico", "Cuba", "Poland", "Sweden", "Norway", "Denmark", "Finland", "Greece",
                 "Hungary", "Romania", "Bulgaria", "Ireland", "Scotland", "England", "Canada", "Morocco",
                 "Algeria", "Tunisia", "Egypt", "Guatemala", "Honduras", "Nicaragua", "Panama", "Luxembourg"}
    assert len(countries & set(names)) >= 8, names


def test_neighbour_moment_is_a_second_moment_per_layer(real_model):
    """E[k kᵀ] of the neighbours' subject keys: one symmetric positive semi-definite matrix per
    edited layer, nothing when neighbours are off."""
    import torch

    from modelql.knowledge import memit_subject as MS
    from modelql.knowledge.neighbours import neighbour_entities

    m = real_model
    reqs = [M.EditRequest("France", "capital", "Rome")]
    moments = MS.neighbour_moments(m, reqs, [6], (), 20)
    assert set(moments) == {6} and moments[6].shape == (m.spec.intermediate_size,) * 2
    assert torch.allclose(moments[6], moments[6].T) and float(torch.linalg.eigvalsh(moments[6]).min()) > -1e-6
    assert MS.neighbour_moments(m, reqs, [6], (), 0) == {}
    assert neighbour_entities(m, ["France"], 0) == []
