"""Every statement form of the LQL spec parses to the expected AST and round-trips.

The table below is the conformance list: one row per statement form and per clause of the
spec's EBNF (every band, mode, conflict policy, SHOW form, pipes, negative numbers, escapes,
multi-line strings). Each row is checked twice: text -> AST, and AST -> text -> AST.
"""

from __future__ import annotations

import re

import pytest

from modelql.errors import LqlParseError
from modelql.lql import CONTEXTUAL_WORDS, KEYWORDS, STATEMENT_KEYWORDS, next_tokens, parse, to_lql
from modelql.lql.ast import (
    CURRENT, STATEMENT_TYPES, ApplyPatch, Assignment, Band, BeginPatch, CompactMajor,
    CompactMinor, Compile, CompileConflict, CompileTarget, Component, Condition, Delete,
    Describe, Diff, ExplainInfer, ExplainWalk, Extract, ExtractLevel, Fact, Infer, Insert, InsertMode,
    Merge, MergeConflict, Nearest, Op, OrderBy, OutputFormat, Pipe, Positions, Range, Rebalance,
    RemovePatch, SavePatch, Select, SelectSource, ShowCompactStatus, ShowEntities, ShowFeatures,
    ShowLayers, ShowModels, ShowPatches, ShowRelations, Stats, Statement, Trace, Update,
    UseModel, UseRemote, UseVindex, Verbosity, Walk, WalkMode,
)

E, F, N = SelectSource.EDGES, SelectSource.FEATURES, SelectSource.ENTITIES
INS = 'INSERT INTO EDGES (entity, relation, target) VALUES ("Atlantis", "capital", "Poseidonia")'


def ins(**kw) -> Insert:
    return Insert((Fact("Atlantis", "capital", "Poseidonia"),), **kw)


def cond(field, op, value) -> Condition:
    return Condition(field, Op(op), value)


CASES: list[tuple[str, Statement]] = [
    # ── USE ──
    ('USE "gemma3-4b.vindex"', UseVindex("gemma3-4b.vindex")),
    ('USE "hf://owner/repo@v1.0";', UseVindex("hf://owner/repo@v1.0")),
    ('USE MODEL "google/gemma-3-4b-it"', UseModel("google/gemma-3-4b-it")),
    ('USE MODEL "tiny" AUTO_EXTRACT;', UseModel("tiny", auto_extract=True)),
    ('USE REMOTE "http://127.0.0.1:8080"', UseRemote("http://127.0.0.1:8080")),
    # ── EXTRACT ──
    ('EXTRACT MODEL "m" INTO "m.vindex"', Extract("m", "m.vindex")),
    ('EXTRACT MODEL "m" INTO "o" COMPONENTS FFN_GATE, FFN_DOWN, FFN_UP, EMBEDDINGS, ATTN_OV, ATTN_QK',
     Extract("m", "o", components=tuple(Component))),
    ('EXTRACT MODEL "m" INTO "o" COMPONENTS ffn_gate', Extract("m", "o", components=(Component.FFN_GATE,))),
    ('EXTRACT MODEL "m" INTO "o" LAYERS 0-5', Extract("m", "o", layers=Range(0, 5))),
    ('EXTRACT MODEL "m" INTO "o" WITH INFERENCE', Extract("m", "o", level=ExtractLevel.INFERENCE)),
    ('EXTRACT MODEL "m" INTO "o" WITH WEIGHTS', Extract("m", "o", level=ExtractLevel.INFERENCE)),
    ('EXTRACT MODEL "m" INTO "o" WITH ALL', Extract("m", "o", level=ExtractLevel.ALL)),
    ('EXTRACT MODEL "m" INTO "o" WITH ATTENTION', Extract("m", "o", level=ExtractLevel.ATTENTION)),
    ('EXTRACT MODEL "m" INTO "o" WITH ALL LAYERS 2 - 3 COMPONENTS attn_qk',  # any order
     Extract("m", "o", components=(Component.ATTN_QK,), layers=Range(2, 3), level=ExtractLevel.ALL)),
    ('EXTRACT MODEL "m" INTO "o" WITH ALL WITH INFERENCE',  # a repeat overrides
     Extract("m", "o", level=ExtractLevel.INFERENCE)),
    # ── COMPILE ──
    ('COMPILE CURRENT INTO VINDEX "out.vindex"', Compile(CURRENT, CompileTarget.VINDEX, "out.vindex")),
    ('COMPILE "a.vindex" INTO MODEL "out"', Compile("a.vindex", CompileTarget.MODEL, "out")),
    ('COMPILE CURRENT INTO MODEL "out" FORMAT SAFETENSORS',
     Compile(CURRENT, CompileTarget.MODEL, "out", format=OutputFormat.SAFETENSORS)),
    ('COMPILE CURRENT INTO MODEL "out" FORMAT GGUF',
     Compile(CURRENT, CompileTarget.MODEL, "out", format=OutputFormat.GGUF)),
    ('COMPILE CURRENT INTO VINDEX "o" ON CONFLICT LAST_WINS',
     Compile(CURRENT, CompileTarget.VINDEX, "o", on_conflict=CompileConflict.LAST_WINS)),
    ('COMPILE CURRENT INTO VINDEX "o" ON CONFLICT HIGHEST_CONFIDENCE',
     Compile(CURRENT, CompileTarget.VINDEX, "o", on_conflict=CompileConflict.HIGHEST_CONFIDENCE)),
    ('compile current into vindex "o" format safetensors on conflict fail;',
     Compile(CURRENT, CompileTarget.VINDEX, "o", format=OutputFormat.SAFETENSORS,
             on_conflict=CompileConflict.FAIL)),
    # ── DIFF ──
    ('DIFF "a.vindex" "b.vindex"', Diff("a.vindex", "b.vindex")),
    ('DIFF "a" CURRENT LAYER 26 RELATION "capital" LIMIT 50',
     Diff("a", CURRENT, layer=26, relation="capital", limit=50)),
    ('DIFF CURRENT "b" RELATIONS "language"', Diff(CURRENT, "b", relation="language")),
    ('DIFF "a" "b" LIMIT 3 LAYER 2 INTO PATCH "d.vlp"', Diff("a", "b", layer=2, limit=3, into_patch="d.vlp")),
    ('DIFF "a" "b" INTO PATCH "p.vlp"', Diff("a", "b", into_patch="p.vlp")),
    # ── STATS ──
    ("STATS", Stats()),
    ("stats;", Stats()),
    ('STATS "other.vindex"', Stats("other.vindex")),
    # ── WALK ──
    ('WALK "The capital of France is"', Walk("The capital of France is")),
    ('WALK "p" TOP 5', Walk("p", top=5)),
    ('WALK "p" LAYERS 14-27', Walk("p", layers=Range(14, 27))),
    ('WALK "p" LAYERS ALL', Walk("p")),
    ('WALK "p" MODE HYBRID', Walk("p", mode=WalkMode.HYBRID)),
    ('WALK "p" MODE PURE', Walk("p", mode=WalkMode.PURE)),
    ('WALK "p" MODE DENSE', Walk("p", mode=WalkMode.DENSE)),
    ('WALK "p" COMPARE', Walk("p", compare=True)),
    ('walk "p" compare mode pure layers 0-3 top 7 top 8;',
     Walk("p", top=8, layers=Range(0, 3), mode=WalkMode.PURE, compare=True)),
    # ── INFER ──
    ('INFER "The capital of France is"', Infer("The capital of France is")),
    ('INFER "p" TOP 3 COMPARE', Infer("p", top=3, compare=True)),
    ('INFER "p" COMPARE TOP 10', Infer("p", top=10, compare=True)),
    # ── SELECT ──
    ("SELECT * FROM EDGES", Select(E)),
    ("SELECT entity, relation, target FROM EDGES", Select(E, fields=("entity", "relation", "target"))),
    ("SELECT * FROM FEATURES", Select(F)),
    ("SELECT * FROM ENTITIES", Select(N)),
    ('SELECT * FROM EDGES NEAREST TO "France" AT LAYER 26', Select(E, nearest=Nearest("France", 26))),
    ('SELECT * FROM EDGES WHERE entity = "France"', Select(E, where=(cond("entity", "=", "France"),))),
    ('SELECT * FROM EDGES WHERE entity = "France" AND relation = "capital" LIMIT 5',
     Select(E, where=(cond("entity", "=", "France"), cond("relation", "=", "capital")), limit=5)),
    ("SELECT * FROM EDGES WHERE layer != 3 AND score > -2.5 AND score < 1 AND layer >= 2 AND layer <= 9",
     Select(E, where=(cond("layer", "!=", 3), cond("score", ">", -2.5), cond("score", "<", 1),
                      cond("layer", ">=", 2), cond("layer", "<=", 9)))),
    ('SELECT * FROM EDGES WHERE relation LIKE "cap%"', Select(E, where=(cond("relation", "LIKE", "cap%"),))),
    ('SELECT * FROM EDGES WHERE layer IN (1, 2, -3) AND entity IN ("a", \'b\') AND x IN ()',
     Select(E, where=(cond("layer", "IN", (1, 2, -3)), cond("entity", "IN", ("a", "b")),
                      cond("x", "IN", ())))),
    ("SELECT * FROM EDGES WHERE x IN ((1, 2.5), (-0.5, \"z\"))",
     Select(E, where=(cond("x", "IN", ((1, 2.5), (-0.5, "z"))),))),
    ("SELECT * FROM EDGES WHERE score > - 2", Select(E, where=(cond("score", ">", -2),))),
    ("SELECT * FROM EDGES WHERE LAYER = 26 AND CONFIDENCE > 0.5 AND RELATION = 'x'",  # keyword fields
     Select(E, where=(cond("layer", "=", 26), cond("confidence", ">", 0.5), cond("relation", "=", "x")))),
    ("SELECT * FROM EDGES ORDER BY confidence", Select(E, order_by=OrderBy("confidence"))),
    ("SELECT * FROM EDGES ORDER BY c_score ASC", Select(E, order_by=OrderBy("c_score"))),
    ("SELECT * FROM EDGES ORDER BY LAYER DESC", Select(E, order_by=OrderBy("layer", descending=True))),
    ('SELECT Layer_2, MyField, entity, target, vindex, last FROM FEATURES WHERE token = "Paris" '
     'ORDER BY feature DESC LIMIT 34',
     Select(F, fields=("Layer_2", "MyField", "entity", "target", "vindex", "last"),
            where=(cond("token", "=", "Paris"),), order_by=OrderBy("feature", True), limit=34)),
    ('select * from entities where layer = 26 limit 50',
     Select(N, where=(cond("layer", "=", 26),), limit=50)),
    ('SELECT * FROM EDGES NEAREST TO "France" AT LAYER 26 WHERE layer = 26 ORDER BY layer LIMIT 5',
     Select(E, nearest=Nearest("France", 26), where=(cond("layer", "=", 26),),
            order_by=OrderBy("layer"), limit=5)),
    # ── DESCRIBE ──
    ('DESCRIBE "France"', Describe("France")),
    ('DESCRIBE "France" ALL LAYERS', Describe("France", band=Band.ALL)),
    ('DESCRIBE "France" SYNTAX', Describe("France", band=Band.SYNTAX)),
    ('DESCRIBE "France" KNOWLEDGE', Describe("France", band=Band.KNOWLEDGE)),
    ('DESCRIBE "France" OUTPUT', Describe("France", band=Band.OUTPUT)),
    ('DESCRIBE "France" AT LAYER 26', Describe("France", layer=26)),
    ('DESCRIBE "France" RELATIONS ONLY', Describe("France", relations_only=True)),
    ('DESCRIBE "France" VERBOSE', Describe("France", verbosity=Verbosity.VERBOSE)),
    ('DESCRIBE "France" BRIEF', Describe("France")),
    ('DESCRIBE "France" RAW', Describe("France", verbosity=Verbosity.RAW)),
    ("describe 'France' raw relations only at layer 3 output verbose;",
     Describe("France", band=Band.OUTPUT, layer=3, relations_only=True, verbosity=Verbosity.VERBOSE)),
    # ── EXPLAIN ──
    ('EXPLAIN WALK "The capital of France is"', ExplainWalk("The capital of France is")),
    ('EXPLAIN WALK "p" LAYERS 20-27 VERBOSE TOP 3', ExplainWalk("p", layers=Range(20, 27), verbose=True, top=3)),
    ('EXPLAIN INFER "p"', ExplainInfer("p")),
    ('EXPLAIN INFER "p" LAYERS 1-2 KNOWLEDGE VERBOSE TOP 4 RELATIONS ONLY WITH ATTENTION',
     ExplainInfer("p", layers=Range(1, 2), band=Band.KNOWLEDGE, verbose=True, top=4,
                  relations_only=True, with_attention=True)),
    ('EXPLAIN INFER "p" ALL LAYERS', ExplainInfer("p", band=Band.ALL)),
    ('EXPLAIN INFER "p" SYNTAX', ExplainInfer("p", band=Band.SYNTAX)),
    ('EXPLAIN INFER "p" OUTPUT WITH ATTENTION', ExplainInfer("p", band=Band.OUTPUT, with_attention=True)),
    # ── TRACE ──
    ('TRACE "The capital of France is"', Trace("The capital of France is")),
    ('TRACE "p" FOR "Paris"', Trace("p", answer="Paris")),
    ('TRACE "p" DECOMPOSE LAYERS 20-33', Trace("p", decompose=True, layers=Range(20, 33))),
    ('TRACE "p" POSITIONS ALL SAVE "t.bin"', Trace("p", positions=Positions.ALL, save="t.bin")),
    ('TRACE "p" POSITIONS LAST', Trace("p", positions=Positions.LAST)),
    ('TRACE "p" POSITIONS', Trace("p", positions=Positions.LAST)),
    ('TRACE "p" POSITIONS DECOMPOSE', Trace("p", decompose=True, positions=Positions.LAST)),
    ('trace "p" save "x" positions all for "Paris";',
     Trace("p", answer="Paris", positions=Positions.ALL, save="x")),
    # ── INSERT ──
    (INS, ins()),
    (INS + " AT LAYER 24", ins(layer=24)),
    (INS + " CONFIDENCE 1", ins(confidence=1.0)),
    (INS + " CONFIDENCE 0.95", ins(confidence=0.95)),
    (INS + " ALPHA 0.1", ins(alpha=0.1)),
    (INS + " MODE KNN", ins(mode=InsertMode.KNN)),
    (INS + " mode memit", ins(mode=InsertMode.MEMIT)),
    (INS + " MODE COMPOSE", ins(mode=InsertMode.COMPOSE)),
    (INS + " MODE = compose ALPHA 0.25 CONFIDENCE 0.9 AT LAYER 20;",
     ins(layer=20, confidence=0.9, alpha=0.25, mode=InsertMode.COMPOSE)),
    (INS + ', ("Lemuria", "capital", "Mu") MODE MEMIT',
     Insert((Fact("Atlantis", "capital", "Poseidonia"), Fact("Lemuria", "capital", "Mu")), mode=InsertMode.MEMIT)),
    ("insert into edges (ENTITY, Relation, target) values ('a', 'b', 'c')", Insert((Fact("a", "b", "c"),))),
    # ── DELETE / UPDATE ──
    ('DELETE FROM EDGES WHERE entity = "France"', Delete((cond("entity", "=", "France"),))),
    ("DELETE FROM EDGES WHERE layer = 26 AND feature = 8821",
     Delete((cond("layer", "=", 26), cond("feature", "=", 8821)))),
    ('DELETE FROM EDGES WHERE relation != "capital"', Delete((cond("relation", "!=", "capital"),))),
    ('UPDATE EDGES SET target = "Lyon" WHERE entity = "France"',
     Update((Assignment("target", "Lyon"),), (cond("entity", "=", "France"),))),
    ('UPDATE EDGES SET top_token = "x", confidence = 0.5, c_score = -1 WHERE layer = 3 AND feature = 5',
     Update((Assignment("top_token", "x"), Assignment("confidence", 0.5), Assignment("c_score", -1)),
            (cond("layer", "=", 3), cond("feature", "=", 5)))),
    # ── MERGE ──
    ('MERGE "src.vindex"', Merge("src.vindex")),
    ('MERGE "src" INTO "dst"', Merge("src", "dst")),
    ('MERGE "src" ON CONFLICT KEEP_SOURCE', Merge("src", on_conflict=MergeConflict.KEEP_SOURCE)),
    ('MERGE "src" INTO "dst" ON CONFLICT KEEP_TARGET',
     Merge("src", "dst", on_conflict=MergeConflict.KEEP_TARGET)),
    ('MERGE "src" ON CONFLICT HIGHEST_CONFIDENCE', Merge("src", on_conflict=MergeConflict.HIGHEST_CONFIDENCE)),
    # ── REBALANCE ──
    ("REBALANCE", Rebalance()),
    ("REBALANCE UNTIL CONVERGED MAX 16 FLOOR 0.30 CEILING 0.9",
     Rebalance(until_converged=True, max_iterations=16, floor=0.3, ceiling=0.9)),
    ("rebalance ceiling = 1 floor = 0", Rebalance(floor=0.0, ceiling=1.0)),
    # ── COMPACT ──
    ("COMPACT MINOR", CompactMinor()),
    ("COMPACT MAJOR", CompactMajor()),
    ("COMPACT MAJOR FULL", CompactMajor(full=True)),
    ("COMPACT MAJOR ALL", CompactMajor(full=True)),
    ("compact major full with lambda = 0.001", CompactMajor(full=True, lambda_=0.001)),
    ("COMPACT MAJOR WITH LAMBDA = 1", CompactMajor(lambda_=1.0)),
    # ── SHOW ──
    ("SHOW RELATIONS", ShowRelations()),
    ("SHOW RELATIONS AT LAYER 26 WITH EXAMPLES VERBOSE",
     ShowRelations(layer=26, with_examples=True, verbosity=Verbosity.VERBOSE)),
    ("SHOW RELATIONS BRIEF", ShowRelations()),
    ("SHOW RELATIONS RAW WITH EXAMPLES", ShowRelations(with_examples=True, verbosity=Verbosity.RAW)),
    ("SHOW LAYERS", ShowLayers()),
    ("SHOW LAYERS 0-5", ShowLayers(Range(0, 5))),
    ("SHOW LAYERS RANGE 10 - 12", ShowLayers(Range(10, 12))),
    ("SHOW FEATURES 26", ShowFeatures(26)),
    ('SHOW FEATURES 26 WHERE token = "Paris" AND confidence >= 0.2 LIMIT 10',
     ShowFeatures(26, where=(cond("token", "=", "Paris"), cond("confidence", ">=", 0.2)), limit=10)),
    ('SHOW FEATURES 3 WHERE relation = "capital"', ShowFeatures(3, where=(cond("relation", "=", "capital"),))),
    ("SHOW FEATURES 3 LIMIT 4", ShowFeatures(3, limit=4)),
    ("SHOW ENTITIES", ShowEntities()),
    ("SHOW ENTITIES 26", ShowEntities(layer=26)),
    ("SHOW ENTITIES AT LAYER 26 LIMIT 10", ShowEntities(layer=26, limit=10)),
    ("SHOW ENTITIES LIMIT 10", ShowEntities(limit=10)),
    ("SHOW MODELS", ShowModels()),
    ("SHOW PATCHES", ShowPatches()),
    ("SHOW COMPACT STATUS", ShowCompactStatus()),
    # ── patches ──
    ('BEGIN PATCH "facts.vlp"', BeginPatch("facts.vlp")),
    ("SAVE PATCH", SavePatch()),
    ('SAVE PATCH "out.vlp";', SavePatch("out.vlp")),
    ('APPLY PATCH "facts.vlp"', ApplyPatch("facts.vlp")),
    ('REMOVE PATCH "facts.vlp"', RemovePatch("facts.vlp")),
    # ── pipes ──
    ('WALK "p" TOP 5 |> EXPLAIN WALK "p"', Pipe(Walk("p", top=5), ExplainWalk("p"))),
    ('USE "a.vindex"; |> STATS;', Pipe(UseVindex("a.vindex"), Stats())),
    ("STATS|>SHOW MODELS", Pipe(Stats(), ShowModels())),
    # ── lexical: case, comments, strings, escapes, numbers ──
    ('wAlK "p" ToP 3', Walk("p", top=3)),
    ('-- a comment\nDESCRIBE "x" -- another; with a semicolon\n  VERBOSE -- end', Describe("x", verbosity=Verbosity.VERBOSE)),
    ('DESCRIBE "a -- not a comment; nor a split"', Describe("a -- not a comment; nor a split")),
    (r'DESCRIBE "q\"uote \\ back \n nl \t tab \r cr \0 nul \x \' single"',
     Describe("q\"uote \\ back \n nl \t tab \r cr \0 nul x ' single")),
    (r"DESCRIBE 'it\'s \"fine\"'", Describe("it's \"fine\"")),
    ('DESCRIBE "line one\nline two\n\tindented"', Describe("line one\nline two\n\tindented")),
    ("DESCRIBE ''", Describe("")),
    ('DESCRIBE "Zürich 東京 🙂"', Describe("Zürich 東京 🙂")),
    ("WALK \"p\"\n\tTOP\r\n 007\fLAYERS 0 -\n 5", Walk("p", top=7, layers=Range(0, 5))),
    ("SELECT * FROM EDGES WHERE x = 0.001 AND y = -0.5 AND z = 12.0", Select(E, where=(
        cond("x", "=", 0.001), cond("y", "=", -0.5), cond("z", "=", 12.0)))),
    ("SELECT * FROM EDGES WHERE x = 9223372036854775807 AND y = -9223372036854775807", Select(E, where=(
        cond("x", "=", 2**63 - 1), cond("y", "=", -(2**63 - 1))))),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:60] for c in CASES])
def test_parses_to_expected_ast(text, expected):
    got = parse(text)
    assert got == expected
    assert repr(got) == repr(expected)  # also distinguishes 1 from 1.0 and str from Token


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:60] for c in CASES])
def test_round_trips_through_the_printer(text, expected):
    printed = to_lql(expected)
    assert "\n" not in printed  # canonical text is one line, even for multi-line strings
    again = parse(printed)
    assert again == expected and repr(again) == repr(expected)
    assert to_lql(again) == printed  # printing is a fixpoint
    assert parse(to_lql(expected, semicolon=True)) == expected


def test_every_statement_class_is_in_the_table():
    seen = {type(stmt) for _, stmt in CASES}
    seen |= {type(s.left) for _, s in CASES if isinstance(s, Pipe)}
    missing = {cls.__name__ for cls in STATEMENT_TYPES} - {cls.__name__ for cls in seen}
    assert not missing


def _words(text: str) -> set[str]:
    no_strings = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|--[^\n]*', " ", text, flags=re.S)
    return {w.upper() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", no_strings)}


def test_every_keyword_is_exercised_by_the_table():
    used = set().union(*(_words(text) for text, _ in CASES))
    unsupported = {"OR", "NOT", "BETWEEN"}  # reserved by the spec, no statement uses them
    assert KEYWORDS - used == unsupported
    assert CONTEXTUAL_WORDS <= used


SPEC_RESERVED = """EXTRACT COMPILE DIFF USE WALK SELECT DESCRIBE EXPLAIN INSERT DELETE UPDATE MERGE
SHOW STATS FROM INTO WHERE AND OR NOT IN LIKE BETWEEN ORDER BY ASC DESC LIMIT TOP LAYERS MODE COMPARE
AT LAYER CONFIDENCE MODEL EDGES ENTITIES RELATION RELATIONS FEATURES MODELS FORMAT COMPONENTS ON
CONFLICT KEEP_SOURCE KEEP_TARGET HIGHEST_CONFIDENCE LAST_WINS FAIL SET VALUES CURRENT WITH EXAMPLES
ONLY VERBOSE RANGE ALL NEAREST TO PURE HYBRID DENSE SAFETENSORS GGUF AUTO_EXTRACT FFN_GATE FFN_DOWN
FFN_UP EMBEDDINGS ATTN_OV ATTN_QK INFER SYNTAX KNOWLEDGE OUTPUT WEIGHTS INFERENCE BEGIN SAVE APPLY
REMOVE PATCH PATCHES REMOTE TRACE FOR DECOMPOSE POSITIONS BRIEF RAW ATTENTION ALPHA KNN COMPOSE
REBALANCE FLOOR CEILING MAX UNTIL CONVERGED COMPACT STATUS""".split()


def test_reserved_words_are_the_specs():
    assert KEYWORDS == frozenset(SPEC_RESERVED)
    # the spec's contextual words, plus modelql's MODE MEMIT
    assert CONTEXTUAL_WORDS == {"VINDEX", "MINOR", "MAJOR", "FULL", "LAMBDA", "LAST", "ENTITY", "TARGET", "MEMIT"}


def test_statement_keywords_are_what_the_grammar_accepts_first():
    from modelql.lql.parser import _get_parser

    assert _get_parser().parse_interactive("").accepts() == set(STATEMENT_KEYWORDS)


@pytest.mark.parametrize("spelling", ["walk", "WALK", "Walk", "wAlK"])
def test_keywords_are_case_insensitive(spelling):
    assert parse(f'{spelling} "p"') == Walk("p")


@pytest.mark.parametrize("word", sorted(KEYWORDS))
def test_any_keyword_is_a_field_name_lowercased(word):
    stmt = parse(f"SELECT {word} FROM EDGES WHERE {word.capitalize()} = 1 ORDER BY {word} DESC")
    assert stmt == Select(E, fields=(word.lower(),), where=(cond(word.lower(), "=", 1),),
                          order_by=OrderBy(word.lower(), True))


def test_identifiers_keep_their_case():
    assert parse("SELECT Foo_1, bAR FROM EDGES").fields == ("Foo_1", "bAR")


def test_a_keyword_prefix_is_an_identifier():
    # `walker` is an identifier, not WALK + `er`; `layers2` is not LAYERS
    assert parse("SELECT walker, layers2, _x FROM EDGES").fields == ("walker", "layers2", "_x")


def test_keyword_case_folding_is_ascii_only():
    # U+017F (long s) case-folds to "s" in Unicode; LQL keywords are ASCII
    with pytest.raises(LqlParseError, match="unexpected character 'ſ'"):
        parse("ſelect * FROM EDGES")
    with pytest.raises(LqlParseError, match="unexpected character"):
        parse("WALK \"p\" \u212aOP 3")  # Kelvin sign


def test_dash_dash_is_always_a_comment_outside_strings():
    # `--` starts a comment even right after a number: this is WALK "p" TOP 5
    assert parse('WALK "p" TOP 5--3') == Walk("p", top=5)


def test_numbers_in_number_positions_are_floats_and_values_keep_their_type():
    stmt = parse(INS + " CONFIDENCE 1 ALPHA 2")
    assert type(stmt.confidence) is float and type(stmt.alpha) is float
    where = parse("SELECT * FROM EDGES WHERE a = 1 AND b = 1.0 AND c = -1 AND d = -1.0").where
    assert [type(c.value) for c in where] == [int, float, int, float]


def test_strings_in_the_ast_are_plain_str():
    stmt = parse("SELECT name FROM EDGES WHERE e = 'x'")
    assert type(stmt.fields[0]) is str and type(stmt.where[0].value) is str


def test_printer_output_is_canonical():
    assert to_lql(parse("walk 'p' compare mode pure layers 0-3 top 7")) == \
        'WALK "p" TOP 7 LAYERS 0-3 MODE PURE COMPARE'
    assert to_lql(parse("describe 'a\"b' verbose knowledge")) == 'DESCRIBE "a\\"b" KNOWLEDGE VERBOSE'
    assert to_lql(parse("stats |> show models"), semicolon=True) == "STATS |> SHOW MODELS;"
    assert to_lql(parse(INS)) == INS
    assert to_lql(parse(INS + " mode = knn")) == INS + " MODE KNN"


@pytest.mark.parametrize("value,text", [
    (1e-7, "0.0000001"), (1e22, "10000000000000000000000.0"), (0.1, "0.1"), (-2.5, "-2.5"),
    (3.0, "3.0"), (5e-324, "0." + "0" * 323 + "5"),
])
def test_floats_print_in_plain_decimal(value, text):
    stmt = Select(E, where=(Condition("x", Op.EQ, value),))
    printed = to_lql(stmt)
    assert printed.endswith(f"x = {text}")
    assert parse(printed) == stmt


def test_statements_know_their_keyword_and_print_as_lql():
    for text, stmt in CASES:
        assert type(stmt).keyword, type(stmt)
        assert str(stmt) == to_lql(stmt)
    assert parse('USE REMOTE "http://h"').keyword == "USE REMOTE"
    assert parse("SHOW PATCHES").keyword == "SHOW PATCHES"
    assert parse(INS).keyword == "INSERT"
    assert all(cls.keyword for cls in STATEMENT_TYPES)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, modelql.lql; heavy = {'torch', 'numpy', 'transformers', 'rich', 'prompt_toolkit'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_next_tokens_for_completion():
    assert next_tokens("") == STATEMENT_KEYWORDS
    assert next_tokens("  -- comment\n") == STATEMENT_KEYWORDS
    assert next_tokens("DESCRIBE ") == {"STRING"}
    assert {"VERBOSE", "BRIEF", "RAW", "AT", "RELATIONS", "ALL", "SYNTAX", "KNOWLEDGE", "OUTPUT",
            "SEMI", "PIPE", "$END"} == next_tokens('describe "France" verbose')
    assert next_tokens('TRACE "p" POSITIONS') >= {"ALL", "LAST", "SAVE", "$END"}
    assert next_tokens("COMPACT") == {"MINOR", "MAJOR"}
    assert next_tokens("SELECT * FROM EDGES WHERE") >= KEYWORDS | {"IDENT"}
    assert next_tokens("WALK 'p' |>") == STATEMENT_KEYWORDS
    assert next_tokens("DESCRIB") == frozenset()  # not a valid prefix
    assert next_tokens('DESCRIBE "unterminated') == frozenset()
