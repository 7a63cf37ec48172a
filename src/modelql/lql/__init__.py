"""LQL, the query language of modelql: grammar, AST, parser, printer, batch splitting.

    >>> from modelql.lql import parse, to_lql
    >>> stmt = parse('describe "France" knowledge verbose;')
    >>> stmt
    Describe(entity='France', band=<Band.KNOWLEDGE: 'KNOWLEDGE'>, layer=None, relations_only=False, verbosity=<Verbosity.VERBOSE: 'VERBOSE'>)
    >>> to_lql(stmt)
    'DESCRIBE "France" KNOWLEDGE VERBOSE'

Names are imported lazily, so importing the package (as `modelql --help` does through
`modelql.lql.cli_commands`) loads neither lark nor the AST; the LALR tables are built on the
first ``parse``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelql._lazy import lazy_exports

_EXPORTS = {
    "LqlSyntaxError": "modelql.errors",
    "Statement": "ast",
    "Piece": "batch", "split_statements": "batch", "statement_complete": "batch",
    "CONTEXTUAL_WORDS": "parser", "KEYWORDS": "parser", "STATEMENT_KEYWORDS": "parser",
    "next_tokens": "parser", "parse": "parser", "parse_pieces": "parser", "parse_script": "parser",
    "format_value": "printer", "quote": "printer", "to_lql": "printer",
}

__all__ = ["ast", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from modelql.errors import LqlSyntaxError
    from modelql.lql import ast
    from modelql.lql.ast import Statement
    from modelql.lql.batch import Piece, split_statements, statement_complete
    from modelql.lql.parser import (CONTEXTUAL_WORDS, KEYWORDS, STATEMENT_KEYWORDS, next_tokens, parse,
                                    parse_pieces, parse_script)
    from modelql.lql.printer import format_value, quote, to_lql


__getattr__ = lazy_exports(__name__, _EXPORTS, submodules=("ast",))
