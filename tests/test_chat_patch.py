"""`--patch` / `/patch`: a saved .vlp patch changes what the chat and generate commands answer,
checked against the embedded model's ground truth (France → Paris before, Rome after)."""

from __future__ import annotations

import io
import os

from typer.testing import CliRunner

from modelql import defaults as D
from modelql.cli import app
from modelql.lql import render
from modelql.lql.executor import Executor
from modelql.lql.session import Session

QUESTION = "What is the capital of France?"


def test_patch_changes_the_answer(kmodel, kvindex, fast_memit, tmp_path, monkeypatch):
    from modelql.chat_repl import ChatSession, apply_patch
    from modelql.runtime.sampling import SamplingParams

    cache = os.environ["MODELQL_CACHE"]
    s = Session(default_vindex=False, cwd=tmp_path)
    for stmt in (f'USE "{kvindex.path}"', 'INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome")',
                 'SAVE PATCH "rome.vlp"'):
        [render.lines(r) for r in Executor(s).run(stmt)]
    patch = tmp_path / "rome.vlp"
    assert patch.is_file()
    monkeypatch.setenv("MODELQL_CACHE", cache)

    def answer(model) -> str:
        out = io.StringIO()
        chat = ChatSession(model, SamplingParams(temperature=0, max_tokens=12), out=out, err=io.StringIO(),
                           patcher=apply_patch)
        chat.handle(QUESTION)
        return out.getvalue()

    assert "Paris" in answer(kmodel) and "Rome" not in answer(kmodel)
    err = io.StringIO()
    chat = ChatSession(kmodel, SamplingParams(temperature=0, max_tokens=12), out=io.StringIO(), err=err,
                       patcher=apply_patch)
    chat.handle(f"/patch {patch}")
    assert "applied" in err.getvalue()
    assert "Rome" in answer(chat.model)
    chat.handle("/patch /nonexistent.vlp")
    assert "error: patch file not found" in err.getvalue()

    r = CliRunner().invoke(app, ["generate", "--chat", "-n", "12", "--patch", str(patch), QUESTION])
    assert r.exit_code == 0, r.output
    assert "Rome" in r.stdout
    assert D.entities()  # the question is about a fact the model was trained on
