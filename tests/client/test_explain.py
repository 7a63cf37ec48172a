"""Per-token feature attribution (knowledge.explain): the embedded model's " Paris", local and
remote feature sources agree, and `modelql explain` prints the table and --json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

PROMPT = "The capital of France is"


def _paris_step(ex, vindex):
    """The step that emits " Paris"; if a retrained default model words it differently, the
    forced next-token attribution of " Paris" after the prompt (as INFER would score it)."""
    steps = [t for t in ex.tokens if t.token == " Paris"]
    if steps:
        return steps[0]
    from modelql.knowledge.explain import VindexFeatures, attribute
    from modelql.knowledge.queries import model_for

    model = model_for(vindex)
    paris = model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    return attribute(model, model.tokenizer.encode(PROMPT), [paris], VindexFeatures(vindex), top=5)[0]


@pytest.fixture(scope="module")
def local_explanation(kvindex):
    from modelql.knowledge.explain import VindexFeatures, explain
    from modelql.knowledge.queries import model_for

    return explain(model_for(kvindex), PROMPT, VindexFeatures(kvindex), max_tokens=4, top=5)


def test_paris_is_attributed_to_the_features_that_write_it(local_explanation, kvindex):
    """The features named for " Paris" are ranked by contribution, and ablating them lowers its
    probability more than ablating random features of the same layers (seeded, mean of 3 draws)."""
    import random

    import torch

    from modelql.knowledge.queries import model_for
    from modelql.runtime import interp

    step = _paris_step(local_explanation, kvindex)
    assert step.token == " Paris"
    assert len(step.features) == 5
    model = model_for(kvindex)
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])

    def p_paris(feats):
        by = {}
        for layer, f in feats:
            by.setdefault(layer, []).append(f)
        hooks = interp.compose(*[interp.ablate_features(layer, fs) for layer, fs in by.items()]) if by else {}
        return float(torch.softmax(model.forward(ids, hooks=hooks, logits="last")[0].double(), -1)[step.token_id])

    base = p_paris([])
    named = base - p_paris([(f.layer, f.feature) for f in step.features])
    rng = random.Random(0)
    rand = [base - p_paris([(f.layer, rng.randrange(kvindex.num_features(f.layer))) for f in step.features])
            for _ in range(3)]
    assert named > 0 and named > sum(rand) / 3, (named, rand)
    assert step.attention_logit is not None and 0 <= step.attention_share <= 1


def _ablated_prob(model, ids, token_id, feats):
    import torch

    from modelql.runtime import interp

    by = {}
    for layer, f in feats:
        by.setdefault(layer, []).append(f)
    hooks = interp.compose(*[interp.ablate_features(layer, fs) for layer, fs in by.items()]) if by else {}
    return float(torch.softmax(model.forward(torch.tensor([ids]), hooks=hooks, logits="last")[0].double(), -1)[token_id])


def test_named_features_matter_more_than_random_ones_across_prompts(kvindex):
    """The issue's check on 20 fact prompts (bench/describe.py --explain 50 runs it on any model):
    ablating the top-5 features `explain` names for the greedy token lowers its probability more
    than 5 random features of the same layers (mean of 3 draws) in ≥ 90 % of them. Ranked by
    direct logit contribution alone this held for 86 % of 50 prompts; by effect (activation ×
    gradient) for all 50."""
    import random

    import torch

    from modelql import defaults as D
    from modelql.knowledge.explain import VindexFeatures, attribute
    from modelql.knowledge.queries import model_for

    model = model_for(kvindex)
    src = VindexFeatures(kvindex)
    rng = random.Random(0)
    facts = rng.sample(D.facts(), 20)
    wins = 0
    for fact in facts:
        ids = model.tokenizer.encode(D.TRAIN_TEMPLATES[fact.relation][0].replace("{X}", fact.entity))
        t = int(model.forward(torch.tensor([ids]), logits="last")[0].argmax())
        (step,) = attribute(model, ids, [t], src, top=5)
        feats = [(f.layer, f.feature) for f in step.features]
        base = _ablated_prob(model, ids, t, [])
        named = base - _ablated_prob(model, ids, t, feats)
        rand = [base - _ablated_prob(model, ids, t, [(L, rng.randrange(kvindex.num_features(L))) for L, _f in feats])
                for _ in range(3)]
        wins += named > sum(rand) / 3
    assert wins >= 18, wins


def test_contributions_are_an_exact_split_of_the_ffn_logit(kvindex):
    """Every feature's `a_f · (d_f · v_t)` summed over all layers equals the FFNs' direct
    contribution to the token's logit (hook_mlp_out · v_t), to float rounding."""
    import torch

    from modelql.knowledge.decode import attribute as dla
    from modelql.knowledge.decode import token_direction
    from modelql.knowledge.queries import model_for
    from modelql.runtime import interp

    model = model_for(kvindex)
    ids = model.tokenizer.encode(PROMPT)
    paris = model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    n = model.spec.num_layers
    names = [f"blocks.{i}.mlp.hook_post" for i in range(n)] + [f"blocks.{i}.hook_mlp_out" for i in range(n)] + \
        [f"blocks.{n - 1}.hook_resid_post"]
    _, cache = interp.run_with_cache(model, torch.tensor([ids]), names)
    final = cache[f"blocks.{n - 1}.hook_resid_post"][-1]
    c = dla(model, {i: cache[f"blocks.{i}.mlp.hook_post"][-1][None] for i in range(n)}, final[None], paris)
    v = token_direction(model, final, paris)
    ffn = sum(float(cache[f"blocks.{i}.hook_mlp_out"][-1].float() @ v) for i in range(n))
    assert sum(float(x.sum()) for x in c.values()) == pytest.approx(ffn, rel=1e-3, abs=1e-3)


def test_forced_next_token_attribution_matches_explain_infer(kvindex):
    """`attribute(rank="direct")` on given ids == EXPLAIN INFER's per-layer top contributors,
    merged, at the same position."""
    from modelql.knowledge.explain import VindexFeatures, attribute
    from modelql.knowledge.infer import explain_infer
    from modelql.knowledge.queries import model_for

    model = model_for(kvindex)
    ids = model.tokenizer.encode(PROMPT)
    paris = model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    (step,) = attribute(model, ids, [paris], VindexFeatures(kvindex), top=3, rank="direct")
    assert step.token == " Paris" and step.position == len(ids) - 1
    ref = explain_infer(model, PROMPT, vindex=kvindex, top=20)
    assert ref.predictions[0].token_id == paris
    positive = sorted((f for f in ref.trace if f.contribution and f.contribution > 0), key=lambda f: -f.contribution)[:3]
    assert [(f.layer, f.feature) for f in step.features] == [(f.layer, f.feature) for f in positive]
    for a, b in zip(step.features, positive):
        assert a.contribution == pytest.approx(b.contribution, rel=1e-3, abs=1e-3)
        assert a.gate == pytest.approx(b.gate, rel=1e-3, abs=1e-3)


def test_remote_features_equal_local(kc, kvindex, local_explanation):
    from modelql.knowledge.explain import RemoteFeatures, explain
    from modelql.knowledge.queries import model_for

    remote = explain(model_for(kvindex), PROMPT, RemoteFeatures(kc, model_for(kvindex)), max_tokens=4, top=5)
    assert remote.completion == local_explanation.completion
    assert remote.features_from == f"remote {kc.base_url}"
    for a, b in zip(remote.tokens, local_explanation.tokens):
        assert [(f.layer, f.feature, f.top_token, f.top_tokens, f.relation) for f in a.features] == \
            [(f.layer, f.feature, f.top_token, f.top_tokens, f.relation) for f in b.features]
        assert [f.gate for f in a.features] == pytest.approx([f.gate for f in b.features], rel=1e-3, abs=1e-3)


def _cli(args, env=None):
    from modelql.cli import app

    return CliRunner().invoke(app, args, env=env)


def test_cli_table(kvindex):
    r = _cli(["explain", PROMPT, "--max-tokens", "3", "--top", "3"], env={"MODELQL_KNOWLEDGE_URL": ""})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert lines[header].split() == ["#", "Token", "Attn", "Layer", "Feature", "Logit+", "Gate", "Promotes",
                                     "Relation"]
    rows = lines[header + 2:]
    rows = rows[:rows.index("")]
    assert rows[0].startswith("0  ' Paris'") and rows[0].split()[3].endswith("%") and len(rows) == 3 * 2
    end = lines[header].index("Logit+") + len("Logit+")  # right-aligned column
    for row in rows:
        contrib = row[:end].split()[-1]
        assert contrib[0] == "+" and float(contrib) > 0, row
    assert "features from vindex" in r.output


def test_cli_json_local_and_remote_agree(ksrv, local_explanation):
    r = _cli(["explain", PROMPT, "--max-tokens", "4", "--json"], env={"MODELQL_KNOWLEDGE_URL": ""})
    assert r.exit_code == 0, r.output
    local = json.loads(r.output)
    assert local["completion"] == local_explanation.completion
    assert [t["token"] for t in local["tokens"]][0] == " Paris"
    feats = local["tokens"][0]["features"]
    assert set(feats[0]) == {"layer", "feature", "gate_score", "top_token", "top_tokens", "relation", "contribution"}
    assert 0 <= local["tokens"][0]["attention_share"] <= 1
    r = _cli(["explain", PROMPT, "--max-tokens", "4", "--json"], env={"MODELQL_KNOWLEDGE_URL": ksrv.url})
    assert r.exit_code == 0, r.output
    remote = json.loads(r.output)
    assert remote["features_from"] == f"remote {ksrv.url}"
    strip = lambda d: [[(f["layer"], f["feature"], f["top_token"], f["relation"]) for f in t["features"]]
                       for t in d["tokens"]]
    assert strip(remote) == strip(local)


def test_cli_errors_are_one_line(dead_url):
    r = _cli(["explain", PROMPT, "--knowledge-url", dead_url])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [r.output.strip()] and "failed to connect to" in r.output
    r = _cli(["explain", "   "])
    assert r.exit_code == 1 and "empty prompt" in r.output
    r = _cli(["explain", "/nonexistent/model", PROMPT])
    assert r.exit_code == 1 and "neither a vindex nor an HF model directory" in r.output
