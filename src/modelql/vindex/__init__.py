"""The vindex: a model's FFN as a queryable key/value store on disk (see specs/vindex-format.md).

    from modelql.vindex import Vindex, extract
    extract("path/to/hf-model", "model.vindex", level="browse", dtype="f16")
    vx = Vindex.load("model.vindex")
    hits = vx.walk(vx.embedding(token_id), k=10)
"""

from .bands import Bands, resolve_bands
from .checksums import VerifyReport
from .extract import ExtractResult, extract
from .format import IndexJson, KnnEntry, LayerInfo, read_knn_store, write_knn_store
from .vindex import FeatureMeta, GateHit, Vindex, WalkHit, topk_abs, verify

__all__ = [
    "Vindex", "FeatureMeta", "GateHit", "WalkHit", "IndexJson", "LayerInfo", "KnnEntry", "Bands",
    "VerifyReport", "ExtractResult", "extract", "verify", "resolve_bands", "topk_abs",
    "read_knn_store", "write_knn_store",
]
