"""Typed errors, mapped once at each edge.

Every failure a user can cause is a `ModelqlError` subclass with a one-line message that names
the problem. The CLI prints `error: <message>` and exits non-zero, LQL prints `Error: <message>`,
and the server maps `http_status` to a JSON error body. Anything else escaping is a bug.

All the classes live here, grouped by the layer that raises them, so that each edge maps them
without importing the (heavy) module that raises them. Pure standard library: importing this
module costs nothing.
"""

from __future__ import annotations


class ModelqlError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    http_status: int = 400
    code: str = "invalid_request_error"


class ModelNotFoundError(ModelqlError):
    """A model path does not exist or holds no model."""

    http_status = 404
    code = "model_not_found"


class ModelFormatError(ModelqlError):
    """A model's files exist but are malformed (bad config, truncated weights, ...)."""


class UnsupportedModelError(ModelqlError):
    """The model is well-formed but of a family or variant modelql does not run."""


class ChatTemplateError(ModelqlError):
    """A chat template failed to render (it called raise_exception, or is malformed)."""


class InvalidParamsError(ModelqlError):
    """A sampling parameter is out of range; `param` names it (for the HTTP error body)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(ModelqlError):
    """A prompt plus the requested completion does not fit in the context window."""

    code = "context_length_exceeded"


class VindexError(ModelqlError):
    """A vindex directory is missing, malformed, or lacks what an operation needs."""


class CapabilityError(ModelqlError):
    """The operation needs something this backend does not have (e.g. weights for INFER)."""


class CompileError(ModelqlError):
    """COMPILE / DIFF cannot proceed (bad destination, conflicts, missing weights)."""


# -- knowledge queries -------------------------------------------------------------------------


class DescribeError(ModelqlError):
    """A DESCRIBE argument is invalid (unknown mode or band, layer not loaded)."""


class SelectError(ModelqlError):
    """A SELECT has an unknown field, operator or ordering."""


class EmptyPromptError(ModelqlError):
    """A WALK prompt that tokenises to nothing."""


class LabelError(ModelqlError):
    """A triples or templates file is missing or malformed."""


# -- LQL ---------------------------------------------------------------------------------------


class LqlParseError(ModelqlError):
    """An LQL statement failed to parse; the message carries line, column and a caret."""


_DISPLAY_WIDTH = 100  # longer source lines are shown as a window around the error


class LqlSyntaxError(LqlParseError):
    """A statement failed to lex or parse (raised by `modelql.lql.parser`).

    ``str(err)`` is three lines: ``Parse error at line L, column C: <reason>``, the offending
    source line (indented by two spaces), and a caret under the column.
    """

    def __init__(
        self, reason: str, source: str, position: int, *, anchor: tuple[int, int] = (0, 1)
    ) -> None:
        """``anchor``: an offset <= ``position`` and its line number, to count lines from."""
        position = max(0, min(position, len(source)))
        anchor_offset, anchor_line = anchor if anchor[0] <= position else (0, 1)
        line_start = source.rfind("\n", 0, position) + 1
        line_end = source.find("\n", position)
        if line_end < 0:
            line_end = len(source)
        self.reason = reason
        self.position = position
        self.line = anchor_line + source.count("\n", anchor_offset, position)
        self.column = position - line_start + 1
        self.source_line = source[line_start:line_end]
        self.message = f"Parse error at line {self.line}, column {self.column}: {reason}"
        shown, caret = _caret_lines(self.source_line, self.column - 1)
        super().__init__(f"{self.message}\n  {shown}\n  {caret}")

    def __reduce__(self):  # picklable despite the custom __init__
        return (_rebuild_error, (self.__class__, self.args[0], self.__dict__))


def _rebuild_error(cls, text, state):
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.__dict__.update(state)
    return err


def _caret_lines(line: str, col0: int) -> tuple[str, str]:
    """The source line made printable (a window of it if long) and the caret line under col0."""
    prefix = suffix = ""
    start, end = 0, len(line)
    if len(line) > _DISPLAY_WIDTH:
        start = max(0, min(col0 - _DISPLAY_WIDTH // 2, len(line) - _DISPLAY_WIDTH))
        end = start + _DISPLAY_WIDTH
        prefix = "…" if start > 0 else ""
        suffix = "…" if end < len(line) else ""
    window = line[start:end]
    shown = prefix + "".join(_printable(c) for c in window) + suffix
    pad = [" "] * len(prefix)
    for c in window[: max(0, col0 - start)]:
        pad.append("  " if _is_wide(c) else " ")
    return shown, "".join(pad) + "^"


def _printable(c: str) -> str:
    return c if c.isprintable() else " "


def _is_wide(c: str) -> bool:
    import unicodedata

    return c.isprintable() and unicodedata.east_asian_width(c) in ("W", "F")


class NoBackendError(ModelqlError):
    """A statement needs a backend and none is loaded (lql spec §6)."""

    def __init__(self, message: str = 'No backend loaded. Run USE "path.vindex" first.') -> None:
        super().__init__(message)


class LqlExecutionError(ModelqlError):
    """A statement could not be executed (lql spec §6 execution messages)."""


class PatchError(ModelqlError):
    """A patch file is malformed or does not apply to this base."""


class RemoteError(ModelqlError):
    """A remote server (knowledge or FFN shard) failed or answered with an error."""

    http_status = 502
    code = "upstream_error"


class WireError(ModelqlError):
    """A malformed or unservable walk-ffn request or response (the route answers 400 with it)."""

    http_status = 400
    code = "invalid_request_error"


class KnowledgeHTTPError(RemoteError):
    """The server answered with an error status; `status`, `code` and `message` come from its
    JSON error envelope (`code` derived from the status when the envelope has none)."""

    def __init__(self, status: int, code: str, message: str, endpoint: str):
        super().__init__(f"{endpoint} failed ({status}): {message}")
        self.status = status
        self.http_status = status if 400 <= status < 600 else 502
        self.code = code
        self.message = message
        self.endpoint = endpoint


class KnowledgeConnectionError(RemoteError):
    """The server could not be reached (after the retries)."""

    def __init__(self, url: str, cause: BaseException, attempts: int):
        super().__init__(f"failed to connect to {url}: {cause or type(cause).__name__} "
                         f"({attempts} attempt{'s' if attempts != 1 else ''})")
        self.url = url
        self.cause = cause
        self.attempts = attempts
