"""LQL text -> AST.

``parse(text)`` parses exactly one statement, an optional ``;``, optionally ``|>`` and a second
statement (optional ``;``), then end of input (spec §2). ``parse_script(text)`` splits a script
into statements (``batch.split_statements``) and parses each one.

The grammar is ``grammar.lark`` (lark, LALR(1), contextual lexer). The parse tree is never
built: ``_ToAst`` runs as lark's inline transformer and returns ``ast`` dataclasses directly.

Every failure raises ``LqlSyntaxError`` (a ``modelql.errors.LqlParseError``) whose ``str`` is::

    Parse error at line 1, column 10: unterminated string literal
      DESCRIBE "France
               ^

with ``.reason``, ``.line``, ``.column`` (1-based), ``.position`` (0-based character offset)
and ``.source_line``. Nothing else escapes ``parse`` for any ``str`` input.
"""

from __future__ import annotations

import math
import re
import threading
from importlib import resources
from typing import Any, Iterable

import lark
from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from modelql.errors import LqlSyntaxError
from modelql.lql import ast
from modelql.lql.batch import Piece, split_statements

__all__ = [
    "LqlSyntaxError",
    "parse",
    "parse_script",
    "parse_pieces",
    "next_tokens",
    "KEYWORDS",
    "CONTEXTUAL_WORDS",
    "STATEMENT_KEYWORDS",
    "grammar_text",
]


class _Semantic(Exception):
    """Raised inside the transformer: a syntactically valid but invalid construct."""

    def __init__(self, reason: str, position: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.position = position


# ──────────────────────────────────────────────────────────────────────────────────────────
# Vocabulary, read from the grammar file (the single source of truth)
# ──────────────────────────────────────────────────────────────────────────────────────────


def grammar_text() -> str:
    """The text of ``grammar.lark``."""
    return resources.files("modelql.lql").joinpath("grammar.lark").read_text(encoding="utf-8")


def _vocabulary(text: str) -> tuple[frozenset[str], frozenset[str]]:
    words = dict(re.findall(r'^([A-Z_]+): "([a-z_]+)"i\s*$', text, re.M))
    body = re.search(r"^_keyword:(.*?)\n\s*\n", text, re.M | re.S)
    assert body is not None, "grammar.lark: the _keyword rule is missing"
    reserved = frozenset(w.strip() for w in body.group(1).split("|"))
    assert reserved <= words.keys(), reserved - words.keys()
    return reserved, frozenset(words[k].upper() for k in words if k not in reserved)


#: The reserved words of LQL (uppercase), as listed in spec §1.
KEYWORDS: frozenset[str]
#: Words that are keywords only in one position ("vindex", "last", ...), uppercase.
CONTEXTUAL_WORDS: frozenset[str]
KEYWORDS, CONTEXTUAL_WORDS = _vocabulary(grammar_text())

#: The keywords a statement can start with.
STATEMENT_KEYWORDS: frozenset[str] = frozenset(
    "USE EXTRACT COMPILE DIFF WALK INFER SELECT DESCRIBE EXPLAIN INSERT DELETE UPDATE MERGE "
    "REBALANCE COMPACT SHOW STATS BEGIN SAVE APPLY REMOVE TRACE".split()
)


# ──────────────────────────────────────────────────────────────────────────────────────────
# Literals
# ──────────────────────────────────────────────────────────────────────────────────────────

_INT_MAX = 2**63 - 1
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}
_ESCAPE_RE = re.compile(r"\\([\s\S])")


def _unescape(match: re.Match[str]) -> str:
    c = match.group(1)
    return _ESCAPES.get(c, c)


def _string(tok: Token) -> str:
    body = tok.value[1:-1]
    if "\\" in body:
        return _ESCAPE_RE.sub(_unescape, body)
    return body


def _int(tok: Token) -> int:
    text = tok.value
    digits = text.lstrip("0")
    if len(digits) > 19 or (digits and int(digits) > _INT_MAX):
        raise _Semantic(f"invalid integer: {_clip(text)} (larger than {_INT_MAX})", tok.start_pos)
    return int(digits) if digits else 0


def _float(tok: Token) -> float:
    value = float(tok.value)
    if not math.isfinite(value):
        raise _Semantic(f"invalid number: {_clip(tok.value)} (out of range)", tok.start_pos)
    return value


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ──────────────────────────────────────────────────────────────────────────────────────────
# Tree -> AST (lark inline transformer: each method gets a rule's children, tokens included)
# ──────────────────────────────────────────────────────────────────────────────────────────


class _Clause(tuple):
    """(field name, value) produced by an optional clause; folded into statement kwargs."""

    __slots__ = ()


def _clause(name: str, value: Any) -> _Clause:
    return _Clause((name, value))


def _split(children: Iterable[Any]) -> tuple[list[Any], dict[str, Any], list[Token]]:
    """Children -> (positional values, clause kwargs (later wins), tokens)."""
    values: list[Any] = []
    clauses: dict[str, Any] = {}
    tokens: list[Token] = []
    for c in children:
        if isinstance(c, Token):
            tokens.append(c)
        elif type(c) is _Clause:
            clauses[c[0]] = c[1]
        else:
            values.append(c)
    return values, clauses, tokens


def _token_types(tokens: list[Token]) -> set[str]:
    return {t.type for t in tokens}


_MAX_TUPLE_DEPTH = 32


def _depth(value: Any) -> int:
    if type(value) is tuple:
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _statement(cls: type[ast.Statement]):
    """A callback building ``cls(*positional_values, **clauses)``."""

    def build(self, children):
        values, clauses, _ = _split(children)
        return cls(*values, **clauses)

    build.__name__ = cls.__name__
    return build


def _flag(name: str):
    def build(self, children):
        return _clause(name, True)

    return build


def _keyed(name: str):
    """A clause whose value is its one non-token child."""

    def build(self, children):
        values, _, _ = _split(children)
        return _clause(name, values[-1])

    return build


def _const(value: Any):
    def build(self, children):
        return value

    return build


class _ToAst(lark.Transformer):
    # ── literals and shared pieces ──
    def string(self, c):
        return _string(c[0])

    def int(self, c):
        return _int(c[0])

    def number(self, c):
        tok = c[0]
        return float(_int(tok)) if tok.type == "INT" else _float(tok)

    def range(self, c):
        start, end = _int(c[0]), _int(c[2])
        if start > end:
            raise _Semantic(f"invalid range: start ({start}) > end ({end})", c[0].start_pos)
        return ast.Range(start, end)

    def int_value(self, c):
        value = _int(c[-1])
        return -value if len(c) == 2 else value

    def float_value(self, c):
        value = _float(c[-1])
        return -value if len(c) == 2 else value

    def tuple_value(self, c):
        items = tuple(x for x in c if not isinstance(x, Token))
        if _depth(items) > _MAX_TUPLE_DEPTH:
            raise _Semantic(f"value lists nested deeper than {_MAX_TUPLE_DEPTH}", c[0].start_pos)
        return items

    def field(self, c):
        tok = c[0]
        return tok.value if tok.type == "IDENT" else tok.value.lower()

    def op(self, c):
        return ast.Op[c[0].type]

    def condition(self, c):
        return ast.Condition(c[0], c[1], c[2])

    def where(self, c):
        return _clause("where", tuple(x for x in c if not isinstance(x, Token)))

    band_all = _const(ast.Band.ALL)
    band_syntax = _const(ast.Band.SYNTAX)
    band_knowledge = _const(ast.Band.KNOWLEDGE)
    band_output = _const(ast.Band.OUTPUT)
    current = _const(ast.CURRENT)

    def verbosity(self, c):
        return ast.Verbosity[c[0].type]

    # ── clauses shared by several statements ──
    top_clause = _keyed("top")
    layers_clause = _keyed("layers")
    band_clause = _keyed("band")
    at_layer_clause = _keyed("layer")
    verbosity_clause = _keyed("verbosity")
    layer_clause = _keyed("layer")
    limit_clause = _keyed("limit")
    limit = _keyed("limit")
    compare_clause = _flag("compare")
    verbose_clause = _flag("verbose")
    relations_only_clause = _flag("relations_only")

    # ── statement level ──
    def start(self, c):
        stmts = [x for x in c if not isinstance(x, Token)]
        return stmts[0] if len(stmts) == 1 else ast.Pipe(stmts[0], stmts[1])

    # ── lifecycle ──
    use_vindex = _statement(ast.UseVindex)
    use_remote = _statement(ast.UseRemote)

    def use_model(self, c):
        values, _, tokens = _split(c)
        return ast.UseModel(values[0], auto_extract="AUTO_EXTRACT" in _token_types(tokens))

    extract = _statement(ast.Extract)

    def components_clause(self, c):
        return _clause("components", tuple(x for x in c if not isinstance(x, Token)))

    _LEVELS = {
        "INFERENCE": ast.ExtractLevel.INFERENCE,
        "WEIGHTS": ast.ExtractLevel.INFERENCE,
        "ALL": ast.ExtractLevel.ALL,
        "ATTENTION": ast.ExtractLevel.ATTENTION,
    }

    def level_clause(self, c):
        return _clause("level", self._LEVELS[c[-1].type])

    def component(self, c):
        tok = c[0]
        if tok.type == "IDENT":
            raise _Semantic(f"unknown component: {_clip(tok.value)}", tok.start_pos)
        return ast.Component[tok.type]

    def compile(self, c):
        values, clauses, tokens = _split(c)
        types = _token_types(tokens)
        target = ast.CompileTarget.MODEL if "MODEL" in types else ast.CompileTarget.VINDEX
        fmt = None
        if "SAFETENSORS" in types:
            fmt = ast.OutputFormat.SAFETENSORS
        elif "GGUF" in types:
            fmt = ast.OutputFormat.GGUF
        conflict = clauses.get("on_conflict")
        if conflict is not None:
            strategy, position = conflict
            if target is not ast.CompileTarget.VINDEX:
                raise _Semantic("ON CONFLICT is only valid for COMPILE INTO VINDEX", position)
            conflict = strategy
        return ast.Compile(values[0], target, values[1], format=fmt, on_conflict=conflict)

    def compile_conflict(self, c):
        return _clause("on_conflict", (ast.CompileConflict[c[-1].type], c[0].start_pos))

    def diff(self, c):
        values, clauses, _ = _split(c)
        into = values[2] if len(values) > 2 else None
        return ast.Diff(values[0], values[1], into_patch=into, **clauses)

    relation_clause = _keyed("relation")
    stats = _statement(ast.Stats)

    # ── queries ──
    walk = _statement(ast.Walk)

    def layers_all_clause(self, c):
        return _clause("layers", None)

    def walk_mode_clause(self, c):
        return _clause("mode", ast.WalkMode[c[-1].type])

    infer = _statement(ast.Infer)

    def select(self, c):
        _, clauses, tokens = _split(c)
        source = next(
            ast.SelectSource[t.type] for t in tokens if t.type in ("EDGES", "FEATURES", "ENTITIES")
        )
        return ast.Select(source, **clauses)

    def select_fields(self, c):
        return _clause("fields", tuple(x for x in c if not isinstance(x, Token)))

    def nearest(self, c):
        values, _, _ = _split(c)
        return _clause("nearest", ast.Nearest(values[0], values[1]))

    def order_by(self, c):  # ORDER BY field [ASC | DESC]
        descending = isinstance(c[-1], Token) and c[-1].type == "DESC"
        return _clause("order_by", ast.OrderBy(c[2], descending=descending))

    describe = _statement(ast.Describe)
    explain_walk = _statement(ast.ExplainWalk)
    explain_infer = _statement(ast.ExplainInfer)
    with_attention_clause = _flag("with_attention")

    trace = _statement(ast.Trace)
    for_clause = _keyed("answer")
    decompose_clause = _flag("decompose")
    save_clause = _keyed("save")

    def positions_clause(self, c):
        all_ = len(c) == 2 and c[1].type == "ALL"
        return _clause("positions", ast.Positions.ALL if all_ else ast.Positions.LAST)

    # ── mutations ──
    def insert(self, c):
        values, clauses, _ = _split(c)
        return ast.Insert(tuple(values), **clauses)

    def fact(self, c):
        return ast.Fact(*_split(c)[0])

    confidence_clause = _keyed("confidence")
    alpha_clause = _keyed("alpha")

    def insert_mode_clause(self, c):
        return _clause("mode", ast.InsertMode[c[-1].type])

    delete = _statement(ast.Delete)

    def update(self, c):
        values, clauses, _ = _split(c)
        return ast.Update(tuple(values), clauses["where"])

    def assignment(self, c):
        return ast.Assignment(c[0], c[2])

    merge = _statement(ast.Merge)

    def merge_conflict(self, c):
        return _clause("on_conflict", ast.MergeConflict[c[-1].type])

    rebalance = _statement(ast.Rebalance)
    until_converged_clause = _flag("until_converged")
    max_clause = _keyed("max_iterations")
    floor_clause = _keyed("floor")
    ceiling_clause = _keyed("ceiling")

    compact_minor = _const(ast.CompactMinor())

    def compact_major(self, c):
        values, _, tokens = _split(c)
        full = bool(_token_types(tokens) & {"ALL", "FULL"})
        return ast.CompactMajor(full=full, lambda_=values[0] if values else None)

    # ── introspection ──
    show_relations = _statement(ast.ShowRelations)
    with_examples_clause = _flag("with_examples")
    show_layers = _statement(ast.ShowLayers)
    show_features = _statement(ast.ShowFeatures)
    show_entities = _statement(ast.ShowEntities)
    show_models = _const(ast.ShowModels())
    show_patches = _const(ast.ShowPatches())
    show_compact_status = _const(ast.ShowCompactStatus())

    # ── patches ──
    begin_patch = _statement(ast.BeginPatch)
    save_patch = _statement(ast.SavePatch)
    apply_patch = _statement(ast.ApplyPatch)
    remove_patch = _statement(ast.RemovePatch)


# ──────────────────────────────────────────────────────────────────────────────────────────
# The lark parser (built on first use)
# ──────────────────────────────────────────────────────────────────────────────────────────


class _AlwaysAccept:
    """Post-lexer whose only job is to make the contextual lexer always try these terminals.

    With IDENT always in play, a word is lexed whole (``VERBOSELY`` is one identifier, not
    ``VERBOSE`` + ``LY``) and a keyword out of place is still recognised as that keyword;
    with INT/FLOAT/DOT, ``TOP 5.5`` reports the number 5.5 instead of splitting it.
    """

    always_accept = ("IDENT", "INT", "FLOAT", "DOT")

    def process(self, stream):
        return stream


_lock = threading.Lock()
_parser: lark.Lark | None = None


def _get_parser() -> lark.Lark:
    global _parser
    if _parser is None:
        with _lock:
            if _parser is None:
                _parser = lark.Lark(
                    grammar_text(),
                    parser="lalr",
                    lexer="contextual",
                    postlex=_AlwaysAccept(),
                    transformer=_ToAst(),
                    maybe_placeholders=False,
                    g_regex_flags=re.ASCII,  # keyword case-folding stays ASCII ("ſelect" is no SELECT)
                )
    return _parser


# ──────────────────────────────────────────────────────────────────────────────────────────
# Public API
# ──────────────────────────────────────────────────────────────────────────────────────────


def parse(text: str) -> ast.Statement:
    """Parse one statement (optionally ``;``-terminated, optionally ``A |> B``).

    Raises ``LqlSyntaxError`` (an ``LqlParseError``) on any lexical or syntax error.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse() takes a str, not {type(text).__name__}")
    return _parse(text, text, 0)


def parse_pieces(script: str) -> list[tuple[Piece, ast.Statement | LqlSyntaxError]]:
    """Split a script (spec §2 batch rules) and parse every piece.

    Returns ``(piece, statement)`` or ``(piece, error)`` per piece, in order, so that a batch
    runner can execute the good statements and report ``Error: ...`` for the bad ones. Error
    positions (line, column, caret) refer to the whole script.
    """
    if not isinstance(script, str):
        raise TypeError(f"parse_pieces() takes a str, not {type(script).__name__}")
    out: list[tuple[Piece, ast.Statement | LqlSyntaxError]] = []
    for piece in split_statements(script):
        try:
            out.append((piece, _parse(piece.text, script, piece.start, piece.line)))
        except LqlSyntaxError as err:
            out.append((piece, err))
    return out


def parse_script(script: str) -> list[ast.Statement]:
    """Parse every statement of a script; raises the first piece's ``LqlSyntaxError``."""
    statements = []
    for _piece, result in parse_pieces(script):
        if isinstance(result, LqlSyntaxError):
            raise result
        statements.append(result)
    return statements


def next_tokens(prefix: str) -> frozenset[str]:
    """The terminals the grammar accepts after ``prefix`` (for REPL completion).

    Names are keywords and contextual words in upper case (``"VERBOSE"``, ``"LAST"``), and
    ``"STRING"``, ``"INT"``, ``"FLOAT"``, ``"IDENT"``, ``"$END"`` and punctuation names
    (``"SEMI"``, ``"PIPE"``, ``"LPAR"``, ...). Pass the text *before* the word being typed.
    Empty if ``prefix`` is not the beginning of a valid statement.
    """
    try:
        interactive = _get_parser().parse_interactive(prefix)
        interactive.exhaust_lexer()
        return frozenset(interactive.accepts())
    except (UnexpectedInput, _Semantic):
        return frozenset()


def _parse(text: str, source: str, offset: int, line: int = 1) -> ast.Statement:
    """Parse ``text``, which sits at ``offset`` (on line ``line``) of ``source``."""
    try:
        return _get_parser().parse(text)
    except UnexpectedCharacters as err:
        reason, position = _lexical_reason(err.char), err.pos_in_stream
    except UnexpectedToken as err:
        reason, position = _syntax_reason(err)
    except _Semantic as err:
        reason, position = err.reason, err.position
    except UnexpectedInput as err:  # pragma: no cover - other lark errors (none expected with LALR)
        reason, position = "unexpected input", getattr(err, "pos_in_stream", None) or len(text)
    raise LqlSyntaxError(reason, source, offset + position, anchor=(offset, line))


# ──────────────────────────────────────────────────────────────────────────────────────────
# Error messages (spec §6 phrases where the spec has one)
# ──────────────────────────────────────────────────────────────────────────────────────────


def _lexical_reason(char: str) -> str:
    if char in "\"'":
        return "unterminated string literal"
    if char == "|":
        return "expected '>' after '|'"
    if char == "!":
        return "expected '=' after '!'"
    return f"unexpected character {_quote_char(char)}"


def _quote_char(c: str) -> str:
    if c.isprintable():
        return f"'{c}'"
    return "'" + c.encode("unicode_escape").decode("ascii") + "'"


_PUNCTUATION = {
    "STAR": "*", "COMMA": ",", "SEMI": ";", "LPAR": "(", "RPAR": ")", "DOT": ".", "EQ": "=",
    "NE": "!=", "GE": ">=", "LE": "<=", "GT": ">", "LT": "<", "PIPE": "|>", "DASH": "-",
}


def _render_token(tok: Token) -> str:
    """Spec §6 token rendering: keyword WALK, identifier foo, string "x", integer 5, ..."""
    kind = tok.type
    if kind == "$END":
        return "end of input"
    if kind == "STRING":
        from modelql.lql.printer import quote

        return f"string {_clip(quote(_string(tok)))}"
    if kind == "INT":
        return f"integer {_clip(tok.value)}"
    if kind == "FLOAT":
        return f"number {_clip(tok.value)}"
    if kind in _PUNCTUATION:
        return f"'{tok.value}'"
    if kind == "IDENT" and tok.value.upper() in KEYWORDS:  # a keyword the contextual lexer
        return f"keyword {tok.value.upper()}"  # did not expect here
    if kind in KEYWORDS:
        return f"keyword {kind}"
    return f"identifier {_clip(tok.value)}"


def _render_expected(name: str) -> str:
    if name in _PUNCTUATION:
        return f"'{_PUNCTUATION[name]}'"
    if name in CONTEXTUAL_WORDS:
        return f"'{name.lower()}'"
    return {
        "STRING": "string literal", "INT": "integer", "FLOAT": "number",
        "IDENT": "identifier", "$END": "end of input",
    }.get(name, name)


def _one_of(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} or {items[1]}"
    return ", ".join(items[:-1]) + f", or {items[-1]}"


_VALUE_START = {"STRING", "INT", "FLOAT", "DASH", "LPAR"}
_OPS = {"EQ", "NE", "GT", "LT", "GE", "LE", "LIKE", "IN"}
_COMPONENTS = {"FFN_GATE", "FFN_DOWN", "FFN_UP", "EMBEDDINGS", "ATTN_OV", "ATTN_QK"}
_SHOW = ["RELATIONS", "LAYERS", "FEATURES", "ENTITIES", "MODELS", "PATCHES", "COMPACT"]

#: (terminals that must all be acceptable, phrase after "expected "), first match wins.
_PHRASES: list[tuple[frozenset[str], str]] = [
    (frozenset({"IDENT"}) | KEYWORDS, "field name"),
    (STATEMENT_KEYWORDS, "statement keyword"),
    (frozenset(_VALUE_START), "value"),
    (frozenset(_OPS), "comparison operator"),
    (frozenset(_COMPONENTS), "component name (" + ", ".join(sorted(_COMPONENTS)) + ")"),
    (frozenset(_SHOW), _one_of(_SHOW) + " after SHOW"),
    (frozenset({"HYBRID", "PURE", "DENSE"}), "HYBRID, PURE, or DENSE"),
    (frozenset({"KNN", "COMPOSE"}), "KNN or COMPOSE after MODE"),
    (frozenset({"LAST_WINS", "HIGHEST_CONFIDENCE", "FAIL"}),
     "LAST_WINS | HIGHEST_CONFIDENCE | FAIL after ON CONFLICT"),
    (frozenset({"KEEP_SOURCE", "KEEP_TARGET", "HIGHEST_CONFIDENCE"}),
     "KEEP_SOURCE, KEEP_TARGET, or HIGHEST_CONFIDENCE after ON CONFLICT"),
    (frozenset({"MINOR", "MAJOR"}), "MINOR or MAJOR after COMPACT"),
    (frozenset({"INFERENCE", "ALL", "WEIGHTS", "ATTENTION"}),
     "INFERENCE, ALL, WEIGHTS, or ATTENTION after WITH"),
    (frozenset({"SAFETENSORS", "GGUF"}), "SAFETENSORS or GGUF"),
    (frozenset({"MODEL", "VINDEX"}), "MODEL or VINDEX"),
    (frozenset({"STRING", "CURRENT"}), "string literal or CURRENT"),
    (frozenset({"INT", "FLOAT"}), "number"),
]
_EXACT: dict[frozenset[str], str] = {
    frozenset({"STRING"}): "string literal",
    frozenset({"INT"}): "positive integer",
    frozenset({"INT", "ALL"}): "layer range or ALL",
    frozenset({"ENTITY"}): "'entity'",
    frozenset({"RELATION"}): "'relation'",
    frozenset({"TARGET"}): "'target'",
}


def _expected_phrase(expected: set[str]) -> str:
    key = frozenset(expected)
    if key in _EXACT:
        return _EXACT[key]
    for required, phrase in _PHRASES:
        if required <= key:
            return phrase
    names = sorted(expected, key=lambda n: (n in _PUNCTUATION or n == "$END", n))
    return _one_of([_render_expected(n) for n in names])


def _suggestion(tok: Token, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for a misspelt word, else ``""``."""
    if tok.type != "IDENT" or tok.value.upper() in KEYWORDS:
        return ""
    import difflib

    words = sorted(c for c in candidates if c in KEYWORDS or c in CONTEXTUAL_WORDS)
    match = difflib.get_close_matches(tok.value.upper(), words, n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def _syntax_reason(err: UnexpectedToken) -> tuple[str, int]:
    tok = err.token
    if tok.type == "$END":
        position = tok.end_pos if tok.end_pos is not None else 0
    else:
        position = tok.start_pos or 0
    expected = set(err.expected)
    if err.interactive_parser is not None:
        # LALR reports the lookaheads of the state it stopped in, which after a shared rule
        # (string, int, field, ...) is the union over all contexts; ask the parser instead.
        try:
            expected = set(err.interactive_parser.accepts()) or expected
        except Exception:  # pragma: no cover - accepts() is best effort
            pass
    if "$END" in expected and tok.type != "$END":
        return f"unexpected trailing token: {_render_token(tok)}" + _suggestion(tok, expected), position
    expected.discard("$END")
    phrase = _expected_phrase(expected)
    return f"expected {phrase}, got {_render_token(tok)}" + _suggestion(tok, expected), position
