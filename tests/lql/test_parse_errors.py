"""Parse errors: one type (LqlParseError), spec §6 reasons, line/column and a caret."""

from __future__ import annotations

import pickle

import pytest

from modelql.errors import LqlParseError, ModelqlError
from modelql.lql import LqlSyntaxError, parse

INS = 'INSERT INTO EDGES (entity, relation, target) VALUES ("a", "b", "c")'

# (text, reason (exact unless it ends with "…", then a prefix), line, column)
ERRORS = [
    # unknown keyword -> names what was expected
    ('DESCRIB "France"', "expected statement keyword, got identifier DESCRIB (did you mean DESCRIBE?)", 1, 1),
    ("FOO", "expected statement keyword, got identifier FOO", 1, 1),
    ('WHERE "x"', "expected statement keyword, got keyword WHERE", 1, 1),
    ("", "expected statement keyword, got end of input", 1, 1),
    ("  -- only a comment\n", "expected statement keyword, got end of input", 1, 1),
    ('WALK "p" TOPP 3', "unexpected trailing token: identifier TOPP (did you mean TOP?)", 1, 10),
    ('SHOW RELATION', "expected RELATIONS, LAYERS, FEATURES, ENTITIES, MODELS, PATCHES, or COMPACT after SHOW, "
     "got keyword RELATION", 1, 6),
    ("SHOW foo", "expected RELATIONS, LAYERS, FEATURES, ENTITIES, MODELS, PATCHES, or COMPACT after SHOW, "
     "got identifier foo", 1, 6),
    ("COMPACT walk", "expected MINOR or MAJOR after COMPACT, got keyword WALK", 1, 9),
    ('WALK "p" MODE fast', "expected HYBRID, PURE, or DENSE, got identifier fast", 1, 15),
    (INS + " MODE = DENSE", "expected KNN or COMPOSE after MODE, got keyword DENSE", 1, 76),
    ('COMPILE CURRENT INTO VINDEX "o" ON CONFLICT KEEP_SOURCE',
     "expected LAST_WINS | HIGHEST_CONFIDENCE | FAIL after ON CONFLICT, got keyword KEEP_SOURCE", 1, 45),
    ('MERGE "a" ON CONFLICT FAIL',
     "expected KEEP_SOURCE, KEEP_TARGET, or HIGHEST_CONFIDENCE after ON CONFLICT, got keyword FAIL", 1, 23),
    ('COMPILE CURRENT INTO MODEL "o" ON CONFLICT FAIL', "ON CONFLICT is only valid for COMPILE INTO VINDEX", 1, 32),
    ('COMPILE CURRENT INTO TABLE "o"', "expected MODEL or VINDEX, got identifier TABLE", 1, 22),
    ('EXTRACT MODEL "m" INTO "o" COMPONENTS ffn_gate, attn_xx', "unknown component: attn_xx", 1, 49),
    ('EXTRACT MODEL "m" INTO "o" WITH BROWSE', "expected INFERENCE, ALL, WEIGHTS, or ATTENTION after WITH, "
     "got identifier BROWSE", 1, 33),
    ("INSERT INTO EDGES (entity, target, relation)", "expected 'relation', got identifier target", 1, 28),
    ("INSERT INTO EDGES (subject, relation, target)", "expected 'entity', got identifier subject", 1, 20),
    (INS + ",", "expected '(', got end of input", 1, 69),
    (INS + ', ("d", "e")', "expected ',', got ')'", 1, 79),
    # unterminated strings (either quote; across lines)
    ('DESCRIBE "France', "unterminated string literal", 1, 10),
    ("DESCRIBE 'France", "unterminated string literal", 1, 10),
    ('TRACE "p"\n  LAYERS 1-2\n  FOR "oops\nmore', "unterminated string literal", 3, 7),
    ('DESCRIBE "ends with a backslash\\', "unterminated string literal", 1, 10),
    ('DESCRIBE "escaped quote \\"', "unterminated string literal", 1, 10),
    # bad ranges
    ('WALK "p" LAYERS 27-14', "invalid range: start (27) > end (14)", 1, 17),
    ("SHOW LAYERS 5 - 4", "invalid range: start (5) > end (4)", 1, 13),
    ('WALK "p" LAYERS 3', "expected '-', got end of input", 1, 18),
    ('WALK "p" LAYERS 3-', "expected positive integer, got end of input", 1, 19),
    ('WALK "p" LAYERS -3-4', "expected layer range or ALL, got '-'", 1, 17),
    # trailing tokens
    ('STATS "a" "b"', 'unexpected trailing token: string "b"', 1, 11),
    ('WALK "p";;', "unexpected trailing token: ';'", 1, 10),
    ('WALK "p" |> WALK "q" |> WALK "r"', "unexpected trailing token: '|>'", 1, 22),
    ("SHOW MODELS 5", "unexpected trailing token: integer 5", 1, 13),
    ("SELECT * FROM EDGES WHERE a = 1 OR b = 2", "unexpected trailing token: keyword OR", 1, 33),
    ("SELECT * FROM EDGES LIMIT 5 ORDER BY x", "unexpected trailing token: keyword ORDER", 1, 29),
    ("STATS 1.", "unexpected trailing token: integer 1", 1, 7),
    ('DESCRIBE "x" VERBOSELY', "unexpected trailing token: identifier VERBOSELY (did you mean VERBOSE?)", 1, 14),
    # lexical errors
    ("STATS #", "unexpected character '#'", 1, 7),
    ('WALK "p" TOP @', "unexpected character '@'", 1, 14),
    ("DESCRIBE é", "unexpected character 'é'", 1, 10),
    ("STATS \x00", "unexpected character '\\x00'", 1, 7),
    ('WALK "p" | SHOW MODELS', "expected '>' after '|'", 1, 10),
    ("SELECT * FROM EDGES WHERE a ! 3", "expected '=' after '!'", 1, 29),
    # expected-X messages (spec §6 phrases)
    ("DESCRIBE France", "expected string literal, got identifier France", 1, 10),
    ("DESCRIBE", "expected string literal, got end of input", 1, 9),
    ("DIFF CURRENT 5", "expected string literal or CURRENT, got integer 5", 1, 14),
    ('WALK "p" TOP', "expected positive integer, got end of input", 1, 13),
    ('WALK "p" TOP -5', "expected positive integer, got '-'", 1, 14),
    ('WALK "p" TOP 5.5', "expected positive integer, got number 5.5", 1, 14),
    ('WALK "p" TOP "5"', 'expected positive integer, got string "5"', 1, 14),
    (INS + " CONFIDENCE high", "expected number, got identifier high", 1, 80),
    (INS + " CONFIDENCE -0.5", "expected number, got '-'", 1, 80),
    ("SELECT * FROM EDGES WHERE layer = ", "expected value, got end of input", 1, 34),
    ("SELECT * FROM EDGES WHERE layer = layer", "expected value, got keyword LAYER", 1, 35),
    ('SELECT * FROM EDGES WHERE x = - "a"', 'expected number, got string "a"', 1, 33),
    ("SELECT * FROM EDGES WHERE layer 5", "expected comparison operator, got integer 5", 1, 33),
    ("SELECT * FROM EDGES WHERE layer == 5", "expected value, got '='", 1, 34),
    ("SELECT * FROM EDGES WHERE = 5", "expected field name, got '='", 1, 27),
    ("SELECT FROM EDGES", "expected FROM or ',', got keyword EDGES", 1, 13),
    ("SELECT * FROM TABLES", "expected EDGES, ENTITIES, or FEATURES, got identifier TABLES", 1, 15),
    ('DESCRIBE "x" AT 5', "expected LAYER, got integer 5", 1, 17),
    ('DESCRIBE "x" RELATIONS', "expected ONLY, got end of input", 1, 23),
    ('UPDATE EDGES SET target = "x"', "expected WHERE or ',', got end of input", 1, 30),
    ("DELETE FROM EDGES", "expected WHERE, got end of input", 1, 18),
    ("SELECT * FROM EDGES WHERE x IN (1, 2", "expected ',' or ')', got end of input", 1, 37),
    # numbers out of range
    ('WALK "p" TOP 9223372036854775808', "invalid integer: 9223372036854775808…", 1, 14),
    ("SELECT * FROM EDGES WHERE x = " + "9" * 5000, "invalid integer: 999…", 1, 31),
    ("SELECT * FROM EDGES WHERE x = " + "9" * 400 + ".5", "invalid number: 999…", 1, 31),
    ("SELECT * FROM EDGES WHERE x IN " + "(" * 40 + ")" * 40, "value lists nested deeper than 32", 1, 39),
]


def _check(err: LqlParseError, text: str, reason: str, line: int, column: int) -> None:
    if reason.endswith("…"):
        assert err.reason.startswith(reason[:-1]), err.reason
    else:
        assert err.reason == reason
    assert (err.line, err.column) == (line, column)
    # position, line and column agree with the text
    assert text.count("\n", 0, err.position) + 1 == line
    assert err.position - (text.rfind("\n", 0, err.position) + 1) + 1 == column
    header, shown, caret = str(err).split("\n")
    assert header == f"Parse error at line {line}, column {column}: {err.reason}"
    assert err.source_line == text.split("\n")[line - 1]
    if len(err.source_line) <= 100 and err.source_line.isascii():
        assert shown == "  " + err.source_line.replace("\t", " ").replace("\x00", " ")
        assert caret == " " * (column + 1) + "^"


@pytest.mark.parametrize("text,reason,line,column", ERRORS, ids=[e[1][:50] for e in ERRORS])
def test_parse_error(text, reason, line, column):
    with pytest.raises(LqlParseError) as info:
        parse(text)
    err = info.value
    assert isinstance(err, LqlSyntaxError) and isinstance(err, ModelqlError)
    _check(err, text, reason, line, column)


def test_the_message_is_three_lines_with_a_caret_under_the_offending_token():
    with pytest.raises(LqlParseError) as info:
        parse('DESCRIBE "France" KNOWLEDGE\n  AT LAYER x')
    assert str(info.value) == (
        "Parse error at line 2, column 12: expected positive integer, got identifier x\n"
        "    AT LAYER x\n"
        "             ^"
    )


def test_caret_accounts_for_wide_characters():
    with pytest.raises(LqlParseError) as info:
        parse('WALK "東京" TOP x')
    _, shown, caret = str(info.value).split("\n")
    assert shown == '  WALK "東京" TOP x'
    # two display columns per CJK character: the caret sits under the x
    assert caret == " " * (2 + 6 + 4 + 6) + "^"


def test_long_lines_are_shown_as_a_window_around_the_error():
    text = 'WALK "' + "a" * 300 + '" TOP x -- ' + "b" * 300
    with pytest.raises(LqlParseError) as info:
        parse(text)
    err = info.value
    _, shown, caret = str(err).split("\n")
    assert len(shown) <= 2 + 100 + 2 and shown.startswith("  …") and shown.endswith("…")
    assert shown[caret.index("^")] == "x"


def test_tabs_keep_the_caret_aligned():
    with pytest.raises(LqlParseError) as info:
        parse('WALK\t"p"\tTOP\tx')
    _, shown, caret = str(info.value).split("\n")
    assert shown[caret.index("^")] == "x"


def test_error_is_picklable():
    with pytest.raises(LqlParseError) as info:
        parse("WALK 5")
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value) and copy.line == 1 and copy.column == 6
    assert copy.reason == info.value.reason


def test_non_str_input_is_a_type_error():
    with pytest.raises(TypeError):
        parse(b"STATS")  # type: ignore[arg-type]
