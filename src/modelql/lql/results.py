"""Typed results of the LQL statements that are not knowledge queries.

Knowledge queries return the rows of ``modelql.knowledge.rows`` (``DescribeResult``,
``WalkResult``, ``SelectResult``, ``RelationsResult``, ``Stats``) and TRACE a
``modelql.knowledge.trace.Trace``. The session-level statements (USE, EXTRACT, SHOW LAYERS,
SHOW MODELS, STATS of a model backend, TRACE SAVE) return the small dataclasses below.

The executor wraps every value in an ``Executed(statement, value)`` so that renderers see the
statement's display options (WALK's MODE label, DESCRIBE's verbosity, ...) next to the data.
Nothing here formats text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelql.lql import ast

__all__ = [
    "Executed", "UsedVindex", "UsedModel", "Extracted", "LayerRow", "LayersResult", "ModelRow",
    "ModelsResult", "ModelStats", "TraceSaved",
]


@dataclass(frozen=True)
class Executed:
    """One statement's result: ``value`` is a typed result, ``statement`` the AST it came from."""

    statement: ast.Statement
    value: Any


@dataclass(frozen=True)
class UsedVindex:
    """USE "path" (or the embedded default vindex, ``default=True``)."""

    path: str
    model: str
    num_layers: int
    features: int
    extract_level: str
    relation_types: int = 0  # distinct relation labels (probe + cluster), 0 if none
    probe_confirmed: int = 0  # distinct probe-confirmed relations
    default: bool = False


@dataclass(frozen=True)
class UsedModel:
    """USE MODEL "id|path": a model for dense inference, loaded on first use."""

    model: str
    path: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    weight_bytes: int
    family: str


@dataclass(frozen=True)
class Extracted:
    """EXTRACT MODEL ... INTO ...: the new vindex (then auto-USEd: ``used``)."""

    model: str
    path: str
    level: str
    num_layers: int
    hidden_size: int
    seconds: float
    seconds_down_meta: float
    bytes_written: int
    used: UsedVindex


@dataclass(frozen=True)
class LayerRow:
    """SHOW LAYERS: one loaded layer."""

    layer: int
    features: int
    with_meta: int
    top_token: str  # the most frequent top token of the layer ("" if none)
    top_token_count: int = 0


@dataclass(frozen=True)
class LayersResult:
    rows: tuple[LayerRow, ...]
    num_layers: int


@dataclass(frozen=True)
class ModelRow:
    """SHOW MODELS: one vindex directory."""

    name: str
    path: str
    size_bytes: int
    num_layers: int
    model: str
    extract_level: str
    status: str  # "ready" | "unreadable: <why>"


@dataclass(frozen=True)
class ModelsResult:
    directory: str
    rows: tuple[ModelRow, ...]


@dataclass(frozen=True)
class ModelStats:
    """STATS on a model backend (USE MODEL)."""

    model: UsedModel


@dataclass(frozen=True)
class TraceSaved:
    """TRACE ... SAVE "file": the trace was written (``trace`` is the full ``Trace``)."""

    trace: Any
    path: str
    chains: int  # token positions (chains) written
