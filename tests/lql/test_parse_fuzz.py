"""Fuzzing the front end with hypothesis.

* Arbitrary text never makes ``parse`` raise anything but ``LqlParseError``, and every error
  carries a consistent position and a three-line message.
* Text assembled from LQL fragments (keywords, strings with escapes, numbers, ranges,
  punctuation, comments, bad characters) and mutations of valid statements reach deep into
  the grammar; whatever parses round-trips through the printer.
* Random ASTs of every statement class print to text that parses back to the same AST, alone,
  in pipes, and as batch scripts.
"""

from __future__ import annotations

import re
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelql.errors import LqlParseError
from modelql.lql import (
    CONTEXTUAL_WORDS, KEYWORDS, STATEMENT_KEYWORDS, LqlSyntaxError, ast, parse, parse_pieces, parse_script,
    split_statements, statement_complete, to_lql,
)

from .test_parse import CASES

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_outcome(text: str) -> None:
    """parse(text) returns a Statement that round-trips, or raises a well-formed LqlParseError."""
    try:
        stmt = parse(text)
    except LqlParseError as err:
        assert isinstance(err, LqlSyntaxError)
        assert 0 <= err.position <= len(text)
        assert err.line == text.count("\n", 0, err.position) + 1
        assert err.column == err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        lines = str(err).split("\n")
        assert len(lines) == 3
        assert lines[0] == f"Parse error at line {err.line}, column {err.column}: {err.reason}"
        assert lines[2].strip() == "^"
        assert err.reason and "\n" not in err.reason
    else:
        assert isinstance(stmt, ast.Statement)
        printed = to_lql(stmt)
        again = parse(printed)
        assert again == stmt and repr(again) == repr(stmt), printed


# ── arbitrary text ──────────────────────────────────────────────────────────────────────────


@FUZZ
@given(st.text())
def test_arbitrary_text_raises_only_parse_errors(text):
    check_outcome(text)


@FUZZ
@given(st.text(alphabet=string.printable))
def test_arbitrary_ascii_raises_only_parse_errors(text):
    check_outcome(text)


# ── text built from LQL fragments ───────────────────────────────────────────────────────────

_WORDS = sorted(KEYWORDS | CONTEXTUAL_WORDS)
keyword = st.sampled_from(_WORDS).flatmap(
    lambda w: st.sampled_from([w, w.lower(), w.capitalize()])
)
identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
string_body = st.lists(
    st.sampled_from(list("ab ;-'\"\n\t|é東") + ["\\\\", '\\"', "\\'", "\\n", "\\0", "\\x", "--"]),
    max_size=6,
).map("".join)
quoted = st.one_of(
    string_body.map(lambda s: '"' + s.replace('"', '\\"') + '"'),
    string_body.map(lambda s: "'" + s.replace("'", "\\'") + "'"),
    string_body.map(lambda s: '"' + s),  # often unterminated
)
number = st.one_of(
    st.integers(0, 40).map(str),
    st.integers(0, 2**70).map(str),
    st.floats(0, 1e6, allow_nan=False).map(lambda f: f"{f:.3f}"),
    st.sampled_from(["0.5", "1.", ".5", "007", "1.2.3", "9" * 30, "9" * 30 + ".5"]),
)
rng = st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda t: f"{t[0]}-{t[1]}")
punct = st.sampled_from(["*", ",", ";", "(", ")", ".", "=", "!=", ">", "<", ">=", "<=", "|>", "-",
                         "|", "!", "#", "@", "é", "\x00", "--c\n", "\n", "~"])
fragment = st.one_of(keyword, keyword, keyword, identifier, quoted, number, rng, punct)
separator = st.sampled_from([" ", " ", "", "\n", "\t", " -- note\n"])


@st.composite
def fragment_text(draw):
    """Random fragments, most often after a statement keyword (so parsing gets past it)."""
    head = draw(st.sampled_from(["", ""] + sorted(STATEMENT_KEYWORDS) + ["EXPLAIN WALK", "EXPLAIN INFER"]))
    parts = draw(st.lists(fragment, max_size=14))
    return head + " " + "".join(p + draw(separator) for p in parts)


@FUZZ
@given(fragment_text())
def test_fragment_text_raises_only_parse_errors(text):
    check_outcome(text)


# ── mutations of valid statements ───────────────────────────────────────────────────────────

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\d+\.\d+|\d+|\w+|\|>|[!<>]=|\S', re.S)
VALID = [text for text, _ in CASES]


@st.composite
def mutated_statement(draw):
    """A valid statement with 0-3 token-level edits, or a valid prefix plus random fragments."""
    tokens = _TOKEN.findall(draw(st.sampled_from(VALID)))
    if draw(st.booleans()):
        cut = draw(st.integers(1, len(tokens)))
        tokens = tokens[:cut] + draw(st.lists(fragment, max_size=4))
    for _ in range(draw(st.integers(0, 3))):
        if not tokens:
            break
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace"]))
        i = draw(st.integers(1, len(tokens))) - 1 if draw(st.booleans()) else len(tokens) - 1
        if op == "delete" and tokens:
            del tokens[i]
        elif op == "duplicate" and tokens:
            tokens.insert(i, tokens[i])
        elif op == "swap" and len(tokens) > 1:
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif op == "insert":
            tokens.insert(i + 1, draw(fragment))
        elif op == "replace" and tokens:
            tokens[i] = draw(fragment)
    return " ".join(tokens)


@FUZZ
@given(mutated_statement())
def test_mutated_statements_raise_only_parse_errors(text):
    check_outcome(text)


# ── random ASTs round-trip ──────────────────────────────────────────────────────────────────

text = st.text(max_size=12)
uint = st.one_of(st.integers(0, 100), st.integers(0, 2**63 - 1))
maybe_uint = st.none() | uint
pos_float = st.floats(min_value=0, allow_nan=False, allow_infinity=False).map(abs)
maybe_float = st.none() | pos_float
rng_ast = st.tuples(uint, uint).map(lambda t: ast.Range(min(t), max(t)))
maybe_range = st.none() | rng_ast
field_name = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.sampled_from(sorted(KEYWORDS | CONTEXTUAL_WORDS)),
).map(lambda f: f.lower() if f.upper() in KEYWORDS else f)
scalar = st.one_of(
    text,
    st.integers(-(2**63 - 1), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=8)
condition = st.builds(ast.Condition, field_name, st.sampled_from(ast.Op), value)
where = st.lists(condition, min_size=1, max_size=3).map(tuple)
maybe_where = st.just(()) | where
vref = st.one_of(text, st.just(ast.CURRENT))
band = st.none() | st.sampled_from(ast.Band)


@st.composite
def compile_stmt(draw):
    target = draw(st.sampled_from(ast.CompileTarget))
    conflict = draw(st.none() | st.sampled_from(ast.CompileConflict)) if target is ast.CompileTarget.VINDEX else None
    fmt = draw(st.none() | st.sampled_from(ast.OutputFormat))
    return ast.Compile(draw(vref), target, draw(text), format=fmt, on_conflict=conflict)


simple_statement = st.one_of(
    st.builds(ast.UseVindex, text),
    st.builds(ast.UseModel, text, st.booleans()),
    st.builds(ast.UseRemote, text),
    st.builds(ast.Extract, text, text,
              st.none() | st.lists(st.sampled_from(ast.Component), min_size=1, max_size=4).map(tuple),
              maybe_range, st.sampled_from(ast.ExtractLevel)),
    compile_stmt(),
    st.builds(ast.Diff, vref, vref, maybe_uint, st.none() | text, maybe_uint, st.none() | text),
    st.builds(ast.Stats, st.none() | text),
    st.builds(ast.Walk, text, maybe_uint, maybe_range, st.none() | st.sampled_from(ast.WalkMode), st.booleans()),
    st.builds(ast.Infer, text, maybe_uint, st.booleans()),
    st.builds(ast.Select, st.sampled_from(ast.SelectSource), st.lists(field_name, max_size=3).map(tuple),
              st.none() | st.builds(ast.Nearest, text, uint), maybe_where,
              st.none() | st.builds(ast.OrderBy, field_name, st.booleans()), maybe_uint),
    st.builds(ast.Describe, text, band, maybe_uint, st.booleans(), st.sampled_from(ast.Verbosity)),
    st.builds(ast.ExplainWalk, text, maybe_range, st.booleans(), maybe_uint),
    st.builds(ast.ExplainInfer, text, maybe_range, band, st.booleans(), maybe_uint, st.booleans(), st.booleans()),
    st.builds(ast.Trace, text, st.none() | text, st.booleans(), maybe_range,
              st.none() | st.sampled_from(ast.Positions), st.none() | text),
    st.builds(ast.Insert, st.lists(st.builds(ast.Fact, text, text, text), min_size=1, max_size=3).map(tuple),
              maybe_uint, maybe_float, maybe_float,
              st.none() | st.sampled_from(ast.InsertMode)),
    st.builds(ast.Delete, where),
    st.builds(ast.Update, st.lists(st.builds(ast.Assignment, field_name, value), min_size=1, max_size=3).map(tuple),
              where),
    st.builds(ast.Merge, text, st.none() | text, st.none() | st.sampled_from(ast.MergeConflict)),
    st.builds(ast.Rebalance, st.booleans(), maybe_uint, maybe_float, maybe_float),
    st.just(ast.CompactMinor()),
    st.builds(ast.CompactMajor, st.booleans(), maybe_float),
    st.builds(ast.ShowRelations, maybe_uint, st.booleans(), st.sampled_from(ast.Verbosity)),
    st.builds(ast.ShowLayers, maybe_range),
    st.builds(ast.ShowFeatures, uint, maybe_where, maybe_uint),
    st.builds(ast.ShowEntities, maybe_uint, maybe_uint),
    st.sampled_from([ast.ShowModels(), ast.ShowPatches(), ast.ShowCompactStatus()]),
    st.builds(ast.BeginPatch, text),
    st.builds(ast.SavePatch, st.none() | text),
    st.builds(ast.ApplyPatch, text),
    st.builds(ast.RemovePatch, text),
)
statement = st.one_of(simple_statement, st.builds(ast.Pipe, simple_statement, simple_statement))


def same(a, b) -> bool:
    return a == b and repr(a) == repr(b)


@settings(max_examples=600, deadline=None)
@given(statement)
def test_random_asts_round_trip(stmt):
    printed = to_lql(stmt)
    assert same(parse(printed), stmt), printed
    assert same(parse(printed + ";"), stmt)


@settings(max_examples=150, deadline=None)
@given(st.lists(simple_statement, max_size=6), st.sampled_from([";", "; ", ";\n", ";\n-- c;\n"]))
def test_random_scripts_split_and_parse(stmts, sep):
    script = sep.join(to_lql(s) for s in stmts)
    assert parse_script(script) == stmts
    assert len(split_statements(script)) == len(stmts)
    assert all(not isinstance(r, LqlParseError) for _, r in parse_pieces(script))
    if stmts:
        assert statement_complete(script + ";")


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("ab ;'\"\\-\n"))))
def test_splitting_arbitrary_text_covers_it(script):
    pieces = split_statements(script)
    for piece in pieces:
        assert script[piece.start:piece.start + len(piece.text)] == piece.text
        assert piece.text.strip()
    for _, result in parse_pieces(script):
        assert isinstance(result, (ast.Statement, LqlParseError))
    statement_complete(script)
