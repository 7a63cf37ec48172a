"""The relation decode's logit attribution on every supported family (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from modelql.knowledge.decode import _group, attribute, token_direction
from tests.tiny_models import FAMILIES, make_tiny


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    from modelql.runtime.model import Model

    d = tmp_path_factory.mktemp(request.param)
    make_tiny(request.param, d)
    return Model.load(d)


def _run(m, ids):
    n = m.spec.num_layers
    names = (["blocks.0.hook_resid_pre"] + [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_attn_out", "hook_mlp_out")]
             + [f"blocks.{i}.mlp.hook_post" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"])
    cache = {}

    def grab(t, name):
        cache[name] = t[0, -1].double().clone()

    m.forward(torch.tensor([ids]), hooks={k: grab for k in names}, logits="none")
    return cache


def test_token_direction_splits_the_logit_exactly(tiny):
    """Σ over embedding, attention and FFN writes of `v_t · c` = logit_t − mean logit (before any
    soft-cap), up to the final norm's bias, which no component writes."""
    m = tiny
    n = m.spec.num_layers
    ids = [3, 17, 42, 99, 5, 8]
    c = _run(m, ids)
    final = c[f"blocks.{n - 1}.hook_resid_post"]
    x = m.norm(final.float()[None], "final_norm")[0].double()
    logits = x @ m.lm_head.double().T / m.spec.logits_scale  # brute force, no soft-cap
    bias = m.weights.get("final_norm.bias")
    W = m.lm_head.double()
    parts = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_attn_out", "hook_mlp_out")]
    for t in (0, 7, 123, int(logits.argmax())):
        v = token_direction(m, final.float(), t).double()
        total = sum(float(v @ c[p]) for p in parts)
        if bias is not None:
            total += float((W[t] - W.mean(0)) @ bias.double()) / m.spec.logits_scale
        assert total == pytest.approx(float(logits[t] - logits.mean()), rel=1e-3, abs=1e-3)


def test_feature_attribution_sums_to_the_ffn_write(tiny):
    """Per-feature contributions of a layer add up to that layer's whole FFN write along `v_t`
    (gated and GPT-2-style FFNs, Gemma's post-FFN norm; the down bias, if any, is no feature's)."""
    m = tiny
    n = m.spec.num_layers
    ids = [3, 17, 42, 99, 5, 8]
    c = _run(m, ids)
    final = c[f"blocks.{n - 1}.hook_resid_post"].float()
    acts = {L: c[f"blocks.{L}.mlp.hook_post"].float()[None] for L in range(n)}
    t = 11
    contrib = attribute(m, acts, final[None], t)
    if not contrib:
        pytest.skip("no dense down projection to attribute")
    v = token_direction(m, final, t).double()
    for L, per in contrib.items():
        write = c[f"blocks.{L}.hook_mlp_out"]
        b = m.weights.get(f"layers.{L}.down.bias")
        if b is not None:
            write = write - b.double()
        assert float(per.double().sum()) == pytest.approx(float(v @ write), rel=1e-3, abs=1e-3)
    layer, feature, best, layers, count, total = _group(contrib)
    flat = torch.cat([contrib[L] for L in sorted(contrib)])
    assert best == pytest.approx(float(flat.max())) and 1 <= count <= flat.numel() and layer in layers
    assert total == pytest.approx(float(flat.sum()), rel=1e-4, abs=1e-4)
    assert float(contrib[layer][feature]) == pytest.approx(best)


def _group_brute(contribs: dict) -> tuple:
    """The group by a full stable sort: the largest contributions (ties → lower index) until they
    reach half the positive total."""
    layers = sorted(contribs)
    flat = torch.cat([contribs[L].double() for L in layers])
    owner = [L for L in layers for _ in range(contribs[L].numel())]
    order = sorted(range(flat.numel()), key=lambda j: (-float(flat[j]), j))
    half = float(flat.clamp_min(0).sum()) / 2
    if float(flat[order[0]]) <= 0:
        return -1, -1, 0.0, (), 0, float(flat.sum())
    acc, n = 0.0, 0
    while n < len(order):
        acc += max(0.0, float(flat[order[n]]))
        n += 1
        if acc >= half:
            break
    first = order[0]
    start = sum(contribs[L].numel() for L in layers if L < owner[first])
    return (owner[first], first - start, float(flat[first]), tuple(sorted({owner[j] for j in order[:n]})), n,
            float(flat.sum()))


def test_claims_group_as_a_full_sort_groups_them():
    """`_group` (a top-k grown until it reaches half the positive total) gives what a full stable sort
    gives: ties at the top, a long flat tail that needs k > 64, nothing positive, one layer or several."""
    g = torch.Generator().manual_seed(0)
    items = [{L: torch.randn(300, generator=g) for L in (2, 5, 7)} for _ in range(2)]
    items[1][5][10] = items[1][5][20] = items[1][7][3] = 50.0  # a three-way tie at the top
    items.append({L: torch.full((300,), 0.01) for L in (2, 5, 7)})  # half needs ~450 features
    items.append({L: -torch.rand(300, generator=g) for L in (2, 5, 7)})  # nothing positive
    items.append({1: torch.randn(40, generator=g)})
    for c in items:
        got, want = _group(c), _group_brute(c)
        assert got[:2] == want[:2] and got[3:5] == want[3:5]
        assert got[2] == pytest.approx(want[2]) and got[5] == pytest.approx(want[5])
    assert _group({}) == (-1, -1, 0.0, (), 0, 0.0)


def test_attribution_of_many_claims_is_each_claims_own(tiny):
    """`attribute_many` (one pass over the down matrices for every claim of a DESCRIBE) gives each
    (contexts, token) what `attribute` gives it alone."""
    from modelql.knowledge.decode import attribute_many

    m = tiny
    n = m.spec.num_layers
    runs = [_run(m, ids) for ids in ([3, 17, 42, 99], [5, 8, 13], [21, 34, 55, 89, 1])]
    finals = torch.stack([c[f"blocks.{n - 1}.hook_resid_post"].float() for c in runs])
    acts = {L: torch.stack([c[f"blocks.{L}.mlp.hook_post"].float() for c in runs]) for L in range(n)}
    items = [([0], 11), ([1, 2], 7), ([0, 2], 11), ([2], 123)]
    many = attribute_many(m, acts, finals, items)
    for (ctxs, t), got in zip(items, many):
        ix = torch.tensor(ctxs)
        one = attribute(m, {L: a[ix] for L, a in acts.items()}, finals[ix], t)
        assert set(got) == set(one)
        for L in one:
            assert torch.allclose(got[L], one[L], atol=1e-5, rtol=1e-4)


def test_phrases_stop_at_their_limit(tiny):
    """`extend_phrases` grows each phrase greedily, no longer than its row's limit: a capped phrase
    is the uncapped one's prefix."""
    from types import SimpleNamespace

    from modelql.knowledge.decode import extend_phrases

    m = tiny
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " w" + "".join(f"{i}" for i in ids))
    prompts = [[3, 17, 42], [5, 8, 13, 21]]
    first = [int(m.forward(torch.tensor([p]), logits="last")[0].argmax()) for p in prompts]
    free = extend_phrases(m, tok, prompts, first, max_tokens=4)
    capped = extend_phrases(m, tok, prompts, first, max_tokens=4, limits=[2, 1])
    assert capped == [free[0][:2], free[1][:1]]
    assert len(free[0]) > 2 or len(free[1]) > 1  # every token reads as a word: phrases run on uncapped


def test_answer_lengths_are_a_quantile_of_the_objects_plus_an_article():
    from types import SimpleNamespace

    from modelql.knowledge.calibrate import answer_lengths

    tok = SimpleNamespace(encode=lambda text, add_special_tokens=False: text.split())
    pairs = [[f"s{i}", f"x{i}" if i < 19 else "y y y y y"] for i in range(20)]
    assert answer_lengths(tok, {"r": {"pairs": pairs}}) == {"r": 2}  # one long outlier of 20 does not set it
    assert answer_lengths(tok, {"r": {"pairs": [["a", "x x x"]]}}) == {"r": 4}


@pytest.mark.parametrize("draft", ["right", "wrong", "half", "none", "several"])
def test_drafted_phrases_are_the_step_by_step_ones(tiny, draft):
    """A draft continuation checked in one pass keeps only the model's own greedy tokens: right,
    wrong, half-right or no drafts all give the phrases of the step-by-step continuation, and so do
    several drafts per row (a wrong one, the half-right one and the right one, in any order)."""
    from types import SimpleNamespace

    from modelql.knowledge.decode import extend_phrases

    m = tiny
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " w" + "".join(f"{i}" for i in ids))
    prompts = [[3, 17, 42], [5, 8, 13, 21], [9, 9, 2]]
    first = [int(m.forward(torch.tensor([p]), logits="last")[0].argmax()) for p in prompts]
    ref = extend_phrases(m, tok, prompts, first, max_tokens=4)
    true = [r[1:] for r in ref]
    drafts = {"right": true, "wrong": [[(t + 1) % 50 for t in d] for d in true],
              "half": [d[:1] + [(t + 1) % 50 for t in d[1:]] for d in true], "none": [[] for _ in true],
              "several": [[[(t + 1) % 50 for t in d], d[:1] + [(t + 1) % 50 for t in d[1:]], d][n % 3:]
                          + [[(t + 1) % 50 for t in d], d[:1] + [(t + 1) % 50 for t in d[1:]], d][:n % 3]
                          for n, d in enumerate(true)]}[draft]
    caches = []
    for p in prompts:
        c = m.new_cache()
        m.forward(torch.tensor([p]), c, logits="none")
        caches.append(c)
    got = extend_phrases(m, tok, prompts, first, max_tokens=4, caches=caches, drafts=drafts)
    assert got == ref
    assert all(c.length <= len(p) + len(r) for c, p, r in zip(caches, prompts, ref))  # no unchecked draft kept
