"""LQL, the query language of modelql: grammar, AST, parser, printer, batch splitting.

    >>> from modelql.lql import parse, to_lql
    >>> stmt = parse('describe "France" knowledge verbose;')
    >>> stmt
    Describe(entity='France', band=<Band.KNOWLEDGE: 'KNOWLEDGE'>, layer=None, relations_only=False, verbosity=<Verbosity.VERBOSE: 'VERBOSE'>)
    >>> to_lql(stmt)
    'DESCRIBE "France" KNOWLEDGE VERBOSE'

Importing this package loads lark only; the LALR tables are built on the first ``parse``.
"""

from modelql.lql import ast
from modelql.lql.ast import Statement
from modelql.lql.batch import Piece, split_statements, statement_complete
from modelql.lql.parser import (
    CONTEXTUAL_WORDS,
    KEYWORDS,
    STATEMENT_KEYWORDS,
    LqlSyntaxError,
    next_tokens,
    parse,
    parse_pieces,
    parse_script,
)
from modelql.lql.printer import format_value, quote, to_lql

__all__ = [
    "ast",
    "Statement",
    "parse",
    "parse_script",
    "parse_pieces",
    "next_tokens",
    "LqlSyntaxError",
    "to_lql",
    "quote",
    "format_value",
    "Piece",
    "split_statements",
    "statement_complete",
    "KEYWORDS",
    "CONTEXTUAL_WORDS",
    "STATEMENT_KEYWORDS",
]
