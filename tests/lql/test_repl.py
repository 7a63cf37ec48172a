"""The LQL REPL: driven in a pseudo-terminal (pexpect) — a query, a Tab completion, errors,
multi-line input, Ctrl-C, history, exit — plus the completer and the plain (non-tty) loop."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from prompt_toolkit.document import Document

from modelql.lql.repl import LqlCompleter, meta_command, ready, scan
from modelql.lql.session import Session

pexpect = pytest.importorskip("pexpect")

PROMPT = "lql>"


@pytest.fixture
def repl(tiny_vindex, tmp_path):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", MODELQL_HISTORY=str(tmp_path / "hist"),
               MODELQL_CACHE=str(tmp_path / "cache"), MODELQL_DEBUG="", NO_COLOR="1")
    child = pexpect.spawn(sys.executable, ["-m", "modelql.cli", "repl", "--vindex", str(tiny_vindex)],
                          env=env, encoding="utf-8", dimensions=(50, 160), timeout=60)
    child.expect(PROMPT)
    yield child, tmp_path / "hist"
    if child.isalive():
        child.terminate(force=True)


def test_repl_in_a_pty(repl):
    child, history = repl
    # a query
    child.send("SHOW LAYERS;\r")
    child.expect("WithMeta")
    child.expect("L1")
    child.expect(PROMPT)
    # a completion: "SHOW LAY<Tab>" becomes SHOW LAYERS (else it would be a parse error)
    child.send("SHOW LAY")
    child.send("\t")
    child.expect("ERS")  # the completion's remainder is drawn after what was typed
    child.send(" 1-1;\r")
    child.expect("WithMeta")
    child.expect(PROMPT)
    assert "Error" not in child.before
    # errors: a parse error with its caret, then an execution error; the REPL carries on
    child.send('WALK "x" BOGUS;\r')
    child.expect("Error: Parse error at line 1, column 10: unexpected trailing token")
    child.expect(PROMPT)
    child.send('USE "nope.vindex";\r')
    child.expect("Error: vindex not found: nope.vindex")
    child.expect(PROMPT)
    # multi-line input: Enter inside an unfinished statement continues it
    child.send("SHOW\r")
    child.expect(r"\.\.\.>")
    child.send("LAYERS 0-0;\r")
    child.expect("WithMeta")
    child.expect(PROMPT)
    # Ctrl-C discards the partial statement
    child.send('DESCRIBE "unfinished')
    child.sendcontrol("c")
    child.expect(PROMPT)
    child.send("help\r")
    child.expect("statements end with")
    child.expect(PROMPT)
    # exit
    child.send("exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = history.read_text()
    assert "SHOW LAYERS;" in saved and "SHOW LAYERS 1-1;" in saved and "unfinished" not in saved


def test_repl_ctrl_d_exits(repl):
    child, _ = repl
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_plain_mode_reads_stdin(tiny_vindex, tmp_path):
    script = 'SHOW LAYERS\n 0-0;\nWALK "x" BOGUS;\nSHOW LAYERS 1-1;\nexit\nSHOW LAYERS;\n'
    env = dict(os.environ, MODELQL_HISTORY=str(tmp_path / "h"), MODELQL_DEBUG="")
    p = subprocess.run([sys.executable, "-m", "modelql.cli", "repl", "--vindex", str(tiny_vindex)], input=script,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert sum(1 for line in lines if "WithMeta" in line) == 2  # the statement after `exit` never ran
    assert any(line.startswith("Error: Parse error") for line in lines)
    assert "\x1b[" not in p.stdout  # no escape codes when not on a terminal


# -- pieces of the REPL ----------------------------------------------------------------------------


def completions(completer, text):
    return [c.text for c in completer.get_completions(Document(text), None)]


def test_keyword_completion():
    c = LqlCompleter(Session(default_vindex=False))
    assert completions(c, "SHOW LAY") == ["LAYERS"]
    assert completions(c, "desc") == ["describe"]
    assert set(completions(c, "")) >= {"DESCRIBE", "WALK", "SELECT", "SHOW", "USE", "TRACE"}
    assert "VERBOSE" in completions(c, 'DESCRIBE "France" ')
    assert completions(c, 'DESCRIBE "France" VERB') == ["VERBOSE"]
    assert "FROM" in completions(c, "SELECT * ")
    assert set(completions(c, "SELECT * FROM ")) == {"EDGES", "FEATURES", "ENTITIES"}
    assert completions(c, "STATS; SHOW MOD") == ["MODELS"]  # after a finished statement
    assert completions(c, "ex") == ["exit", "explain", "extract"]
    assert completions(c, "WALK 'a; b' TO") == ["TOP"]  # ';' inside a string is not a boundary
    assert completions(c, "BOGUS ") == []


def test_entity_completion_default_facts():
    c = LqlCompleter(Session())  # default session, nothing opened: the facts table's names
    got = completions(c, 'DESCRIBE "Fran')
    assert got[0] == 'France"'
    assert completions(c, "DESCRIBE 'Japa")[0] == "Japan'"
    assert "Paris\"" in completions(c, 'DESCRIBE "Pari')


def test_entity_completion_from_vocabulary(tiny_vindex):
    s = Session(default_vindex=False)
    s.use_vindex(tiny_vindex)
    c = LqlCompleter(s)
    names = c.entity_names()
    assert names and all(n.isalpha() and len(n) >= 3 for n in names)
    word = names[0]
    assert word + '"' in completions(c, 'DESCRIBE "' + word[:2])


def test_scan_and_ready():
    assert scan('STATS; DESCRIBE "x') == (6, 16)
    assert scan("DESCRIBE 'a\\'b") == (0, 9)
    assert scan("STATS -- 'not a string\n; W") == (24, None)
    assert ready("STATS") and ready("SHOW MODELS") and ready("SHOW LAYERS;") and ready("") and ready("quit")
    assert not ready("SHOW LAYERS") and not ready('DESCRIBE "a;') and not ready("SHOW LAYERS -- ;")
    assert [meta_command(t) for t in ("exit", "QUIT;", "\\q", "help", "\\?", "\\h", "clear", "STATS")] == \
        ["exit", "exit", "exit", "help", "help", "help", "clear", None]


def test_run_plain_in_process(tiny_vindex):
    from modelql.lql.repl import run

    s = Session(default_vindex=False)
    s.use_vindex(tiny_vindex)
    out = io.StringIO()
    run(s, stdin=io.StringIO("SHOW LAYERS 0-0;\nUSE \"nope\";\n"), stdout=out)
    text = out.getvalue()
    assert "WithMeta" in text and re.search(r"^Error: vindex not found: nope$", text, re.M)


def test_path_completion(tiny_vindex, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    import shutil

    shutil.copytree(tiny_vindex, tmp_path / "mine.vindex")
    c = LqlCompleter(Session(default_vindex=False, cwd=tmp_path))
    assert completions(c, 'USE "mi') == ['mine.vindex"']  # a vindex is a leaf, not a folder
    assert completions(c, 'USE MODEL "mod') == ["models/"]
    assert completions(c, f'STATS "{tmp_path}/no') == [f'{tmp_path}/notes.txt"']
    assert completions(c, "EXTRACT MODEL 'm' INTO 'mo") == ["models/"]
    assert 'mine.vindex"' not in completions(c, 'DESCRIBE "mi')  # entity strings are not paths
