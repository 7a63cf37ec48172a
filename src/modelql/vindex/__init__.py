"""The vindex: a model's FFN as a queryable key/value store on disk (see specs/vindex-format.md).

    from modelql.vindex import Vindex, extract
    extract("path/to/hf-model", "model.vindex", level="browse", dtype="f16")
    vx = Vindex.load("model.vindex")
    hits = vx.walk(vx.embedding(token_id), k=10)

Names are imported lazily so `import modelql.vindex.cli_commands` (the CLI) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelql._lazy import lazy_exports

_EXPORTS = {
    "Vindex": "vindex", "FeatureMeta": "vindex", "GateHit": "vindex", "WalkHit": "vindex",
    "topk_abs": "vindex", "verify": "vindex",
    "IndexJson": "format", "LayerInfo": "format", "KnnEntry": "format", "read_knn_store": "format",
    "write_knn_store": "format",
    "Bands": "bands", "resolve_bands": "bands",
    "VerifyReport": "checksums",
    "ExtractResult": "extract", "extract": "extract",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .bands import Bands, resolve_bands
    from .checksums import VerifyReport
    from .extract import ExtractResult, extract
    from .format import IndexJson, KnnEntry, LayerInfo, read_knn_store, write_knn_store
    from .vindex import FeatureMeta, GateHit, Vindex, WalkHit, topk_abs, verify


__getattr__ = lazy_exports(__name__, _EXPORTS)
