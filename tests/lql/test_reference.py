"""Issue 23, defect 8: the LQL reference (HELP, docs/lql.md, the REPL's help) from one source, SELECT's
column list and `WHERE target`, and the CLI's --version, `lql --json`, completion and `generate -`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelql.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _statement_rules() -> set[str]:
    from modelql.lql.parser import grammar_text

    m = re.search(r"\?statement:(.*?)\n\n", grammar_text(), re.S)
    return {r.strip() for r in m.group(1).replace("\n", " ").split("|")}


def test_every_statement_has_help_with_its_grammar_syntax():
    from modelql.lql.reference import ENTRIES, help_text, syntax

    covered = {e.rule for e in ENTRIES} | {"save_patch", "apply_patch", "remove_patch"}
    assert _statement_rules() <= covered, _statement_rules() - covered
    listing = str(help_text())
    for word in ("INSERT", "DELETE", "UPDATE", "BEGIN PATCH", "COMPILE", "DIFF", "MERGE", "DESCRIBE", "SELECT"):
        assert re.search(rf"^  {word}\b", listing, re.M), word
    for e in ENTRIES:
        assert syntax(e).startswith(f"{e.rule} ="), e.name
        text = str(help_text(e.name.lower()))
        assert syntax(e).splitlines()[0] in text and e.example in text


def test_docs_lql_md_is_generated_from_the_reference():
    from modelql.lql.reference import markdown

    assert (ROOT / "docs" / "lql.md").read_text(encoding="utf-8") == markdown(), \
        "regenerate: python -m modelql.lql.reference > docs/lql.md"


def test_docs_api_md_covers_every_route_and_the_extensions(ksrv):
    import httpx

    from modelql import extensions

    doc = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    paths = httpx.get(ksrv.url + "/openapi.json", timeout=30).json()["paths"]
    missing = [p for p in paths if f"`{p}`" not in doc]
    assert not missing, missing
    assert "`/v1/stream`" in doc and extensions.markdown_table() in doc


def test_help_is_not_lql_syntax():
    """HELP is a meta-statement: the parser (LARQL's accept/reject set) does not know it."""
    from modelql.errors import LqlSyntaxError
    from modelql.lql.parser import parse

    with pytest.raises(LqlSyntaxError):
        parse("HELP;")


def test_help_in_a_batch(tiny_vindex):
    from modelql.lql import render
    from modelql.lql.executor import run_batch
    from modelql.lql.session import Session

    s = Session(default_vindex=False)
    s.use_vindex(tiny_vindex)
    outcomes = run_batch("HELP; help insert; HELP nothing; SHOW LAYERS 0-0", s)
    assert [o.ok for o in outcomes] == [True, True, False, True]
    assert "DELETE" in "\n".join(render.lines(outcomes[0].results[0]))
    assert "INSERT INTO EDGES" in "\n".join(render.lines(outcomes[1].results[0]))
    assert "no help for 'nothing'" in str(outcomes[2].error)


def test_select_column_list_and_where_target(tiny_vindex):
    from modelql.lql import render
    from modelql.lql.executor import run_batch
    from modelql.lql.session import Session

    s = Session(default_vindex=False)
    s.use_vindex(tiny_vindex)
    (star,) = run_batch("SELECT * FROM EDGES LIMIT 3", s)
    token = star.results[0].value.rows[0].token
    (o,) = run_batch("SELECT target, layer FROM EDGES LIMIT 3", s)
    header = render.lines(o.results[0])[0].split()
    assert header == ["Target", "Layer"]
    (w,) = run_batch(f'SELECT layer, feature, target FROM EDGES WHERE target = "{token}" LIMIT 5', s)
    assert w.ok, w.error
    assert w.results[0].value.rows and all(r.token == token for r in w.results[0].value.rows)
    (bad,) = run_batch("SELECT nonsense FROM EDGES", s)
    assert "unknown column 'nonsense'" in str(bad.error)


def test_version_completion_and_lql_json(tiny_vindex):
    from modelql import __version__

    runner = CliRunner()
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"modelql {__version__}"
    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    r = runner.invoke(app, ["lql", "--json", "--vindex", str(tiny_vindex), "SHOW LAYERS 0-0; WALK 'x' BOGUS"])
    assert r.exit_code == 1
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert [x["ok"] for x in lines] == [True, False]
    assert isinstance(lines[0]["results"][0], (dict, list)) and lines[1]["error"].startswith("Parse error")


def test_generate_from_stdin_drops_the_trailing_newline(monkeypatch):
    """`echo "prompt" | modelql generate -` generates what `modelql generate "prompt"` does."""
    from modelql.defaults import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("embedded default model not installed")
    runner = CliRunner()
    args = ["generate", "--max-tokens", "4"]
    piped = runner.invoke(app, args + ["-"], input="The capital of France is\n")
    direct = runner.invoke(app, args + ["The capital of France is"])
    assert piped.exit_code == 0 and direct.exit_code == 0
    assert piped.stdout.strip() and piped.stdout == direct.stdout
