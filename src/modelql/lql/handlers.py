"""The LQL statement registry: AST class → handler(executor, stmt). Kept apart from the executor
so the handler modules (`lql.editing`) register themselves without importing it."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

from modelql.errors import CapabilityError
from modelql.lql import ast
from modelql.lql.session import Session


class Executing(Protocol):
    """What a handler sees of the executor running it."""

    session: Session


Handler = Callable[[Executing, Any], Any]

#: AST class -> handler(executor, stmt) -> typed value (or a list of values).
HANDLERS: dict[type[ast.Statement], Handler] = {}

#: The spec's optional statements modelql does not implement: they parse, then answer
#: "<KEYWORD> is not available yet".
NOT_YET: frozenset[type[ast.Statement]] = frozenset({
    ast.Rebalance, ast.CompactMinor, ast.CompactMajor, ast.ShowCompactStatus,
})


def not_available(keyword: str) -> CapabilityError:
    return CapabilityError(f"{keyword} is not available yet")


def handles(*classes: type[ast.Statement]):
    def register(fn: Handler) -> Handler:
        for cls in classes:
            HANDLERS[cls] = fn
        return fn

    return register


def knowledge(name: str) -> Callable[..., Any]:
    """``modelql.knowledge.<name>``, imported when a statement first needs it (parsing stays light)."""
    return getattr(importlib.import_module("modelql.knowledge"), name)
