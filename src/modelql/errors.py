"""Typed errors, mapped once at each edge.

Every failure a user can cause is a `ModelqlError` subclass with a one-line message that names
the problem. The CLI prints `error: <message>` and exits non-zero, LQL prints `Error: <message>`,
and the server maps `http_status` to a JSON error body. Anything else escaping is a bug.
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


class ContextLengthError(ModelqlError):
    """A prompt plus the requested completion does not fit in the context window."""

    code = "context_length_exceeded"


class VindexError(ModelqlError):
    """A vindex directory is missing, malformed, or lacks what an operation needs."""


class CapabilityError(ModelqlError):
    """The operation needs something this backend does not have (e.g. weights for INFER)."""


class LqlParseError(ModelqlError):
    """An LQL statement failed to parse; the message carries line, column and a caret."""


class PatchError(ModelqlError):
    """A patch file is malformed or does not apply to this base."""


class RemoteError(ModelqlError):
    """A remote server (knowledge or FFN shard) failed or answered with an error."""

    http_status = 502
    code = "upstream_error"
