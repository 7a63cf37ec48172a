"""Golden tests on the embedded default model's vindex (no USE: the default backend).

Content-checking assertions against the model's ground truth (``modelql.defaults`` facts) and
against independent computations, not whole-output snapshots: DESCRIBE "France" lists Paris
under a capital label, WALK rows are the exact gate KNN, SELECT ... relation = "capital" rows
carry that label, SHOW RELATIONS lists the facts' relations, STATS describes the default
vindex, INFER predicts Paris, TRACE ranks Paris first at the last layer.

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


def test_describe_france(session):
    (r,) = run(session, 'DESCRIBE "France"')
    d = r.value
    assert d.found and d.edges
    paris = [e for e in d.edges if e.target == "Paris"]
    assert paris, [e.target for e in d.edges]
    assert paris[0].relation == "capital"
    out = render.lines(r)
    assert out[0] == "France"
    assert re.fullmatch(r"  signal: (clean|moderate|diffuse) \(\d+ edges, max gate [\d.]+.*\)", out[1])
    assert any(re.fullmatch(r"    capital\s+→ Paris\s+[\d.]+\s+L\d+", line) for line in out), out
    verbose = lines(session, 'DESCRIBE "France" VERBOSE')
    assert any(re.match(r"    \[capital\]\s+→ Paris\s+[\d.]+\s+L\d+(-\d+)?\s+\d+x", line) for line in verbose)


@pytest.mark.parametrize("entity,capital", [("Japan", "Tokyo"), ("Germany", "Berlin"), ("Italy", "Rome")])
def test_describe_other_capitals(session, entity, capital):
    (r,) = run(session, f'DESCRIBE "{entity}"')
    targets = [e.target for e in r.value.edges]
    assert capital in targets, targets


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


def test_infer(session):
    (r,) = run(session, 'INFER "The capital of France is"')
    preds = [p.token.strip() for p in r.value.predictions]
    assert preds[0] == "Paris", preds
    out = render.lines(r)
    assert out[0] == "Predictions (walk FFN):"
    assert re.fullmatch(r" 1\.  Paris \(\d+\.\d\d%\)", out[1])
    assert "Inference trace (features that fired with attention):" in out


def test_trace(session):
    (r,) = run(session, 'TRACE "The capital of France is" FOR "Paris"')
    t = r.value
    last = [row for row in t.rows if row.layer == t.num_layers - 1][-1]
    assert last.answer_rank == 1 and last.answer_prob > 0.1
    out = render.lines(r)
    assert re.fullmatch(rf'Trace: "The capital of France is" \(\d+ tokens, {t.num_layers} layers, [\d.]+ms\)', out[0])
    assert out[1] == "Answer trajectory for 'Paris':"
    assert out[-1].split()[:2] == [f"L{t.num_layers - 1}", "1"]


def test_cli_without_use_runs_on_the_default_vindex(default_vindex_path):
    if os.environ.get("MODELQL_TEST_DEFAULT_MODEL"):
        pytest.skip("the CLI always uses the embedded model")
    env = dict(os.environ, MODELQL_DEBUG="")
    p = subprocess.run([sys.executable, "-m", "modelql.cli", "lql", 'STATS; DESCRIBE "France"'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"Path: {default_vindex_path}" in p.stdout
    assert re.search(r"capital\s+→ Paris", p.stdout)
    assert "Extracting" not in p.stderr  # reused from the cache
