"""Batch splitting (spec §2), parse_script / parse_pieces, and the REPL completeness check."""

from __future__ import annotations

import pytest

from modelql.errors import LqlParseError
from modelql.lql import (
    LqlSyntaxError, Piece, parse_pieces, parse_script, split_statements, statement_complete,
)
from modelql.lql.ast import Describe, ShowModels, Stats, Verbosity, Walk


def texts(script: str) -> list[str]:
    return [p.text for p in split_statements(script)]


@pytest.mark.parametrize("script,expected", [
    ("STATS; SHOW MODELS;", ["STATS;", "SHOW MODELS;"]),
    ("STATS; SHOW MODELS", ["STATS;", "SHOW MODELS"]),  # the last ';' is optional
    ('DESCRIBE "a;b"; STATS', ['DESCRIBE "a;b";', "STATS"]),  # ';' inside double quotes
    ("DESCRIBE 'a;b' ; STATS", ["DESCRIBE 'a;b' ;", "STATS"]),  # ... and single quotes
    ('DESCRIBE "a\\";b"; STATS', ['DESCRIBE "a\\";b";', "STATS"]),  # escaped quote
    ("DESCRIBE 'a\\';b'; STATS", ["DESCRIBE 'a\\';b';", "STATS"]),
    ('DESCRIBE \'a"b;\'; STATS', ['DESCRIBE \'a"b;\';', "STATS"]),  # the other quote is inert
    ('DESCRIBE "a\\\\"; STATS', ['DESCRIBE "a\\\\";', "STATS"]),  # escaped backslash ends it
    ("STATS -- a comment; not a split\n; SHOW MODELS", ["STATS -- a comment; not a split\n;", "SHOW MODELS"]),
    ('DESCRIBE "-- not a comment"; STATS', ['DESCRIBE "-- not a comment";', "STATS"]),
    ("-- header\n\nSTATS;\n\n-- trailing comment\n", ["STATS;"]),  # comment-only pieces dropped
    (";;  ;\n-- x; y\n;", []),  # empty pieces dropped
    ("", []),
    ("   \n\t ", []),
    ('DESCRIBE "multi\nline;\nstring";\nSTATS;', ['DESCRIBE "multi\nline;\nstring";', "STATS;"]),
    ('STATS; DESCRIBE "unterminated; STATS;', ["STATS;", 'DESCRIBE "unterminated; STATS;']),
    ("WALK 'p' |> STATS; SHOW MODELS", ["WALK 'p' |> STATS;", "SHOW MODELS"]),
    ("WALK 'p' TOP 3-- c\n;", ["WALK 'p' TOP 3-- c\n;"]),
    ("a-b;-", ["a-b;", "-"]),
])
def test_split(script, expected):
    assert texts(script) == expected


def test_pieces_know_where_they_start():
    script = "STATS;\n  -- comment\n  DESCRIBE 'x;y'\n    VERBOSE;  SHOW MODELS"
    pieces = split_statements(script)
    assert pieces == [
        Piece("STATS;", 0, 1, 1),
        Piece("DESCRIBE 'x;y'\n    VERBOSE;", script.index("DESCRIBE"), 3, 3),
        Piece("SHOW MODELS", script.index("SHOW"), 4, 15),
    ]
    for p in pieces:
        assert script[p.start:p.start + len(p.text)] == p.text


def test_parse_script():
    script = """
    -- a session
    STATS;
    DESCRIBE 'France' VERBOSE; -- inline comment
    walk "a;b" top 3
    """
    assert parse_script(script) == [
        Stats(), Describe("France", verbosity=Verbosity.VERBOSE), Walk("a;b", top=3),
    ]


def test_parse_script_reports_positions_in_the_script():
    script = "STATS;\nSHOW MODELS;\n  WALK 'p' TOP x;\nSTATS;"
    with pytest.raises(LqlParseError) as info:
        parse_script(script)
    err = info.value
    assert (err.line, err.column) == (3, 16)
    assert str(err).split("\n")[1:] == ["    WALK 'p' TOP x;", " " * 17 + "^"]


def test_parse_pieces_keeps_going_after_an_error():
    script = "STATS; DESCRIB 'x'; SHOW MODELS; WALK 'unterminated"
    results = parse_pieces(script)
    assert [p.text for p, _ in results] == ["STATS;", "DESCRIB 'x';", "SHOW MODELS;", "WALK 'unterminated"]
    assert results[0][1] == Stats() and results[2][1] == ShowModels()
    bad = results[1][1]
    assert isinstance(bad, LqlSyntaxError) and (bad.line, bad.column) == (1, 8)
    assert bad.reason.startswith("expected statement keyword, got identifier DESCRIB")
    last = results[3][1]
    assert isinstance(last, LqlSyntaxError) and last.reason == "unterminated string literal"
    assert last.column == script.index("'unterminated") + 1


@pytest.mark.parametrize("buffer,complete", [
    ("STATS", True),
    ("stats", True),
    ("  Show\n  Models  ", True),
    ("SHOW MODELS -- list them", True),
    ("STATS;", True),
    ('STATS "p"', False),
    ('STATS "p";', True),
    ("DESCRIBE 'x'", False),
    ("DESCRIBE 'x';", True),
    ("DESCRIBE 'x';   \n", True),
    ("DESCRIBE 'x'; -- done", True),
    ("DESCRIBE 'x;'", False),
    ("DESCRIBE 'x -- ;", False),
    ("DESCRIBE 'x' -- ;", False),
    ("DESCRIBE\n'x'\nVERBOSE\n;", True),
    ("", False),
    ("-- nothing", False),
    ("SHOW", False),
    ("SHOW PATCHES", False),
])
def test_statement_complete(buffer, complete):
    assert statement_complete(buffer) is complete
