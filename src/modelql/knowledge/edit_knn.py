"""INSERT MODE KNN: the canonical prompt's FFN input stored as a key (no weights change); the
runtime recalls the fact when a prompt names the entity (`vindex.knn_match`)."""

from __future__ import annotations

import time

import numpy as np

from ..vindex import patch as vlp
from ..vindex.overlay import PatchSession
from .edit_common import EditError, InsertResult, canonical_prompt, capture, install_layer, target_id

KNN_DEFAULT_CONFIDENCE = 1.0


def insert_knn(ps: PatchSession, entity: str, relation: str, target: str, layer: int | None,
                confidence: float | None) -> InsertResult:
    t0 = time.perf_counter()
    vx = ps.view
    l = install_layer(vx, layer)
    tid = target_id(vx, target)
    conf = KNN_DEFAULT_CONFIDENCE if confidence is None else float(confidence)
    if ps.has_weights:
        key = capture(ps.model(), canonical_prompt(relation, entity), [l]).get(l)
        if key is None:
            raise EditError(f"no residual captured at layer {l}")
        source = "residual"
    else:
        from .queries import entity_vector

        key = entity_vector(vx, entity)
        if key is None:
            raise EditError(f"entity {entity!r} has no tokens in this vocabulary")
        source = "embedding"
    op = vlp.InsertKnnOp(l, entity, relation, target, tid, key.numpy().astype(np.float32), conf)
    auto = ps.record([op])
    return InsertResult(entity, relation, target, "knn", l, tid, conf, layers=(l,), key_source=source,
                        knn_total=len(ps.state.knn), auto_patch=auto,
                        latency_ms=(time.perf_counter() - t0) * 1000)

