"""`modelql lql` (batch) and `modelql repl`: command bodies registered in `modelql.cli`.

    modelql lql 'STATS; DESCRIBE "France";'     statements from the argument
    modelql lql -f script.lql                   ... from a file ('-' = stdin)
    modelql repl                                interactive

Batch mode runs every statement in one session, prints each statement's output (a blank line
between statements), prints `Error: <message>` for a failing statement and carries on (except after a
failed USE: the script stops there), and
exits 1 if any statement failed. With no USE (and no --vindex) statements run against the
embedded default model's vindex, extracted into the cache on first use (progress on stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

VindexOpt = Annotated[
    Optional[str],
    typer.Option("--vindex", help="start with USE \"PATH\" (default: the embedded model's vindex)",
                 show_default=False),
]


def _session(vindex: str | None):
    from modelql.lql.session import Session

    session = Session()
    if vindex is not None:
        session.use_vindex(vindex)
    return session


def lql_command(
    script: Annotated[Optional[str], typer.Argument(help="LQL statements separated by ';'",
                                                    show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option("-f", "--file", help="read the statements from FILE ('-' = stdin)",
                                                 show_default=False)] = None,
    vindex: VindexOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object per statement on stdout: "
                                           "{statement, ok, results, error}")] = False,
) -> None:
    """Run LQL statements in batch mode."""
    from modelql.errors import ModelqlError
    from modelql.lql import render
    from modelql.lql.executor import run_batch

    if script is not None and file is not None:
        raise ModelqlError("give statements or -f FILE, not both")
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    elif script is not None:
        text = script
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise ModelqlError("no statements: give them as an argument, with -f FILE, or on stdin")
    session = _session(vindex)
    out = sys.stdout
    if json_out:
        _run_json(text, session, out)
        return
    state = {"printed": False}

    def separate() -> None:
        if state["printed"]:
            out.write("\n")
        state["printed"] = True

    def on_result(executed) -> None:
        lines = render.lines(executed)
        if lines:
            separate()
            out.write("\n".join(lines) + "\n")
            out.flush()

    failed = 0

    def on_outcome(outcome) -> None:
        nonlocal failed
        if outcome.error is not None:
            failed += 1
            if not outcome.results:
                separate()
            out.write("\n".join(render.error_lines(outcome.error)) + "\n")
            out.flush()

    run_batch(text, session, on_result=on_result, on_outcome=on_outcome)
    if failed:
        raise typer.Exit(1)


def to_jsonable(value):
    """A result value as JSON data: its `to_json()`, a dataclass's fields, else its text."""
    import dataclasses
    import enum

    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _run_json(text: str, session, out) -> None:
    """`modelql lql --json`: each statement as one JSON line (results as data, errors as text)."""
    import json

    from modelql.lql import render
    from modelql.lql.executor import run_batch

    failed = 0

    def on_outcome(o) -> None:
        nonlocal failed
        failed += not o.ok
        line = {"statement": o.piece.text.strip(), "ok": o.ok, "results": [to_jsonable(r.value) for r in o.results],
                "error": None if o.ok else render.error_lines(o.error)[0].removeprefix("Error: ")}
        out.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
        out.flush()

    run_batch(text, session, on_outcome=on_outcome)
    if failed:
        raise typer.Exit(1)


def repl_command(
    vindex: VindexOpt = None,
    history: Annotated[Optional[Path], typer.Option("--history", help="history file (default: "
                                                    "$MODELQL_HISTORY or <cache>/lql_history)",
                                                    show_default=False)] = None,
) -> None:
    """Query the model interactively in LQL."""
    from modelql.lql.repl import run

    code = run(_session(vindex), history=history)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("lql")(lql_command)
    app.command("repl")(repl_command)
