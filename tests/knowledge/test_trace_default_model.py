"""TRACE on the embedded default model (issue 5): " Paris" reaches rank 1 for "The capital of France
is", the trace says which layers' attention and FFN raised it, and a saved trace reloads identical."""

from __future__ import annotations

import pytest

from modelql.knowledge.trace import Trace, trace
from modelql.runtime import load_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def france(model_dir):
    model = load_model(model_dir)
    return model, trace(model, PROMPT, for_token="Paris")


def test_paris_reaches_rank_1(france):
    model, t = france
    layer = t.first_rank1_layer()
    assert layer is not None, [(r.layer, r.answer_rank) for r in t.rows]
    last = [r for r in t.rows if r.position == len(t.tokens) - 1]
    assert last[-1].answer_rank == 1  # and the model's prediction is Paris
    assert model.tokenizer.decode([int(model.forward(model.tokenizer.encode(PROMPT))[0, -1].argmax())]) == " Paris"


def test_trace_shows_which_layers_raised_the_answer(france):
    """Every layer row carries the answer's logit-lens value of its attention and FFN outputs and
    a verdict; at least one layer's attention or FFN is marked as raising " Paris"."""
    _, t = france
    last = [r for r in t.rows if r.position == len(t.tokens) - 1 and r.layer >= 0]
    assert len(last) == t.num_layers
    assert all(r.attn_logit is not None and r.ffn_logit is not None and r.who for r in last), last
    assert any("↑" in r.who for r in last), [(r.layer, r.who, r.attn_logit, r.ffn_logit) for r in last]


def test_saved_trace_reloads_identical(france, tmp_path):
    _, t = france
    assert Trace.load(t.save(tmp_path / "paris.json")) == t
