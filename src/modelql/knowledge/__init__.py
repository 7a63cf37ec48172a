"""The knowledge API: the semantics shared by LQL, HTTP and Python (ARCHITECTURE.md).

Functions take an opened `Vindex` and return typed rows (`knowledge.rows`); they never format
text. `describe` (DESCRIBE), `walk` (WALK / EXPLAIN WALK), `select` (SELECT … FROM EDGES |
FEATURES | ENTITIES, NEAREST TO), `relations` (SHOW RELATIONS), `stats` (STATS), `trace`
(TRACE); labelling in `knowledge.labels`.

Names are imported lazily so `import modelql.knowledge.cli_commands` (the CLI) stays cheap.
`describe` and `trace` are both functions and modules: the package attribute is always the
function (the module is `sys.modules["modelql.knowledge.describe"]`).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from modelql._lazy import lazy_exports

_EXPORTS = {
    # trace (TRACE)
    "Trace": "trace", "TraceRow": "trace", "trace": "trace", "TRACE_FORMAT": "trace",
    # describe
    "describe": "describe", "DescribeError": "modelql.errors", "REFERENCE_THRESHOLD": "describe",
    "DEFAULT_MIN_Z": "describe", "resolve_mode": "describe", "scan_layers": "describe",
    # browse
    "walk": "browse", "select": "browse", "relations": "browse", "stats": "browse", "entities": "browse",
    "features": "browse", "SelectError": "modelql.errors",
    # queries
    "entity_vector": "queries", "walk_vector": "queries", "residual_query": "queries", "model_for": "queries",
    "ResidualQuery": "queries", "DEFAULT_CONTEXTS": "queries",
    # labels
    "FeatureLabels": "labels", "labels_for": "labels", "label_vindex": "labels", "probe_features": "labels",
    "LabelError": "modelql.errors",
    # rows
    "Edge": "rows", "Section": "rows", "DescribeResult": "rows", "WalkRow": "rows", "WalkResult": "rows",
    "Condition": "rows", "FeatureRow": "rows", "EntityRow": "rows", "SelectResult": "rows",
    "ProbeRelationRow": "rows", "RelationRow": "rows", "ClusterRow": "rows", "RelationsResult": "rows",
    "BandStats": "rows", "Stats": "rows",
}
# names that are both a function (exported) and a submodule
_SHADOWED = frozenset({"describe", "trace"})

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from modelql.errors import DescribeError, LabelError, SelectError

    from .browse import entities, features, relations, select, stats, walk
    from .describe import DEFAULT_MIN_Z, REFERENCE_THRESHOLD, describe, resolve_mode, scan_layers
    from .labels import FeatureLabels, label_vindex, labels_for, probe_features
    from .queries import DEFAULT_CONTEXTS, ResidualQuery, entity_vector, model_for, residual_query, walk_vector
    from .rows import (BandStats, ClusterRow, Condition, DescribeResult, Edge, EntityRow, FeatureRow,
                       ProbeRelationRow, RelationRow, RelationsResult, Section, SelectResult, Stats, WalkResult,
                       WalkRow)
    from .trace import TRACE_FORMAT, Trace, TraceRow, trace


__getattr__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """Keeps `knowledge.describe` / `knowledge.trace` the functions when their submodules load
    (the import system would otherwise set the package attribute to the module)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
