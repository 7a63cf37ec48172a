"""Splitting an LQL script into statements (spec §2, batch mode).

A script is split on ``;`` characters that are outside quotes and outside ``--`` comments
(quote tracking honours backslash escapes). The ``;`` stays with its statement; pieces that
hold nothing but whitespace and comments are dropped. Splitting never fails: an unterminated
string simply runs to the end of the script, and parsing that piece reports it.

This module does no parsing and imports nothing heavy (the REPL uses ``statement_complete``
on every keystroke).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Piece", "split_statements", "statement_complete"]


@dataclass(frozen=True, slots=True)
class Piece:
    """One statement's text within a script.

    ``text`` runs from the statement's first token to its ``;`` (inclusive) or, for the last
    statement, to the end of the script; ``start`` is the offset of ``text[0]`` in the script
    and ``line``/``column`` (1-based) its position.
    """

    text: str
    start: int
    line: int
    column: int


# Lexical units that matter for splitting. Strings and comments are matched whole so that
# quotes, `;` and `--` inside them are inert. An unterminated string runs to the end.
_STRING = r"""
    "(?:[^"\\]|\\[\s\S])*(?:"|\\?\Z)
  | '(?:[^'\\]|\\[\s\S])*(?:'|\\?\Z)
"""
# What the splitter must look at: strings, comments and semicolons (everything else is inert).
_SPECIAL = re.compile(rf"{_STRING} | --[^\n]* | ;", re.VERBOSE)
_NON_BLANK = re.compile(r"[^ \t\n\r\f]")
# Every unit, for the REPL's completeness check.
_UNIT = re.compile(
    rf"""
      (?P<str> {_STRING} )
    | (?P<comment> --[^\n]* )
    | (?P<semi> ; )
    | (?P<ws> [ \t\n\r\f]+ )
    | (?P<other> [^"';\s-]+ | [\s\S] )
    """,
    re.VERBOSE,
)


def split_statements(script: str) -> list[Piece]:
    """Split ``script`` into statement pieces (see the module docstring)."""
    pieces: list[Piece] = []
    first = -1  # offset of the current piece's first significant character, -1 if none yet
    pos = 0  # end of the last special unit
    line, counted = 1, 0  # line number at offset `counted`

    def add(start: int, end: int) -> None:
        nonlocal line, counted
        line += script.count("\n", counted, start)
        counted = start
        column = start - (script.rfind("\n", 0, start) + 1) + 1
        text = script[start:end]
        pieces.append(Piece(text if end < len(script) else text.rstrip(), start, line, column))

    for m in _SPECIAL.finditer(script):
        start = m.start()
        if first < 0 and start > pos:
            blank = _NON_BLANK.search(script, pos, start)
            if blank:
                first = blank.start()
        char = script[start]
        if char == ";":
            if first >= 0:
                add(first, m.end())
            first = -1
        elif char != "-" and first < 0:  # a string starts the statement
            first = start
        pos = m.end()
    if first < 0:
        blank = _NON_BLANK.search(script, pos)
        first = blank.start() if blank else -1
    if first >= 0:
        add(first, len(script))
    return pieces


_BARE_STATEMENT = re.compile(r"(?:stats|show[ \t\n\r\f]+models)", re.IGNORECASE)


def statement_complete(buffer: str) -> bool:
    """Whether a REPL buffer holds a complete statement (spec §2, REPL).

    True when the buffer, ignoring comments and trailing whitespace, ends with a ``;`` that is
    outside any string, or is exactly ``STATS`` or ``SHOW MODELS`` (which may omit the ``;``).
    """
    significant = [
        (m.lastgroup, m.start(), m.end())
        for m in _UNIT.finditer(buffer)
        if m.lastgroup not in ("ws", "comment")
    ]
    if not significant:
        return False
    kind, start, end = significant[-1]
    if kind == "semi":
        return True
    text = " ".join(buffer[s:e] for k, s, e in significant)
    return all(k == "other" for k, _, _ in significant) and bool(_BARE_STATEMENT.fullmatch(text))
