"""Golden tests on the embedded default model's vindex (no USE: the default backend).

Content-checking assertions against the model's ground truth (``modelql.defaults`` facts) and
against independent computations, not whole-output snapshots: DESCRIBE "France" shows its true
facts under their relation labels (and Paris under capital whenever the model itself predicts
Paris), WALK rows are the exact gate KNN, SELECT ... relation = "capital" rows carry that label,
SHOW RELATIONS lists the facts' relations, STATS describes the default vindex, INFER equals a
transformers forward pass and has Paris among its predictions, TRACE's last layer agrees with
INFER.

The vindex comes from the default-vindex cache (``$MODELQL_CACHE`` or ``~/.cache/modelql``):
the first run extracts and labels it (a minute or two), later runs reuse it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from modelql import defaults
from modelql.lql import render
from modelql.lql.executor import run_batch
from modelql.lql.session import Session


@pytest.fixture(scope="module")
def session(default_vindex_path):
    return Session(default_vindex=lambda: default_vindex_path)


def run(session, text):
    (outcome,) = run_batch(text, session)
    assert outcome.ok, render.error_lines(outcome.error)
    return outcome.results


def lines(session, text) -> list[str]:
    return [line for r in run(session, text) for line in render.lines(r)]


def test_no_use_means_the_default_vindex(session, default_vindex_path):
    text = "\n".join(lines(session, "STATS"))
    assert session.backend == "vindex" and session.vindex_is_default
    assert session.vindex.path == default_vindex_path
    assert text.startswith("Model: modelql-default (llama, extract level inference, ")
    assert re.search(r"^Features: [\d.]+K? \([\d.]+K? x \d+ layers\)$", text, re.M)
    m = re.search(r"^  Probe-labelled features: (\d+) \((\d+) relation types\)$", text, re.M)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) >= len(defaults.RELATIONS) - 2
    assert re.search(r"^  Knowledge \(L\d+-\d+\): ", text, re.M)
    assert "Weights: yes" in text
    assert text.splitlines()[-1] == f"Path: {default_vindex_path}"


def truths(entity: str) -> dict[str, set[str]]:
    """Ground truth: token -> relations, for every fact of `entity` in the shipped facts table. A
    multi-word target also counts under each of its words of 4+ letters ("South America" under
    "South"), as edges name single tokens (the probe labeller's matching forms, algorithms §6.1)."""
    out: dict[str, set[str]] = {}
    for f in defaults.facts():
        if f.entity == entity:
            forms = {f.target} | {w for w in f.target.split() if len(w) >= 4} if " " in f.target else {f.target}
            for form in forms:
                out.setdefault(form, set()).add(f.relation)
    return out


def knows(session, entity: str, relation: str) -> str | None:
    """The fact's target when the model itself (dense forward, canonical template) ranks it first."""
    from modelql.runtime import interp

    target = defaults.targets_by_subject().get((entity, relation), (None,))[0]
    model = session.model("INFER")
    prompt = defaults.prompt(defaults.TRAIN_TEMPLATES[relation][0], entity)
    logits, _ = interp.run_with_cache(model, interp.to_ids(model, prompt), [])
    top = model.tokenizer.decode([int(logits[-1].argmax())]).strip()
    return target if target and top == target.split()[0] else None


def test_describe_france(session):
    (r,) = run(session, 'DESCRIBE "France"')
    d = r.value
    assert d.found and d.edges
    # every edge shown is an edge of the result, in gate order, with its label
    out = render.lines(r)
    assert out[0] == "France"
    assert re.fullmatch(r"  signal: (clean|moderate|diffuse) \(\d+ edges, max gate [\d.]+.*\)", out[1])
    shown = [line for line in out if "→" in line]
    for line, e in zip(shown, [e for s in d.sections() for e in s.edges]):
        low = r"( \(low confidence, p=[\d.]+\))?"  # a calibrated claim below the model's measured floors
        assert re.fullmatch(rf"    {re.escape(e.relation or '')}\s*→ {re.escape(e.target)}\s+{e.gate:.1f}\s+L{e.layer}{low}",
                            line), (line, e)
    # ground truth: true facts of France appear with their relation as label
    truth = truths("France")
    correct = {(e.target, e.relation) for e in d.edges if e.relation in truth.get(e.target, ())}
    assert len(correct) >= 2 and len({rel for _t, rel in correct}) >= 2, correct
    # the model's own knowledge: a capital it predicts must be a labelled DESCRIBE edge
    capital = knows(session, "France", "capital")
    if capital is not None:
        assert (capital, "capital") in {(e.target, e.relation) for e in d.edges}


@pytest.mark.parametrize("entity", ["Japan", "Germany", "Italy", "Brazil"])
def test_describe_lists_true_facts(session, entity):
    (r,) = run(session, f'DESCRIBE "{entity}" VERBOSE')
    truth = truths(entity)
    correct = {(e.target, e.relation) for e in r.value.edges if e.relation in truth.get(e.target, ())}
    assert correct, [(e.target, e.relation) for e in r.value.edges]
    out = "\n".join(render.lines(r))
    for target, relation in correct:
        if any(e.target == target for s in r.value.sections("verbose") for e in s.edges):
            assert re.search(rf"\[{re.escape(relation)}\]\s+→ {re.escape(target)}\s", out)


def test_walk(session):
    from modelql.knowledge import walk_vector

    (r,) = run(session, 'WALK "The capital of France is"')
    w = r.value
    vx = session.vindex
    assert w.token == "is" and list(w.layers) == vx.layers()
    q, _ = walk_vector(vx, "The capital of France is")
    for layer, rows in w.by_layer().items():
        knn = vx.gate_knn(layer, q, 10)
        assert [x.feature for x in rows] == [h.feature for h in knn if vx.feature_meta(layer, h.feature)][:len(rows)]
    out = render.lines(r)
    assert out[0] == (f'Feature scan for "The capital of France is" (token "is", {vx.num_layers} layers, '
                      f"mode=hybrid (default))")
    body = out[1:-2]
    assert len(body) == 3 * vx.num_layers
    assert all(re.fullmatch(r'  L\d+:\s+F\d+\s+gate=[+-]\d+\.\d\s+top="[^"]*"\s+down=\[[^\]]*\]', x) for x in body)
    assert re.fullmatch(r"[\d.]+ms", out[-2])


def test_select_capital_edges(session):
    (r,) = run(session, 'SELECT * FROM EDGES WHERE relation = "capital" LIMIT 5')
    s = r.value
    assert len(s.rows) == 5 and s.total >= 5
    assert all("capital" in (row.relation or "").lower() for row in s.rows)
    out = render.lines(r)
    assert out[0].split() == ["Layer", "Feature", "Token", "Also", "Relation", "Score"]
    for line in out[2:7]:
        assert re.fullmatch(r"\s*L\d+\s+F\d+\s+.+capital.*\s+\d\.\d{4}", line), line
    assert out[-1] == f"5 of {s.total} rows (LIMIT 5)"


def test_show_relations(session):
    (r,) = run(session, "SHOW RELATIONS")
    rel = r.value
    names = [p.name for p in rel.probe_relations]
    assert "capital" in names and set(names) <= set(defaults.RELATIONS)
    out = render.lines(r)
    assert out[0] == f"Probe-confirmed relations ({rel.probe_count} labels):"
    counts = [p.count for p in rel.probe_relations]
    assert counts == sorted(counts, reverse=True)
    assert any(re.fullmatch(r"  capital\s+\d+\s+L\d+(-\d+)?", line) for line in out)


def test_infer(session, kmodel_dir):
    """INFER equals an independent forward pass (transformers on the model's own files), and the
    true capital is among the model's top predictions."""
    import torch
    import transformers as T

    from modelql.runtime import interp

    (r,) = run(session, 'INFER "The capital of France is"')
    preds = r.value.predictions
    ids = interp.to_ids(session.model("INFER"), "The capital of France is")
    hf = T.AutoModelForCausalLM.from_pretrained(kmodel_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        probs = torch.softmax(hf(ids).logits[0, -1].double(), -1)
    top = torch.topk(probs, len(preds))
    assert [p.token_id for p in preds] == top.indices.tolist()
    assert [round(p.prob, 4) for p in preds] == [round(float(v), 4) for v in top.values]
    assert "Paris" in [p.token.strip() for p in preds]
    out = render.lines(r)
    assert out[0] == "Predictions (walk FFN):"
    assert all(re.fullmatch(r" ?\d+\. .+ \(\d+\.\d\d%\)", line) for line in out[1:1 + len(preds)])
    assert "Inference trace (features that fired with attention):" in out


def test_trace(session):
    """TRACE's last layer (logit lens of the final residual) agrees with INFER's output."""
    (r,) = run(session, 'TRACE "The capital of France is" FOR "Paris"')
    t = r.value
    last = [row for row in t.rows if row.layer == t.num_layers - 1][-1]
    (i,) = run(session, 'INFER "The capital of France is" TOP 10')
    preds = i.value.predictions
    rank = next(k for k, p in enumerate(preds, 1) if p.token_id == t.answer_id)
    assert last.answer_rank == rank
    assert abs(last.answer_prob - preds[rank - 1].prob) < 1e-4
    out = render.lines(r)
    assert re.fullmatch(rf'Trace: "The capital of France is" \(\d+ tokens, {t.num_layers} layers, [\d.]+ms\)', out[0])
    assert out[1] == "Answer trajectory for 'Paris':"
    assert [line.split()[0] for line in out[4:]] == ["emb"] + [f"L{n}" for n in range(t.num_layers)]
    assert out[-1].split()[1] == str(rank)


def test_cli_without_use_runs_on_the_default_vindex(default_vindex_path):
    if os.environ.get("MODELQL_TEST_DEFAULT_MODEL"):
        pytest.skip("the CLI always uses the embedded model")
    env = dict(os.environ, MODELQL_DEBUG="")
    p = subprocess.run([sys.executable, "-m", "modelql.cli", "lql", 'STATS; DESCRIBE "France"'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"Path: {default_vindex_path}" in p.stdout
    assert "\nFrance\n  signal: " in p.stdout
    assert "Extracting" not in p.stderr  # reused from the cache
