"""The LQL executor and session on a tiny inference-level vindex: dispatch, backends, capability
errors, pipes, batch mode, and the session-level statements (USE, STATS, SHOW LAYERS/MODELS,
EXTRACT, TRACE) checked against independent computations."""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest

from modelql.errors import CapabilityError, ModelqlError
from modelql.lql import ast, parse, render
from modelql.lql.executor import HANDLERS, Executor, run_batch
from modelql.lql.results import Executed, LayersResult, ModelsResult, UsedModel, UsedVindex
from modelql.lql.session import LqlExecutionError, NoBackendError, Session


def session_on(path, **kw) -> Session:
    s = Session(default_vindex=False, **kw)
    s.use_vindex(path)
    return s


def run(session: Session, text: str) -> list[Executed]:
    return Executor(session).run(text)


def out(session: Session, text: str) -> list[str]:
    return [line for r in run(session, text) for line in render.lines(r)]


def error_of(session: Session, text: str) -> str:
    outcomes = run_batch(text, session)
    assert len(outcomes) == 1 and outcomes[0].error is not None, outcomes
    lines = render.error_lines(outcomes[0].error)
    return "\n".join(lines)


# -- dispatch table ------------------------------------------------------------------------------


def test_every_statement_is_dispatched_or_not_yet():
    from modelql.lql import executor

    for cls in ast.STATEMENT_TYPES:
        assert (cls in HANDLERS) != (cls in executor.NOT_YET), cls.__name__


NOT_YET_TEXTS = [
    ("REBALANCE UNTIL CONVERGED", "REBALANCE"),
    ("COMPACT MINOR", "COMPACT MINOR"),
    ("COMPACT MAJOR FULL", "COMPACT MAJOR"),
    ("SHOW COMPACT STATUS", "SHOW COMPACT STATUS"),
]


@pytest.mark.parametrize("text,keyword", NOT_YET_TEXTS)
def test_not_available_yet(text, keyword):
    from modelql.lql import executor

    assert type(parse(text)) in executor.NOT_YET
    session = Session(default_vindex=False)  # the answer does not need (or load) a backend
    with pytest.raises(CapabilityError, match=re.escape(f"{keyword} is not available yet")):
        Executor(session).run(text)
    assert error_of(session, text) == f"Error: {keyword} is not available yet"
    assert session.backend == "none"


def test_statement_needs_backend():
    session = Session(default_vindex=False)
    with pytest.raises(NoBackendError, match=r'No backend loaded\. Run USE "path\.vindex" first\.'):
        Executor(session).run('DESCRIBE "France"')
    for text in ("STATS", "SHOW LAYERS", 'WALK "x"', "SHOW RELATIONS", 'TRACE "x"'):
        assert error_of(session, text).startswith("Error: No backend loaded.")


def test_default_backend_opens_on_first_use(tiny_vindex):
    calls = []

    def provider():
        calls.append(1)
        return tiny_vindex

    session = Session(default_vindex=provider)
    assert session.backend == "none"
    run(session, "SHOW MODELS")  # needs no backend: the default is not opened
    assert calls == []
    (r,) = run(session, "SHOW LAYERS")
    assert isinstance(r.value, LayersResult)
    assert session.backend == "vindex" and session.vindex_is_default and calls == [1]
    run(session, "STATS")
    assert calls == [1]  # opened once


# -- USE -----------------------------------------------------------------------------------------


def test_use_vindex(tiny_vindex):
    session = Session(default_vindex=False)
    (r,) = run(session, f'USE "{tiny_vindex}"')
    assert isinstance(r.value, UsedVindex)
    assert r.value.num_layers == 2 and r.value.features == 2 * 64
    assert session.backend == "vindex" and not session.vindex_is_default
    (line,) = render.lines(r)
    assert line.startswith(f"Using: {tiny_vindex} (2 layers, 128 features, model: ")


def test_use_discards_session_state(tiny_vindex):
    session = session_on(tiny_vindex)
    session.recording, session.overlay, session.caches["x"] = object(), object(), 1
    run(session, f'USE "{tiny_vindex}"')
    assert session.recording is None and session.overlay is None and session.caches == {}


def test_use_errors(tmp_path):
    session = Session(default_vindex=False, cwd=tmp_path)
    assert error_of(session, 'USE "missing.vindex"') == "Error: vindex not found: missing.vindex"
    assert error_of(session, 'USE "hf://owner/repo"').startswith("Error: USE \"hf://...\"")
    (tmp_path / "notavindex").mkdir()
    msg = error_of(session, 'USE "notavindex"')
    assert msg.startswith("Error: ") and "\n" not in msg


def test_relative_paths_resolve_against_session_cwd(tiny_vindex):
    session = Session(default_vindex=False, cwd=tiny_vindex.parent)
    (r,) = run(session, f'USE "{tiny_vindex.name}"')
    assert r.value.path == str(tiny_vindex)


def test_use_model_backend(tiny_model_dir):
    session = Session(default_vindex=False)
    (r,) = run(session, f'USE MODEL "{tiny_model_dir}"')
    assert isinstance(r.value, UsedModel)
    assert (r.value.num_layers, r.value.hidden_size, r.value.intermediate_size) == (2, 32, 64)
    assert session.backend == "model"
    lines = render.lines(r)
    assert lines[0].startswith(f"Using model: {tiny_model_dir} (2 layers, hidden=32, ")
    assert "live weights" in lines[0]
    # browse statements need a vindex (spec §4.1), with the EXTRACT hint
    msg = error_of(session, 'DESCRIBE "France"')
    assert msg.startswith("Error: this operation requires a vindex. Extract first: EXTRACT MODEL")
    assert "\n" not in msg
    assert "Layers: 2, hidden 32, intermediate 64" in "\n".join(out(session, "STATS"))
    # TRACE runs on the dense model
    (t,) = run(session, 'TRACE "The capital of France is"')
    assert t.value.num_layers == 2


def test_use_model_missing(tmp_path):
    session = Session(default_vindex=False, cwd=tmp_path)
    msg = error_of(session, 'USE MODEL "nope/model"')
    assert msg.startswith("Error: model not found: nope/model")


def test_use_model_auto_extract(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELQL_CACHE", str(tmp_path / "cache"))
    session = Session(default_vindex=False, progress=False)
    (r,) = run(session, f'USE MODEL "{tiny_model_dir}" AUTO_EXTRACT')
    assert isinstance(r.value, UsedVindex) and session.backend == "vindex"
    path = session.vindex.path
    assert path.parent == tmp_path / "cache" / "vindex" and path.name.endswith(".vindex")
    assert session.vindex.extract_level == "inference"
    stamp = (path / "index.json").stat().st_mtime_ns
    run(Session(default_vindex=False), f'USE MODEL "{tiny_model_dir}" AUTO_EXTRACT')
    assert (path / "index.json").stat().st_mtime_ns == stamp  # reused, not re-extracted


# -- EXTRACT -------------------------------------------------------------------------------------


def test_extract_then_use(tiny_model_dir, tmp_path):
    session = Session(default_vindex=False, cwd=tmp_path)
    (r,) = run(session, f'EXTRACT MODEL "{tiny_model_dir}" INTO "new.vindex"')
    assert (tmp_path / "new.vindex" / "index.json").is_file()
    assert session.backend == "vindex" and session.vindex.path == tmp_path / "new.vindex"
    assert session.vindex.extract_level == "browse"
    lines = render.lines(r)
    assert lines[-2] == f"Extraction complete: {tmp_path / 'new.vindex'}"
    assert lines[-1].startswith("Using: ")
    assert error_of(session, f'EXTRACT MODEL "{tiny_model_dir}" INTO "x.vindex" LAYERS 0-1') == \
        "Error: EXTRACT ... LAYERS is not available yet"
    msg = error_of(session, f'EXTRACT MODEL "{tiny_model_dir}" INTO "new.vindex"')  # exists
    assert msg.startswith("Error: ") and "already exists" in msg


# -- STATS ---------------------------------------------------------------------------------------


def test_stats(tiny_vindex):
    session = session_on(tiny_vindex)
    text = "\n".join(out(session, "STATS"))
    assert re.search(r"^Features: 128 \(64 x 2 layers\)$", text, re.M)
    assert "Knowledge Graph:" in text and "By layer band" in text
    assert re.search(r"^  Knowledge \(L\d+-\d+\): ", text, re.M)
    assert re.search(r"^Index size: [\d.]+ (KB|MB)$", text, re.M)
    assert f"Path: {tiny_vindex}" in text


def test_stats_path_does_not_switch(tiny_vindex, tiny_browse_vindex):
    session = session_on(tiny_vindex)
    text = "\n".join(out(session, f'STATS "{tiny_browse_vindex}"'))
    assert f"Path: {tiny_browse_vindex}" in text and "extract level browse" in text
    assert session.vindex.path == tiny_vindex
    assert error_of(session, 'STATS "nope.vindex"') == "Error: vindex not found: nope.vindex"


# -- SHOW LAYERS / SHOW MODELS -------------------------------------------------------------------


def test_show_layers_matches_metadata(tiny_vindex):
    session = session_on(tiny_vindex)
    vx = session.vindex
    (r,) = run(session, "SHOW LAYERS")
    assert [row.layer for row in r.value.rows] == vx.layers()
    for row in r.value.rows:
        metas = [vx.feature_meta(row.layer, f) for f in range(vx.num_features(row.layer))]
        tops = Counter(m.top_token_id for m in metas if m is not None)
        assert row.features == vx.num_features(row.layer)
        assert row.with_meta == sum(1 for m in metas if m is not None)
        best = max(tops.values())
        assert row.top_token_count == best
        assert row.top_token == vx.token_text(min(i for i, n in tops.items() if n == best))
    lines = render.lines(r)
    assert lines[0].split() == ["Layer", "Features", "WithMeta", "TopToken"]
    assert [line.split()[0] for line in lines[2:]] == ["L0", "L1"]
    (r1,) = run(session, "SHOW LAYERS 1-1")
    assert [row.layer for row in r1.value.rows] == [1]


def test_show_models(tiny_vindex, tmp_path):
    shutil.copytree(tiny_vindex, tmp_path / "b.vindex")
    (tmp_path / "a-broken.vindex").mkdir()
    (tmp_path / "a-broken.vindex" / "index.json").write_text("{not json")
    (tmp_path / "plain-dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    session = Session(default_vindex=False, cwd=tmp_path)
    (r,) = run(session, "SHOW MODELS")
    assert isinstance(r.value, ModelsResult)
    assert [m.name for m in r.value.rows] == ["a-broken.vindex", "b.vindex"]
    broken, good = r.value.rows
    assert good.status == "ready" and good.num_layers == 2 and good.size_bytes > 0
    assert broken.status.startswith("unreadable")
    lines = render.lines(r)
    assert lines[0].split() == ["Model", "Size", "Layers", "Status"]
    assert re.search(r"b\.vindex\s+[\d.]+ (KB|MB)\s+2\s+ready$", lines[-1])
    assert session.backend == "none"
    empty = Session(default_vindex=False, cwd=tmp_path / "plain-dir")
    assert out(empty, "SHOW MODELS") == [f"  (no vindexes in {tmp_path / 'plain-dir'})"]


# -- queries -------------------------------------------------------------------------------------

WALK_ROW = re.compile(r'^  L\d+:\s+F\d+\s+gate=[+-]\d+\.\d\s+top="[^"]*"\s+down=\[.*\]$')


def test_walk(tiny_vindex):
    session = session_on(tiny_vindex)
    (r,) = run(session, 'WALK "The capital of France" TOP 4')
    w = r.value
    assert w.top == 4 and len(w.rows) <= 4 * 2
    # the first hit per layer is the exact gate KNN of the query (independent path: vindex API)
    from modelql.knowledge import walk_vector

    q, _ = walk_vector(session.vindex, "The capital of France")
    for layer, rows in w.by_layer().items():
        best = session.vindex.gate_knn(layer, q, 1)[0]
        assert (rows[0].feature, round(rows[0].gate_score, 4)) == (best.feature, round(best.score, 4))
    lines = render.lines(r)
    assert lines[0].startswith('Feature scan for "The capital of France" (token "')
    assert lines[0].endswith(", 2 layers, mode=hybrid (default))")
    rows = [line for line in lines if WALK_ROW.match(line)]
    assert len(rows) == len(lines) - 3
    for layer in (0, 1):
        assert 1 <= sum(1 for line in rows if line.startswith(f"  L{layer}:")) <= 3
    assert re.fullmatch(r"\d+\.\dms", lines[-2])
    assert "no attention" in lines[-1]
    (r2,) = run(session, 'WALK "France" MODE PURE COMPARE LAYERS 1-1')
    lines = render.lines(r2)
    assert "1 layers, mode=pure (sparse KNN only)" in lines[0]
    assert 1 <= sum(1 for line in lines if WALK_ROW.match(line)) <= 5


def test_explain_walk(tiny_vindex):
    session = session_on(tiny_vindex)
    lines = out(session, 'EXPLAIN WALK "France" LAYERS 0-0 TOP 2')
    rows = [line for line in lines if re.match(r"^  L0: F\d+ → .* \(gate=[+-]\d+\.\d, down=\[.*\]\)$", line)]
    assert len(rows) == 2


def test_walk_empty_prompt(tiny_vindex):
    session = session_on(tiny_vindex)
    assert error_of(session, 'WALK ""') == "Error: empty prompt"


def test_describe_and_select_dispatch(tiny_vindex):
    session = session_on(tiny_vindex)
    (d,) = run(session, 'DESCRIBE "France" VERBOSE')
    assert render.lines(d)[0] == "France"
    (s,) = run(session, "SELECT * FROM FEATURES WHERE layer = 1 ORDER BY confidence DESC LIMIT 3")
    assert len(s.value.rows) == 3 and all(row.layer == 1 for row in s.value.rows)
    scores = [row.c_score for row in s.value.rows]
    assert scores == sorted(scores, reverse=True)
    (e,) = run(session, "SHOW FEATURES 0 LIMIT 2")
    assert len(e.value.rows) == 2
    assert error_of(session, "SHOW FEATURES 7") == "Error: no features at layer 7"
    (rel,) = run(session, "SHOW RELATIONS")
    assert render.lines(rel)


# -- TRACE ---------------------------------------------------------------------------------------


def test_trace(tiny_vindex, tmp_path):
    session = session_on(tiny_vindex, cwd=tmp_path)
    (r,) = run(session, 'TRACE "The capital of France is" FOR "Paris"')
    t = r.value
    assert [row.layer for row in t.rows] == [-1, 0, 1]
    lines = render.lines(r)
    assert re.fullmatch(r'Trace: "The capital of France is" \(\d+ tokens, 2 layers, [\d.]+ms\)', lines[0])
    assert lines[1] == "Answer trajectory for 'Paris':"
    assert lines[2].split() == ["Layer", "Rank", "Prob", "Attn", "FFN", "Who"]
    assert [line.split()[0] for line in lines[4:]] == ["emb", "L0", "L1"]
    (d,) = run(session, 'TRACE "The capital of France is" DECOMPOSE LAYERS 1-1')
    lines = render.lines(d)
    assert lines[1].split() == ["Layer", "|attn_Δ|", "|ffn_Δ|", "|residual|", "attn%"]
    assert [line.split()[0] for line in lines[3:]] == ["emb", "L1"]
    (p,) = run(session, 'TRACE "The capital of France is"')
    assert render.lines(p)[1].split() == ["Layer", "Top-1", "Prob", "|attn_Δ|", "|ffn_Δ|"]


def test_trace_save(tiny_vindex, tmp_path):
    from modelql.knowledge.trace import Trace

    session = session_on(tiny_vindex, cwd=tmp_path)
    msg = error_of(session, 'TRACE "Hello world" SAVE "t.json"')
    assert msg == ("Error: TRACE SAVE requires POSITIONS ALL so the saved trace contains complete "
                   "token chains")
    assert not (tmp_path / "t.json").exists()
    (r,) = run(session, 'TRACE "Hello world" POSITIONS ALL SAVE "t.json"')
    saved = Trace.load(tmp_path / "t.json")
    assert saved == r.value.trace
    assert render.lines(r)[-1] == f"Saved {len(saved.tokens)} token chains to {tmp_path / 't.json'}"


def test_inference_needs_weights(tiny_browse_vindex):
    session = session_on(tiny_browse_vindex)
    msg = error_of(session, 'TRACE "Hello"')
    assert msg.startswith("Error: TRACE requires model weights.") and "EXTRACT MODEL" in msg
    assert "\n" not in msg


# -- pipes and batch -----------------------------------------------------------------------------


def test_pipe_runs_both_in_order(tiny_vindex):
    session = session_on(tiny_vindex)
    results = run(session, "SHOW LAYERS |> STATS")
    assert [type(r.statement).__name__ for r in results] == ["ShowLayers", "Stats"]


def test_pipe_error_aborts_right_side(tiny_vindex):
    session = session_on(tiny_vindex)
    (o,) = run_batch('SHOW LAYERS |> WALK ""', session)
    assert [type(r.statement).__name__ for r in o.results] == ["ShowLayers"]
    assert str(o.error) == "empty prompt"
    (o2,) = run_batch('WALK "" |> SHOW LAYERS', session)
    assert o2.results == [] and str(o2.error) == "empty prompt"


def test_batch_continues_after_errors(tiny_vindex):
    session = session_on(tiny_vindex)
    script = f'''
        SHOW LAYERS;
        WALK "x" BOGUS;        -- a parse error
        SHOW FEATURES 99;      -- an execution error
        STATS
    '''
    outcomes = run_batch(script, session)
    assert [o.ok for o in outcomes] == [True, False, False, True]
    assert outcomes[1].statement is None
    parse_err = render.error_lines(outcomes[1].error)
    assert parse_err[0].startswith("Error: Parse error at line 3, column ")
    assert parse_err[2].strip() == "^"
    assert render.error_lines(outcomes[2].error) == ["Error: no features at layer 99"]


def test_batch_stops_after_a_failed_use(tiny_vindex):
    session = session_on(tiny_vindex)
    outcomes = run_batch('SHOW LAYERS; USE "nope.vindex"; SHOW FEATURES 0; STATS', session)
    assert [o.ok for o in outcomes] == [True, False, False]
    assert render.error_lines(outcomes[1].error) == ["Error: vindex not found: nope.vindex"]
    assert str(outcomes[2].error) == "script stopped: the USE at line 1 failed, so the 2 statement(s) after it " \
                                     "were not run"
    assert outcomes[2].results == []
    assert session.vindex.path == tiny_vindex  # the failed USE left the backend alone


def test_internal_errors_are_one_line(tiny_vindex, monkeypatch):
    session = session_on(tiny_vindex)

    def boom(ex, stmt):
        raise ValueError("broken\nacross lines")

    monkeypatch.setitem(HANDLERS, ast.ShowLayers, boom)
    monkeypatch.delenv("MODELQL_DEBUG", raising=False)
    assert error_of(session, "SHOW LAYERS") == "Error: internal error: ValueError: broken across lines"
    monkeypatch.setenv("MODELQL_DEBUG", "1")
    with pytest.raises(ValueError):
        run_batch("SHOW LAYERS", session)


def test_multiline_modelql_errors_become_one_line():
    err = ModelqlError("first line\n  second line")
    assert render.error_lines(err) == ["Error: first line second line"]
    assert render.error_lines(LqlExecutionError("x")) == ["Error: x"]


def test_parse_then_execute_is_the_batch_path(tiny_vindex):
    session = session_on(tiny_vindex)
    stmt = parse("SHOW LAYERS 0-0;")
    (r,) = Executor(session).execute(stmt)
    assert r.statement == stmt


# -- INFER / EXPLAIN INFER -------------------------------------------------------------------------

PRED_ROW = re.compile(r"^ ?\d+\. .+ \(\d+\.\d\d%\)$")


def test_infer_matches_transformers(tiny_vindex, tiny_model_dir):
    import torch
    import transformers as T

    from modelql.runtime import interp

    session = session_on(tiny_vindex)
    (r,) = run(session, 'INFER "The capital of France is" TOP 3')
    preds = r.value.predictions
    assert len(preds) == 3
    # independent reference: transformers on the original checkpoint, same token ids
    ids = interp.to_ids(session.model("INFER"), "The capital of France is")
    hf = T.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        probs = torch.softmax(hf(ids).logits[0, -1].double(), -1)
    top = torch.topk(probs, 3)
    assert [p.token_id for p in preds] == top.indices.tolist()
    assert [round(p.prob, 5) for p in preds] == [round(float(v), 5) for v in top.values]
    lines = render.lines(r)
    assert lines[0] == "Predictions (walk FFN):"
    assert all(PRED_ROW.match(line) for line in lines[1:4])
    assert re.fullmatch(r"\d+\.\dms", lines[4])
    assert lines[6] == "Inference trace (features that fired with attention):"
    assert all(re.match(r"^  L[01]: (\[[^\]]+\] )?F\d+ gate=[+-]\d+\.\d → .* \[.*\]$", line) for line in lines[7:])
    (c,) = run(session, 'INFER "The capital of France is" TOP 2 COMPARE')
    text = render.lines(c)
    assert "Predictions (dense):" in text
    assert [p.token_id for p in c.value.dense] == [p.token_id for p in c.value.predictions]


def test_infer_on_model_backend(tiny_model_dir):
    session = Session(default_vindex=False)
    run(session, f'USE MODEL "{tiny_model_dir}"')
    lines = out(session, 'INFER "Hello world"')
    assert lines[0] == "Predictions (dense — no vindex):"
    assert sum(1 for line in lines if PRED_ROW.match(line)) == 5
    assert lines[-1].startswith("Tip: ")
    assert error_of(session, 'EXPLAIN INFER "Hello"').startswith("Error: this operation requires a vindex.")


def test_explain_infer(tiny_vindex):
    session = session_on(tiny_vindex)
    lines = out(session, 'EXPLAIN INFER "The capital of France is" LAYERS 1-1 TOP 2')
    assert lines[0] == 'Inference trace for "The capital of France is":'
    assert re.fullmatch(r"Prediction: .+ \(\d+\.\d\d%\) in [\d.]+ms", lines[1])
    assert lines[2] == ""
    assert 1 <= len(lines[3:]) <= 2 and all(line.startswith("  L1: ") for line in lines[3:])
    att = out(session, 'EXPLAIN INFER "The capital of France is" WITH ATTENTION')
    assert [line.split()[0] for line in att[3:]] == ["L0", "L1"]
    assert all(re.search(r"\(\d+%\) → .* \(\d+\.\d%\)$", line) for line in att[3:])


def test_infer_needs_weights(tiny_browse_vindex):
    session = session_on(tiny_browse_vindex)
    for stmt, keyword in (('INFER "x"', "INFER"), ('EXPLAIN INFER "x"', "EXPLAIN INFER")):
        assert error_of(session, stmt).startswith(f"Error: {keyword} requires model weights.")
