"""`modelql chat` driven in a real terminal (pexpect on a pty): history recall with Up, Ctrl-C in the
middle of an answer stops it and keeps the conversation, slash commands never reach the model."""

from __future__ import annotations

import json
import os
import sys
import time

import pexpect
import pytest

from tests.runtime.tiny_tokenizer import make_model_with_tokenizer

PROMPT = ">>>"  # prompt_toolkit draws the trailing space as a cursor move


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny random model with a long context: it rarely emits EOS, so answers run long enough to
    interrupt."""
    d = tmp_path_factory.mktemp("chatmodel")
    make_model_with_tokenizer(d, "chatml", max_position=4096, seed=1)
    return d


def spawn(model_dir, tmp_path, *args):
    env = {**os.environ, "MODELQL_CACHE": str(tmp_path / "cache"), "TERM": "xterm", "COLUMNS": "120",
           "PROMPT_TOOLKIT_NO_CPR": "1",  # no cursor-position request racing the first keys typed
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = pexpect.spawn(sys.executable, ["-m", "modelql.cli", "chat", str(model_dir), *map(str, args)],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 120))
    child.expect_exact(PROMPT)
    return child


def saved(child, path) -> list[dict]:
    child.sendline(f"/save {path}")
    child.expect_exact("(saved ")
    child.expect_exact(PROMPT)
    return json.loads(path.read_text())


def interrupt(child):
    """Ctrl-C once the answer is streaming: the prompt comes back with the conversation kept."""
    time.sleep(2.0)
    child.sendintr()
    child.expect_exact("[interrupted: the partial answer stays")
    child.expect_exact(PROMPT)


def test_history_recall_and_ctrl_c_keeps_the_conversation(long_model, tmp_path):
    child = spawn(long_model, tmp_path, "-n", "3000", "--temperature", "1", "--seed", "1", "--ignore-eos")
    try:
        child.sendline("/help")
        child.expect_exact("/explain")
        child.expect_exact(PROMPT)
        child.send("first question\r")
        interrupt(child)
        # Up recalls the previous input (the history), Enter sends it again
        child.send("\x1b[A")
        child.expect_exact("first question")
        child.send("\r")
        interrupt(child)
        msgs = saved(child, tmp_path / "a.json")
        assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
        assert msgs[0]["content"] == msgs[2]["content"] == "first question"
        # the conversation goes on after the interruption; multi-line input with a trailing backslash
        child.send("line one\\\r")
        child.send("line two\r")
        interrupt(child)
        msgs = saved(child, tmp_path / "b.json")
        assert len(msgs) == 6 and msgs[4] == {"role": "user", "content": "line one\nline two"}
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(PROMPT)
        assert saved(child, tmp_path / "c.json") == []
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert (tmp_path / "cache" / "chat_history").read_text().count("first question") >= 1


def test_explain_the_last_answer_in_the_terminal(long_model, tmp_path):
    """`/explain N` after an answer: one row per answer token, in order, each with N features of the
    model's vindex (extracted on first use into the cache) — and the command never reaches the model."""
    import re

    from modelql.vindex import Vindex

    child = spawn(long_model, tmp_path, "-n", "4", "--temperature", "0", "--ignore-eos")
    try:
        child.sendline("/explain")
        child.expect_exact("nothing to explain yet")
        child.expect_exact(PROMPT)
        child.send("hello there\r")
        msgs = saved(child, tmp_path / "e.json")  # the answer is complete
        child.sendline("/explain 2")
        child.sendline("/explain two")
        child.expect_exact("usage: /explain [N]")  # everything /explain 2 printed came before
        shown = child.before
        child.expect_exact(PROMPT)
        assert saved(child, tmp_path / "f.json") == msgs
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert [m["role"] for m in msgs] == ["user", "assistant"]  # /explain was not a message
    rows = re.findall(r"^\s+('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\s+(L\d+:F\d+→.*?)\s*$", shown.replace("\r", ""),
                      re.MULTILINE)
    assert len(rows) == 4, shown
    import ast

    assert "".join(ast.literal_eval(tok) for tok, _ in rows) == msgs[1]["content"]
    vx = Vindex.load(next((tmp_path / "cache" / "vindex").glob("*.vindex")))
    for _, feats in rows:
        found = re.findall(r"L(\d+):F(\d+)→", feats)
        assert len(found) == 2
        for layer, feature in found:
            assert 0 <= int(layer) < vx.num_layers and 0 <= int(feature) < vx.num_features(int(layer))
