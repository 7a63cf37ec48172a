"""The reused KV state of a probe's entity-independent head (`knowledge.prefix_cache`): a query that
forks it and runs only its own tail reads what running the whole prompt reads, DESCRIBE claims the
same, and an overlay edit (a new weights version) is never served a stale head."""

from __future__ import annotations

import random

import pytest
import torch

from modelql import defaults as D
from modelql.knowledge import describe
from modelql.knowledge import prefix_cache as P
from modelql.knowledge.calibrate import FAMILIARITY_CONTEXT, two_shot
from modelql.knowledge.queries import model_for, residual_query

TWO_SHOT = two_shot("The capital of {X} is", [("Spain", "Madrid"), ("Peru", "Lima")])
CONTEXTS = ["{X}", FAMILIARITY_CONTEXT, "The capital of {X} is", TWO_SHOT, "{X} is a country in"]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to float32 rounding (relative to the tensor's scale: residuals reach hundreds)."""
    return float((a.double() - b.double()).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("entity", ["France", "Burkina Faso", "asdfgh"])
def test_a_forked_head_reads_what_the_whole_prompt_reads(vx, entity):
    got = residual_query(vx, entity, contexts=CONTEXTS, with_logits=True, token_logprobs=[1, 3])
    ref = residual_query(vx, entity, contexts=CONTEXTS, with_logits=True, token_logprobs=[1, 3], use_prefix=False)
    assert got.ids == ref.ids
    assert all(_close(got.per_context[L], ref.per_context[L]) for L in ref.per_context)
    assert all(_close(got.per_context_act[L], ref.per_context_act[L]) for L in ref.per_context_act)
    assert _close(got.logits, ref.logits) and _close(got.final, ref.final)
    assert got.logits.argmax(-1).tolist() == ref.logits.argmax(-1).tolist()
    for c, lps in ref.token_logprobs.items():
        assert _close(torch.tensor(got.token_logprobs[c]), torch.tensor(lps))
    # the caches continue the prompts alike (the relation decode grows its answers from them)
    m = model_for(vx)
    nxt = ref.logits.argmax(-1)[:, None]
    for c_got, c_ref, t in zip(got.caches, ref.caches, nxt):
        assert c_got.length == c_ref.length
        assert _close(m.forward(t[None], c_got, logits="last"), m.forward(t[None], c_ref, logits="last"))


def test_the_head_is_run_once_per_model(vx):
    m = model_for(vx)
    a = P.prefix_state(m, m.tokenizer, TWO_SHOT.split("{X}")[0])
    b = P.prefix_state(m, m.tokenizer, TWO_SHOT.split("{X}")[0])
    assert a is b and len(a.ids) > 10 and a.cache.length == len(a.ids) and a.hidden.shape[0] == len(a.ids)
    fork = a.fork(5, 3)
    assert fork.length == 5 and torch.equal(fork.k[0][:, :5], a.cache.k[0][:, :5])
    assert P.shared(a.ids, list(a.ids) + [7]) == len(a.ids)
    assert P.shared(a.ids, list(a.ids)) == len(a.ids) - 1  # the last token is always run
    assert P.shared(a.ids, [a.ids[0] + 1]) == 0


def test_describe_claims_the_same_without_the_reused_heads(vx, monkeypatch):
    ents = sorted(random.Random(5).sample(D.entities(), 6)) + ["asdfgh"]
    got = {e: [(x.relation, x.target, x.confident) for x in describe(vx, e).edges if x.decoded] for e in ents}
    monkeypatch.setattr("modelql.knowledge.queries.prefix_state", lambda *a, **k: None)
    from modelql.knowledge.describe import _result_cache

    _result_cache(vx).clear()
    ref = {e: [(x.relation, x.target, x.confident) for x in describe(vx, e).edges if x.decoded] for e in ents}
    assert got == ref


def test_an_overlay_edit_is_a_new_weights_version(vx):
    from modelql.knowledge import edit
    from modelql.vindex.overlay import PatchSession

    ps = PatchSession(vx, model_for(vx))
    m = ps.model()
    before = P.weights_version(m)
    assert P.weights_version(m) == before and before != P.weights_version(model_for(vx))
    edit.insert(ps, "Kenya", "capital", "Lima", mode="compose")
    assert P.weights_version(m) != before


def test_describe_claims_the_same_without_drafts(vx, monkeypatch):
    """The phrases drafted from the relation's objects (`decode.draft_index`, `guess_draft`) are the step-by-step
    ones: DESCRIBE claims the same without them."""
    from modelql.knowledge.describe import _result_cache

    ents = sorted(random.Random(6).sample(D.entities(), 8))
    _result_cache(vx).clear()
    got = {e: [(x.relation, x.target, x.confident) for x in describe(vx, e).edges if x.decoded] for e in ents}
    monkeypatch.setattr("modelql.knowledge.decode.draft_index", lambda *a, **k: {})
    monkeypatch.setattr("modelql.knowledge.decode.guess_draft", lambda *a, **k: ())
    _result_cache(vx).clear()
    ref = {e: [(x.relation, x.target, x.confident) for x in describe(vx, e).edges if x.decoded] for e in ents}
    assert got == ref
