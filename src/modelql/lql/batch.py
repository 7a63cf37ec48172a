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
_UNIT = re.compile(
    r"""
      (?P<str> "(?:[^"\\]|\\[\s\S])*(?:"|\\?\Z)
             | '(?:[^'\\]|\\[\s\S])*(?:'|\\?\Z) )
    | (?P<comment> --[^\n]* )
    | (?P<semi> ; )
    | (?P<ws> [ \t\n\r\f\v]+ )
    | (?P<other> [^"';\s-]+ | - )
    """,
    re.VERBOSE,
)


def _units(script: str):
    pos, n = 0, len(script)
    while pos < n:
        m = _UNIT.match(script, pos)
        if m is None:  # only for characters \s matches beyond ASCII whitespace
            yield "other", pos, pos + 1
            pos += 1
            continue
        yield m.lastgroup, pos, m.end()
        pos = m.end()


def split_statements(script: str) -> list[Piece]:
    """Split ``script`` into statement pieces (see the module docstring)."""
    pieces: list[Piece] = []
    first = -1  # offset of the current piece's first significant unit, -1 if none yet
    line = 1  # line number at `pos`
    line_start = 0
    first_line = first_col = 0
    for kind, start, end in _units(script):
        if kind == "semi":
            if first >= 0:
                pieces.append(Piece(script[first:end], first, first_line, first_col))
            first = -1
        elif kind in ("str", "other") and first < 0:
            first = start
            first_line, first_col = line, start - line_start + 1
        if kind in ("ws", "str") and "\n" in script[start:end]:
            line += script.count("\n", start, end)
            line_start = script.rfind("\n", start, end) + 1
    if first >= 0:
        pieces.append(Piece(script[first:].rstrip(), first, first_line, first_col))
    return pieces


_BARE_STATEMENT = re.compile(r"(?:stats|show[ \t\n\r\f\v]+models)", re.IGNORECASE)


def statement_complete(buffer: str) -> bool:
    """Whether a REPL buffer holds a complete statement (spec §2, REPL).

    True when the buffer, ignoring comments and trailing whitespace, ends with a ``;`` that is
    outside any string, or is exactly ``STATS`` or ``SHOW MODELS`` (which may omit the ``;``).
    """
    significant = [
        (kind, start, end) for kind, start, end in _units(buffer) if kind not in ("ws", "comment")
    ]
    if not significant:
        return False
    kind, start, end = significant[-1]
    if kind == "semi":
        return True
    text = " ".join(buffer[s:e] for k, s, e in significant)
    return all(k == "other" for k, _, _ in significant) and bool(_BARE_STATEMENT.fullmatch(text))
